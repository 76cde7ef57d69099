//! Unix-socket messages with file descriptors (SCM_RIGHTS), peer credentials and pidfds: the
//! daemon's OS edge. Works on blocking and non-blocking sockets alike (a non-blocking one
//! reports `WouldBlock`, which is what tokio's `async_io` expects).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// Room for descriptors in one read: the kernel's SCM_MAX_FD, the most one message can carry
/// however many SCM_RIGHTS blocks the sender used.
pub const MAX_FDS_PER_READ: usize = sys_util::socket::SCM_MAX_FD;

/// Send `bytes` (all or a prefix: returns how many) with `fds` attached to the first byte
/// (`sys_util::socket::send_with_fds`: MSG_NOSIGNAL, a closed peer is EPIPE).
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    sys_util::socket::send_with_fds(socket, &[io::IoSlice::new(bytes)], fds)
}

/// Receive into `buf`; descriptors that came along are appended to `fds`. Returns the byte
/// count (0 at end of stream) and whether control data was cut short. The one implementation
/// the vfio-user framing uses too (`sys_util::socket::recv_with_fds`): descriptors the kernel
/// installed from a message it could not deliver whole are returned too, so they get closed.
pub fn recv(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    sys_util::socket::recv_with_fds(socket, buf, fds)
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    sys_util::pidfd::open(pid).map_err(io::Error::from)
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo` (`None` if it is not a pidfd, or the
/// process is gone: fdinfo then says -1).
pub fn pidfd_pid(fd: BorrowedFd<'_>) -> Option<libc::pid_t> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|pid: &libc::pid_t| *pid > 0)
}

/// What kind of anonymous inode `fd` is (`"[userfaultfd]"`, `"[pidfd]"`, ...), if it is one.
pub fn anon_inode_kind(fd: BorrowedFd<'_>) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    target
        .to_str()?
        .strip_prefix("anon_inode:")
        .map(str::to_string)
}
