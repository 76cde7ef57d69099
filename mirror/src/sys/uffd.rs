//! userfaultfd. The ABI and its calls (create, UFFDIO_API, register, unregister, wake, reading
//! messages) are `sys_util::uffd`, defined once for the workspace; the mirror's own piece is
//! adopting the child fd a FORK event announces.

use std::os::fd::{FromRawFd, OwnedFd};

pub(crate) use sys_util::uffd::*;

/// Takes ownership of the child userfaultfd a FORK message announces. The kernel installed that
/// fd in this process's table for the reader alone, so owning it here is sound; callers must pass
/// only the fd number of a FORK message they have just read.
pub(crate) fn adopt_fork_fd(fd: libc::c_int) -> OwnedFd {
    // SAFETY: the FORK event's fd was installed for us by the kernel and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
