//! The hmm-tests port on the vfio-user backend: the emulated MXA-1 runs in another process (this
//! test binary re-executed in server mode, serving one connection with
//! `firmware_stubs::vfio_user_server`), driver buffers reach it by fd and the test's memory
//! through DMA_READ/DMA_WRITE served by the driver. Same cases as `hmm_conformance.rs`.
mod hmm;

use std::sync::Arc;

use driver::fault::ServiceMode;
use driver::runtime::Runtime;

fn open(mode: ServiceMode) -> Arc<Runtime> {
    hmm::vfio_user::open(mode, "device_server_mode")
}

/// Server mode (does nothing unless started by `open`): serve one client, then exit.
#[test]
fn device_server_mode() {
    hmm::vfio_user::serve_if_server_mode();
}

mod interrupt {
    use super::*;
    hmm_suite!(|| open(ServiceMode::Interrupt));
}

mod polling {
    use super::*;
    hmm_suite!(|| open(ServiceMode::Polling));
}
