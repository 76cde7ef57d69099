//! The client library: what a compute runtime uses instead of opening the device itself.
//!
//! ```no_run
//! use driver::DeviceOps;
//! use mirrord_client::DaemonClient;
//! let client = DaemonClient::connect(&mirrord_client::checked_default_socket_path()?)?;
//! let mut arena = client.alloc_arena(1 << 20)?; // memory the device can reach
//! client.fill(&mut arena[..], 0x5a5a_5a5a_5a5a_5a5a)?;
//! assert!(arena.iter().all(|b| *b == 0x5a));
//! # Ok::<(), driver::Error>(())
//! ```
//!
//! Device-visible memory lives in arenas ([`DaemonClient::alloc_arena`]): the daemon cannot
//! reach this process's private memory, so a command naming any other address fails with
//! [`driver::fault::CancelReason::Unreachable`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accel_abi::{Completion, Status};

use crate::protocol::{
    self, kind, ClientLimits, CompletionEvent, DeviceLostNotice, ErrorCode, Header, Reply, Request,
    StatsReply, HEADER_SIZE, MAX_PAYLOAD, REPLY, STATUS_DEVICE_LOST, VERSION,
};
use crate::shared_mem::SharedMemory;
use crate::unix_msg;
use driver::backend::DeviceLost;
use driver::runtime::{completion_result, DeviceOps, Op};
use driver::Error;
use sys_util::sync::lock;

/// A command submitted through the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a submitted command must be waited for"]
pub struct DaemonTicket {
    /// The tag its completion carries.
    pub tag: u64,
}

struct Conn {
    sock: UnixStream,
    /// When a frame last came from the daemon (read by any thread): a wait gives up only after
    /// the reply timeout without one.
    heard: std::time::Instant,
    next_id: u32,
    completions: HashMap<u64, CompletionEvent>,
    /// Tags the daemon accepted whose completion has not arrived yet: the daemon counts the
    /// same commands against the in-flight quota (it forgets one before it sends its
    /// completion), so [`DaemonClient::submit_batch`] keeps this under the quota.
    in_flight: HashSet<u64>,
    /// Set once the session is unusable (the daemon said so, or the stream broke): why, without
    /// the "daemon connection: " that [`Error::DaemonConnection`] puts in front when shown.
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
    /// How long a wait goes without any frame from the daemon before it gives up.
    reply_timeout: Duration,
}

/// A wait failed while the daemon may still run the command: unless the device is lost (then
/// nothing runs), end the session and return once the daemon released it, so the command can
/// no longer reach this process's arenas.
fn end_session(conn: &mut Conn, e: Error) -> Error {
    let e = conn.unless_lost(e);
    if matches!(e, Error::DeviceLost(_)) {
        return e;
    }
    end_session_and_await_release(conn, &e);
    match e {
        Error::Timeout(_) => Error::Timeout(
            "the command's completion from the daemon; the session was ended, and the daemon \
             released it (device view torn down and fenced) before this returned: connect again \
             to go on",
        ),
        e => e,
    }
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

/// What [`Conn::broken`] keeps of `e`: a [`Error::DaemonConnection`]'s own text (kept whole, it
/// would gain one "daemon connection: " each time a later call returned it).
fn why_broken(e: &Error) -> String {
    match e {
        Error::DaemonConnection(why) => why.clone(),
        other => other.to_string(),
    }
}

/// The same failure again, for each op of a batch that `e` stopped ([`Error`] is not `Clone`).
fn same_failure(e: &Error) -> Error {
    match e {
        Error::Timeout(what) => Error::Timeout(what),
        Error::DeviceLost(lost) => Error::DeviceLost(lost.clone()),
        Error::Daemon { code, message } => Error::Daemon {
            code: *code,
            message: message.clone(),
        },
        other => Error::DaemonConnection(why_broken(other)),
    }
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
                self.broken = Some(why_broken(&send_error));
                send_error
            }
        }
    }

    fn break_with(&mut self, what: &str, e: io::Error) -> Error {
        let err = io_err(what, e);
        if !matches!(err, Error::Timeout(_)) {
            self.broken = Some(why_broken(&err));
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
            self.heard = std::time::Instant::now();
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
                self.in_flight.remove(&e.tag);
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

    /// What the daemon's answer to the SUBMIT of `tag` means for the caller.
    fn submitted(&mut self, tag: u64, answer: Result<Reply, Error>) -> Result<DaemonTicket, Error> {
        match answer.map_err(|e| self.unless_lost(e))? {
            Reply::Submitted => {
                // A completion that overtook its answer has nothing in flight any more.
                if !self.completions.contains_key(&tag) {
                    self.in_flight.insert(tag);
                }
                Ok(DaemonTicket { tag })
            }
            Reply::Error { code, message } => {
                Err(self.unless_lost(Error::Daemon { code, message }))
            }
            other => Err(Error::DaemonConnection(format!(
                "unexpected answer to SUBMIT: {other:?}"
            ))),
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

/// How [`DaemonClient::connect_with_options`] connects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The longest wait for any one reply (30 s).
    pub reply_timeout: Duration,
    /// Uids besides root and this process's own whose daemon this client trusts with its
    /// userfaultfd and pidfd (none).
    pub trusted_uids: Vec<u32>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            reply_timeout: Duration::from_secs(30),
            trusted_uids: Vec::new(),
        }
    }
}

impl ConnectOptions {
    /// With `timeout` as the longest wait for any one reply.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// Also trust a daemon running as `uid` (a daemon of a service account, say).
    pub fn trust_uid(mut self, uid: u32) -> Self {
        self.trusted_uids.push(uid);
        self
    }
}

/// Refuses a daemon this process does not trust, before it is sent anything: whoever listens
/// on the socket receives this process's userfaultfd (with it, it could write into this
/// process's memory) and pidfd. The listener's credentials come from the kernel
/// (SO_PEERCRED: who called listen()), so they cannot be forged by the listener.
fn check_daemon_identity(
    sock: &UnixStream,
    path: &Path,
    options: &ConnectOptions,
) -> Result<(), Error> {
    let cred = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| Error::Os {
            what: "SO_PEERCRED on the daemon socket",
            source: e.into(),
        })?;
    let (uid, own) = (cred.uid(), nix::unistd::geteuid().as_raw());
    if uid == 0 || uid == own || options.trusted_uids.contains(&uid) {
        return Ok(());
    }
    Err(Error::DaemonConnection(format!(
        "refusing the daemon at {}: it runs as uid {uid} (pid {}), which is neither root nor \
         this process's uid {own} nor a trusted uid {:?}, so it was sent nothing (not this \
         process's userfaultfd, not its pidfd); another local user may have bound the socket \
         first. If that uid's daemon is meant to serve you, trust it: \
         ConnectOptions::trust_uid({uid}) with DaemonClient::connect_with_options",
        path.display(),
        cred.pid(),
        options.trusted_uids,
    )))
}

impl DaemonClient {
    /// Connect to the daemon at `path` and start a session: this process's userfaultfd (made
    /// here, closed here once sent, so this process never waits on a dead daemon) and pidfd go
    /// to the daemon, which builds a mirror of this process and a device address space for it.
    ///
    /// The daemon must run as root or as this process's uid (SO_PEERCRED, checked before
    /// anything is sent); [`DaemonClient::connect_with_options`] trusts others.
    pub fn connect(path: &Path) -> Result<Arc<DaemonClient>, Error> {
        Self::connect_with_options(path, &ConnectOptions::default())
    }

    /// Like [`DaemonClient::connect`], with the longest wait for any one reply.
    pub fn connect_with(path: &Path, timeout: Duration) -> Result<Arc<DaemonClient>, Error> {
        Self::connect_with_options(path, &ConnectOptions::default().timeout(timeout))
    }

    /// Like [`DaemonClient::connect`], with `options`.
    pub fn connect_with_options(
        path: &Path,
        options: &ConnectOptions,
    ) -> Result<Arc<DaemonClient>, Error> {
        let timeout = options.reply_timeout;
        let sock = UnixStream::connect(path)
            .map_err(|e| Error::DaemonConnection(format!("connect to {}: {e}", path.display())))?;
        check_daemon_identity(&sock, path, options)?;
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
            heard: std::time::Instant::now(),
            next_id: 1,
            completions: HashMap::new(),
            in_flight: HashSet::new(),
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
                reply_timeout: timeout,
            })),
            other => Err(Error::DaemonConnection(format!(
                "unexpected answer to HELLO: {other:?}"
            ))),
        }
    }

    /// A command's failure as the caller should read it: a fault cancelled for the
    /// mapped-bytes quota says which quota, its value and how to raise it (the daemon's
    /// completion carries only the cancel code).
    fn explained(&self, e: Error) -> Error {
        match e {
            Error::Cancelled {
                reason: driver::fault::CancelReason::Quota,
            } => Error::QuotaExceeded {
                quota: "mapped (pinned) bytes per client (the command was cancelled, its \
                        pages would not fit; raise it with mirrorctl serve --max-mapped-mib or \
                        DaemonConfig::limits.max_mapped_bytes)",
                limit: self.limits.max_mapped_bytes,
            },
            e => e,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        lock(&self.conn)
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
        let mut conn = self.conn();
        let answer = conn.request(Request::Submit { tag, op }, &[]);
        conn.submitted(tag, answer)
    }

    /// Submit several commands, pipelined: SUBMITs go out without waiting for each answer,
    /// but never more than the in-flight quota ([`ClientLimits::max_in_flight`]) counting
    /// both the commands not answered yet and those accepted and not completed; when the
    /// quota is full this waits for completions (kept for [`DaemonClient::wait`]) before it
    /// sends more. So a batch of any size is submitted whole, and the daemon is never asked
    /// for more than it takes, nor left writing answers nobody reads. One result per op, in
    /// order (a refused op does not stop the ones after it from being tried; a broken session
    /// or a reply timeout fails every op not answered yet).
    ///
    /// # Safety
    /// As [`DaemonClient::submit`], for every op.
    pub unsafe fn submit_batch(&self, ops: &[Op]) -> Vec<Result<DaemonTicket, Error>> {
        let mut conn = self.conn();
        let quota = self.limits.max_in_flight.max(1) as usize;
        let mut results: Vec<Option<Result<DaemonTicket, Error>>> =
            ops.iter().map(|_| None).collect();
        // Sent and not answered yet, oldest first (the daemon answers in order): op index,
        // tag, request id.
        let mut unanswered: VecDeque<(usize, u64, u32)> = VecDeque::new();
        let mut next = 0;
        let stopped = loop {
            if next < ops.len() && conn.in_flight.len() + unanswered.len() < quota {
                let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
                let (k, payload) = Request::Submit { tag, op: ops[next] }.encode();
                match conn.send(k, &payload, &[]) {
                    Ok(id) => unanswered.push_back((next, tag, id)),
                    Err(e) => {
                        // The session is over: this op and every one not answered yet fail.
                        let e = conn.refusal_behind(e);
                        break Some(conn.unless_lost(e));
                    }
                }
                next += 1;
                continue;
            }
            if let Some((at, tag, id)) = unanswered.pop_front() {
                let answer = conn.reply_to(kind::SUBMIT, id);
                let failed_reading = answer.as_ref().err().map(same_failure);
                results[at] = Some(conn.submitted(tag, answer));
                match failed_reading {
                    Some(e) => break Some(e),
                    None => continue,
                }
            }
            if next == ops.len() {
                break None;
            }
            // The quota is full of commands running: a completion frees a slot.
            if let Err(e) = conn.reply_to(0, 0) {
                break Some(conn.unless_lost(e));
            }
        };
        results
            .into_iter()
            .map(|r| match (r, &stopped) {
                (Some(r), _) => r,
                (None, Some(e)) => Err(same_failure(e)),
                (None, None) => Err(Error::DaemonConnection(
                    "internal: a batched op was never sent".into(),
                )),
            })
            .collect()
    }

    /// Wait for `ticket`'s completion; the command's result value.
    ///
    /// When this returns, with a result or an error, the device can no longer touch the
    /// memory the command names. If no frame comes from the daemon within the session's reply
    /// timeout, or the session breaks while the daemon may still be running the command, this
    /// ends the session and returns only once the daemon has closed it: the daemon closes a
    /// session after releasing its client (device view torn down and fenced, DMA unmapped,
    /// leftover work cancelled or its address space quarantined), so the command can no longer
    /// reach this process's arenas. Every later request on this client then fails.
    ///
    /// Waits of several threads share the connection in slices of at most 10 ms, so one
    /// thread's long wait does not hold up another's submit or wait.
    pub fn wait(&self, ticket: DaemonTicket) -> Result<u64, Error> {
        match self.wait_until(ticket, None)? {
            Some(result) => Ok(result),
            None => unreachable!("a wait without a deadline ends with a result or an error"),
        }
    }

    /// Wait at most `timeout` (zero: just look) for `ticket`'s completion: `Ok(Some(result))`
    /// once it came (the ticket is collected), `Ok(None)` while the command still runs (the
    /// ticket stays in flight and the device may still access the command's memory: wait for
    /// it again). An error, or a session that broke, is handled as [`DaemonClient::wait`]
    /// handles it: the session is ended and the call returns only once the daemon released it.
    pub fn wait_for(&self, ticket: DaemonTicket, timeout: Duration) -> Result<Option<u64>, Error> {
        self.wait_until(ticket, Some(std::time::Instant::now() + timeout))
    }

    /// The one wait loop: each step takes the connection, looks for the completion, and else
    /// polls the socket for at most 10 ms and reads one frame if one came. `None` once
    /// `deadline` passed with the command still running.
    fn wait_until(
        &self,
        ticket: DaemonTicket,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<u64>, Error> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::time::Instant;
        const SLICE: Duration = Duration::from_millis(10);
        let started = Instant::now();
        loop {
            let mut conn = self.conn();
            if let Some(e) = conn.completions.remove(&ticket.tag) {
                if e.status == STATUS_DEVICE_LOST {
                    return Err(conn.lost_command());
                }
                let status = Status::from_u32(e.status).unwrap_or(Status::BadCommand);
                return completion_result(Completion {
                    status,
                    result: e.result,
                })
                .map(Some)
                .map_err(|e| self.explained(e));
            }
            if let Some(why) = &conn.broken {
                let e = Error::DaemonConnection(why.clone());
                return Err(end_session(&mut conn, e));
            }
            let now = Instant::now();
            // Quiet since this wait began, and since any thread last heard the daemon.
            let heard = conn.heard.max(started);
            if now.duration_since(heard) >= self.reply_timeout {
                return Err(end_session(&mut conn, Error::Timeout("a daemon reply")));
            }
            let slice = deadline.map_or(SLICE, |d| d.saturating_duration_since(now).min(SLICE));
            let ms = u16::try_from(slice.as_millis()).unwrap_or(10);
            let mut fds = [PollFd::new(conn.sock.as_fd(), PollFlags::POLLIN)];
            let readable = match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => {
                    let e = Error::Os {
                        what: "poll the daemon connection",
                        source: e.into(),
                    };
                    return Err(end_session(&mut conn, e));
                }
            };
            if readable {
                // Still under the lock the poll was made under: nobody else read the frame. The
                // daemon writes whole frames, so the rest of it follows at once (bounded by the
                // socket's read timeout, the reply timeout).
                if let Err(e) = conn.reply_to(0, 0) {
                    return Err(end_session(&mut conn, e));
                }
                // The frame read may be this ticket's completion: look again first.
                continue;
            }
            // Checked after the socket was looked at once, so a zero timeout still reads what
            // the daemon has sent.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
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

/// A wait is ending without its command's completion while the daemon may still run the
/// command: end the session (our write side, so the daemon reads end-of-stream and releases us)
/// and read until the daemon closes its side, which it does only after the release. No bound:
/// returning sooner could let the device write an arena the caller has reused. A stream that
/// breaks (reset) means the daemon is gone, and with it its device's access to our memfds.
fn end_session_and_await_release(conn: &mut Conn, why: &Error) {
    if conn.broken.is_none() {
        conn.broken = Some(format!("session ended after a failed wait: {why}"));
    }
    if let Err(e) = conn.sock.shutdown(std::net::Shutdown::Write) {
        if e.kind() != io::ErrorKind::NotConnected {
            tracing::debug!(error = %e, "shutting our side of the daemon session down");
        }
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut fds = Vec::new();
    let started = std::time::Instant::now();
    loop {
        match unix_msg::recv(conn.sock.as_fd(), &mut buf, &mut fds) {
            Ok((0, _)) => break,
            Ok(_) => fds.clear(),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                tracing::warn!(waited = ?started.elapsed(), "waiting for the daemon to release this session before a failed wait returns (its device may still reach our arenas)");
            }
            Err(_) => break,
        }
    }
    tracing::warn!(error = %why, waited = ?started.elapsed(), "daemon session ended after a failed wait; the daemon released it");
}

// SAFETY: `wait_op` (DaemonClient::wait) returns only with the command's completion, on a lost
// device, or once the daemon has released the session (see `end_session_and_await_release`):
// in each case the device can no longer reach the memory the command names.
unsafe impl DeviceOps for DaemonClient {
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

/// Where the daemon listens unless told otherwise, in a directory no other user can write:
/// `$XDG_RUNTIME_DIR/mirrord.sock` (the directory checked as below), else
/// `/run/mirrord.sock` for root, else `/tmp/mirrord-UID/mirrord.sock`, its directory made
/// private by [`checked_private_dir`]. A socket straight in `/tmp` (as `/tmp/mirrord-UID.sock`
/// was) could be bound first by any local user; the client's SO_PEERCRED check would then
/// refuse to talk, but the daemon could not serve.
pub fn checked_default_socket_path() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        check_private(
            &dir,
            &std::fs::metadata(&dir).map_err(|e| dir_error(&dir, e))?,
        )?;
        return Ok(dir.join("mirrord.sock"));
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Ok(PathBuf::from("/run/mirrord.sock"));
    }
    let dir = std::env::temp_dir().join(format!("mirrord-{uid}"));
    checked_private_dir(&dir)?;
    Ok(dir.join("mirrord.sock"))
}

/// Make `dir` (mode 0700) unless it exists, then check that it is a directory (not a symbolic
/// link), owned by this process's uid, that no other user can write or search: somebody else
/// who made it first could otherwise take or replace the socket inside. An error names what
/// is wrong and the ways out (`XDG_RUNTIME_DIR`, `--socket`).
pub fn checked_private_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(dir_error(dir, e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| dir_error(dir, e))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(dir, "is a symbolic link".into()));
    }
    check_private(dir, &meta)
}

fn check_private(dir: &Path, meta: &std::fs::Metadata) -> Result<(), Error> {
    let own = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() {
        return Err(unsafe_dir(dir, "is not a directory".into()));
    }
    if meta.uid() != own {
        return Err(unsafe_dir(
            dir,
            format!(
                "is owned by uid {}, not by this process's uid {own}",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(unsafe_dir(
            dir,
            format!("has mode {mode:04o}: other users may use it (it must be 0700)"),
        ));
    }
    Ok(())
}

fn dir_error(dir: &Path, e: io::Error) -> Error {
    unsafe_dir(dir, format!("cannot be made or read: {e}"))
}

fn unsafe_dir(dir: &Path, why: String) -> Error {
    Error::DaemonConnection(format!(
        "the daemon socket directory {} {why}; set XDG_RUNTIME_DIR to a private directory \
         of your own (mode 0700), or name a socket with --socket (DaemonConfig::new)",
        dir.display()
    ))
}
