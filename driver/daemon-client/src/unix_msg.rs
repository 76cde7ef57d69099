//! Unix-socket messages with file descriptors (SCM_RIGHTS), peer credentials and pidfds: the
//! daemon's OS edge. Works on blocking and non-blocking sockets alike (a non-blocking one
//! reports `WouldBlock`, which is what tokio's `async_io` expects).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// Room for descriptors in one read: the kernel's SCM_MAX_FD, the most one message can carry
/// however many SCM_RIGHTS blocks the sender used.
pub const MAX_FDS_PER_READ: usize = vfio_user_protocol::framing::SCM_MAX_FD;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Send `bytes` (all or a prefix: returns how many) with `fds` attached to the first byte.
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [io::IoSlice::new(bytes)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(errno)
}

/// Receive into `buf`; descriptors that came along are appended to `fds`. Returns the byte
/// count (0 at end of stream) and whether control data was cut short. One implementation with
/// the vfio-user framing ([`vfio_user_protocol::framing::recv_with_fds`]): descriptors the kernel
/// installed from a message it could not deliver whole are returned too, so they get closed.
pub fn recv(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    vfio_user_protocol::framing::recv_with_fds(socket, buf, fds)
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
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
