//! The hmm-tests port (`tools/testing/selftests/mm/hmm-tests.c`) on the in-process MXA-1
//! emulator, in both fault-service modes. A later backend (vfio-user) is one more module with its
//! own `open` function; see docs/conformance.md for the case-by-case table.
mod hmm;

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
    hmm_suite!(|| open(ServiceMode::Interrupt));
}

mod polling {
    use super::*;
    hmm_suite!(|| open(ServiceMode::Polling));
}
