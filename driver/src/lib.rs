//! Userspace HMM mirror driver for the MXA-1 accelerator.
//!
//! Layers, bottom up:
//! - [`backend`]: how the device is reached (in-process emulator, kernel VFIO, vfio-user);
//! - [`device`]: the MXA-1 programming model over any backend (rings, TLB fences, faults);
//! - device page tables ([`Translation`], [`PageSize`]) and IOVA allocation, inside [`device`]
//!   and [`dma`];
//! - the mirror of a process address space into a device address space (fault service and
//!   invalidation), and the runtime API on top ([`Runtime`], [`Context`], [`Op`]);
//! - personalities ([`Personality`]): what kind of device a runtime drives, MXA-1 ([`Mxa`], the
//!   default) or QEMU's edu ([`edu::Edu`]), both opened through [`Runtime::open_with`].
#![deny(missing_docs)]

pub mod arena;
pub mod backend;
pub mod context;
pub mod device;
pub mod dma;
pub mod edu;
pub mod fault;
mod iova;
mod memlock;
mod pagetable;
pub mod runtime;
mod service_cpu;
mod sys;
pub mod view;

pub use iova::IovaError;
pub use memlock::{effective_limit as effective_memlock_limit, has_cap_ipc_lock, MemlockExceeded};
pub use pagetable::{
    inconsistent_entries as inconsistent_page_table_entries, PageSize, PageTableError, Translation,
};
pub use runtime::{
    Context, DeviceOps, DeviceSpec, FaultSource, Mxa, NoFaults, Op, Personality, Runtime,
    RuntimeOptions,
};
pub use sys::dmabuf::{DmaBuffer, DmaBufferError};
pub use view::{AgeScan, TableStats};

/// Driver errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    /// DMA memory could not be allocated.
    #[error(transparent)]
    DmaBuffer(#[from] sys::dmabuf::DmaBufferError),
    /// IOVA space ran out.
    #[error(transparent)]
    Iova(#[from] iova::IovaError),
    /// Page-table update failed.
    #[error(transparent)]
    PageTable(#[from] pagetable::PageTableError),
    /// An OS call failed.
    #[error("{what} failed: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The device is not an MXA-1 (or not a version this driver knows).
    #[error("not an MXA-1 device (vendor {vendor:#06x}, device {device:#06x}) or unknown version")]
    WrongDevice {
        /// PCI vendor ID found.
        vendor: u16,
        /// PCI device ID found.
        device: u16,
    },
    /// The device reports something this driver does not support.
    #[error("unsupported device: {0}")]
    Unsupported(String),
    /// The device latched an error.
    #[error("device error code {code} (info {info:#x})")]
    DeviceError {
        /// ERROR_CODE.
        code: u32,
        /// ERROR_INFO.
        info: u64,
    },
    /// Every command-queue slot stayed busy for the whole timeout.
    #[error("command queue full ({entries} entries in flight); wait for completions or raise the timeout")]
    QueueFull {
        /// Queue size.
        entries: u32,
    },
    /// The device did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The mirror (CPU side) failed.
    #[error(transparent)]
    Mirror(mirror::Error),
    /// Every device address space is in use.
    #[error("all {asids} device address spaces are in use")]
    NoFreeAddressSpace {
        /// How many the device has.
        asids: usize,
    },
    /// A device without its own page table needs IOVA == VA, and that IOVA range is taken or
    /// outside the IOMMU's ranges.
    #[error("cannot map {len:#x} bytes at IOVA == VA {va:#x}: the range is in use or outside the IOMMU's IOVA ranges")]
    IdentityUnavailable {
        /// Virtual address.
        va: u64,
        /// Length.
        len: u64,
    },
    /// A caller passed something unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The driver cancelled the command's work item: a device fault could not be serviced.
    #[error("device fault not serviceable: {reason}")]
    Cancelled {
        /// Why.
        reason: fault::CancelReason,
    },
    /// A command longer than the device's maximum transfer (`CAP_MAX_TRANSFER`), refused before
    /// it reaches the device (which would only complete it `BadCommand`).
    #[error(
        "command too long: its length is {len} bytes and the device's maximum transfer \
         (CAP_MAX_TRANSFER, fixed by the device) is {max} bytes; split it into commands of at \
         most {max} bytes"
    )]
    CommandTooLong {
        /// The command's length.
        len: u64,
        /// The device's maximum transfer.
        max: u64,
    },
    /// A quota would be exceeded.
    #[error("quota exceeded: {quota} is {limit}")]
    QuotaExceeded {
        /// Which quota.
        quota: &'static str,
        /// Its value.
        limit: u64,
    },
    /// An arena was refused.
    #[error(transparent)]
    Arena(#[from] arena::ArenaError),
    /// The daemon refused a request.
    #[error("daemon: {message} ({code:?})")]
    Daemon {
        /// Its error code.
        code: DaemonErrorCode,
        /// Its explanation.
        message: String,
    },
    /// The daemon connection broke or the daemon said something this client cannot read.
    #[error("daemon connection: {0}")]
    DaemonConnection(String),
    /// The device is gone for good (its vfio-user server died, the connection to it broke):
    /// the command failed, like every other in flight on it, and every later one fails too.
    /// Nothing the device was doing will complete; open the device again once it is back.
    #[error("{0} (no command in flight on it completes, and none runs any more: open the device again once it is back)")]
    DeviceLost(backend::DeviceLost),
    /// The device failed the command.
    #[error("device failed the command: {status:?} (detail {detail:#x})")]
    CommandFailed {
        /// Completion status.
        status: accel_abi::Status,
        /// Status-specific detail (the VA or IOVA involved).
        detail: u64,
    },
}

/// Error codes of a failed daemon request, as the daemon's wire protocol carries them
/// (`mirrord_client::protocol::ErrorCode`, docs/daemon.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DaemonErrorCode {
    /// The frame or payload was malformed.
    BadMessage = 1,
    /// No common protocol version.
    Version = 2,
    /// The peer is not allowed (uid not on the allow-list, foreign pidfd, ...).
    NotAllowed = 3,
    /// The request is not valid now (before HELLO, a second HELLO, ...).
    OutOfOrder = 4,
    /// The payload exceeded the protocol's payload limit.
    TooLarge = 5,
    /// A limit or quota would be exceeded; the message names it.
    Limit = 6,
    /// An argument was unusable (address, length, fd).
    InvalidArgument = 7,
    /// The named object does not exist.
    NotFound = 8,
    /// The daemon is shutting down.
    ShuttingDown = 9,
    /// The device or driver failed.
    Device = 10,
    /// Anything else.
    Internal = 11,
    /// The device is lost for good (its server process died, its connection broke); the
    /// message names it and says why. The daemon exits once every client is told.
    DeviceLost = 12,
}

impl DaemonErrorCode {
    /// From the wire (unknown codes read as `Internal`).
    pub fn from_u32(v: u32) -> DaemonErrorCode {
        match v {
            1 => Self::BadMessage,
            2 => Self::Version,
            3 => Self::NotAllowed,
            4 => Self::OutOfOrder,
            5 => Self::TooLarge,
            6 => Self::Limit,
            7 => Self::InvalidArgument,
            8 => Self::NotFound,
            9 => Self::ShuttingDown,
            10 => Self::Device,
            12 => Self::DeviceLost,
            _ => Self::Internal,
        }
    }
}
