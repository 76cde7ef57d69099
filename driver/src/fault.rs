//! Fault service, in the shape of nouveau's and UVM's: drain the fault buffer in batches, sort
//! by (address space, page, access), dedup, let each address space's handler service its
//! pages, cancel the work items whose faults could not be serviced, and replay once per batch.
//!
//! Two modes: interrupt (block on the fault and completion eventfds) and polling (busy-poll the
//! fault buffer's next slot with backoff). Benchmarks state which one they measured.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use accel_abi::regs::intr;
use accel_abi::{AccessKind, Completion, FaultRecord, PAGE_SIZE};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::device::{backoff, CancelOutcome, Device, DrainedFault, Ticket};
pub use crate::service_cpu::{clock_read_ns, ServiceCpu};
use crate::service_cpu::{timed, BatchTimer, Phase, ServiceCpuCounters};
use crate::Error;
use sys_util::sync::{ignore_poison, lock, read, write};

/// How the service thread learns about faults and completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceMode {
    /// Block on the device's interrupt eventfds.
    Interrupt,
    /// Busy-poll the fault buffer and completion records (spin, then yield, then short sleeps).
    Polling,
}

/// Why the driver cancelled a stalled work item: the code the device reports back as the
/// command's result, so the submitter gets a precise error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u32)]
pub enum CancelReason {
    /// No CPU mapping covers the address (no VMA, PROT_NONE, or a special mapping).
    #[error("no CPU mapping at the faulting address")]
    NoMapping = 1,
    /// The CPU mapping does not allow the access (write to read-only memory).
    #[error("the CPU mapping does not permit the access")]
    Permission = 2,
    /// Invalidations kept colliding with the fault for the whole retry budget.
    #[error("the retry budget was spent: invalidations kept racing the fault")]
    RetryBudget = 3,
    /// The device address space has no live context (released, or never created).
    #[error("no context owns this device address space")]
    NoContext = 4,
    /// DMA mapping failed (IOVA space, memlock limit, backend error).
    #[error("DMA mapping failed")]
    DmaMap = 5,
    /// The fault record itself was malformed.
    #[error("malformed fault record")]
    Malformed = 6,
    /// Any other servicing failure (see the driver log).
    #[error("the fault could not be serviced")]
    Other = 7,
    /// The device cannot reach this memory: in daemon mode only the memfd arenas a client
    /// registered are reachable, and the address is outside them (or the client maps something
    /// else there now).
    #[error(
        "the memory is not reachable by the device (daemon mode: outside every registered arena)"
    )]
    Unreachable = 8,
    /// Mapping the page would exceed the context's mapped/pinned-bytes quota.
    #[error("the context's mapped (pinned) bytes quota would be exceeded")]
    Quota = 9,
    /// The memory could not be registered for CPU change events (another userfaultfd owns the
    /// range, or the kernel refuses the VMA) and the context requires events
    /// (`ContextOptions::require_events`).
    #[error("the memory cannot be registered for CPU change events (another userfaultfd owns it, or the kernel refuses the mapping)")]
    Untracked = 10,
    /// The memory was taken away from the device: a command on it outlived its submitter's
    /// wait (a timeout), so the submitter has its memory back and the device may not touch it
    /// until that command has ended (`Context::wait`, docs/semantics.md section 1).
    #[error("the memory was revoked from the device: a command on it outlived its submitter's wait, and its pages stay unreachable until that command ends")]
    Revoked = 11,
}

impl CancelReason {
    /// Decode a cancel code from a completion result.
    pub fn from_code(code: u64) -> CancelReason {
        match code {
            1 => Self::NoMapping,
            2 => Self::Permission,
            3 => Self::RetryBudget,
            4 => Self::NoContext,
            5 => Self::DmaMap,
            6 => Self::Malformed,
            8 => Self::Unreachable,
            9 => Self::Quota,
            10 => Self::Untracked,
            11 => Self::Revoked,
            _ => Self::Other,
        }
    }
}

/// One page that faulted, with the strongest access any fault on it needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// Page-aligned VA.
    pub page: u64,
    /// Strongest access (write or atomic beats read beats prefetch).
    pub access: AccessKind,
    /// No record shows a work item stalled on this page now: each was a lookahead (the item
    /// has not got there yet) or was posted before a replay that has retried its item since.
    /// Mapping it is still worth it (the item is probably on its way there); failing to map it
    /// cancels nothing and is no failure: an item that really cannot get past the page faults
    /// on it again.
    pub hint: bool,
}

/// Services the faults of one device address space.
pub trait FaultHandler: Send + Sync {
    /// Make `faults` (sorted by page, deduplicated) accessible, or say why each can't be.
    /// Returns one outcome per input, in order.
    fn service(&self, faults: &[PageFault]) -> Vec<Result<(), CancelReason>>;
}

/// Counters the service keeps.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Fault records drained.
    pub records: AtomicU64,
    /// Batches serviced.
    pub batches: AtomicU64,
    /// Distinct pages serviced successfully.
    pub pages_serviced: AtomicU64,
    /// Work items cancelled.
    pub cancels: AtomicU64,
    /// Replays issued (one per batch, whether of every address space or of a few).
    pub replays: AtomicU64,
    /// Address spaces replayed alone (revision 3, scoped replay): each batch that replayed
    /// only the address spaces it serviced adds their number.
    pub scoped_replays: AtomicU64,
    /// Batches serviced by a thread waiting for a completion in polling mode instead of the
    /// service thread (it was spinning on the CPU anyway, and faults were posted).
    pub assisted_batches: AtomicU64,
    /// The fault lookahead depth the service asks of the device now (revision 3: it adapts;
    /// a device without `LOOKAHEAD_DEPTH` keeps its own, `CAP_FAULT_LOOKAHEAD`).
    pub lookahead_depth: AtomicU64,
    /// Times the service changed the lookahead depth: halved when most lookahead pages of a
    /// batch could not be mapped (the device walked for nothing), doubled (up to
    /// `CAP_FAULT_LOOKAHEAD`) when a stall's lookahead filled the whole window (its operand
    /// went on past it, so it stalls again one window later).
    pub lookahead_adjustments: AtomicU64,
    /// Fault-buffer overflows seen.
    pub overflows: AtomicU64,
    /// Malformed records seen.
    pub malformed: AtomicU64,
    /// Device errors latched (ERROR_CODE) and cleared.
    pub device_errors: AtomicU64,
    /// Times an address space's faults beyond its fair share of a batch were left stalled for
    /// the next round (several address spaces faulting at once).
    pub deferred: AtomicU64,
    /// Lookahead records drained (pages the device reported ahead of the stalled access).
    pub lookahead_records: AtomicU64,
    /// Lookahead pages that could not be serviced (their items were left to fault for real).
    pub lookahead_failed: AtomicU64,
    /// Records drained after a replay had already retried their work item (posted before the
    /// replay, drained after it): treated as hints.
    pub replayed_records: AtomicU64,
    /// Pages known only from replayed records that could not be serviced: nothing cancelled
    /// (the item may have completed; if it is still stuck there it faults again).
    pub replayed_failed: AtomicU64,
    /// Cancels not written because another thread replayed between the drain and the cancel
    /// (the items were retried; those still stuck fault again).
    pub cancels_skipped: AtomicU64,
    /// Cancels the device refused because the item was running, not stalled (its record was
    /// posted in the moment between the last replay's look at the fault buffer and the replay
    /// itself). Read back and cleared, not left as a device error; the item faults again if
    /// it still cannot go on.
    pub cancels_refused: AtomicU64,
    /// 1 once the service saw the device lost ([`crate::backend::Backend::lost`]): it stopped
    /// servicing, and every completion wait fails with [`Error::DeviceLost`] from then on.
    pub device_lost: AtomicU64,
    /// Completion waits that ended with [`Error::DeviceLost`] (commands in flight when the
    /// device was lost, or waited for after).
    pub lost_waits: AtomicU64,
}

/// A test hook the fault service calls on its own thread after each drain, before servicing,
/// with the well-formed records drained ([`FaultService::set_drain_hook`]).
pub type DrainHook = Arc<dyn Fn(&[FaultRecord]) + Send + Sync>;

/// Most address spaces one batch replays one by one (scoped replay); a batch naming more
/// replays every address space with one write.
const MAX_SCOPED_REPLAYS: usize = 4;

/// Fewest pages an address space may have serviced per batch when several share it.
const MIN_FAIR_SHARE: usize = 16;

/// The interrupt-mode service's poll timeout: faults are serviced at least this often even if
/// no fault interrupt arrives.
const POLL_TIMEOUT_MS: u16 = 100;
/// The longest a completion wait blocks in interrupt mode before it looks at the record again.
const COMPLETION_BOUND: Duration = Duration::from_millis(50);
/// An event found without its interrupt counts as missed only if no interrupt of its vector
/// arrives for this long after: an interrupt merely in flight when the timeout expired (the
/// record lands before its MSI) is not a miss.
pub const MISS_GRACE: Duration = Duration::from_millis(500);

/// Interrupts one device's fault service received, per vector, and the events it found only
/// through its timeouts because no interrupt came. Interrupt mode only: in polling mode the
/// service uses no interrupts and every field stays 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterruptStats {
    /// Fault interrupts received (signals of the fault vector's eventfd).
    pub fault: u64,
    /// Completion interrupts received.
    pub completion: u64,
    /// Error interrupts received.
    pub error: u64,
    /// Poll timeouts (100 ms without any interrupt) after which fault records were found
    /// pending, with no fault interrupt arriving for them within [`MISS_GRACE`]: faults
    /// serviced by timeout polling.
    pub missed_fault: u64,
    /// Completion waits (`Context::wait`, [`FaultService::wait`]) for a command that asked for
    /// a completion interrupt, that found the completion only after their 50 ms bound expired
    /// with no completion interrupt, none arriving within [`MISS_GRACE`] either.
    pub missed_completion: u64,
}

#[derive(Default)]
struct IrqCounters {
    fault: AtomicU64,
    completion: AtomicU64,
    error: AtomicU64,
    missed_fault: AtomicU64,
    missed_completion: AtomicU64,
    warned_fault: AtomicBool,
    warned_completion: AtomicBool,
}

/// Events found without their interrupt, not judged yet. An interrupt of the vector (the
/// vector's count moving past `seen`) shows it was only late; none for [`MISS_GRACE`] makes
/// them misses.
#[derive(Default)]
struct Suspects {
    count: u64,
    since: Option<Instant>,
    seen: u64,
}

impl Suspects {
    fn add(&mut self, seen: u64, now: Instant) {
        if self.seen != seen {
            // An interrupt came since the earlier ones: they were late, not missed.
            self.count = 0;
        }
        if self.count == 0 {
            self.since = Some(now);
            self.seen = seen;
        }
        self.count += 1;
    }

    /// The misses confirmed now, given the vector's interrupt count `seen`.
    fn judge(&mut self, seen: u64, now: Instant) -> u64 {
        if self.count == 0 {
            return 0;
        }
        if seen != self.seen {
            self.count = 0;
            return 0;
        }
        match self.since {
            Some(since) if now.duration_since(since) >= MISS_GRACE => {
                std::mem::take(&mut self.count)
            }
            _ => 0,
        }
    }
}

/// Shared between the service thread and the driver.
struct Shared {
    device: Arc<Device>,
    handlers: RwLock<HashMap<u16, Weak<dyn FaultHandler>>>,
    stats: ServiceStats,
    stop: AtomicBool,
    mode: ServiceMode,
    batch: usize,
    /// The address space served first in the next batch (round robin).
    next_first_asid: AtomicU32,
    completed: Mutex<u64>,
    completion_cv: Condvar,
    irq: IrqCounters,
    fault_suspects: Mutex<Suspects>,
    completion_suspects: Mutex<Suspects>,
    drain_hook: RwLock<Option<DrainHook>>,
    cpu_accounting: AtomicBool,
    cpu: ServiceCpuCounters,
    /// Held by whichever thread services a batch (the service thread, or a waiter assisting in
    /// polling mode): the other one does not drain meanwhile, so two batches never split the
    /// records of one stall between them, nor service the same pages twice.
    batch_gate: Mutex<()>,
}

/// The fault-service thread of one device, and completion waiting.
pub struct FaultService {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    wake: nix::sys::eventfd::EventFd,
}

impl FaultService {
    /// Start servicing `device`'s faults in `mode`, draining at most `batch` records at a time.
    pub fn start(
        device: Arc<Device>,
        mode: ServiceMode,
        batch: usize,
    ) -> Result<FaultService, Error> {
        let wake = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map_err(|e| Error::Os {
            what: "eventfd",
            source: e.into(),
        })?;
        let wake_fd = wake.as_fd().try_clone_to_owned().map_err(|e| Error::Os {
            what: "dup(eventfd)",
            source: e,
        })?;
        let stats = ServiceStats::default();
        stats
            .lookahead_depth
            .store(u64::from(device.caps().fault_lookahead), Ordering::Relaxed);
        let shared = Arc::new(Shared {
            device,
            handlers: RwLock::new(HashMap::new()),
            stats,
            stop: AtomicBool::new(false),
            mode,
            batch: batch.max(1),
            next_first_asid: AtomicU32::new(0),
            completed: Mutex::new(0),
            completion_cv: Condvar::new(),
            irq: IrqCounters::default(),
            fault_suspects: Mutex::new(Suspects::default()),
            completion_suspects: Mutex::new(Suspects::default()),
            drain_hook: RwLock::new(None),
            cpu_accounting: AtomicBool::new(false),
            cpu: ServiceCpuCounters::default(),
            batch_gate: Mutex::new(()),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("mxa-fault-service".into())
            .spawn(move || worker.run(wake_fd))
            .map_err(|e| Error::Os {
                what: "spawn fault service",
                source: e,
            })?;
        Ok(FaultService {
            shared,
            thread: Some(thread),
            wake,
        })
    }

    /// Route faults of `asid` to `handler` (held weakly: a dropped context stops receiving).
    pub fn register(&self, asid: u16, handler: Weak<dyn FaultHandler>) {
        write(&self.shared.handlers).insert(asid, handler);
    }

    /// Stop routing faults of `asid`; its stalled items are cancelled with `NoContext`.
    pub fn unregister(&self, asid: u16) {
        write(&self.shared.handlers).remove(&asid);
    }

    /// Test hook: from now on, call `hook` on the service thread after each drain of the fault
    /// buffer, before the records are serviced (`None` removes it). While it runs, no fault of
    /// the device is serviced: a test holds a batch there to order events against it
    /// deterministically (a replay, a completion, an unmap between the drain and the service).
    pub fn set_drain_hook(&self, hook: Option<DrainHook>) {
        *write(&self.shared.drain_hook) = hook;
    }

    /// Measure the service thread's own CPU time per batch, split by phase, from the next
    /// batch on ([`FaultService::cpu_cost`]). Off by default: the thread CPU clock is a system
    /// call, read about ten times per batch.
    pub fn set_cpu_accounting(&self, on: bool) {
        self.shared.cpu_accounting.store(on, Ordering::Relaxed);
    }

    /// The service thread's CPU time in the batches accounted so far (all 0 unless
    /// [`FaultService::set_cpu_accounting`] was turned on).
    pub fn cpu_cost(&self) -> ServiceCpu {
        self.shared.cpu.snapshot()
    }

    /// Counters.
    pub fn stats(&self) -> &ServiceStats {
        &self.shared.stats
    }

    /// The mode in use.
    pub fn mode(&self) -> ServiceMode {
        self.shared.mode
    }

    /// Interrupts received per vector and events found without one (all 0 in polling mode).
    pub fn interrupt_stats(&self) -> InterruptStats {
        let c = &self.shared.irq;
        InterruptStats {
            fault: c.fault.load(Ordering::Relaxed),
            completion: c.completion.load(Ordering::Relaxed),
            error: c.error.load(Ordering::Relaxed),
            missed_fault: c.missed_fault.load(Ordering::Relaxed),
            missed_completion: c.missed_completion.load(Ordering::Relaxed),
        }
    }

    /// How many completion interrupts the service has seen (interrupt mode; it stays put in
    /// polling mode). Read it before looking for completions, then
    /// [`FaultService::wait_completion_interrupt`] cannot miss one posted after the look.
    pub fn completion_generation(&self) -> u64 {
        *lock(&self.shared.completed)
    }

    /// Block until the completion-interrupt count differs from `seen` or `timeout` passes;
    /// returns the count.
    pub fn wait_completion_interrupt(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = lock(&self.shared.completed);
        let (guard, _) = ignore_poison(self.shared.completion_cv.wait_timeout_while(
            guard,
            timeout,
            |now| *now == seen,
        ));
        *guard
    }

    /// Wait up to `timeout` for `ticket`'s completion.
    pub fn wait(&self, ticket: Ticket, timeout: Duration) -> Result<Completion, Error> {
        let device = &self.shared.device;
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        let wants_irq = self.shared.mode == ServiceMode::Interrupt
            && device.completion_interrupt_requested(ticket);
        // The interrupt generation at which the last bounded wait expired with no completion
        // interrupt at all.
        let mut quiet: Option<u64> = None;
        loop {
            // Read the interrupt generation before looking at the record: a completion
            // interrupt after the look bumps it, so the wait below cannot miss it.
            let generation = *lock(&self.shared.completed);
            if let Some(c) = device.try_complete(ticket) {
                if wants_irq && quiet == Some(generation) {
                    // Found by the timeout, and still no completion interrupt.
                    lock(&self.shared.completion_suspects).add(generation, Instant::now());
                }
                return Ok(c);
            }
            // Looked at after the record: a completion posted before the loss is still the
            // command's result.
            if let Some(lost) = device.lost() {
                self.shared.stats.lost_waits.fetch_add(1, Ordering::Relaxed);
                return Err(Error::DeviceLost(lost));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout("command completion"));
            }
            match self.shared.mode {
                ServiceMode::Polling => {
                    // The waiter is burning this CPU anyway: if faults are posted (quite
                    // likely its own command's), service a batch here instead of waiting for
                    // the service thread to be scheduled (on a shared core that is a context
                    // switch there and one back for every fault).
                    if !self.shared.assist_batch() {
                        backoff(&mut spins);
                    }
                }
                ServiceMode::Interrupt => {
                    let guard = lock(&self.shared.completed);
                    if *guard == generation {
                        // The bound is only a safety net; completions arrive by interrupt.
                        let (guard, waited) = ignore_poison(
                            self.shared
                                .completion_cv
                                .wait_timeout(guard, (deadline - now).min(COMPLETION_BOUND)),
                        );
                        quiet = (waited.timed_out() && *guard == generation).then_some(generation);
                    } else {
                        quiet = None;
                    }
                }
            }
        }
    }
}

impl Drop for FaultService {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn access_rank(a: AccessKind) -> u8 {
    match a {
        AccessKind::Prefetch => 0,
        AccessKind::Read => 1,
        AccessKind::Write => 2,
        AccessKind::Atomic => 3,
    }
}

impl Shared {
    fn run(&self, wake: std::os::fd::OwnedFd) {
        let mut spins = 0u32;
        let mut batch = Vec::with_capacity(self.batch);
        while !self.stop.load(Ordering::Acquire) {
            if self.device.lost().is_some() {
                self.serve_lost_device(&wake);
                return;
            }
            match self.mode {
                ServiceMode::Interrupt => {
                    let dev = &self.device;
                    let mut fds = vec![
                        PollFd::new(dev.irq.fault.as_fd(), PollFlags::POLLIN),
                        PollFd::new(dev.irq.completion.as_fd(), PollFlags::POLLIN),
                        PollFd::new(dev.irq.error.as_fd(), PollFlags::POLLIN),
                        PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                    ];
                    // Readable once the device is lost: the loop top then sees it at once.
                    if let Some(lost) = dev.backend().lost_event() {
                        fds.push(PollFd::new(lost, PollFlags::POLLIN));
                    }
                    let woken = match nix::poll::poll(&mut fds, PollTimeout::from(POLL_TIMEOUT_MS))
                    {
                        Ok(n) => n,
                        Err(e) => {
                            if e != nix::errno::Errno::EINTR {
                                tracing::error!(error = %e, "poll on device interrupts failed");
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            continue;
                        }
                    };
                    let ready = |i: usize| {
                        fds[i]
                            .revents()
                            .is_some_and(|r| r.contains(PollFlags::POLLIN))
                    };
                    let (fault, completion, error) = (ready(0), ready(1), ready(2));
                    // Drain the eventfd counters, then acknowledge the status bits *before*
                    // looking at the rings, so a new event after our look fires again.
                    // Each eventfd's counter is the number of interrupts since the last read.
                    let received = |fd: &nix::sys::eventfd::EventFd, count: &AtomicU64| {
                        if let Ok(n) = fd.read() {
                            count.fetch_add(n, Ordering::Relaxed);
                        }
                    };
                    let mut ack = 0;
                    if fault {
                        received(&dev.irq.fault, &self.irq.fault);
                        ack |= intr::FAULT;
                    }
                    if completion {
                        received(&dev.irq.completion, &self.irq.completion);
                        ack |= intr::COMPLETION;
                    }
                    if error {
                        received(&dev.irq.error, &self.irq.error);
                        ack |= intr::ERROR;
                    }
                    if ack != 0 {
                        if let Err(e) = dev.ack_interrupts(ack) {
                            tracing::error!(error = %e, "acknowledging interrupts failed");
                        }
                    }
                    if completion {
                        self.notify_completions();
                    }
                    if error {
                        self.check_device_error();
                    }
                    self.judge_misses();
                    if woken == 0 && self.device.fault_pending() {
                        // A whole poll period without an interrupt, and faults are waiting:
                        // their interrupt is in flight, or it never comes.
                        let seen = self.irq.fault.load(Ordering::Relaxed);
                        lock(&self.fault_suspects).add(seen, Instant::now());
                    }
                    // Service whatever is posted, fault interrupt or not (coalescing).
                    while self.device.fault_pending()
                        && !self.stop.load(Ordering::Acquire)
                        && self.device.lost().is_none()
                    {
                        if !self.try_service_batch(&mut batch) {
                            // A waiter is servicing (polling mode only): it finishes soon.
                            std::thread::yield_now();
                        }
                    }
                }
                ServiceMode::Polling => {
                    if self.device.fault_pending() && self.try_service_batch(&mut batch) {
                        spins = 0;
                    } else {
                        backoff(&mut spins);
                        if spins % 1024 == 0 {
                            self.check_device_error();
                        }
                    }
                }
            }
        }
    }

    /// In polling mode, service one batch on the calling thread (a completion waiter) if faults
    /// are posted and no test hook orders the service; whether it did.
    fn assist_batch(&self) -> bool {
        if !self.device.fault_pending()
            || self.stop.load(Ordering::Acquire)
            || self.device.lost().is_some()
            || read(&self.drain_hook).is_some()
        {
            return false;
        }
        thread_local! {
            static BATCH: std::cell::RefCell<Vec<DrainedFault>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BATCH.with(|b| match b.try_borrow_mut() {
            Ok(mut batch) => {
                let serviced = self.try_service_batch(&mut batch);
                if serviced {
                    self.stats.assisted_batches.fetch_add(1, Ordering::Relaxed);
                }
                serviced
            }
            // A handler waiting for a command from inside a service (never done): not twice.
            Err(_) => false,
        })
    }

    /// The device is gone: wake every completion waiter (each then fails with
    /// [`Error::DeviceLost`] instead of waiting for its timeout), service nothing more (every
    /// device access would fail), and wait for the service to be stopped.
    fn serve_lost_device(&self, wake: &std::os::fd::OwnedFd) {
        if self.stats.device_lost.swap(1, Ordering::Relaxed) == 0 {
            if let Some(lost) = self.device.lost() {
                tracing::error!(%lost, "device lost: failing every command waiting for it; fault service stopped");
            }
        }
        self.notify_completions();
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
            if let Err(e) = nix::poll::poll(&mut fds, PollTimeout::NONE) {
                if e != nix::errno::Errno::EINTR {
                    tracing::error!(error = %e, "poll on the stop event failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Count the events found without an interrupt that no interrupt followed within
    /// [`MISS_GRACE`]; warn the first time for each vector.
    fn judge_misses(&self) {
        let now = Instant::now();
        let seen = self.irq.fault.load(Ordering::Relaxed);
        let missed = lock(&self.fault_suspects).judge(seen, now);
        if missed > 0 {
            self.irq.missed_fault.fetch_add(missed, Ordering::Relaxed);
            if !self.irq.warned_fault.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    backend = ?self.device.backend().kind(),
                    missed,
                    "no fault interrupt arrived: faults serviced by {POLL_TIMEOUT_MS} ms timeout \
                     polling; check that MSI was enabled (the device's fault vector never \
                     signalled its eventfd while fault records waited; in a guest, look for an \
                     MSI error in the hypervisor's log). Counted in Runtime::interrupt_stats"
                );
            }
        }
        let generation = *lock(&self.completed);
        let missed = lock(&self.completion_suspects).judge(generation, now);
        if missed > 0 {
            self.irq
                .missed_completion
                .fetch_add(missed, Ordering::Relaxed);
            if !self.irq.warned_completion.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    backend = ?self.device.backend().kind(),
                    missed,
                    "no completion interrupt arrived: completions found by {} ms timeout \
                     polling; check that MSI was enabled (the device's completion vector never \
                     signalled its eventfd; in a guest, look for an MSI error in the \
                     hypervisor's log). Counted in Runtime::interrupt_stats",
                    COMPLETION_BOUND.as_millis()
                );
            }
        }
    }

    /// The address spaces to replay alone after this batch, or `None` for one replay of every
    /// address space. Replaying only the address spaces a batch serviced leaves the other
    /// address spaces' stalled items alone: retried, each would fault on the same page again
    /// and post a duplicate of the record still waiting in the buffer. Every address space is
    /// replayed when the device cannot name one, when the buffer overflowed (an item may have
    /// stalled with no record, so nobody knows its address space), when a record was unreadable
    /// (the same), when the batch names more than [`MAX_SCOPED_REPLAYS`] address spaces (one
    /// register write each), and when nobody else is registered (the same thing, one write).
    fn scoped_replay_set(
        &self,
        groups: &[std::ops::Range<usize>],
        records: &[(FaultRecord, bool)],
        overflow: bool,
        drained: usize,
    ) -> Option<Vec<u16>> {
        let caps = self.device.caps();
        let readable = records.len() == drained;
        if !caps.scoped_replay || overflow || !readable || groups.len() > MAX_SCOPED_REPLAYS {
            return None;
        }
        let asids: Vec<u16> = groups.iter().map(|g| records[g.start].0.asid).collect();
        if asids.is_empty()
            || asids.iter().any(|&a| u32::from(a) >= caps.asids)
            || read(&self.handlers).len() <= asids.len()
        {
            return None;
        }
        Some(asids)
    }

    fn notify_completions(&self) {
        let mut n = lock(&self.completed);
        *n += 1;
        self.completion_cv.notify_all();
    }

    fn check_device_error(&self) {
        match self.device.take_error() {
            Ok(Some((code, info))) => {
                self.stats.device_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    code,
                    info = format_args!("{info:#x}"),
                    "device latched an error"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "reading the device error register failed"),
        }
    }

    /// [`Shared::service_batch`] unless another thread is servicing one; whether it did.
    fn try_service_batch(&self, batch: &mut Vec<DrainedFault>) -> bool {
        let _gate = match self.batch_gate.try_lock() {
            Ok(gate) => gate,
            // A panic in an earlier batch poisons nothing the gate protects (it guards no data).
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        self.service_batch(batch);
        true
    }

    fn service_batch(&self, batch: &mut Vec<DrainedFault>) {
        let timer = self
            .cpu_accounting
            .load(Ordering::Relaxed)
            .then(BatchTimer::start);
        self.service_drained(batch);
        if let Some(timer) = timer {
            timer.finish(&self.cpu);
        }
    }

    fn service_drained(&self, batch: &mut Vec<DrainedFault>) {
        batch.clear();
        let drain = match self.device.drain_faults(self.batch, batch) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "draining the fault buffer failed");
                return;
            }
        };
        let overflow = drain.overflow;
        let span = tracing::debug_span!("fault_batch", records = batch.len(), overflow);
        let _enter = span.enter();
        self.stats
            .records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if overflow {
            self.stats.overflows.fetch_add(1, Ordering::Relaxed);
        }

        // Sort by (asid, page, access) and group: one entry per (asid, page) with the
        // strongest access, and every work id that faulted on it. Each record says whether it
        // proves its item stalled on the page now: it does unless it is a lookahead (the item
        // has not got there yet) or was posted before the last replay (the item was retried
        // since: it may have run past the page and completed; if it still cannot get past, it
        // has posted a new record). Only items proven stalled are cancelled, and only their
        // pages count as failures: a cancel of an item that is not stalled is refused by the
        // device and latched as an error.
        let mut records: Vec<(FaultRecord, bool)> = Vec::with_capacity(batch.len());
        let mut cancels: Vec<(u32, u16, CancelReason)> = Vec::new();
        let va_limit = 1u64 << self.device.caps().va_bits.clamp(12, 63);
        for d in batch.iter() {
            match *d {
                DrainedFault::Fault {
                    record: r,
                    replayed,
                } if r.va >= va_limit => {
                    // An address the device cannot translate: a device (or emulator) bug, and
                    // arithmetic on it further down could overflow. Fail the work item, if
                    // this record shows it stalled.
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        va = r.va,
                        work_id = r.work_id,
                        replayed,
                        "fault record beyond the VA width"
                    );
                    if !replayed && !r.lookahead {
                        cancels.push((r.work_id, r.asid, CancelReason::Malformed));
                    }
                }
                DrainedFault::Fault {
                    record: r,
                    replayed,
                } => {
                    if r.lookahead {
                        self.stats.lookahead_records.fetch_add(1, Ordering::Relaxed);
                    }
                    if replayed {
                        self.stats.replayed_records.fetch_add(1, Ordering::Relaxed);
                    }
                    records.push((r, replayed))
                }
                DrainedFault::Malformed { slot } => {
                    // Nothing in it can be trusted, not even the work id: the stalled item
                    // re-faults on the next replay and gets a well-formed record.
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(slot, "malformed fault record skipped");
                }
            }
        }
        let depth = self.stats.lookahead_depth.load(Ordering::Relaxed);
        let lookahead_records = records.iter().filter(|(r, _)| r.lookahead).count();
        let full_windows = full_lookahead_windows(batch, depth);
        let mut lookahead_failures = 0;
        let hook = read(&self.drain_hook).clone();
        if let Some(hook) = hook {
            let plain: Vec<FaultRecord> = records.iter().map(|(r, _)| *r).collect();
            hook(&plain);
        }
        records.sort_by_key(|(r, _)| (r.asid, r.va / PAGE_SIZE, access_rank(r.access)));

        // One group per address space. Fairness between address spaces (daemon clients): the
        // group served first rotates from batch to batch, and when several share a batch each
        // gets at most its share of pages; the rest stay stalled and fault again after the
        // replay, so one flooding client cannot hold the service for everybody else.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let mut i = 0;
        while i < records.len() {
            let mut j = i;
            while j < records.len() && records[j].0.asid == records[i].0.asid {
                j += 1;
            }
            groups.push(i..j);
            i = j;
        }
        let scoped = self.scoped_replay_set(&groups, &records, overflow, batch.len());
        let first = self.next_first_asid.load(Ordering::Relaxed);
        let start = groups
            .iter()
            .position(|g| u32::from(records[g.start].0.asid) >= first)
            .unwrap_or(0);
        groups.rotate_left(start);
        if let Some(g) = groups.first() {
            self.next_first_asid
                .store(u32::from(records[g.start].0.asid) + 1, Ordering::Relaxed);
        }
        let share = if groups.len() > 1 {
            (self.batch / groups.len()).max(MIN_FAIR_SHARE)
        } else {
            usize::MAX
        };

        let mut serviced_any = false;
        for range in groups {
            let group = &records[range];
            let asid = group[0].0.asid;
            let mut pages: Vec<PageFault> = Vec::new();
            // Per page: the work items that faulted on it, and whether a record shows one
            // stalled there. Only those are cancelled if the page fails; the others fault on
            // the page again after the replay if it still does not translate.
            let mut owners: Vec<Vec<Owner>> = Vec::new();
            for &(r, replayed) in group {
                let page = r.va & !(PAGE_SIZE - 1);
                let stalled = !r.lookahead && !replayed;
                let full = pages.len() == share;
                match pages.last_mut() {
                    Some(last) if last.page == page => {
                        if access_rank(r.access) > access_rank(last.access) {
                            last.access = r.access;
                        }
                        last.hint &= !stalled;
                        let o = owners.last_mut().expect("owners parallel to pages");
                        match o.iter_mut().find(|o| o.work_id == r.work_id) {
                            Some(owner) => {
                                owner.stalled |= stalled;
                                owner.replayed |= replayed;
                            }
                            None => o.push(Owner {
                                work_id: r.work_id,
                                stalled,
                                replayed,
                            }),
                        }
                    }
                    _ if full => {
                        // Over this batch's share: left stalled, it faults again after replay.
                        self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    _ => {
                        pages.push(PageFault {
                            page,
                            access: r.access,
                            hint: !stalled,
                        });
                        owners.push(vec![Owner {
                            work_id: r.work_id,
                            stalled,
                            replayed,
                        }]);
                    }
                }
            }
            let handler = read(&self.handlers).get(&asid).and_then(Weak::upgrade);
            let outcomes = match handler {
                Some(h) => h.service(&pages),
                None => vec![Err(CancelReason::NoContext); pages.len()],
            };
            for (k, owners) in owners.iter().enumerate() {
                match outcomes.get(k).copied().unwrap_or(Err(CancelReason::Other)) {
                    Ok(()) => {
                        serviced_any = true;
                        self.stats.pages_serviced.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(reason) => {
                        for owner in owners {
                            if !owner.stalled {
                                let counter = if owner.replayed {
                                    &self.stats.replayed_failed
                                } else {
                                    lookahead_failures += 1;
                                    &self.stats.lookahead_failed
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            if !cancels.iter().any(|(id, _, _)| *id == owner.work_id) {
                                cancels.push((owner.work_id, asid, reason));
                            }
                        }
                    }
                }
            }
        }

        let mut cancelled = 0;
        for (work_id, asid, reason) in &cancels {
            match self
                .device
                .cancel_stalled(*work_id, *asid, *reason as u32, drain.replays)
            {
                Ok(CancelOutcome::Cancelled) => {
                    tracing::debug!(work_id, %reason, "cancelled work item");
                    cancelled += 1;
                }
                Ok(CancelOutcome::Replayed) => {
                    // Another thread replayed (a context being dropped) after the drain: the
                    // item was retried and, if it still cannot go on, faults again.
                    tracing::debug!(work_id, %reason, "not cancelled: replayed since the drain");
                    self.stats.cancels_skipped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(CancelOutcome::Refused) => {
                    // Its record was posted in the moment before the last replay and the item
                    // was running: it faults again if it still cannot go on.
                    tracing::debug!(work_id, %reason, "cancel refused: the item was running");
                    self.stats.cancels_refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::error!(error = %e, work_id, "cancel failed"),
            }
        }
        self.stats.cancels.fetch_add(cancelled, Ordering::Relaxed);
        if serviced_any || overflow || !batch.is_empty() {
            // One replay per batch. Items we cancelled are no longer stalled; everything else
            // retries, and whatever is still missing faults again. Any record left in the
            // buffer is now marked replayed when drained.
            let replayed = timed(Phase::Replay, || match &scoped {
                Some(asids) => {
                    self.stats
                        .scoped_replays
                        .fetch_add(asids.len() as u64, Ordering::Relaxed);
                    asids
                        .iter()
                        .try_for_each(|&asid| self.device.replay_scoped(asid))
                }
                None => self.device.replay(),
            });
            if let Err(e) = replayed {
                tracing::error!(error = %e, "replay failed");
            }
            self.stats.replays.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.adapt_lookahead(depth, lookahead_records, lookahead_failures, full_windows);
    }

    /// Halve the lookahead depth when more than half of a batch's lookahead pages could not be
    /// mapped, double it (up to `CAP_FAULT_LOOKAHEAD`) when a stall's lookahead filled its whole
    /// window and none failed, so the device spends its page walks where they pay. Takes effect for stalls after the register write.
    fn adapt_lookahead(&self, depth: u64, lookahead: usize, failed: usize, full_windows: usize) {
        let caps = self.device.caps();
        if !caps.lookahead_depth || lookahead == 0 {
            return;
        }
        let cap = u64::from(caps.fault_lookahead);
        let wanted = if failed * 2 > lookahead {
            (depth / 2).max(1)
        } else if failed == 0 && full_windows > 0 {
            (depth * 2).min(cap)
        } else {
            depth
        };
        if wanted == depth {
            return;
        }
        match self.device.set_lookahead_depth(wanted as u32) {
            Ok(()) => {
                self.stats.lookahead_depth.store(wanted, Ordering::Relaxed);
                self.stats
                    .lookahead_adjustments
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    depth,
                    wanted,
                    lookahead,
                    failed,
                    full_windows,
                    "lookahead depth adapted"
                );
            }
            Err(e) => tracing::warn!(error = %e, wanted, "setting the lookahead depth failed"),
        }
    }
}

/// Stalls of a drained batch followed by at least `depth` lookahead records: their operand went
/// on past the device's lookahead window.
fn full_lookahead_windows(batch: &[DrainedFault], depth: u64) -> usize {
    if depth == 0 {
        return 0;
    }
    let mut full = 0;
    let mut run: Option<u64> = None;
    for d in batch {
        match d {
            DrainedFault::Fault { record, .. } if record.lookahead => {
                if let Some(n) = run.as_mut() {
                    *n += 1;
                }
            }
            // A stall starts a window; an unreadable slot ends one and starts none.
            other => {
                if run.is_some_and(|n| n >= depth) {
                    full += 1;
                }
                run = matches!(other, DrainedFault::Fault { .. }).then_some(0);
            }
        }
    }
    if run.is_some_and(|n| n >= depth) {
        full += 1;
    }
    full
}

/// A work item that faulted on a page of the batch.
struct Owner {
    work_id: u32,
    /// A record shows it stalled on the page now (neither lookahead nor replayed).
    stalled: bool,
    /// One of its records for the page was posted before the last replay.
    replayed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(work_id: u32, page: u64, lookahead: bool) -> DrainedFault {
        DrainedFault::Fault {
            record: FaultRecord {
                va: page * PAGE_SIZE,
                work_id,
                asid: 0,
                access: AccessKind::Write,
                reason: accel_abi::FaultReason::NotPresent,
                timestamp_ns: 0,
                lookahead,
            },
            replayed: false,
        }
    }

    #[test]
    fn a_window_is_full_when_a_stall_brings_as_many_lookahead_records_as_the_depth() {
        let mut batch = vec![drained(1, 10, false)];
        batch.extend((11..15).map(|p| drained(1, p, true)));
        batch.push(drained(2, 40, false));
        batch.extend((41..43).map(|p| drained(2, p, true)));
        batch.push(drained(3, 80, false));
        batch.extend((81..85).map(|p| drained(3, p, true)));
        // Stalls 1 and 3 brought 4 lookahead records each, stall 2 two.
        assert_eq!(full_lookahead_windows(&batch, 4), 2);
        assert_eq!(full_lookahead_windows(&batch, 2), 3);
        assert_eq!(full_lookahead_windows(&batch, 5), 0);
        assert_eq!(full_lookahead_windows(&batch, 0), 0, "no lookahead at all");
        assert_eq!(full_lookahead_windows(&[], 4), 0);
        // A malformed slot ends no window and starts none.
        let odd = vec![DrainedFault::Malformed { slot: 0 }, drained(1, 3, true)];
        assert_eq!(full_lookahead_windows(&odd, 1), 0);
    }

    #[test]
    fn a_late_interrupt_is_no_miss_and_no_interrupt_for_the_grace_period_is() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Suspects::default();
        s.add(5, t0);
        assert_eq!(
            s.judge(5, t0 + MISS_GRACE / 2),
            0,
            "not judged before the grace period"
        );
        assert_eq!(
            s.judge(6, t0 + MISS_GRACE),
            0,
            "an interrupt came: it was late"
        );
        assert_eq!(s.judge(6, t0 + MISS_GRACE * 2), 0, "and stays forgiven");
        s.add(6, t0);
        s.add(6, t0 + ms(100));
        assert_eq!(
            s.judge(6, t0 + MISS_GRACE),
            2,
            "no interrupt at all: both missed"
        );
        assert_eq!(s.judge(6, t0 + MISS_GRACE * 3), 0, "counted once");
        // A suspect after an interrupt starts a new group: the old one was refuted.
        s.add(6, t0);
        s.add(7, t0 + ms(200));
        assert_eq!(s.judge(7, t0 + MISS_GRACE), 0);
        assert_eq!(s.judge(7, t0 + ms(200) + MISS_GRACE), 1);
    }
}
