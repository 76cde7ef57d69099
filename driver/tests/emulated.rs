//! The integration suite on the in-process emulator, in both service modes.
mod suite;

use std::sync::Arc;

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

fn open(mode: ServiceMode) -> Arc<Runtime> {
    let options = RuntimeOptions {
        mode,
        ..Default::default()
    };
    Runtime::open(DeviceSpec::emulated(), options).expect("open the emulated device")
}

mod interrupt {
    use super::*;
    backend_suite!(|| open(ServiceMode::Interrupt));
}

mod polling {
    use super::*;
    backend_suite!(|| open(ServiceMode::Polling));
}
