//! The daemon: one device serving many client processes, each mirrored into its own device
//! address space (docs/daemon.md).
//!
//! - [`server::Daemon`]: the tokio server behind `mirrorctl serve`. A client is authenticated by
//!   SO_PEERCRED (uid allow-list), hands over its userfaultfd and a pidfd, and registers memfd
//!   arenas: the device reaches that client's memory through those arenas only
//!   ([`crate::context::Reach::Arenas`]), so no client can make it touch another's memory or
//!   the daemon's. Faults are serviced against the client's own mirror, with a fair share of
//!   each fault batch per client; quotas bound pins, in-flight commands, arenas and clients.
//! - [`client::DaemonClient`]: what a runtime links instead of opening the device.
//! - [`protocol`]: the versioned wire format both share.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{
    checked_default_socket_path, ClientArena, ConnectOptions, DaemonClient, DaemonTicket,
};
pub use protocol::{ClientLimits, ErrorCode, StatsReply};
pub use server::{Daemon, DaemonConfig};
