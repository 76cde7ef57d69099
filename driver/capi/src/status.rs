//! Status codes, and how a driver error becomes one (with its message for `mdrv_last_error`).

use driver::fault::CancelReason;
use driver::{DaemonErrorCode, Error};

/// What every `mdrv_*` call that can fail returns (as an `int`). 0 is success, 1 is "not yet"
/// (`mdrv_poll`, `mdrv_wait_for`), every error is negative. After an error,
/// `mdrv_last_error()` on the same thread says what failed, with the values involved and what
/// changes them. New codes may be added in later ABI versions (an unknown negative code is an
/// error all the same); a code's meaning never changes.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum mdrv_status {
    /// Success.
    MDRV_OK = 0,
    /// The command has not completed yet; its ticket stays in flight and the device may still
    /// access its memory (`mdrv_poll`, `mdrv_wait_for`). Not an error.
    MDRV_PENDING = 1,
    /// An argument is unusable: an options or statistics struct whose `size` is too small, an
    /// unknown device kind, a zero length, unknown flag bits.
    MDRV_ERR_INVALID_ARGUMENT = -1,
    /// A pointer argument that must not be NULL is NULL (an out-parameter, a buffer address).
    MDRV_ERR_NULL_POINTER = -2,
    /// An address is not aligned as the call needs: the atomic add's target (8 bytes), the
    /// strict wrappers' and arenas' ranges (4096 bytes).
    MDRV_ERR_UNALIGNED = -3,
    /// An address range leaves the 47-bit user address space, or wraps around.
    MDRV_ERR_OUT_OF_RANGE = -4,
    /// The handle is not a live handle of the expected kind: never returned by this library, of
    /// the other kind (a context passed as a device), or destroyed already.
    MDRV_ERR_BAD_HANDLE = -5,
    /// The ticket is not in flight on this context: collected already (by a wait or poll that
    /// returned anything but `MDRV_PENDING`), from another context, or never issued.
    MDRV_ERR_BAD_TICKET = -6,
    /// Busy: the device still has contexts (`mdrv_device_close`), another thread is waiting
    /// for the same ticket, or the command queue stayed full for the whole timeout.
    MDRV_ERR_BUSY = -7,
    /// A timeout passed: `mdrv_wait`'s (the device's `timeout_ms`; the command's memory was
    /// taken away from the device before it returned), or a settle's.
    MDRV_ERR_TIMEOUT = -8,
    /// The device touched an address with no CPU mapping (never mapped, unmapped, PROT_NONE):
    /// the command was cancelled there, having written nothing at or after that page.
    MDRV_ERR_NO_MAPPING = -9,
    /// The CPU mapping does not allow the access (a device write to read-only memory).
    MDRV_ERR_PERMISSION = -10,
    /// The command was cancelled for another reason (memory revoked after a timed-out wait,
    /// unreachable through the daemon, DMA mapping failed, ...): the message says which.
    MDRV_ERR_CANCELLED = -11,
    /// The device completed the command with a failure status (the message names it).
    MDRV_ERR_COMMAND_FAILED = -12,
    /// A command longer than the device's maximum transfer; split it.
    MDRV_ERR_TOO_LONG = -13,
    /// A limit or quota would be exceeded (mapped bytes, device address spaces, the daemon's
    /// quotas): the message names it, its value and what raises it.
    MDRV_ERR_LIMIT = -14,
    /// The device is gone for good (its vfio-user server died, the daemon lost it): nothing in
    /// flight completes and nothing runs any more; open it again once it is back.
    MDRV_ERR_DEVICE_LOST = -15,
    /// The device could not be opened or brought up, or it failed (the message says how).
    MDRV_ERR_DEVICE = -16,
    /// An operating-system call failed (the message names it and its errno).
    MDRV_ERR_OS = -17,
    /// The daemon refused the request or the connection to it broke.
    MDRV_ERR_DAEMON = -18,
    /// Not available for this kind of device or context (for example `mdrv_munmap` on a
    /// daemon context), or not built into this library.
    MDRV_ERR_UNSUPPORTED = -19,
    /// An internal error of the library (a Rust panic, caught before it reached the caller).
    /// The handles involved are still valid; please report the message.
    MDRV_ERR_PANIC = -20,
}

impl mdrv_status {
    // Every code, for `mdrv_status_name` and its test (not exported to the header).
    pub(crate) const ALL: [mdrv_status; 22] = [
        mdrv_status::MDRV_OK,
        mdrv_status::MDRV_PENDING,
        mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
        mdrv_status::MDRV_ERR_NULL_POINTER,
        mdrv_status::MDRV_ERR_UNALIGNED,
        mdrv_status::MDRV_ERR_OUT_OF_RANGE,
        mdrv_status::MDRV_ERR_BAD_HANDLE,
        mdrv_status::MDRV_ERR_BAD_TICKET,
        mdrv_status::MDRV_ERR_BUSY,
        mdrv_status::MDRV_ERR_TIMEOUT,
        mdrv_status::MDRV_ERR_NO_MAPPING,
        mdrv_status::MDRV_ERR_PERMISSION,
        mdrv_status::MDRV_ERR_CANCELLED,
        mdrv_status::MDRV_ERR_COMMAND_FAILED,
        mdrv_status::MDRV_ERR_TOO_LONG,
        mdrv_status::MDRV_ERR_LIMIT,
        mdrv_status::MDRV_ERR_DEVICE_LOST,
        mdrv_status::MDRV_ERR_DEVICE,
        mdrv_status::MDRV_ERR_OS,
        mdrv_status::MDRV_ERR_DAEMON,
        mdrv_status::MDRV_ERR_UNSUPPORTED,
        mdrv_status::MDRV_ERR_PANIC,
    ];

    /// The code's name as the header spells it.
    pub fn name(self) -> &'static std::ffi::CStr {
        use mdrv_status::*;
        match self {
            MDRV_OK => c"MDRV_OK",
            MDRV_PENDING => c"MDRV_PENDING",
            MDRV_ERR_INVALID_ARGUMENT => c"MDRV_ERR_INVALID_ARGUMENT",
            MDRV_ERR_NULL_POINTER => c"MDRV_ERR_NULL_POINTER",
            MDRV_ERR_UNALIGNED => c"MDRV_ERR_UNALIGNED",
            MDRV_ERR_OUT_OF_RANGE => c"MDRV_ERR_OUT_OF_RANGE",
            MDRV_ERR_BAD_HANDLE => c"MDRV_ERR_BAD_HANDLE",
            MDRV_ERR_BAD_TICKET => c"MDRV_ERR_BAD_TICKET",
            MDRV_ERR_BUSY => c"MDRV_ERR_BUSY",
            MDRV_ERR_TIMEOUT => c"MDRV_ERR_TIMEOUT",
            MDRV_ERR_NO_MAPPING => c"MDRV_ERR_NO_MAPPING",
            MDRV_ERR_PERMISSION => c"MDRV_ERR_PERMISSION",
            MDRV_ERR_CANCELLED => c"MDRV_ERR_CANCELLED",
            MDRV_ERR_COMMAND_FAILED => c"MDRV_ERR_COMMAND_FAILED",
            MDRV_ERR_TOO_LONG => c"MDRV_ERR_TOO_LONG",
            MDRV_ERR_LIMIT => c"MDRV_ERR_LIMIT",
            MDRV_ERR_DEVICE_LOST => c"MDRV_ERR_DEVICE_LOST",
            MDRV_ERR_DEVICE => c"MDRV_ERR_DEVICE",
            MDRV_ERR_OS => c"MDRV_ERR_OS",
            MDRV_ERR_DAEMON => c"MDRV_ERR_DAEMON",
            MDRV_ERR_UNSUPPORTED => c"MDRV_ERR_UNSUPPORTED",
            MDRV_ERR_PANIC => c"MDRV_ERR_PANIC",
        }
    }
}

/// A failed call: its code and the message `mdrv_last_error` returns.
#[derive(Debug)]
pub struct Failure {
    /// The code returned.
    pub status: mdrv_status,
    /// What failed, with the values involved.
    pub message: String,
}

/// What an entry point's body returns.
pub type Outcome<T> = Result<T, Failure>;

impl Failure {
    /// A failure with `status` and `message`.
    pub fn new(status: mdrv_status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::new(status_of(&e), e.to_string())
    }
}

impl From<mirror::Error> for Failure {
    fn from(e: mirror::Error) -> Failure {
        Failure::new(mirror_status(&e), e.to_string())
    }
}

/// The code of a driver error.
pub fn status_of(e: &Error) -> mdrv_status {
    use mdrv_status::*;
    match e {
        Error::Backend(_)
        | Error::DmaBuffer(_)
        | Error::Iova(_)
        | Error::PageTable(_)
        | Error::WrongDevice { .. }
        | Error::DeviceError { .. }
        | Error::IdentityUnavailable { .. } => MDRV_ERR_DEVICE,
        Error::Os { .. } => MDRV_ERR_OS,
        Error::Unsupported(_) => MDRV_ERR_UNSUPPORTED,
        Error::QueueFull { .. } => MDRV_ERR_BUSY,
        Error::Timeout(_) => MDRV_ERR_TIMEOUT,
        Error::Mirror(m) => mirror_status(m),
        Error::NoFreeAddressSpace { .. } | Error::QuotaExceeded { .. } => MDRV_ERR_LIMIT,
        Error::InvalidArgument(_) | Error::Arena(_) => MDRV_ERR_INVALID_ARGUMENT,
        Error::Cancelled { reason } => match reason {
            CancelReason::NoMapping => MDRV_ERR_NO_MAPPING,
            CancelReason::Permission => MDRV_ERR_PERMISSION,
            CancelReason::Quota => MDRV_ERR_LIMIT,
            _ => MDRV_ERR_CANCELLED,
        },
        Error::CommandTooLong { .. } => MDRV_ERR_TOO_LONG,
        Error::Daemon { code, .. } => match code {
            DaemonErrorCode::Limit | DaemonErrorCode::TooLarge => MDRV_ERR_LIMIT,
            DaemonErrorCode::InvalidArgument => MDRV_ERR_INVALID_ARGUMENT,
            DaemonErrorCode::DeviceLost => MDRV_ERR_DEVICE_LOST,
            DaemonErrorCode::Device => MDRV_ERR_DEVICE,
            _ => MDRV_ERR_DAEMON,
        },
        Error::DaemonConnection(_) => MDRV_ERR_DAEMON,
        Error::DeviceLost(_) => MDRV_ERR_DEVICE_LOST,
        Error::CommandFailed { .. } => MDRV_ERR_COMMAND_FAILED,
    }
}

/// The code of a mirror (CPU side) error.
fn mirror_status(e: &mirror::Error) -> mdrv_status {
    use mdrv_status::*;
    match e {
        mirror::Error::InvalidRange { reason, .. } if reason.contains("aligned") => {
            MDRV_ERR_UNALIGNED
        }
        mirror::Error::InvalidRange { reason, .. } if reason.contains("multiple") => {
            MDRV_ERR_UNALIGNED
        }
        mirror::Error::InvalidRange { reason, .. }
            if reason.contains("beyond") || reason.contains("overflows") =>
        {
            MDRV_ERR_OUT_OF_RANGE
        }
        mirror::Error::InvalidRange { .. } | mirror::Error::InvalidArgument { .. } => {
            MDRV_ERR_INVALID_ARGUMENT
        }
        mirror::Error::Sys { .. } | mirror::Error::SysRange { .. } | mirror::Error::Io { .. } => {
            MDRV_ERR_OS
        }
        mirror::Error::Fault { .. } | mirror::Error::SpecialMapping { .. } => MDRV_ERR_NO_MAPPING,
        mirror::Error::PermissionDenied { .. } => MDRV_ERR_PERMISSION,
        mirror::Error::SettleTimeout(_) => MDRV_ERR_TIMEOUT,
        mirror::Error::Unsupported { .. } | mirror::Error::TrackedElsewhere { .. } => {
            MDRV_ERR_UNSUPPORTED
        }
        _ => MDRV_ERR_INVALID_ARGUMENT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_header_name() {
        for s in mdrv_status::ALL {
            let name = s.name().to_str().unwrap();
            assert_eq!(name, format!("{s:?}"));
        }
    }

    #[test]
    fn cancel_reasons_map_to_their_codes() {
        let cancelled = |reason| status_of(&Error::Cancelled { reason });
        assert_eq!(
            cancelled(CancelReason::NoMapping),
            mdrv_status::MDRV_ERR_NO_MAPPING
        );
        assert_eq!(
            cancelled(CancelReason::Permission),
            mdrv_status::MDRV_ERR_PERMISSION
        );
        assert_eq!(
            cancelled(CancelReason::Revoked),
            mdrv_status::MDRV_ERR_CANCELLED
        );
        let range = mirror::VaRange::new(0x1001, 0x1000).unwrap_err();
        assert_eq!(mirror_status(&range), mdrv_status::MDRV_ERR_UNALIGNED);
        let range = mirror::VaRange::new(1 << 47, 0x1000).unwrap_err();
        assert_eq!(mirror_status(&range), mdrv_status::MDRV_ERR_OUT_OF_RANGE);
    }
}
