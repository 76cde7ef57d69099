//! The daemon client: what a runtime links instead of opening the device, when one daemon
//! (`mirrorctl serve`, the `mirrord` package) serves the device to many client processes, each
//! mirrored into its own device address space (docs/daemon.md).
//!
//! - [`DaemonClient`]: connect (the daemon is authenticated by SO_PEERCRED), hand over this
//!   process's userfaultfd and a pidfd, register memfd arenas the device may reach, and submit
//!   [`driver::Op`]s through the same [`driver::DeviceOps`] trait an in-process
//!   [`driver::Context`] implements.
//! - [`protocol`]: the versioned wire format the client and the daemon share.
//!
//! No tokio, no VFIO stack and no emulator: this package links `driver` without its default
//! features.
#![deny(missing_docs)]

pub mod client;
pub mod protocol;
pub mod shared_mem;
pub mod unix_msg;

pub use client::{
    checked_default_socket_path, ClientArena, ConnectOptions, DaemonClient, DaemonTicket,
};
pub use protocol::{ClientLimits, ErrorCode, StatsReply};
