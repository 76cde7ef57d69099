//! The daemon server behind `mirrorctl serve` (docs/daemon.md): one device serving many client
//! processes, each mirrored into its own device address space.
//!
//! A client is authenticated by SO_PEERCRED (uid allow-list), hands over its userfaultfd and a
//! pidfd, and registers memfd arenas: the device reaches that client's memory through those
//! arenas only ([`driver::context::Reach::Arenas`]), so no client can make it touch another's
//! memory or the daemon's. Faults are serviced against the client's own mirror, with a fair
//! share of each fault batch per client; quotas bound pins, in-flight commands, arenas and
//! clients. The client side and the wire format are the `mirrord-client` package.
//!
//! The server: accept clients on a Unix socket, give each its own device address space
//! mirroring its process, run its commands, release it when it leaves or dies.
//!
//! Threads: tokio tasks own the sockets (one reader and one session task per client); blocking
//! driver work (building a mirror, registering an arena, releasing a client) goes to tokio's
//! blocking pool; one completion pump thread collects finished commands for every client and
//! hands them to the sessions; the runtime's fault-service thread services every client's faults
//! against that client's own mirror.

#![deny(missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use mirror::{AddressSpace, VaRange};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use driver::arena::{ArenaError, ArenaLimits, ArenaTable};
use driver::backend::DeviceLost;
use driver::context::{ContextOptions, Reach};
use driver::device::{backoff, Ticket};
use driver::fault::ServiceMode;
use driver::runtime::{Context, Runtime};
use driver::Error;
use mirrord_client::protocol::{
    self, kind, ClientLimits, CompletionEvent, DecodeError, DeviceLostNotice, ErrorCode, Header,
    Reply, Request, StatsReply, HEADER_SIZE, MAX_PAYLOAD, REPLY, STATUS_DEVICE_LOST, VERSION,
};
use mirrord_client::unix_msg;
use sys_util::sync::{ignore_poison, lock};

/// How the daemon is set up.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The socket path.
    pub socket: PathBuf,
    /// Uids allowed to connect (SO_PEERCRED). Empty: only the daemon's own uid.
    pub allowed_uids: Vec<u32>,
    /// Most clients served at once (sessions past HELLO; connections still before HELLO are
    /// handshakes, limited by `max_handshakes`).
    pub max_clients: usize,
    /// Most clients of one uid at once (with several allowed uids, so one user cannot take
    /// every slot). Default: `max_clients`.
    pub max_clients_per_uid: usize,
    /// Per-client limits.
    pub limits: ClientLimits,
    /// Protocol violations (malformed, out-of-order, oversized messages) a client may commit
    /// before it is disconnected; each one is answered with an error first.
    pub max_strikes: u32,
    /// On shutdown, how long in-flight commands may take to finish before clients are released.
    pub drain_timeout: Duration,
    /// How long writing to a client may block (a client that stops reading is disconnected).
    pub write_timeout: Duration,
    /// How long a connection may take to complete HELLO (an idle or half-sent connection
    /// would otherwise hold a client slot forever).
    pub hello_timeout: Duration,
    /// Most connections before HELLO (handshakes in progress) at once; they hold no client slot.
    pub max_handshakes: usize,
    /// Most handshakes in progress of one uid at once, so idle connections of one user cannot
    /// keep everybody's new clients out.
    pub max_handshakes_per_uid: usize,
    /// How long a frame may take to arrive once its first byte has (a session stalled
    /// mid-frame would otherwise hold its client slot forever).
    pub frame_timeout: Duration,
    /// Most arena bytes (mapped into the daemon: device-written pages stay in its memory) all
    /// clients of one uid may hold at once.
    pub max_arena_bytes_per_uid: u64,
    /// Most arena bytes all clients together may hold at once.
    pub max_arena_bytes_total: u64,
    /// Bytes of one client's commands on the device at once (the sum of their lengths; a
    /// command larger than this still runs, alone). The device fetches its queue in order, so
    /// whatever one client has queued there runs before a command submitted after it: this
    /// bound is what keeps another client's small command from waiting behind a heavy client's
    /// whole in-flight quota. 0: no bound.
    pub device_bytes_per_client: u64,
    /// Pin budget of each client's context ([`driver::context::ContextOptions::pin_budget`]): past it the
    /// client's cold mappings are evicted (and fault back when used) instead of its commands
    /// being cancelled. `None`: none, and a client past `limits.max_mapped_bytes` is cancelled
    /// with `Quota`. Default 256 MiB, the default mapped-bytes quota: a client stays under the
    /// quota by eviction, and only a single run larger than the budget is refused.
    pub pin_budget_per_client: Option<u64>,
}

impl DaemonConfig {
    /// Defaults, listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            socket: socket.into(),
            allowed_uids: Vec::new(),
            max_clients: 64,
            max_clients_per_uid: 64,
            limits: ClientLimits {
                max_in_flight: 32,
                max_mapped_bytes: 256 << 20,
                max_arenas: 64,
                max_arena_bytes: 1 << 30,
            },
            max_strikes: 3,
            drain_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            max_handshakes: 64,
            max_handshakes_per_uid: 16,
            frame_timeout: Duration::from_secs(10),
            max_arena_bytes_per_uid: 8 << 30,
            max_arena_bytes_total: 16 << 30,
            device_bytes_per_client: DEFAULT_DEVICE_BYTES_PER_CLIENT,
            pin_budget_per_client: Some(256 << 20),
        }
    }

    fn uid_allowed(&self, uid: u32) -> bool {
        if self.allowed_uids.is_empty() {
            uid == nix::unistd::getuid().as_raw()
        } else {
            self.allowed_uids.contains(&uid)
        }
    }
}

/// Default [`DaemonConfig::device_bytes_per_client`]: 8 MiB, a few milliseconds of device time
/// on the emulator, so a small command waits at most about that long per heavy client.
pub const DEFAULT_DEVICE_BYTES_PER_CLIENT: u64 = 8 << 20;

/// One client's commands as [`Daemon::schedule`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSchedule {
    /// The daemon's name for the client.
    pub client_id: u32,
    /// Its process.
    pub pid: libc::pid_t,
    /// Commands submitted to the device so far.
    pub submitted: u64,
    /// Commands waiting for the client's device share (not yet on the device).
    pub waiting_for_device: u32,
    /// Commands accepted and not completed (waiting ones included).
    pub in_flight: u32,
}

/// The unit of the per-client device budget (a semaphore permit).
const BUDGET_UNIT: u64 = 4096;

/// One client past HELLO.
struct ClientState {
    id: u32,
    pid: libc::pid_t,
    uid: u32,
    ctx: Arc<Context>,
    mm: Arc<AddressSpace>,
    arenas: Arc<ArenaTable>,
    in_flight: Arc<AtomicU32>,
    commands: AtomicU64,
    /// This client's share of the device queue ([`DaemonConfig::device_bytes_per_client`], in
    /// [`BUDGET_UNIT`]s); `None` without a bound.
    device_share: Option<DeviceShare>,
    /// Commands of this client waiting for its device share.
    waiting_for_device: AtomicU32,
}

/// A submitted command the pump waits for.
struct Pending {
    ctx: Weak<Context>,
    ticket: Ticket,
    tag: u64,
    events: mpsc::UnboundedSender<CompletionEvent>,
    in_flight: Arc<AtomicU32>,
    _slot: OwnedSemaphorePermit,
    /// The command's part of its client's device share, given back when it completes.
    _device_share: Option<OwnedSemaphorePermit>,
}

/// Collects completions for every client on one thread.
struct Pump {
    pending: Mutex<Vec<Pending>>,
    added: Condvar,
    stop: AtomicBool,
    /// Set (once) when the pump finds the device lost: every session and the accept loop
    /// watch it.
    lost: watch::Sender<Option<DeviceLost>>,
    /// Commands failed because the device was lost.
    lost_commands: AtomicU64,
}

/// How long a session, told of the device loss, forwards the failed completions of its
/// client's commands before it ends (the pump fails them at once: this is only a bound).
const LOST_DRAIN: Duration = Duration::from_secs(5);

impl Pump {
    fn add(&self, p: Pending) {
        lock(&self.pending).push(p);
        self.added.notify_one();
    }

    fn run(&self, runtime: &Runtime) {
        let service = runtime.service();
        let mut spins = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            let seen = service.completion_generation();
            let lost = runtime.device_lost();
            if let Some(lost) = &lost {
                if self.lost.borrow().is_none() {
                    // Announced before any command is failed: a session then tells its client
                    // why before it forwards the failed completions.
                    tracing::error!(%lost, "device lost: failing every client's commands in flight and telling every client");
                    self.lost.send_replace(Some(lost.clone()));
                }
            }
            let mut keep_alive = Vec::new();
            let mut progressed = false;
            {
                let mut pending = lock(&self.pending);
                if pending.is_empty() {
                    let _ =
                        ignore_poison(self.added.wait_timeout(pending, Duration::from_millis(100)));
                    continue;
                }
                pending.retain(|p| {
                    let Some(ctx) = p.ctx.upgrade() else {
                        // Released: the release quiesced (or quarantined) its work.
                        p.in_flight.fetch_sub(1, Ordering::AcqRel);
                        return false;
                    };
                    let done = ctx.try_complete(p.ticket);
                    // Dropped outside the lock: the last reference runs the context's release.
                    keep_alive.push(ctx);
                    let event = match (done, &lost) {
                        (Some(c), _) => CompletionEvent {
                            tag: p.tag,
                            status: c.status as u32,
                            result: c.result,
                        },
                        (None, Some(_)) => {
                            // It will never complete: fail it now.
                            self.lost_commands.fetch_add(1, Ordering::Relaxed);
                            CompletionEvent {
                                tag: p.tag,
                                status: STATUS_DEVICE_LOST,
                                result: 0,
                            }
                        }
                        (None, None) => return true,
                    };
                    progressed = true;
                    p.in_flight.fetch_sub(1, Ordering::AcqRel);
                    let _ = p.events.send(event);
                    false
                });
            }
            for ctx in keep_alive {
                // If the session let go meanwhile, this is the last reference: its release
                // (which can wait seconds for the client's work) must not hold up everybody's
                // completions, so it runs on a thread of its own.
                if let Some(last) = Arc::into_inner(ctx) {
                    let spawned = std::thread::Builder::new()
                        .name("mirrord-release".into())
                        .spawn(move || drop(last));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "releasing a context on the pump thread");
                    }
                }
            }
            if progressed {
                spins = 0;
                continue;
            }
            match service.mode() {
                ServiceMode::Interrupt => {
                    service.wait_completion_interrupt(seen, Duration::from_millis(20));
                }
                ServiceMode::Polling => backoff(&mut spins),
            }
        }
    }
}

struct Shared {
    runtime: Arc<Runtime>,
    config: DaemonConfig,
    clients: Mutex<HashMap<u32, Arc<ClientState>>>,
    /// Sessions past HELLO (client slots taken), in all and per uid.
    client_slots: Tally,
    /// Connections before HELLO, in all and per uid.
    handshakes: Tally,
    /// Arena bytes registered, in all and per uid.
    arena_use: Mutex<ArenaUse>,
    /// RLIMIT_NOFILE's soft limit once raised (what the daemon's limits were sized from).
    fd_limit: u64,
    /// Times a descriptor could not be had (accept or receive hit the open-files limit).
    fd_exhaustions: AtomicU64,
    /// Clients removed from `clients` whose release has not finished yet.
    releasing: AtomicUsize,
    next_id: AtomicU32,
    released: AtomicU64,
    slots: Arc<Semaphore>,
    pump: Arc<Pump>,
}

impl Shared {
    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<ClientState>>> {
        lock(&self.clients)
    }

    fn arena_use(&self) -> std::sync::MutexGuard<'_, ArenaUse> {
        lock(&self.arena_use)
    }

    /// Count `len` arena bytes against the daemon-wide bounds (per uid and in all), or say
    /// which bound they would cross.
    fn reserve_arena_bytes(&self, uid: u32, len: u64) -> Result<(), String> {
        let config = &self.config;
        let mut usage = self.arena_use();
        let of_uid = usage.by_uid.get(&uid).copied().unwrap_or(0);
        if of_uid.saturating_add(len) > config.max_arena_bytes_per_uid {
            return Err(format!(
                "arena limit reached: arena bytes per uid is {} MiB (--max-arena-mib-per-uid); \
                 uid {uid}'s clients hold {} MiB and this arena is {} MiB",
                config.max_arena_bytes_per_uid >> 20,
                of_uid >> 20,
                len >> 20
            ));
        }
        if usage.total.saturating_add(len) > config.max_arena_bytes_total {
            return Err(format!(
                "arena limit reached: arena bytes of all clients is {} MiB \
                 (--max-arena-mib-total); this arena is {} MiB",
                config.max_arena_bytes_total >> 20,
                len >> 20
            ));
        }
        usage.total += len;
        *usage.by_uid.entry(uid).or_insert(0) += len;
        Ok(())
    }

    fn release_arena_bytes(&self, uid: u32, len: u64) {
        let mut usage = self.arena_use();
        usage.total = usage.total.saturating_sub(len);
        if let Some(held) = usage.by_uid.get_mut(&uid) {
            *held = held.saturating_sub(len);
            if *held == 0 {
                usage.by_uid.remove(&uid);
            }
        }
    }

    fn daemon_stats(&self) -> StatsReply {
        let clients: Vec<Arc<ClientState>> = self.clients().values().cloned().collect();
        let dma = self.runtime.device().dma().clone();
        let (iova_bytes, iova_allocations) = {
            let iova = dma.iova();
            (iova.used_bytes(), iova.allocations() as u64)
        };
        let (table_pool_bytes, table_pages_in_use) = self.runtime.device().table_pool_usage();
        StatsReply {
            table_pool_bytes,
            table_pages_in_use,
            clients: (clients.len() + self.releasing.load(Ordering::Acquire)) as u64,
            mapped_bytes_total: clients.iter().map(|c| c.ctx.stats().mapped_bytes).sum(),
            iova_bytes,
            iova_allocations,
            quarantined: self.runtime.quarantined_address_spaces() as u64,
            fault_deferrals: self
                .runtime
                .service()
                .stats()
                .deferred
                .load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            device_lost: u64::from(self.pump.lost.borrow().is_some()),
            lost_commands: self.pump.lost_commands.load(Ordering::Relaxed),
            ..StatsReply::default()
        }
    }
}

/// The daemon: a runtime (one device) shared by every client.
pub struct Daemon {
    shared: Arc<Shared>,
    pump_thread: Option<JoinHandle<()>>,
}

impl Daemon {
    /// A daemon over `runtime`'s device.
    ///
    /// Makes this process non-dumpable first ([`forbid_dumping`]), raises the process's
    /// open-files soft limit to its hard limit and lowers the client and handshake limits
    /// (logged) if even that cannot hold what they need.
    pub fn new(runtime: Arc<Runtime>, mut config: DaemonConfig) -> Result<Daemon, Error> {
        forbid_dumping()?;
        let fd_limit = raise_fd_limit();
        size_for_fd_limit(&mut config, fd_limit, open_fds());
        let slots = runtime.device().caps().cmdq_entries.min(
            runtime
                .options()
                .device
                .cmdq_entries
                .max(1)
                .next_power_of_two(),
        );
        let pump = Arc::new(Pump {
            pending: Mutex::new(Vec::new()),
            added: Condvar::new(),
            stop: AtomicBool::new(false),
            lost: watch::Sender::new(None),
            lost_commands: AtomicU64::new(0),
        });
        let (worker, rt) = (pump.clone(), runtime.clone());
        let pump_thread = std::thread::Builder::new()
            .name("mirrord-completions".into())
            .spawn(move || worker.run(&rt))
            .map_err(|e| Error::Os {
                what: "spawn the completion pump",
                source: e,
            })?;
        Ok(Daemon {
            shared: Arc::new(Shared {
                runtime,
                config,
                clients: Mutex::new(HashMap::new()),
                client_slots: Tally::default(),
                handshakes: Tally::default(),
                arena_use: Mutex::new(ArenaUse::default()),
                fd_limit,
                fd_exhaustions: AtomicU64::new(0),
                releasing: AtomicUsize::new(0),
                next_id: AtomicU32::new(1),
                released: AtomicU64::new(0),
                slots: Arc::new(Semaphore::new(slots.max(1) as usize)),
                pump,
            }),
            pump_thread: Some(pump_thread),
        })
    }

    /// The runtime (the device) the daemon serves.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.shared.runtime
    }

    /// Daemon-wide statistics (the daemon part of a STATS reply).
    pub fn stats(&self) -> StatsReply {
        self.shared.daemon_stats()
    }

    /// The limits in force: the configuration as sized for the open-files limit.
    pub fn config(&self) -> &DaemonConfig {
        &self.shared.config
    }

    /// The open-files limit (RLIMIT_NOFILE, soft, once raised) the daemon was sized for.
    pub fn fd_limit(&self) -> u64 {
        self.shared.fd_limit
    }

    /// Times the daemon could not have a descriptor (the open-files limit was reached while
    /// accepting a connection or receiving a client's descriptors).
    pub fn fd_exhaustions(&self) -> u64 {
        self.shared.fd_exhaustions.load(Ordering::Relaxed)
    }

    /// Where each client's commands are: submitted to the device so far, waiting for the
    /// client's device share, in flight (tools and tests; by client id).
    pub fn schedule(&self) -> Vec<ClientSchedule> {
        let mut all: Vec<ClientSchedule> = self
            .shared
            .clients()
            .values()
            .map(|c| ClientSchedule {
                client_id: c.id,
                pid: c.pid,
                submitted: c.commands.load(Ordering::Relaxed),
                waiting_for_device: c.waiting_for_device.load(Ordering::Acquire),
                in_flight: c.in_flight.load(Ordering::Acquire),
            })
            .collect();
        all.sort_by_key(|c| c.client_id);
        all
    }

    /// Bind the socket and serve until `shutdown` resolves; then stop accepting, let in-flight
    /// commands finish (up to the drain timeout), release every client and remove the socket.
    ///
    /// If the device is lost, every session fails its client's commands in flight with the
    /// loss, tells the client ([`kind::DEVICE_LOST`]) and ends; then this stops accepting,
    /// removes the socket and returns [`Error::DeviceLost`]: a daemon without its device has
    /// nothing to serve (restart it once the device is back).
    pub async fn serve(&self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let listener = bind(&self.shared.config)?;
        let path = self.shared.config.socket.clone();
        tracing::info!(socket = %path.display(), "mirrord serving");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut sessions = tokio::task::JoinSet::new();
        let mut lost_rx = self.shared.pump.lost.subscribe();
        let mut lost = None;
        let mut exhaustion = FdExhaustion::new(self.shared.clone());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                seen = lost_rx.wait_for(Option::is_some) => {
                    lost = seen.ok().and_then(|l| l.clone());
                    break;
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        exhaustion.ended();
                        sessions.spawn(session(self.shared.clone(), stream, stop_rx.clone()));
                    }
                    Err(e) if is_fd_exhaustion(&e) => {
                        if let Some(stream) = exhaustion.accept_failed(&listener, e).await {
                            sessions.spawn(session(self.shared.clone(), stream, stop_rx.clone()));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
        if let Some(lost) = lost {
            // Each session ends by itself once its client is told; the bound only guards
            // against one stuck writing to a client that does not read.
            let bound = LOST_DRAIN + self.shared.config.write_timeout;
            let ended = tokio::time::timeout(bound, async {
                while sessions.join_next().await.is_some() {}
            })
            .await;
            if ended.is_err() {
                tracing::warn!(
                    sessions = sessions.len(),
                    "sessions still ending {bound:?} after the device loss: abandoned"
                );
                sessions.abort_all();
            }
            tracing::error!(%lost, "device lost: every client's work failed and every client told; mirrord exiting");
            return Err(Error::DeviceLost(lost));
        }
        tracing::info!(sessions = sessions.len(), "shutting down: draining clients");
        let _ = stop_tx.send(true);
        while sessions.join_next().await.is_some() {}
        tracing::info!("mirrord stopped");
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shared.pump.stop.store(true, Ordering::Release);
        self.shared.pump.added.notify_all();
        if let Some(t) = self.pump_thread.take() {
            let _ = t.join();
        }
    }
}

/// Make this process non-dumpable (PR_SET_DUMPABLE 0): then only root may open its
/// `/proc/PID/fd/N`, ptrace it or read its memory. A process is dumpable by default, and
/// another process of the same uid could open the daemon's command queue, completion queue
/// and fault buffer memfds read-write through `/proc/PID/fd`, and forge or read every client's
/// commands: the isolation between clients would not hold against a client of the daemon's
/// own uid. `mirrorctl serve` calls this before it opens the device; [`Daemon::new`] again.
pub fn forbid_dumping() -> Result<(), Error> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| Error::Os {
        what: "prctl(PR_SET_DUMPABLE, 0)",
        source: e.into(),
    })
}

fn bind(config: &DaemonConfig) -> Result<UnixListener, Error> {
    let path = &config.socket;
    let os = |what: &'static str| move |source: io::Error| Error::Os { what, source };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Os {
                what: "bind the daemon socket",
                source: io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a daemon already serves {}", path.display()),
                ),
            });
        }
        std::fs::remove_file(path).map_err(os("remove a stale daemon socket"))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(os("create the socket directory"))?;
    }
    // Only our own uid may connect unless others are allowed; SO_PEERCRED is the real check.
    let mode = if config.allowed_uids.is_empty() {
        0o600
    } else {
        0o666
    };
    // The path appears only once the socket listens, with its mode already set.
    let listener = sys_util::socket::listen_at(path, mode).map_err(os("bind the daemon socket"))?;
    listener
        .set_nonblocking(true)
        .map_err(os("make the daemon socket non-blocking"))?;
    let listener = UnixListener::from_std(listener).map_err(os("register the daemon socket"))?;
    Ok(listener)
}

/// Sessions of one kind (client slots, handshakes), in all and per uid.
#[derive(Default)]
struct Tally {
    total: AtomicUsize,
    by_uid: Mutex<HashMap<u32, usize>>,
}

/// Which [`Tally`] a [`Slot`] counts in.
#[derive(Clone, Copy)]
enum SlotKind {
    Handshake,
    Client,
}

/// One session counted in a [`Tally`] (in all and for its uid) while this lives.
struct Slot {
    shared: Arc<Shared>,
    uid: u32,
    kind: SlotKind,
}

impl Slot {
    /// Count one more session of `uid`; returns the counts with it: (in all, of the uid).
    fn take(shared: &Arc<Shared>, uid: u32, kind: SlotKind) -> (Slot, usize, usize) {
        let tally = Slot::tally_of(shared, kind);
        let total = tally.total.fetch_add(1, Ordering::AcqRel) + 1;
        let of_uid = {
            let mut by_uid = lock(&tally.by_uid);
            let n = by_uid.entry(uid).or_insert(0);
            *n += 1;
            *n
        };
        let slot = Slot {
            shared: shared.clone(),
            uid,
            kind,
        };
        (slot, total, of_uid)
    }

    fn tally_of(shared: &Shared, kind: SlotKind) -> &Tally {
        match kind {
            SlotKind::Handshake => &shared.handshakes,
            SlotKind::Client => &shared.client_slots,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let tally = Slot::tally_of(&self.shared, self.kind);
        tally.total.fetch_sub(1, Ordering::AcqRel);
        let mut by_uid = lock(&tally.by_uid);
        if let Some(n) = by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}

/// Arena bytes registered, in all and per uid (each arena is mapped into the daemon, and the
/// pages the device writes stay in the daemon's memory until the arena goes).
#[derive(Default)]
struct ArenaUse {
    total: u64,
    by_uid: HashMap<u32, u64>,
}

/// Descriptors a client past HELLO may hold besides its arenas' memfds: the socket, the
/// userfaultfd, the pidfd and its watched duplicate, the mirror's `/proc` files, and slack.
const FDS_PER_CLIENT: u64 = 8;
/// Descriptors a connection before HELLO may hold: the socket and what one message carries.
const FDS_PER_HANDSHAKE: u64 = 1 + MAX_FDS_PER_MESSAGE as u64;
/// Descriptors kept free for everything else (the device, the runtime's threads, logging).
const FDS_SPARE: u64 = 64;

/// Raise RLIMIT_NOFILE's soft limit to its hard limit (capped by `fs.nr_open`); returns the
/// soft limit in force. Every client costs several descriptors and every arena one, so the
/// 1024 a service usually inherits is far too few.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "getrlimit(RLIMIT_NOFILE) failed; assuming 1024 open files");
            return 1024;
        }
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(ceiling);
    if soft >= target {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = target,
                "raised the open-files limit (RLIMIT_NOFILE) to its hard limit"
            );
            target
        }
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "could not raise the open-files limit");
            soft
        }
    }
}

/// Descriptors this process has open now.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// Lower the client and handshake limits if the open-files limit cannot hold what they need
/// (each client up to [`FDS_PER_CLIENT`] plus one per arena), saying so; log the budget.
fn size_for_fd_limit(config: &mut DaemonConfig, fd_limit: u64, open_now: u64) {
    let per_client = FDS_PER_CLIENT + u64::from(config.limits.max_arenas);
    let need = |clients: usize, handshakes: usize| {
        clients as u64 * per_client + handshakes as u64 * FDS_PER_HANDSHAKE + open_now + FDS_SPARE
    };
    let wanted = (config.max_clients, config.max_handshakes);
    if need(config.max_clients, config.max_handshakes) > fd_limit {
        let budget = fd_limit.saturating_sub(open_now + FDS_SPARE);
        // A quarter of the budget at most for handshakes, the rest for clients.
        let handshakes = (budget / 4 / FDS_PER_HANDSHAKE).max(1) as usize;
        config.max_handshakes = config.max_handshakes.min(handshakes);
        let left = budget.saturating_sub(config.max_handshakes as u64 * FDS_PER_HANDSHAKE);
        config.max_clients = config.max_clients.min((left / per_client).max(1) as usize);
        tracing::warn!(
            fd_limit,
            fds_per_client = per_client,
            "the open-files limit (RLIMIT_NOFILE, hard limit {fd_limit}) cannot hold {} clients \
             and {} handshakes: --max-clients lowered to {}, --max-handshakes to {}; raise the \
             hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower --max-arenas-per-client",
            wanted.0,
            wanted.1,
            config.max_clients,
            config.max_handshakes
        );
    }
    config.max_clients_per_uid = config.max_clients_per_uid.min(config.max_clients);
    config.max_handshakes_per_uid = config.max_handshakes_per_uid.min(config.max_handshakes);
    tracing::info!(
        fd_limit,
        fds_needed = need(config.max_clients, config.max_handshakes),
        max_clients = config.max_clients,
        max_handshakes = config.max_handshakes,
        fds_per_client = per_client,
        "open-files budget"
    );
}

/// Whether an error means no descriptor could be had (the process's or the system's limit).
fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// The text a client refused for want of descriptors gets.
fn out_of_fds_message(shared: &Shared) -> String {
    format!(
        "the daemon is out of file descriptors: its open-files limit (RLIMIT_NOFILE) is {}; \
         try again later, or raise the daemon's hard limit (ulimit -Hn, systemd LimitNOFILE=)",
        shared.fd_limit
    )
}

/// Whether an error's text says a descriptor could not be had (the driver's and the mirror's
/// errors carry the OS error only as text).
fn says_fd_exhaustion(text: &str) -> bool {
    // The OS's description ("Too many open files"), without io::Error's " (os error N)":
    // nix's errors print it after the errno's name instead.
    [libc::EMFILE, libc::ENFILE].iter().any(|&errno| {
        let full = io::Error::from_raw_os_error(errno).to_string();
        let description = full.split(" (os error").next().unwrap_or(&full);
        text.contains(description)
    })
}

/// The accept loop's answer to running out of descriptors: tell the waiting client why (a
/// descriptor kept in reserve is freed for the moment it takes), back off if even that fails,
/// and log once per episode and then every [`FdExhaustion::LOG_EVERY`] rather than per try.
struct FdExhaustion {
    shared: Arc<Shared>,
    reserve: Option<std::fs::File>,
    backoff: Duration,
    in_episode: u64,
    last_log: Option<std::time::Instant>,
}

impl FdExhaustion {
    const LOG_EVERY: Duration = Duration::from_secs(10);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);

    fn new(shared: Arc<Shared>) -> FdExhaustion {
        FdExhaustion {
            shared,
            reserve: std::fs::File::open("/dev/null").ok(),
            backoff: Duration::from_millis(10),
            in_episode: 0,
            last_log: None,
        }
    }

    /// A connection was accepted: any shortage is over.
    fn ended(&mut self) {
        if self.in_episode > 0 {
            tracing::info!(
                refused = self.in_episode,
                "descriptors available again; accepting connections"
            );
            self.in_episode = 0;
            self.last_log = None;
            self.backoff = Duration::from_millis(10);
        }
        if self.reserve.is_none() {
            self.reserve = std::fs::File::open("/dev/null").ok();
        }
    }

    /// `accept` failed for want of a descriptor (Linux checks for a free one before it looks
    /// for a waiting connection, so this also happens with none waiting). Returns a connection
    /// to serve if descriptors turned out to be free again.
    async fn accept_failed(&mut self, listener: &UnixListener, e: io::Error) -> Option<UnixStream> {
        let Some(spare) = self.reserve.take() else {
            // Not even the reserve: nothing can be answered; wait instead of spinning.
            self.note(&e);
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
            self.reserve = std::fs::File::open("/dev/null").ok();
            return None;
        };
        drop(spare);
        let waiting = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        self.reserve = std::fs::File::open("/dev/null").ok();
        let Ok(Ok((stream, _))) = waiting else {
            return None;
        };
        if self.reserve.is_some() {
            // A descriptor besides the connection's: the shortage is over.
            self.ended();
            return Some(stream);
        }
        self.note(&e);
        let message = out_of_fds_message(&self.shared);
        let frame = protocol::frame(
            kind::HELLO | REPLY,
            0,
            &Reply::error(ErrorCode::Limit, message).encode(),
        );
        let _ = write_all(&stream, &frame, Duration::from_secs(1)).await;
        drop(stream);
        self.reserve = std::fs::File::open("/dev/null").ok();
        None
    }

    /// Count a connection refused (or an accept put off) for want of descriptors; log the
    /// first of an episode, then one line per [`FdExhaustion::LOG_EVERY`].
    fn note(&mut self, e: &io::Error) {
        let total = self.shared.fd_exhaustions.fetch_add(1, Ordering::Relaxed) + 1;
        self.in_episode += 1;
        let due = self
            .last_log
            .is_none_or(|at| at.elapsed() >= Self::LOG_EVERY);
        if due {
            self.last_log = Some(std::time::Instant::now());
            tracing::warn!(
                error = %e,
                fd_limit = self.shared.fd_limit,
                in_this_episode = self.in_episode,
                since_start = total,
                "out of file descriptors: refusing new connections with a reply naming the \
                 limit (logged every {:?} while it lasts)",
                Self::LOG_EVERY
            );
        }
    }
}

/// What the reader task hands the session.
enum Incoming {
    Frame {
        header: Header,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
    },
    /// A frame that could not be taken; `header` when its kind and id are known. `fatal` when the
    /// stream cannot be resynchronised.
    Bad {
        header: Option<Header>,
        error: DecodeError,
        fatal: bool,
    },
    /// More descriptors than any message carries; the frame was consumed and its fds closed.
    TooManyFds { header: Header },
    /// The kernel could not install every descriptor sent (the open-files limit); the frame
    /// was consumed and the descriptors that did arrive closed. No header when the read that
    /// brought them failed (the stream is then out of step and ends).
    FdsLost { header: Option<Header> },
    /// A frame begun was not finished within the frame timeout.
    Stalled,
}

/// Read exactly `buf.len()` bytes (and whatever descriptors come along). `Ok(false)` at a clean
/// end of stream before the first byte.
async fn read_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let (n, cut) = stream
            .async_io(Interest::READABLE, || {
                unix_msg::recv(stream.as_fd(), &mut buf[got..], fds)
            })
            .await?;
        *truncated |= cut;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Most descriptors one message carries (HELLO: the uffd and a pidfd).
const MAX_FDS_PER_MESSAGE: usize = 2;

/// What reading one frame came to.
enum Step {
    /// Hand this to the session and read on.
    Next(Incoming),
    /// Hand this to the session, then stop reading (the stream cannot be resynchronised).
    Last(Incoming),
    /// The stream ended or failed.
    End,
}

async fn read_loop(stream: Arc<UnixStream>, tx: mpsc::Sender<Incoming>, frame_timeout: Duration) {
    loop {
        let mut fds = Vec::new();
        let mut truncated = false;
        let mut head = [0u8; HEADER_SIZE];
        // A client may sit idle between frames as long as it likes; once a frame has begun,
        // the rest must come within the frame timeout.
        match read_exact(&stream, &mut head[..1], &mut fds, &mut truncated).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                if let Step::Last(incoming) = read_failed(e) {
                    let _ = tx.send(incoming).await;
                }
                return;
            }
        }
        let rest = read_frame_rest(&stream, &mut head, fds, truncated);
        let step = match tokio::time::timeout(frame_timeout, rest).await {
            Ok(step) => step,
            Err(_) => Step::Last(Incoming::Stalled),
        };
        match step {
            Step::Next(incoming) => {
                if tx.send(incoming).await.is_err() {
                    return;
                }
            }
            Step::Last(incoming) => {
                let _ = tx.send(incoming).await;
                return;
            }
            Step::End => return,
        }
    }
}

/// A read failed. `ENOBUFS` is a message whose descriptors the kernel could install only in
/// part (`unix_msg::recv` cannot list them then): the client is told the limit before the
/// connection ends. Anything else just ends it.
fn read_failed(e: io::Error) -> Step {
    if e.raw_os_error() == Some(libc::ENOBUFS) {
        return Step::Last(Incoming::FdsLost { header: None });
    }
    tracing::debug!(error = %e, "client read failed");
    Step::End
}

/// Read the rest of a frame whose first byte is in `head`.
async fn read_frame_rest(
    stream: &UnixStream,
    head: &mut [u8; HEADER_SIZE],
    mut fds: Vec<OwnedFd>,
    mut truncated: bool,
) -> Step {
    match read_exact(stream, &mut head[1..], &mut fds, &mut truncated).await {
        Ok(true) => {}
        Ok(false) => return Step::End,
        Err(e) => return read_failed(e),
    }
    let header = match Header::decode_lenient(head) {
        Ok(h) => h,
        Err(error) => {
            return Step::Last(Incoming::Bad {
                header: None,
                error,
                fatal: true,
            })
        }
    };
    if header.len > MAX_PAYLOAD {
        // Skip it without keeping it: the stream stays in step.
        let mut left = u64::from(header.len);
        let mut sink = vec![0u8; 4096];
        while left > 0 {
            let n = left.min(sink.len() as u64) as usize;
            match read_exact(stream, &mut sink[..n], &mut fds, &mut truncated).await {
                Ok(true) => left -= n as u64,
                _ => return Step::End,
            }
            fds.clear();
        }
        let error = DecodeError::TooLarge { len: header.len };
        return Step::Next(Incoming::Bad {
            header: Some(header),
            error,
            fatal: false,
        });
    }
    let mut payload = vec![0u8; header.len as usize];
    match read_exact(stream, &mut payload, &mut fds, &mut truncated).await {
        Ok(true) => {}
        Ok(false) => return Step::End,
        Err(e) => return read_failed(e),
    }
    // The control buffer holds MAX_FDS_PER_READ descriptors: truncated with fewer than that
    // means the kernel could not install them all here (the open-files limit).
    let lost = truncated && fds.len() < unix_msg::MAX_FDS_PER_READ;
    Step::Next(if lost {
        Incoming::FdsLost {
            header: Some(header),
        }
    } else if truncated || fds.len() > MAX_FDS_PER_MESSAGE {
        Incoming::TooManyFds { header }
    } else {
        Incoming::Frame {
            header,
            payload,
            fds,
        }
    })
}

enum Flow {
    Continue,
    Close,
}

/// One client's session (after accept).
struct Session {
    shared: Arc<Shared>,
    stream: Arc<UnixStream>,
    peer_pid: libc::pid_t,
    peer_uid: u32,
    /// Counts this connection as a handshake until HELLO succeeds.
    handshake: Option<Slot>,
    /// Counts this session as a client from HELLO on.
    client_slot: Option<Slot>,
    /// Whether the peer runs as the daemon's own uid: only it sees daemon-wide statistics.
    peer_is_operator: bool,
    client: Option<Arc<ClientState>>,
    events: Option<mpsc::UnboundedSender<CompletionEvent>>,
    /// A duplicate of the client's verified pidfd, until the session watches it.
    exit_watch: Option<OwnedFd>,
    strikes: u32,
    closing: bool,
    /// The client has been sent the [`kind::DEVICE_LOST`] notice.
    told_lost: bool,
}

async fn write_all(stream: &UnixStream, bytes: &[u8], timeout: Duration) -> io::Result<()> {
    let write = async {
        let mut sent = 0;
        while sent < bytes.len() {
            sent += stream
                .async_io(Interest::WRITABLE, || {
                    unix_msg::send(stream.as_fd(), &bytes[sent..], &[])
                })
                .await?;
        }
        Ok(())
    };
    tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

async fn exited(pidfd: Option<&AsyncFd<OwnedFd>>) {
    match pidfd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

async fn next_event(rx: &mut Option<mpsc::UnboundedReceiver<CompletionEvent>>) -> CompletionEvent {
    match rx {
        Some(r) => match r.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

enum Next {
    DeviceLost(Option<DeviceLost>),
    Message(Option<Incoming>),
    Event(CompletionEvent),
    Exited,
    Shutdown,
    HelloTimeout,
}

async fn session(shared: Arc<Shared>, stream: UnixStream, mut shutdown: watch::Receiver<bool>) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "SO_PEERCRED failed; dropping the connection");
            return;
        }
    };
    let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
    let stream = Arc::new(stream);
    let write_timeout = shared.config.write_timeout;
    let refuse_at_door = |code, message: String| {
        let stream = stream.clone();
        async move {
            tracing::warn!(uid, pid, %message, "refusing a client");
            let frame = protocol::frame(
                kind::HELLO | REPLY,
                0,
                &Reply::error(code, message).encode(),
            );
            let _ = write_all(&stream, &frame, write_timeout).await;
        }
    };
    if !shared.config.uid_allowed(uid) {
        refuse_at_door(
            ErrorCode::NotAllowed,
            format!("uid {uid} is not allowed to use this daemon"),
        )
        .await;
        return;
    }
    if pid <= 0 {
        refuse_at_door(ErrorCode::NotAllowed, "the peer's pid is unknown".into()).await;
        return;
    }
    // Until HELLO the connection is a handshake, counted apart from clients: connections that
    // never say HELLO cannot take the client slots of their uid.
    let (handshake, handshakes, of_uid) = Slot::take(&shared, uid, SlotKind::Handshake);
    if of_uid > shared.config.max_handshakes_per_uid {
        refuse_at_door(
            ErrorCode::Limit,
            format!(
                "handshake limit reached: connections before HELLO per uid is {} \
                 (--max-handshakes-per-uid)",
                shared.config.max_handshakes_per_uid
            ),
        )
        .await;
        return;
    }
    if handshakes > shared.config.max_handshakes {
        refuse_at_door(
            ErrorCode::Limit,
            format!(
                "handshake limit reached: connections before HELLO is {} (--max-handshakes)",
                shared.config.max_handshakes
            ),
        )
        .await;
        return;
    }
    let span = tracing::info_span!("client", pid, uid);
    let _enter = span.enter();
    tracing::info!("connected");
    drop(_enter);

    let (tx, mut rx) = mpsc::channel(4);
    let reader = tokio::spawn(read_loop(stream.clone(), tx, shared.config.frame_timeout));
    let mut s = Session {
        shared: shared.clone(),
        stream,
        peer_pid: pid,
        peer_uid: uid,
        handshake: Some(handshake),
        client_slot: None,
        peer_is_operator: uid == nix::unistd::getuid().as_raw(),
        client: None,
        events: None,
        exit_watch: None,
        strikes: 0,
        closing: false,
        told_lost: false,
    };
    let mut lost_rx = shared.pump.lost.subscribe();
    let mut events_rx: Option<mpsc::UnboundedReceiver<CompletionEvent>> = None;
    let mut pidfd: Option<AsyncFd<OwnedFd>> = None;
    let hello_deadline = tokio::time::sleep(shared.config.hello_timeout);
    tokio::pin!(hello_deadline);
    loop {
        let next = tokio::select! {
            // First: a session of a lost device does nothing else.
            biased;
            seen = lost_rx.wait_for(Option::is_some) => {
                Next::DeviceLost(seen.ok().and_then(|l| l.clone()))
            }
            _ = &mut hello_deadline, if s.client.is_none() => Next::HelloTimeout,
            m = rx.recv() => Next::Message(m),
            e = next_event(&mut events_rx) => Next::Event(e),
            _ = exited(pidfd.as_ref()) => Next::Exited,
            _ = shutdown.changed() => Next::Shutdown,
        };
        let flow = match next {
            Next::DeviceLost(lost) => {
                s.device_lost(lost, &mut events_rx).await;
                Flow::Close
            }
            Next::Message(None) => {
                tracing::info!(pid, "client closed the connection");
                Flow::Close
            }
            Next::Message(Some(m)) => {
                let flow = s.handle(m).await;
                if events_rx.is_none() && s.client.is_some() {
                    let (etx, erx) = mpsc::unbounded_channel();
                    s.events = Some(etx);
                    events_rx = Some(erx);
                    pidfd = s.watch_exit();
                }
                flow
            }
            Next::Event(e) => s.send_event(e).await,
            Next::Exited => {
                tracing::info!(pid, "client process exited");
                Flow::Close
            }
            Next::Shutdown => {
                s.drain(&mut events_rx).await;
                Flow::Close
            }
            Next::HelloTimeout => {
                let limit = shared.config.hello_timeout;
                let message = format!("no HELLO within {limit:?}; disconnecting");
                let header = Header {
                    kind: kind::HELLO,
                    id: 0,
                    len: 0,
                };
                s.reply(header, Reply::error(ErrorCode::OutOfOrder, message))
                    .await;
                Flow::Close
            }
        };
        if let Flow::Close = flow {
            break;
        }
    }
    reader.abort();
    s.release().await;
}

/// The daemon's answer to a refused REGISTER_ARENA: a limit says, besides its name and value,
/// what raises it.
fn arena_refusal(e: &ArenaError) -> Reply {
    let raise = match e {
        ArenaError::Limit {
            limit: "arenas per client",
            ..
        } => Some("mirrorctl serve --max-arenas-per-client or DaemonConfig::limits.max_arenas"),
        ArenaError::Limit {
            limit: "arena bytes per client",
            ..
        } => Some(
            "mirrorctl serve --max-arena-mib-per-client or DaemonConfig::limits.max_arena_bytes",
        ),
        _ => None,
    };
    let message = match raise {
        Some(raise) => format!("{e}; raise it with {raise}"),
        None => e.to_string(),
    };
    Reply::error(arena_error_code(e), message)
}

fn arena_error_code(e: &ArenaError) -> ErrorCode {
    match e {
        ArenaError::Limit { .. } => ErrorCode::Limit,
        ArenaError::NotFound(_) => ErrorCode::NotFound,
        ArenaError::Map(_) => ErrorCode::Internal,
        _ => ErrorCode::InvalidArgument,
    }
}

impl Session {
    async fn reply(&mut self, header: Header, reply: Reply) -> Flow {
        let frame = protocol::frame(header.kind | REPLY, header.id, &reply.encode());
        match write_all(&self.stream, &frame, self.shared.config.write_timeout).await {
            Ok(()) => Flow::Continue,
            Err(e) => {
                tracing::info!(pid = self.peer_pid, error = %e, "writing to the client failed");
                Flow::Close
            }
        }
    }

    /// Answer a protocol violation and count it; past the limit the client is disconnected.
    async fn strike(&mut self, header: Header, code: ErrorCode, message: String) -> Flow {
        self.strikes += 1;
        let limit = self.shared.config.max_strikes;
        tracing::warn!(pid = self.peer_pid, strikes = self.strikes, %message, "protocol violation");
        let over = self.strikes > limit;
        let message = if over {
            format!("{message}; {limit} protocol violations allowed, disconnecting")
        } else {
            message
        };
        match self.reply(header, Reply::error(code, message)).await {
            Flow::Continue if !over => Flow::Continue,
            _ => Flow::Close,
        }
    }

    async fn send_event(&mut self, e: CompletionEvent) -> Flow {
        if e.status == STATUS_DEVICE_LOST {
            // The pump announced the loss before it failed any command: say why first.
            let lost = self.shared.pump.lost.borrow().clone();
            if let Flow::Close = self.tell_lost(lost.as_ref()).await {
                return Flow::Close;
            }
        }
        let frame = protocol::frame(kind::COMPLETION, 0, &e.encode());
        match write_all(&self.stream, &frame, self.shared.config.write_timeout).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }

    /// Send the [`kind::DEVICE_LOST`] notice, once.
    async fn tell_lost(&mut self, lost: Option<&DeviceLost>) -> Flow {
        let Some(lost) = lost else {
            return Flow::Continue;
        };
        if std::mem::replace(&mut self.told_lost, true) {
            return Flow::Continue;
        }
        let notice = DeviceLostNotice::new(lost).encode();
        let frame = protocol::frame(kind::DEVICE_LOST, 0, &notice);
        match write_all(&self.stream, &frame, self.shared.config.write_timeout).await {
            Ok(()) => Flow::Continue,
            Err(e) => {
                tracing::info!(pid = self.peer_pid, error = %e, "telling the client of the device loss failed");
                Flow::Close
            }
        }
    }

    /// The device is lost: tell the client, forward the completions of its commands (the
    /// pump fails those still in flight with [`STATUS_DEVICE_LOST`]), then end the session.
    async fn device_lost(
        &mut self,
        lost: Option<DeviceLost>,
        events: &mut Option<mpsc::UnboundedReceiver<CompletionEvent>>,
    ) {
        self.closing = true;
        if let Flow::Close = self.tell_lost(lost.as_ref()).await {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + LOST_DRAIN;
        while let Some(rx) = events.as_mut() {
            // Completions the pump posted, then any it posts until the count reaches zero.
            let e = match rx.try_recv() {
                Ok(e) => e,
                Err(_) if client.in_flight.load(Ordering::Acquire) == 0 => break,
                Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(e)) => e,
                    Ok(None) | Err(_) => break,
                },
            };
            if let Flow::Close = self.send_event(e).await {
                return;
            }
        }
        let left = client.in_flight.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(
                pid = self.peer_pid,
                left,
                "commands not failed within {LOST_DRAIN:?} of the device loss"
            );
        }
        tracing::info!(
            pid = self.peer_pid,
            "client told of the device loss; session ended"
        );
    }

    fn watch_exit(&mut self) -> Option<AsyncFd<OwnedFd>> {
        let pidfd = self.exit_watch.take()?;
        async_readable(pidfd).ok()
    }

    async fn handle(&mut self, incoming: Incoming) -> Flow {
        let (header, payload, fds) = match incoming {
            Incoming::Frame {
                header,
                payload,
                fds,
            } => (header, payload, fds),
            Incoming::Bad {
                header,
                error,
                fatal,
            } => {
                let code = ErrorCode::from(&error);
                let header = header.unwrap_or(Header {
                    kind: 0,
                    id: 0,
                    len: 0,
                });
                if fatal {
                    let _ = self
                        .reply(header, Reply::error(code, error.to_string()))
                        .await;
                    return Flow::Close;
                }
                return self.strike(header, code, error.to_string()).await;
            }
            Incoming::TooManyFds { header } => {
                return self
                    .strike(
                        header,
                        ErrorCode::BadMessage,
                        format!("more than {MAX_FDS_PER_MESSAGE} file descriptors in one message"),
                    )
                    .await
            }
            Incoming::FdsLost { header } => {
                // Not the client's doing: no strike. The request cannot be served without
                // its descriptors; those that did arrive are closed already.
                self.shared.fd_exhaustions.fetch_add(1, Ordering::Relaxed);
                let message = format!(
                    "the descriptors sent could not be received: {}",
                    out_of_fds_message(&self.shared)
                );
                tracing::warn!(pid = self.peer_pid, %message, "request refused");
                let Some(header) = header else {
                    // The stream is out of step: answer and close.
                    return self.limit_and_close(message).await;
                };
                return self
                    .reply(header, Reply::error(ErrorCode::Limit, message))
                    .await;
            }
            Incoming::Stalled => {
                let limit = self.shared.config.frame_timeout;
                let message = format!(
                    "a frame was not completed within {limit:?} of its first byte (frame \
                     timeout, --frame-timeout-secs); disconnecting"
                );
                tracing::warn!(pid = self.peer_pid, %message, "stalled client");
                return self.limit_and_close(message).await;
            }
        };
        let request = match Request::decode(header.kind, &payload) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .strike(header, ErrorCode::from(&e), e.to_string())
                    .await
            }
        };
        let expects_fds = matches!(
            request,
            Request::Hello { .. } | Request::RegisterArena { .. }
        );
        if !expects_fds && !fds.is_empty() {
            return self
                .strike(
                    header,
                    ErrorCode::BadMessage,
                    "unexpected file descriptors".into(),
                )
                .await;
        }
        let client = match (&self.client, request) {
            (
                None,
                Request::Hello {
                    min_version,
                    max_version,
                },
            ) => return self.hello(header, min_version, max_version, fds).await,
            (Some(_), Request::Hello { .. }) => {
                return self
                    .strike(
                        header,
                        ErrorCode::OutOfOrder,
                        "HELLO was already accepted".into(),
                    )
                    .await
            }
            (None, _) => {
                return self
                    .strike(
                        header,
                        ErrorCode::OutOfOrder,
                        "HELLO must come first".into(),
                    )
                    .await
            }
            (Some(c), _) => c.clone(),
        };
        match request {
            Request::Hello { .. } => Flow::Continue,
            Request::RegisterArena { va, len, offset } => {
                let [fd]: [OwnedFd; 1] = match fds.try_into() {
                    Ok(one) => one,
                    Err(_) => {
                        return self
                            .strike(
                                header,
                                ErrorCode::BadMessage,
                                "REGISTER_ARENA carries exactly one fd (the memfd)".into(),
                            )
                            .await
                    }
                };
                // Counted daemon-wide first (per uid and in all): the arena's pages live in
                // this process once the device writes them.
                if let Err(message) = self.shared.reserve_arena_bytes(client.uid, len) {
                    drop(fd);
                    return self
                        .reply(header, Reply::error(ErrorCode::Limit, message))
                        .await;
                }
                let c = client.clone();
                let done = tokio::task::spawn_blocking(move || {
                    c.arenas.register(&c.mm, va, len, offset, fd)
                })
                .await;
                if !matches!(done, Ok(Ok(_))) {
                    self.shared.release_arena_bytes(client.uid, len);
                }
                let reply = match done {
                    Ok(Ok(arena)) => {
                        tracing::debug!(pid = self.peer_pid, ?arena, "arena registered");
                        Reply::Arena {
                            writable: arena.writable(),
                        }
                    }
                    Ok(Err(e)) => arena_refusal(&e),
                    Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
                };
                self.reply(header, reply).await
            }
            Request::UnregisterArena { va } => {
                let c = client.clone();
                let shared = self.shared.clone();
                let done = tokio::task::spawn_blocking(move || -> Result<(), ArenaError> {
                    let arena = c.arenas.unregister(va)?;
                    let r = arena.range();
                    shared.release_arena_bytes(c.uid, r.end - r.start);
                    // The device's entries and DMA mappings into it go (fenced) before it is
                    // unmapped here; mappings still holding it keep it mapped until then.
                    if let Ok(range) = VaRange::from_bounds(r.start, r.end) {
                        let _ = c.mm.invalidate(range);
                    }
                    Ok(())
                })
                .await;
                let reply = match done {
                    Ok(Ok(())) => Reply::Done,
                    Ok(Err(e)) => Reply::error(arena_error_code(&e), e.to_string()),
                    Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
                };
                self.reply(header, reply).await
            }
            Request::Submit { tag, op } => self.submit(header, &client, tag, op).await,
            Request::Stats => {
                let c = client.clone();
                let shared = self.shared.clone();
                let operator = self.peer_is_operator;
                let stats = tokio::task::spawn_blocking(move || {
                    let cs = c.ctx.stats();
                    // Other users' clients see their own figures only: the daemon-wide ones
                    // (clients, everyone's mapped bytes, IOVA use) would tell them about
                    // other users' work.
                    let daemon = if operator {
                        shared.daemon_stats()
                    } else {
                        StatsReply::default()
                    };
                    StatsReply {
                        faults: cs.faults,
                        pages_mapped: cs.pages_mapped,
                        mapped_bytes: cs.mapped_bytes,
                        failures: cs.failures,
                        invalidations: cs.invalidations,
                        in_flight: u64::from(c.in_flight.load(Ordering::Acquire)),
                        commands: c.commands.load(Ordering::Relaxed),
                        arenas: c.arenas.len() as u64,
                        arena_bytes: c.arenas.bytes(),
                        ..daemon
                    }
                })
                .await;
                let reply = match stats {
                    Ok(s) => Reply::Stats(s),
                    Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
                };
                self.reply(header, reply).await
            }
            Request::Goodbye => {
                self.reply(header, Reply::Done).await;
                Flow::Close
            }
            Request::Invalidate { va, len } => {
                let (shared, c) = (self.shared.clone(), client.clone());
                let done = tokio::task::spawn_blocking(move || {
                    invalidate_everywhere(&shared, &c, va, len)
                })
                .await;
                let reply = match done {
                    Ok(Ok(())) => Reply::Done,
                    Ok(Err((code, message))) => Reply::error(code, message),
                    Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
                };
                self.reply(header, reply).await
            }
        }
    }

    async fn hello(
        &mut self,
        header: Header,
        min_version: u16,
        max_version: u16,
        fds: Vec<OwnedFd>,
    ) -> Flow {
        if !(min_version..=max_version).contains(&VERSION) {
            let message = format!(
                "no common protocol version: the client speaks {min_version}..={max_version}, \
                 this daemon speaks {VERSION}"
            );
            self.reply(header, Reply::error(ErrorCode::Version, message))
                .await;
            return Flow::Close;
        }
        // A client slot, taken at HELLO (a connection before it holds a handshake slot only).
        let (client_slot, clients, of_uid) =
            Slot::take(&self.shared, self.peer_uid, SlotKind::Client);
        let config = &self.shared.config;
        let over = if of_uid > config.max_clients_per_uid {
            Some(format!(
                "client limit reached: clients per uid is {} (--max-clients-per-uid)",
                config.max_clients_per_uid
            ))
        } else if clients > config.max_clients {
            Some(format!(
                "client limit reached: clients is {} (--max-clients)",
                config.max_clients
            ))
        } else {
            None
        };
        if let Some(message) = over {
            tracing::warn!(pid = self.peer_pid, uid = self.peer_uid, %message, "refusing a client");
            self.reply(header, Reply::error(ErrorCode::Limit, message))
                .await;
            return Flow::Close;
        }
        // Both descriptors are required: the pidfd proves which process the client is (a pid
        // from SO_PEERCRED alone could be reused by another process before we open it).
        let [uffd, pidfd]: [OwnedFd; 2] = match fds.try_into() {
            Ok(both) => both,
            Err(_) => {
                let message = "HELLO carries two fds: the client's userfaultfd, then its pidfd";
                return self
                    .strike(header, ErrorCode::BadMessage, message.into())
                    .await;
            }
        };
        if unix_msg::anon_inode_kind(uffd.as_fd()).as_deref() != Some("[userfaultfd]") {
            let message = "the first fd of HELLO is not a userfaultfd";
            return self
                .strike(header, ErrorCode::InvalidArgument, message.into())
                .await;
        }
        let pid = self.peer_pid;
        if unix_msg::pidfd_pid(pidfd.as_fd()) != Some(pid) {
            if let Err(e) = std::fs::File::open("/dev/null") {
                // The pidfd could not be checked (its fdinfo not opened), not found wrong.
                let message = format!("cannot check the pidfd: {e}");
                return self
                    .refuse_hello(header, ErrorCode::Internal, message)
                    .await;
            }
            let message = format!("the pidfd sent does not refer to the connecting process {pid}");
            return self.strike(header, ErrorCode::NotAllowed, message).await;
        }
        match pidfd.try_clone() {
            Ok(watch) => self.exit_watch = Some(watch),
            Err(e) => {
                let message = format!("cannot duplicate the pidfd: {e}");
                return self
                    .refuse_hello(header, ErrorCode::Internal, message)
                    .await;
            }
        }
        let pidfd = Some(pidfd);
        let shared = self.shared.clone();
        let uid = self.peer_uid;
        let built = tokio::task::spawn_blocking(move || -> Result<Arc<ClientState>, Error> {
            let limits = shared.config.limits;
            let mm = Arc::new(
                AddressSpace::for_process(
                    pid,
                    pidfd,
                    Some(uffd),
                    shared.runtime.options().mirror.clone(),
                )
                .map_err(Error::Mirror)?,
            );
            let arenas = Arc::new(ArenaTable::new(ArenaLimits {
                max_arenas: limits.max_arenas as usize,
                max_bytes: limits.max_arena_bytes,
            }));
            let options = ContextOptions {
                reach: Reach::Arenas(arenas.clone()),
                max_mapped_bytes: Some(limits.max_mapped_bytes),
                pin_budget: shared.config.pin_budget_per_client,
                // A client that keeps the daemon from registering its arena for events (its
                // own userfaultfd on it) would otherwise leave mappings the daemon never
                // hears about: refuse with `Untracked` instead.
                require_events: true,
                ..shared.runtime.options().context.clone()
            };
            let ctx = shared.runtime.create_context_in(mm.clone(), options)?;
            Ok(Arc::new(ClientState {
                id: shared.next_id.fetch_add(1, Ordering::Relaxed),
                pid,
                uid,
                ctx: Arc::new(ctx),
                mm,
                arenas,
                in_flight: Arc::new(AtomicU32::new(0)),
                commands: AtomicU64::new(0),
                device_share: device_share_for(&shared.config),
                waiting_for_device: AtomicU32::new(0),
            }))
        })
        .await;
        let client = match built {
            Ok(Ok(c)) => c,
            Ok(Err(Error::DeviceLost(lost))) => {
                // Not the client's fault: no strike.
                let message = Error::DeviceLost(lost.clone()).to_string();
                self.tell_lost(Some(&lost)).await;
                self.reply(header, Reply::error(ErrorCode::DeviceLost, message))
                    .await;
                return Flow::Close;
            }
            Ok(Err(e)) if says_fd_exhaustion(&e.to_string()) => {
                // Not the client's doing: no strike.
                return self
                    .refuse_hello(header, ErrorCode::Device, e.to_string())
                    .await;
            }
            Ok(Err(e)) => {
                let code = match e {
                    Error::NoFreeAddressSpace { .. } => ErrorCode::Limit,
                    Error::Mirror(mirror::Error::Released) => ErrorCode::NotFound,
                    _ => ErrorCode::Device,
                };
                // A strike: each attempt builds a mirror, which is not free.
                return self.strike(header, code, e.to_string()).await;
            }
            Err(e) => {
                return self
                    .reply(header, Reply::error(ErrorCode::Internal, e.to_string()))
                    .await
            }
        };
        let reply = Reply::Hello {
            version: VERSION,
            client_id: client.id,
            asid: client.ctx.asid(),
            limits: self.shared.config.limits,
        };
        tracing::info!(
            pid,
            client = client.id,
            asid = client.ctx.asid(),
            "client registered"
        );
        self.shared.clients().insert(client.id, client.clone());
        self.client = Some(client);
        self.client_slot = Some(client_slot);
        self.handshake = None;
        self.reply(header, reply).await
    }

    /// Answer `Limit` with `message` outside any request (id 0), then close.
    async fn limit_and_close(&mut self, message: String) -> Flow {
        let unknown = Header {
            kind: 0,
            id: 0,
            len: 0,
        };
        let _ = self
            .reply(unknown, Reply::error(ErrorCode::Limit, message))
            .await;
        Flow::Close
    }

    /// Answer a HELLO that failed on the daemon's side; one that failed for want of
    /// descriptors says so and names the open-files limit (answered `Limit`).
    async fn refuse_hello(&mut self, header: Header, code: ErrorCode, message: String) -> Flow {
        let (code, message) = if says_fd_exhaustion(&message) {
            self.shared.fd_exhaustions.fetch_add(1, Ordering::Relaxed);
            let message = format!("{message}: {}", out_of_fds_message(&self.shared));
            (ErrorCode::Limit, message)
        } else {
            (code, message)
        };
        tracing::warn!(pid = self.peer_pid, %message, "HELLO failed");
        self.reply(header, Reply::error(code, message)).await
    }

    async fn submit(
        &mut self,
        header: Header,
        client: &Arc<ClientState>,
        tag: u64,
        op: driver::Op,
    ) -> Flow {
        if self.closing {
            return self
                .reply(
                    header,
                    Reply::error(ErrorCode::ShuttingDown, "the daemon is shutting down"),
                )
                .await;
        }
        let max = self.shared.config.limits.max_in_flight;
        if client.in_flight.load(Ordering::Acquire) >= max {
            let message = format!(
                "quota exceeded: in-flight commands per client is {max}; wait for a completion \
                 first (DaemonClient::submit_batch does), or raise it with mirrorctl serve \
                 --max-in-flight or DaemonConfig::limits.max_in_flight"
            );
            return self
                .reply(header, Reply::error(ErrorCode::Limit, message))
                .await;
        }
        if let Some(message) = self.too_long(&op) {
            return self
                .reply(header, Reply::error(ErrorCode::Limit, message))
                .await;
        }
        // This client's device share first: while it has its budget's worth of commands on the
        // device, its next one waits here, not in the device queue ahead of other clients'.
        // A lost device fails the commands it held without releasing their shares through
        // this session (it is here, waiting), so the loss ends the wait too.
        let mut lost_rx = self.shared.pump.lost.subscribe();
        let shared_share = tokio::select! {
            biased;
            r = take_device_share(client, &op) => r,
            () = async {
                // The guard `wait_for` returns is not Send: dropped at once.
                drop(lost_rx.wait_for(Option::is_some).await);
            } => {
                let lost = self.shared.pump.lost.borrow().clone();
                self.shared
                    .pump
                    .lost_commands
                    .fetch_add(1, Ordering::Relaxed);
                if let Flow::Close = self.tell_lost(lost.as_ref()).await {
                    return Flow::Close;
                }
                let message = match lost {
                    Some(lost) => Error::DeviceLost(lost).to_string(),
                    None => "the device is lost".to_owned(),
                };
                return self
                    .reply(header, Reply::error(ErrorCode::DeviceLost, message))
                    .await;
            }
        };
        let Ok(device_share) = shared_share else {
            return self
                .reply(
                    header,
                    Reply::error(ErrorCode::ShuttingDown, "the daemon is shutting down"),
                )
                .await;
        };
        // A device queue slot next (FIFO across clients), so the submit below never waits for
        // one while holding the queue.
        let Ok(slot) = self.shared.slots.clone().acquire_owned().await else {
            return self
                .reply(
                    header,
                    Reply::error(ErrorCode::ShuttingDown, "the daemon is shutting down"),
                )
                .await;
        };
        client.in_flight.fetch_add(1, Ordering::AcqRel);
        let ctx = client.ctx.clone();
        let submit = move || {
            // SAFETY: the addresses in `op` name the client's memory, which the device reaches
            // only through the client's arenas (our own mappings of its memfds, never a Rust
            // object of this process); no reference into them exists here.
            unsafe { ctx.submit(op) }
        };
        // The submit may wait (for CPU events to be handled, for a queue slot): never on a
        // worker other sessions need.
        let submitted = if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(submit)
        } else {
            tokio::task::spawn_blocking(submit)
                .await
                .unwrap_or_else(|e| Err(Error::DaemonConnection(e.to_string())))
        };
        match submitted {
            Ok(ticket) => {
                client.commands.fetch_add(1, Ordering::Relaxed);
                let Some(events) = self.events.clone() else {
                    // Cannot happen (the channel is made with the HELLO reply); fail the command
                    // rather than the daemon.
                    client.in_flight.fetch_sub(1, Ordering::AcqRel);
                    let message = "internal: no completion channel for this session";
                    return self
                        .reply(header, Reply::error(ErrorCode::Internal, message))
                        .await;
                };
                self.shared.pump.add(Pending {
                    ctx: Arc::downgrade(&client.ctx),
                    ticket,
                    tag,
                    events,
                    in_flight: client.in_flight.clone(),
                    _slot: slot,
                    _device_share: device_share,
                });
                self.reply(header, Reply::Submitted).await
            }
            Err(Error::DeviceLost(lost)) => {
                client.in_flight.fetch_sub(1, Ordering::AcqRel);
                self.shared
                    .pump
                    .lost_commands
                    .fetch_add(1, Ordering::Relaxed);
                let message = Error::DeviceLost(lost.clone()).to_string();
                if let Flow::Close = self.tell_lost(Some(&lost)).await {
                    return Flow::Close;
                }
                self.reply(header, Reply::error(ErrorCode::DeviceLost, message))
                    .await
            }
            Err(e) => {
                client.in_flight.fetch_sub(1, Ordering::AcqRel);
                self.reply(header, Reply::error(ErrorCode::Device, e.to_string()))
                    .await
            }
        }
    }

    /// Why the device would refuse `op` for its length (it completes such a command with a
    /// bare `BadCommand`, detail 0): the refusal names the device's limit instead.
    fn too_long(&self, op: &driver::Op) -> Option<String> {
        let len = match *op {
            driver::Op::Copy { len, .. }
            | driver::Op::Fill { len, .. }
            | driver::Op::Checksum { len, .. }
            | driver::Op::Prefetch { len, .. } => len,
            driver::Op::AtomicAdd { .. } => return None,
        };
        let max = u64::from(self.shared.runtime.device().caps().max_transfer);
        (len > max).then(|| {
            format!(
                "command too long: its length is {len} bytes and the device's maximum transfer \
                 (CAP_MAX_TRANSFER, fixed by the device) is {max} bytes; split it into \
                 commands of at most {max} bytes"
            )
        })
    }

    /// Shutdown: take no new commands, forward the completions of those in flight (up to the
    /// drain timeout).
    async fn drain(&mut self, events: &mut Option<mpsc::UnboundedReceiver<CompletionEvent>>) {
        self.closing = true;
        let Some(client) = self.client.clone() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + self.shared.config.drain_timeout;
        while client.in_flight.load(Ordering::Acquire) > 0 {
            let Some(rx) = events.as_mut() else { break };
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => {
                    if let Flow::Close = self.send_event(e).await {
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        // Completions the pump posted just before the count reached zero.
        if let Some(rx) = events.as_mut() {
            while let Ok(e) = rx.try_recv() {
                if let Flow::Close = self.send_event(e).await {
                    break;
                }
            }
        }
    }

    /// Quiesce and tear down the client's device address space, unpin, unmap its arenas.
    async fn release(mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        self.shared.releasing.fetch_add(1, Ordering::AcqRel);
        self.shared.clients().remove(&client.id);
        let shared = self.shared.clone();
        let (id, pid) = (client.id, client.pid);
        let _ = tokio::task::spawn_blocking(move || {
            // The last reference to the context runs its release: stop servicing, let its work
            // finish (or quarantine the ASID), fence, unmap, unpin. The pump holds it weakly.
            let (arenas, uid) = (client.arenas.clone(), client.uid);
            let released = client.ctx.release_watch();
            drop(client);
            // The pump may hold the last reference for a moment and run the release on a
            // thread of its own: the session closes only once it is done, so a client that
            // sees its session close knows the device can no longer reach its memory.
            released.wait();
            let held: u64 = arenas
                .clear()
                .iter()
                .map(|a| a.range().end - a.range().start)
                .sum();
            shared.release_arena_bytes(uid, held);
            shared.released.fetch_add(1, Ordering::Relaxed);
            shared.releasing.fetch_sub(1, Ordering::AcqRel);
        })
        .await;
        tracing::info!(client = id, pid, "client released");
    }
}

/// One client's share of the device queue: [`DaemonConfig::device_bytes_per_client`] in
/// [`BUDGET_UNIT`]s, taken by each command for as long as it is on the device.
struct DeviceShare {
    units: u64,
    permits: Arc<Semaphore>,
}

/// A client's device share per the configuration (`None`: no bound).
fn device_share_for(config: &DaemonConfig) -> Option<DeviceShare> {
    let units = config
        .device_bytes_per_client
        .div_ceil(BUDGET_UNIT)
        .min(u64::from(u32::MAX));
    (units > 0).then(|| DeviceShare {
        units,
        permits: Arc::new(Semaphore::new(units as usize)),
    })
}

/// Bytes of device work `op` names.
fn op_bytes(op: &driver::Op) -> u64 {
    match *op {
        driver::Op::Copy { len, .. }
        | driver::Op::Fill { len, .. }
        | driver::Op::Checksum { len, .. }
        | driver::Op::Prefetch { len, .. } => len,
        driver::Op::AtomicAdd { .. } => 8,
    }
}

/// Waits until `op` fits in its client's device share and takes its part: its length in
/// [`BUDGET_UNIT`]s, at most the whole share (a command larger than the share runs alone).
/// The semaphore is FIFO, so a client's commands keep their order. `Err` only if the share
/// was closed (never, today).
async fn take_device_share(
    client: &ClientState,
    op: &driver::Op,
) -> Result<Option<OwnedSemaphorePermit>, tokio::sync::AcquireError> {
    let Some(share) = &client.device_share else {
        return Ok(None);
    };
    // `units` is at most u32::MAX (see `device_share_for`).
    let units = op_bytes(op).div_ceil(BUDGET_UNIT).clamp(1, share.units) as u32;
    if let Ok(permit) = share.permits.clone().try_acquire_many_owned(units) {
        return Ok(Some(permit));
    }
    client.waiting_for_device.fetch_add(1, Ordering::AcqRel);
    let permit = share.permits.clone().acquire_many_owned(units).await;
    client.waiting_for_device.fetch_sub(1, Ordering::AcqRel);
    permit.map(Some)
}

/// INVALIDATE: tear down `[va, va + len)` of `client`'s device address space, then, in every
/// client (this one included: it may map the file twice), each range that maps the same file
/// pages. The other clients are found by their current mappings (PROCMAP_QUERY), not by their
/// arena tables: a device entry exists only where a client maps an arena's file as registered,
/// and a mapping that went away has its own userfaultfd event.
fn invalidate_everywhere(
    shared: &Shared,
    client: &ClientState,
    va: u64,
    len: u64,
) -> Result<(), (ErrorCode, String)> {
    let bad = |why: String| {
        (
            ErrorCode::InvalidArgument,
            format!("INVALIDATE of {len:#x} bytes at {va:#x}: {why}"),
        )
    };
    if va % BUDGET_UNIT != 0 || len % BUDGET_UNIT != 0 || len == 0 {
        return Err(bad(
            "the address and the length must be 4 KiB aligned and the length non-zero".into(),
        ));
    }
    let range = VaRange::new(va, len).map_err(|e| bad(e.to_string()))?;
    // Which file pages the range maps now (before the caller's change or after it: a punched
    // hole or a grown file leaves the mapping in place).
    let files: Vec<FilePages> = match client.mm.walker().vmas(range) {
        Ok(vmas) => vmas
            .iter()
            .filter_map(|v| FilePages::of(v, range))
            .collect(),
        Err(e) => {
            tracing::debug!(client = client.id, error = %e, "INVALIDATE: the client's mappings");
            Vec::new()
        }
    };
    client.mm.invalidate(range).map_err(|e| {
        (
            ErrorCode::NotFound,
            format!("INVALIDATE: the client's mirror: {e}"),
        )
    })?;
    if files.is_empty() {
        return Ok(());
    }
    let clients: Vec<Arc<ClientState>> = shared.clients().values().cloned().collect();
    for other in clients {
        let vmas = match other.mm.walker().vmas(VaRange::whole()) {
            Ok(v) => v,
            // Gone (exited): its release tears its view down anyway.
            Err(_) => continue,
        };
        for v in &vmas {
            for f in &files {
                let Some(hit) = f.mapped_by(v) else { continue };
                if let Err(e) = other.mm.invalidate(hit) {
                    tracing::debug!(client = other.id, error = %e, "INVALIDATE of a sharer");
                } else if other.id != client.id {
                    tracing::debug!(from = client.id, to = other.id, range = ?hit, "invalidated a sharer");
                }
            }
        }
    }
    Ok(())
}

/// A run of one file's pages: (inode, device) and the byte offsets `[start, end)`.
struct FilePages {
    inode: u64,
    dev: (u32, u32),
    start: u64,
    end: u64,
}

impl FilePages {
    /// The file pages a shared file mapping `v` maps inside `range`.
    fn of(v: &mirror::Vma, range: VaRange) -> Option<FilePages> {
        if v.inode == 0 || !v.shared {
            return None;
        }
        let from = range.start().max(v.range.start());
        let to = range.end().min(v.range.end());
        (from < to).then(|| FilePages {
            inode: v.inode,
            dev: v.dev,
            start: v.offset + (from - v.range.start()),
            end: v.offset + (to - v.range.start()),
        })
    }

    /// The addresses at which mapping `v` maps some of these pages.
    fn mapped_by(&self, v: &mirror::Vma) -> Option<VaRange> {
        if (v.inode, v.dev) != (self.inode, self.dev) || !v.shared {
            return None;
        }
        let from = self.start.max(v.offset);
        let to = self.end.min(v.offset + v.range.len());
        if from >= to {
            return None;
        }
        let start = v.range.start() + (from - v.offset);
        VaRange::new(start, to - from).ok()
    }
}

/// Register `fd` with tokio for readability (a pidfd turns readable when its process exits).
/// Must be called inside a tokio runtime.
pub fn async_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open (and is not reused
    // for something else) until the registration is dropped with it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}
