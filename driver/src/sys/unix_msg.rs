//! Unix-socket messages with file descriptors (SCM_RIGHTS), peer credentials and pidfds: the
//! daemon's OS edge. Works on blocking and non-blocking sockets alike (a non-blocking one
//! reports `WouldBlock`, which is what tokio's `async_io` expects).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// Room for descriptors in one read: the kernel's SCM_MAX_FD, the most one message can carry
/// however many SCM_RIGHTS blocks the sender used. With less room the kernel would install the
/// descriptors that fit and flag the truncation, and nix then refuses to list them: they would
/// stay open in this process forever (a review found exactly that leak with 4).
pub const MAX_FDS_PER_READ: usize = 253;

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
/// count (0 at end of stream) and whether control data was cut short: the kernel could not
/// install every descriptor sent (the open-files limit; those it did install are still
/// returned in `fds`, so they are closed like any other), or the sender sent more than
/// [`MAX_FDS_PER_READ`] or other control messages.
pub fn recv(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    // Read with libc, not nix: on a truncated message nix refuses to list the control
    // messages, and descriptors the kernel did install would stay open here for good.
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_READ * size_of::<RawFd>()) as u32) };
    // u64s: aligned for cmsghdr.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `control`, both alive and writable
        // for the lengths given, for the duration of the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = io::Error::last_os_error();
        // A signal before any data: nothing was received, try again (a socket with a receive
        // timeout is never restarted by the kernel, SA_RESTART or not).
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control messages into
    // `control` (each header's length within it, truncated or not); CMSG_FIRSTHDR/NXTHDR
    // stay within `msg_control + msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*c).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    // SCM_RIGHTS installed this fd in our table just now; nothing else owns it.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, truncated))
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

/// Register `fd` with tokio for readability (a pidfd turns readable when its process exits).
/// Must be called inside a tokio runtime.
pub fn async_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open (and is not reused
    // for something else) until the registration is dropped with it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}
