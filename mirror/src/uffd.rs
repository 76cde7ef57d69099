//! userfaultfd setup and hand-over between processes (the daemon receives a client's uffd).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::sys::uffd as raw;
use crate::{Error, Result};

pub use crate::sys::fdpass::{recv_fd, send_fd};

/// What the userfaultfd handshake granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UffdCaps {
    /// The feature bits granted by UFFDIO_API.
    pub features: u64,
    /// FORK events are delivered (needs CAP_SYS_PTRACE).
    pub fork_events: bool,
    /// The fd was created with UFFD_USER_MODE_ONLY (unprivileged fallback).
    pub user_mode_only: bool,
    /// UFFDIO_API was done by the client that sent the fd; the features are unknown.
    pub initialised_elsewhere: bool,
}

/// The features the mirror asks for: every non-cooperative event, plus write-protect-async so
/// registering in WP mode never diverts an ordinary fault to us, and WP on shmem/hugetlb.
pub(crate) const WANTED: u64 = raw::FEATURE_EVENT_UNMAP
    | raw::FEATURE_EVENT_REMOVE
    | raw::FEATURE_EVENT_REMAP
    | raw::FEATURE_EVENT_FORK
    | raw::FEATURE_WP_ASYNC
    | raw::FEATURE_WP_HUGETLBFS_SHMEM;

/// Creates a userfaultfd in the current process without doing the UFFDIO_API handshake, the form
/// a client should send to a daemon (the daemon does the handshake and registrations itself).
/// After sending it the client must close its copy, otherwise its munmaps hang forever if the
/// daemon dies.
pub fn create_uninitialised() -> Result<OwnedFd> {
    raw::create(true, false)
        .or_else(|_| raw::create(true, true))
        .map_err(|e| Error::sys("userfaultfd", e))
}

/// The feature bits this kernel supports, learned from a throwaway uffd (UFFDIO_API with no
/// features reports them). `None` if no uffd can be made to ask.
fn supported_features() -> Option<u64> {
    let probe = raw::create(true, false)
        .or_else(|_| raw::create(true, true))
        .ok()?;
    raw::api(probe.as_fd(), 0)
        .ok()
        .map(|(features, _)| features)
}

/// Creates (or adopts) a uffd and does the handshake, degrading when privileges are missing.
///
/// Only features the kernel supports are requested: asking for an unknown bit is EINVAL, which
/// a received fd would make indistinguishable from "already initialised". Before Linux 6.7 there
/// is no WP_ASYNC: ranges are then registered in plain write-protect mode, which still diverts
/// no fault because nothing is ever write-protected, but file mappings other than shmem cannot
/// be registered (their munmap/madvise are then seen only through the explicit API).
pub(crate) fn open(existing: Option<OwnedFd>) -> Result<(OwnedFd, UffdCaps)> {
    let wanted = match supported_features() {
        Some(supported) => WANTED & supported,
        None => WANTED,
    };
    if wanted & raw::FEATURE_WP_ASYNC == 0 {
        tracing::warn!(
            "UFFD_FEATURE_WP_ASYNC unsupported (kernel before 6.7): registering in plain WP \
             mode; non-shmem file mappings cannot be tracked"
        );
    }
    let (fd, user_mode_only) = match existing {
        Some(fd) => (fd, false),
        None => match raw::create(true, false) {
            Ok(fd) => (fd, false),
            Err(Errno::EPERM) => {
                tracing::warn!(
                    "userfaultfd EPERM (vm.unprivileged_userfaultfd=0): using UFFD_USER_MODE_ONLY"
                );
                let fd = raw::create(true, true).map_err(|e| Error::sys("userfaultfd", e))?;
                (fd, true)
            }
            Err(e) => return Err(Error::sys("userfaultfd", e)),
        },
    };
    set_nonblocking(fd.as_fd())?;
    match raw::api(fd.as_fd(), wanted) {
        Ok((features, _)) => Ok((
            fd,
            UffdCaps {
                features,
                fork_events: features & raw::FEATURE_EVENT_FORK != 0,
                user_mode_only,
                initialised_elsewhere: false,
            },
        )),
        Err(Errno::EPERM) => {
            tracing::warn!(
                "UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE: fork events disabled, \
                 forked children are not reported"
            );
            let (features, _) = raw::api(fd.as_fd(), wanted & !raw::FEATURE_EVENT_FORK)
                .map_err(|e| Error::sys("UFFDIO_API", e))?;
            Ok((
                fd,
                UffdCaps {
                    features,
                    fork_events: false,
                    user_mode_only,
                    initialised_elsewhere: false,
                },
            ))
        }
        Err(Errno::EINVAL) => {
            // A second UFFDIO_API is EINVAL: the sender already did the handshake.
            tracing::warn!(
                "UFFDIO_API EINVAL: the received userfaultfd was initialised by its sender; \
                 event features are whatever it asked for"
            );
            Ok((
                fd,
                UffdCaps {
                    features: 0,
                    fork_events: false,
                    user_mode_only,
                    initialised_elsewhere: true,
                },
            ))
        }
        Err(e) => Err(Error::sys("UFFDIO_API", e)),
    }
}

/// Sets O_NONBLOCK: poll on a blocking uffd always reports POLLERR, and a blocking read would
/// stall the monitor. This also changes the sender's open file description.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| Error::sys("F_GETFL", e))?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(|e| Error::sys("F_SETFL", e))?;
    Ok(())
}
