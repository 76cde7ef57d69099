//! The client library: what a compute runtime uses instead of opening the device itself.
//!
//! ```no_run
//! use driver::daemon::DaemonClient;
//! use driver::DeviceOps;
//! let client = DaemonClient::connect(&driver::daemon::default_socket_path())?;
//! let mut arena = client.alloc_arena(1 << 20)?; // memory the device can reach
//! client.fill(&mut arena[..], 0x5a5a_5a5a_5a5a_5a5a)?;
//! assert!(arena.iter().all(|b| *b == 0x5a));
//! # Ok::<(), driver::Error>(())
//! ```
//!
//! Device-visible memory lives in arenas ([`DaemonClient::alloc_arena`]): the daemon cannot
//! reach this process's private memory, so a command naming any other address fails with
//! [`crate::fault::CancelReason::Unreachable`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accel_abi::{Completion, Status};

use super::protocol::{
    self, kind, ClientLimits, CompletionEvent, DeviceLostNotice, ErrorCode, Header, Reply, Request,
    StatsReply, HEADER_SIZE, MAX_PAYLOAD, REPLY, STATUS_DEVICE_LOST, VERSION,
};
use crate::backend::DeviceLost;
use crate::runtime::{completion_result, DeviceOps, Op};
use crate::sys::shared_mem::SharedMemory;
use crate::sys::unix_msg;
use crate::Error;

/// A command submitted through the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a submitted command must be waited for"]
pub struct DaemonTicket {
    /// The tag its completion carries.
    pub tag: u64,
}

struct Conn {
    sock: UnixStream,
    next_id: u32,
    completions: HashMap<u64, CompletionEvent>,
    /// Set once the session is unusable (the daemon said so, or the stream broke).
    broken: Option<String>,
    /// Set when the daemon said its device is lost ([`kind::DEVICE_LOST`]): every command
    /// not completed yet, and every later request, fails with [`Error::DeviceLost`].
    lost: Option<DeviceLost>,
}

/// A session with the daemon: one device address space mirroring this process.
pub struct DaemonClient {
    conn: Mutex<Conn>,
    next_tag: AtomicU64,
    client_id: u32,
    asid: u16,
    limits: ClientLimits,
}

fn io_err(what: &str, e: io::Error) -> Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        return Error::Timeout("a daemon reply");
    }
    Error::DaemonConnection(format!("{what}: {e}"))
}

impl Conn {
    fn send(&mut self, kind: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<u32, Error> {
        if let Some(why) = &self.broken {
            return Err(Error::DaemonConnection(why.clone()));
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let frame = protocol::frame(kind, id, payload);
        let mut sent = unix_msg::send(self.sock.as_fd(), &frame, fds)
            .map_err(|e| self.break_with("send", e))?;
        while sent < frame.len() {
            sent += unix_msg::send(self.sock.as_fd(), &frame[sent..], &[])
                .map_err(|e| self.break_with("send", e))?;
        }
        Ok(id)
    }

    /// A send failed: if the daemon refused us and closed (at the door, or after too many
    /// protocol violations), its explanation is still readable; prefer it to the socket error.
    fn refusal_behind(&mut self, send_error: Error) -> Error {
        if !matches!(send_error, Error::DaemonConnection(_)) {
            return send_error;
        }
        self.broken = None;
        match self.reply_to(kind::HELLO, u32::MAX) {
            Err(refusal @ Error::Daemon { .. }) => refusal,
            _ => {
                self.broken = Some(send_error.to_string());
                send_error
            }
        }
    }

    fn break_with(&mut self, what: &str, e: io::Error) -> Error {
        let err = io_err(what, e);
        if !matches!(err, Error::Timeout(_)) {
            self.broken = Some(err.to_string());
        }
        err
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        let mut got = 0;
        let mut fds = Vec::new();
        while got < buf.len() {
            let (n, _) = unix_msg::recv(self.sock.as_fd(), &mut buf[got..], &mut fds)
                .map_err(|e| self.break_with("receive", e))?;
            // The daemon never sends descriptors; any that arrive are closed here.
            fds.clear();
            if n == 0 {
                let why = "the daemon closed the connection".to_string();
                self.broken = Some(why.clone());
                return Err(Error::DaemonConnection(why));
            }
            got += n;
        }
        Ok(())
    }

    /// Read frames until the reply to request `id` of `kind`, keeping completions for later.
    fn reply_to(&mut self, request_kind: u16, id: u32) -> Result<Reply, Error> {
        loop {
            let mut head = [0u8; HEADER_SIZE];
            self.read_exact(&mut head)?;
            let header = Header::decode(&head).map_err(|e| {
                self.broken = Some(format!("unreadable frame from the daemon: {e}"));
                Error::DaemonConnection(e.to_string())
            })?;
            let mut payload = vec![0u8; header.len.min(MAX_PAYLOAD) as usize];
            self.read_exact(&mut payload)?;
            if header.kind == kind::DEVICE_LOST {
                let notice = DeviceLostNotice::decode(&payload)
                    .map_err(|e| Error::DaemonConnection(e.to_string()))?;
                let lost = notice.to_lost();
                tracing::error!(%lost, "the daemon's device is lost");
                self.lost = Some(lost);
                if id == 0 {
                    return Ok(Reply::Done);
                }
                continue;
            }
            if header.kind == kind::COMPLETION {
                let e = CompletionEvent::decode(&payload)
                    .map_err(|e| Error::DaemonConnection(e.to_string()))?;
                self.completions.insert(e.tag, e);
                if id == 0 {
                    return Ok(Reply::Done);
                }
                continue;
            }
            if header.kind & REPLY == 0 {
                return Err(Error::DaemonConnection(format!(
                    "unexpected frame kind {:#06x} from the daemon",
                    header.kind
                )));
            }
            let reply = Reply::decode(header.kind & !REPLY, &payload)
                .map_err(|e| Error::DaemonConnection(e.to_string()))?;
            if header.id == id && header.kind == request_kind | REPLY {
                return Ok(reply);
            }
            if let Reply::Error { code, message } = reply {
                // A session-level refusal (id 0): the daemon closes the connection after it.
                self.broken = Some(message.clone());
                return Err(Error::Daemon { code, message });
            }
            return Err(Error::DaemonConnection(format!(
                "reply to request {} while waiting for {id}",
                header.id
            )));
        }
    }

    fn request(&mut self, req: Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, Error> {
        let (k, payload) = req.encode();
        let id = match self.send(k, &payload, fds) {
            Ok(id) => id,
            Err(e) => {
                let e = self.refusal_behind(e);
                return Err(self.unless_lost(e));
            }
        };
        match self.reply_to(k, id).map_err(|e| self.unless_lost(e))? {
            Reply::Error { code, message } => {
                Err(self.unless_lost(Error::Daemon { code, message }))
            }
            r => Ok(r),
        }
    }

    /// The device-loss error if the daemon said (or `e` says) the device is lost: then that
    /// is why the session ended or the request failed; else `e`.
    fn unless_lost(&self, e: Error) -> Error {
        match (&self.lost, e) {
            (_, e @ Error::DeviceLost(_)) => e,
            (Some(lost), Error::DaemonConnection(_) | Error::Timeout(_)) => {
                Error::DeviceLost(lost.clone())
            }
            (
                lost,
                Error::Daemon {
                    code: ErrorCode::DeviceLost,
                    message,
                },
            ) => Error::DeviceLost(lost.clone().unwrap_or(DeviceLost {
                backend: "unknown backend",
                device: "the daemon's device".into(),
                reason: message,
            })),
            (_, e) => e,
        }
    }

    /// The error of a command the daemon completed with [`STATUS_DEVICE_LOST`].
    fn lost_command(&self) -> Error {
        Error::DeviceLost(self.lost.clone().unwrap_or(DeviceLost {
            backend: "unknown backend",
            device: "the daemon's device".into(),
            reason: "the daemon reported the device lost".into(),
        }))
    }
}

impl DaemonClient {
    /// Connect to the daemon at `path` and start a session: this process's userfaultfd (made
    /// here, closed here once sent, so this process never waits on a dead daemon) and pidfd go
    /// to the daemon, which builds a mirror of this process and a device address space for it.
    pub fn connect(path: &Path) -> Result<Arc<DaemonClient>, Error> {
        Self::connect_with(path, Duration::from_secs(30))
    }

    /// Like [`DaemonClient::connect`], with the longest wait for any one reply.
    pub fn connect_with(path: &Path, timeout: Duration) -> Result<Arc<DaemonClient>, Error> {
        let sock = UnixStream::connect(path)
            .map_err(|e| Error::DaemonConnection(format!("connect to {}: {e}", path.display())))?;
        sock.set_read_timeout(Some(timeout))
            .and_then(|_| sock.set_write_timeout(Some(timeout)))
            .map_err(|e| io_err("set socket timeouts", e))?;
        let uffd = mirror::uffd::create_uninitialised().map_err(Error::Mirror)?;
        let pidfd =
            unix_msg::pidfd_open(std::process::id() as libc::pid_t).map_err(|e| Error::Os {
                what: "pidfd_open(self)",
                source: e,
            })?;
        let mut conn = Conn {
            sock,
            next_id: 1,
            completions: HashMap::new(),
            broken: None,
            lost: None,
        };
        let hello = Request::Hello {
            min_version: VERSION,
            max_version: VERSION,
        };
        let reply = conn.request(hello, &[uffd.as_fd(), pidfd.as_fd()]);
        // Our copy must go whatever the answer: with it open, a dead daemon would leave every
        // munmap of a registered range here waiting forever.
        drop(uffd);
        match reply? {
            Reply::Hello {
                client_id,
                asid,
                limits,
                ..
            } => Ok(Arc::new(DaemonClient {
                conn: Mutex::new(conn),
                next_tag: AtomicU64::new(1),
                client_id,
                asid,
                limits,
            })),
            other => Err(Error::DaemonConnection(format!(
                "unexpected answer to HELLO: {other:?}"
            ))),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The daemon's name for this session.
    pub fn client_id(&self) -> u32 {
        self.client_id
    }

    /// The device address space this session owns.
    pub fn asid(&self) -> u16 {
        self.asid
    }

    /// The limits the daemon applies to this session.
    pub fn limits(&self) -> ClientLimits {
        self.limits
    }

    /// Allocate `len` bytes (rounded up to 4 KiB) the device can reach, and register them.
    pub fn alloc_arena(self: &Arc<Self>, len: usize) -> Result<ClientArena, Error> {
        let len = len
            .checked_next_multiple_of(4096)
            .filter(|l| *l > 0)
            .ok_or(Error::InvalidArgument("arena length must be positive"))?;
        let mem = SharedMemory::new(len, &self.client_id.to_string()).map_err(|e| Error::Os {
            what: "create arena memory",
            source: e,
        })?;
        let req = Request::RegisterArena {
            va: mem.va(),
            len: len as u64,
            offset: 0,
        };
        let writable = match self.conn().request(req, &[mem.fd()])? {
            Reply::Arena { writable } => writable,
            other => {
                return Err(Error::DaemonConnection(format!(
                    "unexpected answer to REGISTER_ARENA: {other:?}"
                )))
            }
        };
        Ok(ClientArena {
            mem,
            client: self.clone(),
            writable,
        })
    }

    /// Send a raw request (tests and tools; [`DaemonClient::alloc_arena`] and the
    /// [`DeviceOps`] methods are the normal way).
    pub fn raw_request(&self, req: Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, Error> {
        self.conn().request(req, fds)
    }

    /// Submit `op` on this session's device address space.
    ///
    /// # Safety
    /// As [`DeviceOps::submit_op`]: the device writes the addresses `op` names (inside arenas)
    /// until [`DaemonClient::wait`] returns for the ticket.
    pub unsafe fn submit(&self, op: Op) -> Result<DaemonTicket, Error> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        match self.conn().request(Request::Submit { tag, op }, &[])? {
            Reply::Submitted => Ok(DaemonTicket { tag }),
            other => Err(Error::DaemonConnection(format!(
                "unexpected answer to SUBMIT: {other:?}"
            ))),
        }
    }

    /// Submit several commands with one round trip: every SUBMIT is sent before any reply is
    /// read. One result per op, in order (a refused op, e.g. past the in-flight quota, does not
    /// stop the ones after it from being tried).
    ///
    /// # Safety
    /// As [`DaemonClient::submit`], for every op.
    pub unsafe fn submit_batch(&self, ops: &[Op]) -> Vec<Result<DaemonTicket, Error>> {
        let mut conn = self.conn();
        let mut sent = Vec::with_capacity(ops.len());
        for op in ops {
            let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
            let (k, payload) = Request::Submit { tag, op: *op }.encode();
            sent.push((tag, conn.send(k, &payload, &[])));
        }
        sent.into_iter()
            .map(|(tag, id)| {
                let reply = id.and_then(|id| conn.reply_to(kind::SUBMIT, id));
                match reply.map_err(|e| conn.unless_lost(e))? {
                    Reply::Submitted => Ok(DaemonTicket { tag }),
                    Reply::Error { code, message } => {
                        Err(conn.unless_lost(Error::Daemon { code, message }))
                    }
                    other => Err(Error::DaemonConnection(format!(
                        "unexpected answer to SUBMIT: {other:?}"
                    ))),
                }
            })
            .collect()
    }

    /// Wait for `ticket`'s completion; the command's result value.
    pub fn wait(&self, ticket: DaemonTicket) -> Result<u64, Error> {
        let mut conn = self.conn();
        loop {
            if let Some(e) = conn.completions.remove(&ticket.tag) {
                if e.status == STATUS_DEVICE_LOST {
                    return Err(conn.lost_command());
                }
                let status = Status::from_u32(e.status).unwrap_or(Status::BadCommand);
                return completion_result(Completion {
                    status,
                    result: e.result,
                });
            }
            if let Some(why) = &conn.broken {
                let e = Error::DaemonConnection(why.clone());
                return Err(conn.unless_lost(e));
            }
            if let Err(e) = conn.reply_to(0, 0) {
                return Err(conn.unless_lost(e));
            }
        }
    }

    /// Why the daemon's device is lost, once the daemon said so (every command not completed
    /// by then fails with [`Error::DeviceLost`], and so does every later request).
    pub fn device_lost(&self) -> Option<DeviceLost> {
        self.conn().lost.clone()
    }

    /// This session's and the daemon's statistics.
    pub fn stats(&self) -> Result<StatsReply, Error> {
        match self.conn().request(Request::Stats, &[])? {
            Reply::Stats(s) => Ok(s),
            other => Err(Error::DaemonConnection(format!(
                "unexpected answer to STATS: {other:?}"
            ))),
        }
    }

    /// End the session now (dropping the last reference does it implicitly: the daemon
    /// releases a client whose connection closes).
    pub fn goodbye(&self) -> Result<(), Error> {
        self.conn().request(Request::Goodbye, &[]).map(drop)
    }

    /// Tear the device's view of `[va, va + len)` down (4 KiB aligned): this session's, and
    /// that of every client of the daemon that maps the same file pages as an arena. Bracket
    /// with it what no userfaultfd event reports, `fallocate(PUNCH_HOLE)` or `ftruncate` of an
    /// arena's memfd: call it after the change (and before it too, if device work must not
    /// use the old pages while it runs). When it returns, no client's device entry for those
    /// pages is left (each was cleared, the device TLB invalidated and fenced); the next
    /// device access faults them in again.
    pub fn invalidate(&self, va: u64, len: u64) -> Result<(), Error> {
        match self.conn().request(Request::Invalidate { va, len }, &[])? {
            Reply::Done => Ok(()),
            other => Err(Error::DaemonConnection(format!(
                "unexpected answer to INVALIDATE: {other:?}"
            ))),
        }
    }
}

impl DeviceOps for DaemonClient {
    type Ticket = DaemonTicket;

    unsafe fn submit_op(&self, op: Op) -> Result<DaemonTicket, Error> {
        // SAFETY: forwarded to our caller.
        unsafe { self.submit(op) }
    }

    fn wait_op(&self, ticket: DaemonTicket) -> Result<u64, Error> {
        self.wait(ticket)
    }
}

/// Memory shared with the daemon, reachable by the device at its ordinary addresses.
/// Dropping it unregisters it (the daemon tears the device's view of it down first).
pub struct ClientArena {
    mem: SharedMemory,
    client: Arc<DaemonClient>,
    writable: bool,
}

impl ClientArena {
    /// Its address (the device uses the same one).
    pub fn va(&self) -> u64 {
        self.mem.va()
    }

    /// Whether the daemon lets the device write it.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Give its pages back (they read as zeroes afterwards); the device's entries for them go
    /// too, and its next access faults them in again.
    pub fn discard(&mut self) -> Result<(), Error> {
        self.mem.discard().map_err(|source| Error::Os {
            what: "madvise(MADV_REMOVE) an arena",
            source,
        })
    }
}

impl std::ops::Deref for ClientArena {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.mem.bytes()
    }
}

impl std::ops::DerefMut for ClientArena {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.mem.bytes_mut()
    }
}

impl Drop for ClientArena {
    fn drop(&mut self) {
        let req = Request::UnregisterArena { va: self.mem.va() };
        if let Err(e) = self.client.conn().request(req, &[]) {
            // Unmapping it below still reaches the daemon as a userfaultfd event.
            tracing::debug!(error = %e, "unregistering an arena failed");
        }
    }
}

/// Why a daemon request failed, if it was the daemon that refused it.
pub fn refusal(e: &Error) -> Option<(ErrorCode, &str)> {
    match e {
        Error::Daemon { code, message } => Some((*code, message.as_str())),
        _ => None,
    }
}
