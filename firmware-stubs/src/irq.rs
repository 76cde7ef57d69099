//! Interrupt delivery through eventfds (the in-process analogue of VFIO_DEVICE_SET_IRQS).

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Add 1 to the eventfd counter without ever blocking. If the descriptor is not writable right
/// now (a saturated counter, or something that is not an eventfd), the signal is dropped: the
/// status bit stays set in INTR_STATUS, so nothing is lost that the driver cannot see.
pub(crate) fn signal_eventfd(fd: &OwnedFd) {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => {}
        Ok(_) => {
            tracing::warn!("interrupt eventfd not writable; signal coalesced");
            return;
        }
        Err(e) => {
            tracing::warn!("poll on interrupt eventfd failed: {e}");
            return;
        }
    }
    match nix::unistd::write(fd, &1u64.to_ne_bytes()) {
        Ok(8) => {}
        Ok(n) => tracing::warn!("short write of {n} bytes to interrupt eventfd"),
        Err(Errno::EAGAIN) => {}
        Err(e) => tracing::warn!("write to interrupt eventfd failed: {e}"),
    }
}
