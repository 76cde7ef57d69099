//! File-descriptor passing over Unix sockets (SCM_RIGHTS).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::{Error, Result};

/// Sends `fd` with a small payload over a Unix socket (SCM_RIGHTS).
pub fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>, payload: &[u8]) -> Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(payload)];
    sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map_err(|e| Error::sys("sendmsg(SCM_RIGHTS)", e))?;
    Ok(())
}

/// Receives one fd and its payload (up to `payload.len()` bytes) sent by [`send_fd`].
pub fn recv_fd(socket: BorrowedFd<'_>, payload: &mut [u8]) -> Result<(OwnedFd, usize)> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(payload)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| Error::sys("recvmsg(SCM_RIGHTS)", e))?;
    let bytes = msg.bytes;
    let mut received = None;
    for c in msg
        .cmsgs()
        .map_err(|e| Error::sys("recvmsg control data", e))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw_fd in fds {
                // SAFETY: SCM_RIGHTS installed this fd in our table just now; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw_fd) };
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    let fd = received.ok_or(Error::InvalidArgument {
        what: "message carried no file descriptor",
    })?;
    Ok((fd, bytes))
}
