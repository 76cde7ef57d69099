//! Descriptor passing over Unix stream sockets (`SCM_RIGHTS`), and listening sockets whose path
//! appears only once they accept connections.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// The kernel's cap on descriptors in one SCM_RIGHTS message (`SCM_MAX_FD`). The receive buffer
/// of [`recv_with_fds`] is sized for it (a protocol that takes fewer per message checks
/// its own limit after receiving): with less room the kernel installs the descriptors that
/// fit and truncates the control data, and every descriptor it installed must still be found
/// and closed ([`recv_with_fds`] does).
pub const SCM_MAX_FD: usize = 253;

/// Bind a listening Unix socket at `path` so that the path appears only once connections are
/// accepted, already with permission bits `mode`.
///
/// A plain `bind` creates the path before `listen`, and a peer that waits for the path and
/// connects in between gets `ECONNREFUSED` (a test runner on a loaded 2-core machine hit it).
/// Here the socket is bound and put to listen under a temporary name in the same directory and
/// then renamed over `path`, which also replaces a stale socket atomically. The temporary name
/// (a dot, the pid and a per-process count in base 36) is padded to the length of the file
/// name, so any path that fits the 108 bytes of `sun_path` binds (a file name under 8 bytes
/// makes the temporary path longer by the difference); one that does not fit is refused with
/// that limit named.
pub fn listen_at(
    path: &std::path::Path,
    mode: u32,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    /// `sizeof(sockaddr_un.sun_path)` on Linux, the terminating NUL included.
    const SUN_PATH: usize = 108;
    static BINDS: AtomicUsize = AtomicUsize::new(0);
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} has no file name", path.display()),
        ));
    };
    let mut temporary_name = format!(
        ".{}-{}",
        base36(std::process::id() as usize),
        base36(BINDS.fetch_add(1, Ordering::Relaxed))
    );
    while temporary_name.len() < name.len() {
        temporary_name.push('~');
    }
    let temporary = path.with_file_name(temporary_name);
    if temporary.as_os_str().as_bytes().len() >= SUN_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long: while it is bound it is named {} ({} bytes), and \
                 a Unix socket path holds at most {} bytes; choose a shorter path",
                path.display(),
                temporary.display(),
                temporary.as_os_str().as_bytes().len(),
                SUN_PATH - 1
            ),
        ));
    }
    // A temporary left by a process of ours that died with the same pid is ours to replace.
    let _ = std::fs::remove_file(&temporary);
    let listener = std::os::unix::net::UnixListener::bind(&temporary)?;
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

fn base36(mut n: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[n % 36]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.iter().rev().map(|&d| char::from(d)).collect()
}

/// Receive into `buf`; descriptors that came along are appended to `fds`. Returns the byte
/// count (0 at end of stream) and whether control data was cut short: the kernel could not
/// install every descriptor sent (the open-files limit; those it did install are still
/// returned in `fds`, so they are closed like any other), or the sender sent more than
/// `SCM_MAX_FD` (253) or other control messages.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    // Read with libc, not nix: on a truncated message nix refuses to list the control
    // messages, and descriptors the kernel did install would stay open here for good.
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((SCM_MAX_FD * size_of::<RawFd>()) as u32) };
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

/// Send `bufs` (all or a prefix: returns how many bytes went) with `fds` attached to the first
/// byte, `MSG_NOSIGNAL` (a closed peer is `EPIPE`, not a signal), retrying on EINTR. Works on
/// blocking and non-blocking sockets (a full non-blocking one reports `WouldBlock`).
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            bufs,
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(n) => return Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn scratch_dir(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sys-util-listen-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_listening_socket_appears_with_its_mode_and_no_temporary_left() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch_dir("mode");
        let path = dir.join("s.sock");
        // A stale file where the socket goes is replaced.
        std::fs::write(&path, b"stale").unwrap();
        let listener = listen_at(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.sock")]);
        UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The path is watched by a thread that connects the moment it appears: with a plain
    /// `bind` (path first, `listen` after) that connect can be refused.
    #[test]
    fn a_peer_that_connects_as_soon_as_the_path_appears_is_never_refused() {
        let dir = scratch_dir("race");
        let path = dir.join("s.sock");
        for round in 0..2000 {
            let watcher = std::thread::spawn({
                let path = path.clone();
                move || loop {
                    if path.exists() {
                        return UnixStream::connect(&path).map(drop);
                    }
                    std::thread::yield_now();
                }
            });
            let listener = listen_at(&path, 0o600).unwrap();
            let connected = watcher.join().unwrap();
            assert!(connected.is_ok(), "round {round}: {connected:?}");
            drop(listener);
            std::fs::remove_file(&path).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn any_path_that_fits_binds_and_a_longer_one_names_the_limit() {
        let dir = scratch_dir("long");
        let name_len = |total: usize| total - dir.as_os_str().len() - 1;
        let longest = dir.join("x".repeat(name_len(107)));
        assert_eq!(longest.as_os_str().len(), 107);
        let listener = listen_at(&longest, 0o600).unwrap();
        UnixStream::connect(&longest).unwrap();
        drop(listener);
        let path = dir.join("y".repeat(name_len(108)));
        let err = listen_at(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("at most 107 bytes"), "{err}");
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Bytes and descriptors sent together arrive together, the descriptors usable; a closed
    /// peer is end of stream for the receiver and EPIPE (no SIGPIPE) for the sender.
    #[test]
    fn descriptors_travel_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let sent = send_with_fds(
            a.as_fd(),
            &[IoSlice::new(b"hi"), IoSlice::new(b"!")],
            &[w.as_fd()],
        );
        assert_eq!(sent.unwrap(), 3);
        drop(w);
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        let (n, truncated) = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!((&buf[..n], truncated, fds.len()), (&b"hi!"[..], false, 1));
        let mut pipe_write = std::fs::File::from(fds.pop().unwrap());
        std::io::Write::write_all(&mut pipe_write, b"x").unwrap();
        drop(pipe_write);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut got).unwrap();
        assert_eq!(got, "x");
        drop(b);
        let err = send_with_fds(a.as_fd(), &[IoSlice::new(b"gone")], &[]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
        let (c, d) = UnixStream::pair().unwrap();
        drop(c);
        assert_eq!(
            recv_with_fds(d.as_fd(), &mut buf, &mut fds).unwrap(),
            (0, false)
        );
    }
}
