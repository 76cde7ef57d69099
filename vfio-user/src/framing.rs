//! Messages over a connected `AF_UNIX` stream socket, file descriptors by `SCM_RIGHTS`.
//!
//! Receiving reads exactly the message size the header declares, whatever happens: a message
//! over the size limit, or carrying more descriptors than allowed, is drained (its bytes read
//! into a fixed scratch buffer, its descriptors closed) and reported with its header, so the
//! caller can answer it with an error reply and the stream stays in step. Limits are checked
//! before any allocation. Only a header whose size is smaller than a header leaves the stream
//! position undefined; that is [`RecvError::Desync`] and the connection must be dropped.
//!
//! Descriptors are sent and received with `sys_util::socket` (`send_with_fds`, `recv_with_fds`),
//! which sizes every receive for the kernel's `SCM_MAX_FD` and returns every descriptor the kernel
//! installed, so that those of a refused message are closed; this crate has no `unsafe` of its
//! own.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};
use sys_util::socket::recv_with_fds;

use crate::{Header, HEADER_SIZE};

/// Most descriptors one message may carry ([`Limits::max_fds`] may be lower); a message with
/// more is refused ([`RecvError::TooManyFds`]) and its descriptors closed.
pub const FD_CAP: usize = 16;

/// How long the rest of a message may take once its first byte has arrived
/// ([`Connection::with_message_timeout`] changes it). A peer that sends a header and then
/// stops, keeping the connection open, would otherwise hold the receiving thread forever; past
/// this bound the message is [`RecvError::Stalled`] and the connection must be dropped.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message, header included.
    pub max_msg_size: usize,
    /// Most descriptors per message (at most [`FD_CAP`]).
    pub max_fds: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // A 1 MiB data transfer plus its fixed fields.
            max_msg_size: (1 << 20) + 4096,
            max_fds: 8,
        }
    }
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// Its payload (`header.size - 16` bytes).
    pub payload: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

/// Why [`Connection::recv`] returned no message.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection between messages.
    #[error("peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the connection mid-message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A socket error.
    #[error("socket error: {0}")]
    Io(Errno),
    /// The message was larger than the limit; it was drained. Answer with an error.
    #[error("message of {} bytes exceeds the limit", .0.size)]
    TooLarge(Header),
    /// The message carried too many descriptors; it was drained and they were closed.
    #[error("message {} carried more descriptors than allowed", .0.id)]
    TooManyFds(Header),
    /// The header declares a size smaller than a header: the stream cannot be followed.
    #[error("message size {} is smaller than the header", .0.size)]
    Desync(Header),
    /// The peer started a message and did not finish it within the message timeout
    /// ([`MESSAGE_TIMEOUT`] unless changed); the connection must be dropped.
    #[error(
        "message stalled: {got} of {want} bytes arrived within the message timeout of {timeout:?} \
         (vfio_user_protocol::framing::MESSAGE_TIMEOUT)"
    )]
    Stalled {
        /// Bytes received.
        got: usize,
        /// Bytes expected (the header's size; 16 while the header itself is incomplete).
        want: usize,
        /// The timeout.
        timeout: Duration,
    },
}

impl RecvError {
    /// True if the stream is still in step (the caller may answer and carry on).
    pub fn recoverable(&self) -> bool {
        matches!(self, RecvError::TooLarge(_) | RecvError::TooManyFds(_))
    }
}

/// A vfio-user connection: sends are serialised by a lock, receives must come from one thread.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    write: Mutex<()>,
    limits: Limits,
    peer_max_fds: AtomicUsize,
    message_timeout: Duration,
}

/// State of one message being received: control data lost, and the deadline for its remaining
/// bytes (set when its first byte arrives).
struct Receiving {
    ctrunc: bool,
    stalled: bool,
    deadline: Option<Instant>,
    timeout: Duration,
}

impl Receiving {
    fn new(timeout: Duration) -> Receiving {
        Receiving {
            ctrunc: false,
            stalled: false,
            deadline: None,
            timeout,
        }
    }

    /// Wait until the socket is readable or the deadline passes (false: it passed). Before the
    /// message's first byte there is no deadline: an idle peer may stay idle.
    fn wait_readable(&mut self, fd: BorrowedFd<'_>) -> Result<bool, Errno> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(deadline) = self.deadline else {
            return Ok(true);
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.stalled = true;
                return Ok(false);
            }
            // Rounded up so that a wait never ends just before the deadline.
            let ms = u16::try_from(left.as_millis() + 1).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Err(Errno::EINTR) | Ok(0) => continue,
                Err(e) => return Err(e),
                Ok(_) => return Ok(true),
            }
        }
    }
}

impl Connection {
    /// Wrap a connected stream.
    pub fn new(stream: UnixStream, limits: Limits) -> Connection {
        let limits = Limits {
            max_fds: limits.max_fds.min(FD_CAP),
            ..limits
        };
        Connection {
            stream,
            write: Mutex::new(()),
            limits,
            peer_max_fds: AtomicUsize::new(1),
            message_timeout: MESSAGE_TIMEOUT,
        }
    }

    /// How long the rest of a message may take once its first byte arrived (default
    /// [`MESSAGE_TIMEOUT`]).
    pub fn with_message_timeout(mut self, timeout: Duration) -> Connection {
        self.message_timeout = timeout;
        self
    }

    /// The message timeout.
    pub fn message_timeout(&self) -> Duration {
        self.message_timeout
    }

    /// Bound every send: a send that cannot go on within `timeout` (the peer does not read)
    /// fails with `EAGAIN`, possibly after part of the message went, so the caller must drop
    /// the connection. `None`: sends wait as long as it takes.
    pub fn set_send_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_write_timeout(timeout)
    }

    /// Our receive limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Record how many descriptors the peer accepts per message (from VERSION).
    pub fn set_peer_max_fds(&self, n: usize) {
        self.peer_max_fds.store(n, Ordering::Relaxed);
    }

    /// The underlying socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Shut the socket down both ways: a blocked `recv` returns, later sends fail.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Send one message; `header.size` is set from the payload.
    pub fn send(
        &self,
        mut header: Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<()> {
        let total = HEADER_SIZE + payload.len();
        header.size =
            u32::try_from(total).map_err(|_| std::io::Error::from_raw_os_error(libc::EMSGSIZE))?;
        if fds.len() > self.peer_max_fds.load(Ordering::Relaxed).max(1) {
            return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        let head = header.encode();
        let _guard = sys_util::sync::lock(&self.write);
        let fd = self.stream.as_raw_fd();
        let iov = [IoSlice::new(&head), IoSlice::new(payload)];
        let mut sent = sys_util::socket::send_with_fds(self.stream.as_fd(), &iov, fds)?;
        // The descriptors went with the first byte; the rest is plain data.
        while sent < total {
            let (src, at) = if sent < HEADER_SIZE {
                (&head[..], sent)
            } else {
                (payload, sent - HEADER_SIZE)
            };
            match send(fd, &src[at..], MsgFlags::MSG_NOSIGNAL) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(0) => return Err(std::io::Error::from_raw_os_error(libc::EPIPE)),
                Ok(n) => sent += n,
            }
        }
        Ok(())
    }

    /// A successful reply to `request`.
    pub fn reply(
        &self,
        request: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<()> {
        self.send(Header::reply(request, payload.len()), payload, fds)
    }

    /// A header-only error reply to `request`.
    pub fn reply_error(&self, request: &Header, errno: i32) -> std::io::Result<()> {
        self.send(Header::error_reply(request, errno), &[], &[])
    }

    /// Receive `buf.len()` bytes, collecting descriptors. Returns bytes read before EOF.
    fn fill(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        rx: &mut Receiving,
    ) -> Result<usize, Errno> {
        let mut got = 0;
        while got < buf.len() {
            if !rx.wait_readable(self.stream.as_fd())? {
                break;
            }
            let (n, ctrunc) = recv_with_fds(self.stream.as_fd(), &mut buf[got..], fds)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
            if ctrunc {
                rx.ctrunc = true;
            }
            if n == 0 {
                break;
            }
            got += n;
            if rx.deadline.is_none() {
                rx.deadline = Some(Instant::now() + rx.timeout);
            }
        }
        Ok(got)
    }

    /// Read and discard `len` bytes (closing any descriptors). Returns bytes read before EOF.
    fn drain(&self, len: usize, rx: &mut Receiving) -> Result<usize, Errno> {
        let mut scratch = [0u8; 4096];
        let mut done = 0;
        while done < len {
            let want = (len - done).min(scratch.len());
            let mut fds = Vec::new();
            let n = self.fill(&mut scratch[..want], &mut fds, rx)?;
            done += n;
            if n < want {
                break;
            }
        }
        Ok(done)
    }

    /// Receive the next message.
    pub fn recv(&self) -> Result<Message, RecvError> {
        let mut head = [0u8; HEADER_SIZE];
        let mut fds = Vec::new();
        let mut rx = Receiving::new(self.message_timeout);
        let got = self
            .fill(&mut head, &mut fds, &mut rx)
            .map_err(RecvError::Io)?;
        if got == 0 {
            return Err(RecvError::Closed);
        }
        let short = |rx: &Receiving, got: usize, want: usize| {
            if rx.stalled {
                RecvError::Stalled {
                    got,
                    want,
                    timeout: rx.timeout,
                }
            } else {
                RecvError::Truncated { got, want }
            }
        };
        if got < HEADER_SIZE {
            return Err(short(&rx, got, HEADER_SIZE));
        }
        let header = Header::decode(&head);
        let Some(len) = header.payload_len() else {
            return Err(RecvError::Desync(header));
        };
        if header.size as usize > self.limits.max_msg_size {
            let n = self.drain(len, &mut rx).map_err(RecvError::Io)?;
            if n < len {
                return Err(short(&rx, HEADER_SIZE + n, header.size as usize));
            }
            return Err(RecvError::TooLarge(header));
        }
        let mut payload = vec![0u8; len];
        let n = self
            .fill(&mut payload, &mut fds, &mut rx)
            .map_err(RecvError::Io)?;
        if n < len {
            return Err(short(&rx, HEADER_SIZE + n, header.size as usize));
        }
        if rx.ctrunc || fds.len() > self.limits.max_fds {
            return Err(RecvError::TooManyFds(header));
        }
        Ok(Message {
            header,
            payload,
            fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command;
    use std::io::Write;

    fn pair(limits: Limits) -> (Connection, Connection) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(a, limits), Connection::new(b, limits))
    }

    proptest::proptest! {
        /// Any sequence of messages, some over the size limit, some with descriptors beyond the
        /// limit: each in-limit message arrives intact and in order, each other one is reported
        /// with its header, and the stream ends exactly at the end (every declared size was
        /// consumed, never more).
        #[test]
        fn streams_stay_in_step(
            msgs in proptest::collection::vec(
                (proptest::prelude::any::<u16>(), 0usize..400, 0usize..3), 0..24)
        ) {
            let limits = Limits { max_msg_size: 256, max_fds: 1 };
            let (a, b) = pair(limits);
            a.set_peer_max_fds(4);
            let writer = std::thread::spawn({
                let msgs = msgs.clone();
                move || {
                    let f = std::fs::File::open("/dev/null").unwrap();
                    let fd = std::os::fd::AsFd::as_fd(&f);
                    for (i, (cmd, len, nfds)) in msgs.iter().enumerate() {
                        let body = vec![i as u8; *len];
                        let fds = vec![fd; *nfds];
                        a.send(Header::command(i as u16, *cmd, 0), &body, &fds).unwrap();
                    }
                }
            });
            for (i, (cmd, len, nfds)) in msgs.iter().enumerate() {
                let r = b.recv();
                if HEADER_SIZE + len > limits.max_msg_size {
                    proptest::prop_assert!(matches!(r, Err(RecvError::TooLarge(h)) if h.id == i as u16));
                } else if *nfds > limits.max_fds {
                    proptest::prop_assert!(matches!(r, Err(RecvError::TooManyFds(h)) if h.id == i as u16));
                } else {
                    let m = r.unwrap();
                    proptest::prop_assert_eq!((m.header.id, m.header.command), (i as u16, *cmd));
                    proptest::prop_assert_eq!(m.payload, vec![i as u8; *len]);
                    proptest::prop_assert_eq!(m.fds.len(), *nfds);
                }
            }
            writer.join().unwrap();
            proptest::prop_assert!(matches!(b.recv(), Err(RecvError::Closed)));
        }
    }

    /// Descriptors of this process whose link names `name` (a memfd's is `/memfd:NAME`).
    fn open_fds_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().contains(name))
            .count()
    }

    #[test]
    fn descriptors_beyond_the_limit_are_all_closed() {
        const NAME: &str = "framing-fd-flood";
        let (a, b) = UnixStream::pair().unwrap();
        let b = Connection::new(b, Limits::default());
        let memfd = nix::sys::memfd::memfd_create(
            &std::ffi::CString::new(NAME).unwrap(),
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let before = open_fds_named(NAME);
        // A peer's message with 20 descriptors (more than FD_CAP) and a valid header.
        let head = Header::command(9, command::DMA_MAP, 0).encode();
        let iov = [IoSlice::new(&head)];
        sys_util::socket::send_with_fds(a.as_fd(), &iov, &[memfd.as_fd(); 20]).unwrap();
        assert!(matches!(b.recv(), Err(RecvError::TooManyFds(h)) if h.id == 9));
        assert_eq!(
            open_fds_named(NAME),
            before,
            "descriptors of the refused message are still open"
        );
    }

    #[test]
    fn message_with_fds_round_trips() {
        let (a, b) = pair(Limits::default());
        a.set_peer_max_fds(8);
        let f = std::fs::File::open("/dev/null").unwrap();
        let h = Header::command(3, command::DMA_MAP, 0);
        a.send(h, &[1, 2, 3], &[std::os::fd::AsFd::as_fd(&f)])
            .unwrap();
        let m = b.recv().unwrap();
        assert_eq!(m.header.id, 3);
        assert_eq!(m.header.size, 19);
        assert_eq!(m.payload, vec![1, 2, 3]);
        assert_eq!(m.fds.len(), 1);
    }

    #[test]
    fn oversized_message_is_drained_and_the_stream_stays_in_step() {
        let limits = Limits {
            max_msg_size: 64,
            max_fds: 1,
        };
        let (a, b) = pair(limits);
        a.send(
            Header::command(1, command::REGION_WRITE, 0),
            &[7; 1000],
            &[],
        )
        .unwrap();
        a.send(Header::command(2, command::DEVICE_RESET, 0), &[], &[])
            .unwrap();
        assert!(matches!(b.recv(), Err(RecvError::TooLarge(h)) if h.id == 1));
        let next = b.recv().unwrap();
        assert_eq!(
            (next.header.id, next.header.command),
            (2, command::DEVICE_RESET)
        );
    }

    #[test]
    fn too_many_fds_are_refused_and_closed() {
        let (a, b) = pair(Limits {
            max_fds: 1,
            ..Default::default()
        });
        a.set_peer_max_fds(4);
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&f);
        a.send(
            Header::command(5, command::DEVICE_SET_IRQS, 0),
            &[0; 20],
            &[fd, fd],
        )
        .unwrap();
        a.send(Header::command(6, command::DEVICE_RESET, 0), &[], &[])
            .unwrap();
        assert!(matches!(b.recv(), Err(RecvError::TooManyFds(h)) if h.id == 5));
        assert_eq!(b.recv().unwrap().header.id, 6);
    }

    #[test]
    fn sender_refuses_more_fds_than_the_peer_takes() {
        let (a, _b) = pair(Limits::default());
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsFd::as_fd(&f);
        assert!(a.send(Header::command(1, 1, 0), &[], &[fd, fd]).is_err());
    }

    /// A header, part of its body, then nothing with the connection open: the receive gives up
    /// after the message timeout instead of waiting forever. An idle connection (no byte of a
    /// message yet) is not timed.
    #[test]
    fn a_stalled_message_times_out() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let timeout = Duration::from_millis(200);
        let b = Connection::new(b, Limits::default()).with_message_timeout(timeout);
        let idle = std::thread::spawn(move || {
            let r = b.recv();
            (b, r)
        });
        std::thread::sleep(2 * timeout);
        assert!(!idle.is_finished(), "an idle connection timed out");
        let h = Header {
            size: 100,
            ..Header::command(1, command::REGION_WRITE, 0)
        };
        a.write_all(&h.encode()).unwrap();
        a.write_all(&[0; 10]).unwrap();
        let started = Instant::now();
        let (b, r) = idle.join().unwrap();
        assert!(
            matches!(r, Err(RecvError::Stalled { got: 26, want: 100, timeout: t }) if t == timeout),
            "{r:?}"
        );
        // Generous: it is a timeout, not a hang (the message timeout is 200 ms).
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(!r.unwrap_err().recoverable());
        // Half a header counts too.
        a.write_all(&h.encode()[..5]).unwrap();
        assert!(matches!(
            b.recv(),
            Err(RecvError::Stalled {
                got: 5,
                want: 16,
                ..
            })
        ));
        // The oversized path (drained) is bounded as well.
        let (mut a, b) = UnixStream::pair().unwrap();
        let b = Connection::new(
            b,
            Limits {
                max_msg_size: 64,
                ..Limits::default()
            },
        )
        .with_message_timeout(timeout);
        a.write_all(&Header { size: 1000, ..h }.encode()).unwrap();
        a.write_all(&[0; 100]).unwrap();
        assert!(matches!(b.recv(), Err(RecvError::Stalled { got: 116, .. })));
    }

    #[test]
    fn truncated_and_desynchronised_messages() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let b = Connection::new(b, Limits::default());
        let h = Header {
            size: 100,
            ..Header::command(1, command::REGION_WRITE, 0)
        };
        a.write_all(&h.encode()).unwrap();
        a.write_all(&[0; 10]).unwrap();
        drop(a);
        assert!(matches!(
            b.recv(),
            Err(RecvError::Truncated { got: 26, want: 100 })
        ));
        assert!(matches!(b.recv(), Err(RecvError::Closed)));

        let (mut a, b) = UnixStream::pair().unwrap();
        let b = Connection::new(b, Limits::default());
        let h = Header {
            size: 8,
            ..Header::command(1, command::REGION_WRITE, 0)
        };
        a.write_all(&h.encode()).unwrap();
        assert!(matches!(b.recv(), Err(RecvError::Desync(_))));
    }
}
