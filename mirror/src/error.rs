//! The crate's error type.

use nix::errno::Errno;

use crate::Access;

/// Everything that can go wrong in this crate. Each variant says what was attempted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A range was rejected before anything was done.
    #[error("invalid range start={start:#x} len={len:#x}: {reason}")]
    InvalidRange {
        /// Start address as given.
        start: u64,
        /// Length as given.
        len: u64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Some other argument was rejected.
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What was wrong.
        what: &'static str,
    },
    /// A syscall or ioctl failed.
    #[error("{op} failed: {errno}")]
    Sys {
        /// The operation, e.g. `"UFFDIO_REGISTER"`.
        op: &'static str,
        /// The errno it returned.
        errno: Errno,
    },
    /// A syscall or ioctl failed on a specific address range.
    #[error("{op} on [{start:#x}, {end:#x}) failed: {errno}")]
    SysRange {
        /// The operation.
        op: &'static str,
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
        /// The errno it returned.
        errno: Errno,
    },
    /// Reading a /proc file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being read.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No VMA covers the address, or it is PROT_NONE: a device fault there must fail
    /// (hmm_range_fault's -EFAULT).
    #[error("fault at {addr:#x}: {reason}")]
    Fault {
        /// The first address that could not be made accessible.
        addr: u64,
        /// Why.
        reason: &'static str,
    },
    /// A write was requested on a read-only VMA (hmm_range_fault's -EPERM).
    #[error("{access:?} access to {addr:#x} not permitted by the VMA protection")]
    PermissionDenied {
        /// The first offending address.
        addr: u64,
        /// The access that was requested.
        access: Access,
    },
    /// The range contains a special mapping (VM_IO / VM_PFNMAP, e.g. a mapped BAR, or `[vvar]`),
    /// which a device mirror refuses.
    #[error("special mapping (VM_IO/VM_PFNMAP) at [{start:#x}, {end:#x}) refused")]
    SpecialMapping {
        /// VMA start.
        start: u64,
        /// VMA end.
        end: u64,
    },
    /// The bounded retry budget ran out: invalidations kept colliding with the fault.
    #[error("retry budget of {budget:?} exhausted after {retries} retries")]
    RetryBudgetExhausted {
        /// Retries made.
        retries: u32,
        /// The configured budget.
        budget: std::time::Duration,
    },
    /// The mirrored process has exited (or the address space was released).
    #[error("the mirrored address space has been released (process exit or shutdown)")]
    Released,
    /// Another userfaultfd already registers part of the range (EBUSY): an application that uses
    /// userfaultfd itself conflicts with the mirror.
    #[error("[{start:#x}, {end:#x}) is registered with another userfaultfd")]
    TrackedElsewhere {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The operation is not available in this configuration, kernel or privilege level.
    #[error("{what} is not supported: {why}")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
        /// Why it is unavailable and what to do instead.
        why: String,
    },
    /// The call would deadlock because it was made from a subscriber callback (invalidate or
    /// aging) or the monitor.
    #[error("{what} must not be called from a subscriber callback (invalidate or aging)")]
    CalledFromCallback {
        /// The offending call.
        what: &'static str,
    },
    /// The call would deadlock because this thread holds a subscriber lock (a
    /// [`crate::SubscriberGuard`] from `Subscription::lock`), and the call takes subscriber locks
    /// one after another.
    #[error(
        "{what} must not be called while this thread holds a subscriber lock \
         (Subscription::lock): drop the guard first"
    )]
    SubscriberLockHeld {
        /// The offending call.
        what: &'static str,
    },
    /// `settle()` did not complete in time (the monitor is stuck in a callback).
    #[error("settle timed out after {0:?}; the event monitor is blocked")]
    SettleTimeout(std::time::Duration),
}

impl Error {
    pub(crate) fn sys(op: &'static str, errno: Errno) -> Self {
        Error::Sys { op, errno }
    }

    pub(crate) fn sys_range(op: &'static str, start: u64, end: u64, errno: Errno) -> Self {
        Error::SysRange {
            op,
            start,
            end,
            errno,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
