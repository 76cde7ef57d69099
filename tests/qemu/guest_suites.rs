//! The driver's integration suite and the hmm-tests port, on MXA-1 bound to the kernel's
//! vfio-pci inside the QEMU guest (`tests/qemu/mxa-run.sh`), in both fault-service modes. Every
//! case opens its own runtime on the guest's device and ends with the pin check: nothing holds
//! the runtime, and VmLck is back at zero once it is dropped.
//!
//! Built with `test = false`: on the host there is no such device (the cases would fail saying
//! so); the guest runner builds and runs it.

#[path = "../../driver/tests/suite/mod.rs"]
mod suite;

#[path = "../tests/hmm/mod.rs"]
mod hmm;

use driver::fault::ServiceMode;
use integration_tests::guest;

/// `$suite` instantiated in both fault-service modes, every case on the guest's device and
/// ending with the pin check.
macro_rules! in_both_modes {
    ($suite:ident) => {
        mod interrupt {
            use super::*;
            $suite!(
                || guest::open(ServiceMode::Interrupt),
                after = guest::pins_released
            );
        }
        mod polling {
            use super::*;
            $suite!(
                || guest::open(ServiceMode::Polling),
                after = guest::pins_released
            );
        }
    };
}

mod driver_suite {
    use super::*;
    in_both_modes!(backend_suite);
}

mod hmm_port {
    use super::*;
    in_both_modes!(hmm_suite);
}
