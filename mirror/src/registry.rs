//! Subscriptions, invalidations and the retry budget: the user-facing side of [`crate::seq`].

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use std::time::{Duration, Instant};
use sys_util::sync::{lock, read, write};

use crate::seq::{BeginError, Interval, IntervalSeq, Notifier, Ticket};
use crate::stats::StatsInner;
use crate::{Error, Perms, Result, VaRange};

/// Default bound on how long a fault may keep retrying (the kernel's HMM_RANGE_DEFAULT_TIMEOUT).
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(1);

/// What changed on the CPU side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The range was unmapped (munmap, mremap shrink or move source, `mmap(MAP_FIXED)` overlap).
    Unmap,
    /// The pages were discarded (MADV_DONTNEED / MADV_FREE / MADV_REMOVE); the VMA stays.
    Discard,
    /// The range was moved by mremap; `to` is the new start when known.
    Remap {
        /// New start address (None for an explicit bracket whose target is not known yet).
        to: Option<u64>,
    },
    /// The process forked: private pages became copy-on-write shared with the child. Subscribers
    /// whose entries are backed by long-term pins may keep them (the kernel early-copies pinned
    /// pages for the child); others must drop writable entries.
    Fork,
    /// The CPU protection changed to `perms` (explicit only: mprotect has no userfaultfd event).
    Protect {
        /// The new protection.
        perms: Perms,
    },
    /// The address space is gone (process exit) or the registry shut down. Every subscription gets
    /// one, over its whole range; later faults fail with [`Error::Released`].
    Release,
    /// An explicit [`crate::AddressSpace::invalidate`] call.
    Explicit,
}

/// Where an invalidation came from, which decides its coherence guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSource {
    /// This crate's API: strict (delivered before the change, the call waits for all callbacks).
    Api,
    /// A userfaultfd event: eventual (delivered after the change, bound measured in stats).
    Userfaultfd,
    /// Process exit seen through the pidfd.
    ProcessExit,
}

/// One invalidation as a subscriber sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// The part of the changed range that overlaps the subscription.
    pub range: VaRange,
    /// What happened.
    pub kind: EventKind,
    /// Who reported it.
    pub source: EventSource,
}

/// A record handed to the event observer after all callbacks for one event have returned.
#[derive(Clone, Debug)]
pub struct EventRecord {
    /// The whole changed range (not clipped).
    pub range: VaRange,
    /// What happened.
    pub kind: EventKind,
    /// Who reported it.
    pub source: EventSource,
    /// Subscriptions whose callback ran.
    pub subscribers_hit: usize,
    /// For userfaultfd events: time from reading the event to the last callback returning.
    pub latency: Option<Duration>,
}

/// A hook called after every event's callbacks have returned (see
/// [`crate::AddressSpace::set_event_observer`]).
pub type EventObserver = Box<dyn Fn(&EventRecord) + Send + Sync>;
type Observer = EventObserver;
type Callback<T> = Box<dyn Fn(&mut T, &Invalidation) + Send + Sync>;

thread_local! {
    static CALLBACK_DEPTH: Cell<u32> = const { Cell::new(0) };
}

pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

/// The registry shared by an address space, its subscriptions and its monitor thread.
pub(crate) struct Registry {
    notifier: Notifier<Invalidation>,
    next_id: AtomicU64,
    pub(crate) stats: StatsInner,
    retry_budget: Duration,
    observer: RwLock<Option<Observer>>,
}

impl Registry {
    pub(crate) fn new(retry_budget: Duration) -> Self {
        let registry = Registry {
            notifier: Notifier::new(),
            next_id: AtomicU64::new(1),
            stats: StatsInner::default(),
            retry_budget,
            observer: RwLock::new(None),
        };
        // Its Arc allocation: two counts and the registry.
        let own = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Registry>();
        registry.stats.registry_bytes(own as i64);
        registry
    }

    pub(crate) fn set_observer(&self, observer: Option<Observer>) {
        *write(&self.observer) = observer;
    }

    pub(crate) fn subscribe<T, F>(
        self: &Arc<Self>,
        range: VaRange,
        state: T,
        callback: F,
    ) -> Result<Subscription<T>>
    where
        T: Send + 'static,
        F: Fn(&mut T, &Invalidation) + Send + Sync + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The node's Arc allocation, the boxed callback and the notifier's slot for it.
        let bytes = (2 * std::mem::size_of::<usize>()
            + std::mem::size_of::<SubNode<T>>()
            + std::mem::size_of_val(&callback)
            + std::mem::size_of::<Arc<dyn Interval<Invalidation>>>()) as i64;
        let node = Arc::new(SubNode {
            seq: IntervalSeq::new(id, range.start(), range.end()),
            range,
            state: Mutex::new(state),
            callback: Box::new(callback),
            registry: Arc::downgrade(self),
            bytes,
        });
        self.notifier
            .insert(node.clone())
            .map_err(|_| Error::Released)?;
        self.stats.registry_bytes(bytes);
        Ok(Subscription {
            node,
            registry: self.clone(),
        })
    }

    /// Starts an invalidation: every overlapping subscriber has torn down when this returns, and no
    /// fault can install in the range until the returned bracket is ended.
    pub(crate) fn begin(
        &self,
        range: VaRange,
        kind: EventKind,
        source: EventSource,
    ) -> Bracket<'_> {
        self.stats.event(&kind);
        let inv = Invalidation {
            range,
            kind,
            source,
        };
        let ticket = self
            .notifier
            .invalidate_start(range.start(), range.end(), &inv);
        Bracket {
            registry: self,
            ticket: Some(ticket),
            inv,
        }
    }

    /// A whole invalidation (start + end); returns the number of subscribers hit.
    pub(crate) fn invalidate(
        &self,
        range: VaRange,
        kind: EventKind,
        source: EventSource,
        read_at: Option<Instant>,
    ) -> usize {
        let bracket = self.begin(range, kind, source);
        bracket.finish(read_at)
    }

    /// Process exit or shutdown: every subscription gets one Release, then faults fail.
    pub(crate) fn release(&self, source: EventSource) {
        if self.notifier.is_released() {
            return;
        }
        let hits = self.invalidate(VaRange::whole(), EventKind::Release, source, None);
        self.notifier.mark_released();
        tracing::debug!(hits, ?source, "address space released");
    }

    pub(crate) fn is_released(&self) -> bool {
        self.notifier.is_released()
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.notifier.interval_count()
    }
}

/// A running invalidation; ending it (drop or [`Bracket::finish`]) lets faults proceed again.
pub(crate) struct Bracket<'a> {
    registry: &'a Registry,
    ticket: Option<Ticket>,
    inv: Invalidation,
}

impl Bracket<'_> {
    pub(crate) fn finish(mut self, read_at: Option<Instant>) -> usize {
        self.end(read_at)
    }

    fn end(&mut self, read_at: Option<Instant>) -> usize {
        let Some(ticket) = self.ticket.take() else {
            return 0;
        };
        let hits = ticket.hits;
        self.registry.notifier.invalidate_end(ticket);
        let latency = read_at.map(|t| t.elapsed());
        if let Some(l) = latency {
            self.registry.stats.latency(l);
        }
        let observer = read(&self.registry.observer);
        if let Some(obs) = observer.as_ref() {
            obs(&EventRecord {
                range: self.inv.range,
                kind: self.inv.kind,
                source: self.inv.source,
                subscribers_hit: hits,
                latency,
            });
        }
        hits
    }
}

impl Drop for Bracket<'_> {
    fn drop(&mut self) {
        self.end(None);
    }
}

struct SubNode<T> {
    seq: IntervalSeq,
    range: VaRange,
    state: Mutex<T>,
    callback: Callback<T>,
    registry: std::sync::Weak<Registry>,
    /// What this node adds to [`crate::Stats::registry_bytes`].
    bytes: i64,
}

impl<T: Send> Interval<Invalidation> for SubNode<T> {
    fn seq_state(&self) -> &IntervalSeq {
        &self.seq
    }

    fn invalidate(&self, cur_seq: u64, event: &Invalidation) {
        let Some(range) = event.range.intersect(&self.range) else {
            return;
        };
        let clipped = Invalidation {
            range,
            kind: event.kind,
            source: event.source,
        };
        let mut state = lock(&self.state);
        self.seq.set_seq(cur_seq);
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        let outcome = catch_unwind(AssertUnwindSafe(|| (self.callback)(&mut state, &clipped)));
        CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
        drop(state);
        if let Some(reg) = self.registry.upgrade() {
            reg.stats.invalidation();
            if outcome.is_err() {
                reg.stats.callback_panic();
            }
        }
        if outcome.is_err() {
            tracing::error!(range = ?clipped.range, kind = ?clipped.kind,
                "invalidation callback panicked; the subscriber may hold stale entries");
        }
    }
}

/// A sequence number handed out by [`Subscription::read_begin`]; only useful for `read_retry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSeq(u64);

impl ReadSeq {
    /// The raw value (odd), for logging.
    pub fn value(self) -> u64 {
        self.0
    }
}

/// An interval subscription: the subscriber's state `T` behind its own lock, an invalidate
/// callback run under that lock, and the sequence number protecting faults against invalidations.
///
/// Dropping it removes the interval; the drop waits for a running invalidation of it to finish
/// (unless done from inside a callback, where it is deferred instead).
///
/// ```
/// use mirror::{AddressSpace, Config, Mapping, EventKind};
/// let mm = AddressSpace::current(Config::explicit_only()).unwrap();
/// let buf = Mapping::anonymous(4 * 4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
/// // The state is a toy device page table: the set of mirrored page addresses.
/// let sub = mm
///     .subscribe(buf.range(), Vec::<u64>::new(), |ptes, inv| {
///         ptes.retain(|a| !inv.range.contains(*a));
///     })
///     .unwrap();
/// // The fault path: read_begin, walk without the lock, then lock + read_retry + install.
/// let installed = sub
///     .mirror_range(
///         |_seq| mm.snapshot(buf.range()),
///         |ptes, snap| {
///             ptes.extend((0..snap.pages().len() as u64).map(|i| buf.addr() + i * 4096));
///             ptes.len()
///         },
///     )
///     .unwrap();
/// assert_eq!(installed, 4);
/// mm.invalidate(buf.range()).unwrap();
/// assert!(sub.lock().is_empty());
/// ```
pub struct Subscription<T: Send + 'static> {
    node: Arc<SubNode<T>>,
    registry: Arc<Registry>,
}

impl<T: Send + 'static> Subscription<T> {
    /// The subscribed range.
    pub fn range(&self) -> VaRange {
        self.node.range
    }

    /// `mmu_interval_read_begin`: returns a sequence number to check with
    /// [`SubscriberGuard::read_retry`]. Waits (at most the retry budget) while an invalidation of
    /// this interval is running.
    pub fn read_begin(&self) -> Result<ReadSeq> {
        let budget = self.retry_budget();
        self.read_begin_within(&budget)
    }

    /// `read_begin` bounded by an existing budget's deadline (use inside a retry loop).
    pub fn read_begin_within(&self, budget: &RetryBudget) -> Result<ReadSeq> {
        match self
            .registry
            .notifier
            .read_begin(&self.node.seq, Some(budget.deadline()))
        {
            Ok(seq) => Ok(ReadSeq(seq)),
            Err(BeginError::Released) => Err(Error::Released),
            Err(BeginError::Timeout) => {
                self.registry.stats.budget_exhausted();
                Err(Error::RetryBudgetExhausted {
                    retries: budget.retries,
                    budget: budget.budget,
                })
            }
        }
    }

    /// `mmu_interval_check_retry`: a lockless early-out. Only `true` is reliable.
    pub fn check_retry(&self, seq: ReadSeq) -> bool {
        self.node.seq.needs_retry(seq.0)
    }

    /// Takes the subscriber lock (the one the invalidate callback runs under).
    ///
    /// Never call munmap/madvise/mremap on tracked memory while holding it: the userfaultfd monitor
    /// needs this lock to finish the event the syscall waits for.
    pub fn lock(&self) -> SubscriberGuard<'_, T> {
        SubscriberGuard {
            guard: lock(&self.node.state),
            seq: &self.node.seq,
        }
    }

    /// A fresh retry budget with the address space's configured duration.
    pub fn retry_budget(&self) -> RetryBudget {
        RetryBudget::new(self.registry.retry_budget, self.registry.clone())
    }

    /// The whole fault protocol: `walk(seq)` runs without the lock (fault in, snapshot, pin); if no
    /// invalidation collided, `install(&mut state, walked)` runs under the lock. A collision drops
    /// the walk result (undo pins in its `Drop`) and retries within the budget.
    pub fn mirror_range<W, R>(
        &self,
        mut walk: impl FnMut(ReadSeq) -> Result<W>,
        mut install: impl FnMut(&mut T, W) -> R,
    ) -> Result<R> {
        let mut budget = self.retry_budget();
        loop {
            let seq = self.read_begin_within(&budget)?;
            let walked = walk(seq)?;
            let mut guard = self.lock();
            if !guard.read_retry(seq) {
                return Ok(install(&mut guard, walked));
            }
            drop(guard);
            drop(walked);
            budget.retry()?;
        }
    }
}

impl<T: Send + 'static> Drop for Subscription<T> {
    fn drop(&mut self) {
        self.registry
            .notifier
            .remove(self.node.seq.id(), !in_callback());
        self.registry.stats.registry_bytes(-self.node.bytes);
    }
}

impl<T: Send + 'static> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("range", &self.node.range)
            .finish_non_exhaustive()
    }
}

/// The subscriber lock, held; derefs to the subscriber state.
pub struct SubscriberGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    seq: &'a IntervalSeq,
}

impl<T> SubscriberGuard<'_, T> {
    /// `mmu_interval_read_retry`: true if an invalidation ran since `seq` was handed out, in which
    /// case nothing derived from the walk may be installed.
    pub fn read_retry(&self, seq: ReadSeq) -> bool {
        self.seq.needs_retry(seq.0)
    }
}

impl<T> std::ops::Deref for SubscriberGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for SubscriberGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// A bounded retry budget for one fault: after its duration, [`RetryBudget::retry`] fails with
/// [`Error::RetryBudgetExhausted`] instead of spinning.
pub struct RetryBudget {
    started: Instant,
    budget: Duration,
    retries: u32,
    registry: Arc<Registry>,
}

impl RetryBudget {
    fn new(budget: Duration, registry: Arc<Registry>) -> Self {
        RetryBudget {
            started: Instant::now(),
            budget,
            retries: 0,
            registry,
        }
    }

    /// When the budget runs out.
    pub fn deadline(&self) -> Instant {
        self.started + self.budget
    }

    /// Retries so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Records a retry; fails once the deadline has passed.
    pub fn retry(&mut self) -> Result<()> {
        self.retries += 1;
        self.registry.stats.retry();
        if Instant::now() >= self.deadline() {
            self.registry.stats.budget_exhausted();
            return Err(Error::RetryBudgetExhausted {
                retries: self.retries,
                budget: self.budget,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_bytes_follow_subscriptions() {
        let reg = Arc::new(Registry::new(DEFAULT_RETRY_BUDGET));
        let empty = reg.stats.snapshot().registry_bytes;
        assert!(empty >= std::mem::size_of::<Registry>() as u64);
        let range = VaRange::new(0x10_0000, 0x1000).unwrap();
        let a = reg.subscribe(range, [0u64; 32], |_, _| {}).unwrap();
        let one = reg.stats.snapshot().registry_bytes;
        // The state is held inline in the node.
        assert!(one >= empty + 256, "{empty} -> {one}");
        let b = reg.subscribe(range, [0u64; 32], |_, _| {}).unwrap();
        assert_eq!(
            reg.stats.snapshot().registry_bytes,
            empty + 2 * (one - empty)
        );
        drop(a);
        drop(b);
        assert_eq!(reg.stats.snapshot().registry_bytes, empty);
    }
}
