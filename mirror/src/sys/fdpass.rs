//! File-descriptor passing over Unix sockets (SCM_RIGHTS), on `sys_util::socket`.

use std::os::fd::{BorrowedFd, OwnedFd};

use nix::errno::Errno;

use crate::{Error, Result};

fn errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Sends `fd` with a small payload over a Unix socket (SCM_RIGHTS).
pub fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>, payload: &[u8]) -> Result<()> {
    let iov = [std::io::IoSlice::new(payload)];
    sys_util::socket::send_with_fds(socket, &iov, &[fd])
        .map_err(|e| Error::sys("sendmsg(SCM_RIGHTS)", errno(e)))?;
    Ok(())
}

/// Receives one fd and its payload (up to `payload.len()` bytes) sent by [`send_fd`]. Any further
/// descriptors that came along are closed.
pub fn recv_fd(socket: BorrowedFd<'_>, payload: &mut [u8]) -> Result<(OwnedFd, usize)> {
    let mut fds = Vec::new();
    let (bytes, _) = sys_util::socket::recv_with_fds(socket, payload, &mut fds)
        .map_err(|e| Error::sys("recvmsg(SCM_RIGHTS)", errno(e)))?;
    let fd = fds.into_iter().next().ok_or(Error::InvalidArgument {
        what: "message carried no file descriptor",
    })?;
    Ok((fd, bytes))
}
