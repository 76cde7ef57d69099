//! Subscriptions, invalidations and the retry budget: the user-facing side of [`crate::seq`].

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// One aging request as a subscriber sees it (clipped to its subscription).
///
/// `range` is the part of the range passed to [`crate::AddressSpace::clear_young`] or
/// [`crate::AddressSpace::test_young`] that overlaps the subscription; `clear` is true for
/// `clear_young`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgeQuery {
    /// The queried range, clipped to the subscription.
    pub range: VaRange,
    /// Whether the subscriber must also clear its record of use (and arrange to see later use).
    pub clear: bool,
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
type YoungCallback<T> = Box<dyn Fn(&mut T, &AgeQuery, &mut Vec<VaRange>) + Send + Sync>;

/// What a subscriber is called with (see [`crate::AddressSpace::subscribe_with`]): the
/// invalidate callback, and optionally a second pass and an aging callback.
pub struct Callbacks<T> {
    invalidate: Callback<T>,
    finish: Option<Callback<T>>,
    young: Option<YoungCallback<T>>,
    bytes: usize,
}

impl<T> Callbacks<T> {
    /// One callback per invalidation, as [`crate::AddressSpace::subscribe`] takes.
    pub fn new<F>(invalidate: F) -> Self
    where
        F: Fn(&mut T, &Invalidation) + Send + Sync + 'static,
    {
        Callbacks {
            bytes: std::mem::size_of_val(&invalidate),
            invalidate: Box::new(invalidate),
            finish: None,
            young: None,
        }
    }

    /// Make the invalidation two-pass: the invalidate callback only *starts* the teardown
    /// (clears the device's entries and posts its TLB invalidation without waiting), and
    /// `finish` completes it (waits for the fence, then unpins). Every subscriber an event hits
    /// gets its first pass before any gets its second, so N address spaces (or N devices) wait
    /// for their fences once, together, instead of one after another (the two-pass interval
    /// notifiers of the kernel allow GPU drivers the same). The event still returns only after
    /// every `finish` returned, and no fault installs in the range in between.
    pub fn two_pass<G>(mut self, finish: G) -> Self
    where
        G: Fn(&mut T, &Invalidation) + Send + Sync + 'static,
    {
        self.bytes += std::mem::size_of_val(&finish);
        self.finish = Some(Box::new(finish));
        self
    }

    /// An aging callback too, as [`crate::AddressSpace::subscribe_aging`] takes.
    pub fn aging<Y>(mut self, young: Y) -> Self
    where
        Y: Fn(&mut T, &AgeQuery, &mut Vec<VaRange>) + Send + Sync + 'static,
    {
        self.bytes += std::mem::size_of_val(&young);
        self.young = Some(Box::new(young));
        self
    }
}

impl<T> std::fmt::Debug for Callbacks<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("two_pass", &self.finish.is_some())
            .field("aging", &self.young.is_some())
            .finish()
    }
}

thread_local! {
    /// How many subscriber callbacks (invalidate or aging) this thread is inside.
    static CALLBACK_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The ids of the subscriptions whose lock this thread holds, through a
    /// [`SubscriberGuard`] or a running callback.
    static HELD_LOCKS: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(|d| d.get() > 0)
}

/// Counts this thread as inside a subscriber callback while it lives (also across a caught
/// panic, since the callback runs inside `catch_unwind` within its lifetime).
struct CallbackDepth;

impl CallbackDepth {
    fn enter() -> Self {
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        CallbackDepth
    }
}

impl Drop for CallbackDepth {
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Records that this thread holds subscription `id`'s lock while it lives. A subscriber guard is
/// not `Send`, so the thread that records it is the one that releases it.
struct HeldLock {
    id: u64,
}

impl HeldLock {
    fn new(id: u64) -> Self {
        // `try_with`: a guard taken or dropped during thread-local teardown is simply not
        // recorded (the checks relying on it then do not fire for that thread).
        let _ = HELD_LOCKS.try_with(|held| held.borrow_mut().push(id));
        HeldLock { id }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = HELD_LOCKS.try_with(|held| {
            let mut held = held.borrow_mut();
            if let Some(pos) = held.iter().rposition(|&id| id == self.id) {
                held.swap_remove(pos);
            }
        });
    }
}

/// Whether this thread holds any subscriber lock.
fn holds_any_subscriber_lock() -> bool {
    HELD_LOCKS
        .try_with(|held| !held.borrow().is_empty())
        .unwrap_or(false)
}

/// Whether this thread holds subscription `id`'s lock.
fn holds_subscriber_lock(id: u64) -> bool {
    HELD_LOCKS
        .try_with(|held| held.borrow().contains(&id))
        .unwrap_or(false)
}

/// Sorts `ranges` and merges those that overlap or touch.
fn merge_ranges(ranges: &mut Vec<VaRange>) {
    ranges.sort_unstable_by_key(|r| r.start());
    let mut merged: Vec<VaRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(last) if r.start() <= last.end() => {
                if r.end() > last.end() {
                    // Both are valid page-aligned ranges below the limit, so their hull is too.
                    *last = VaRange::from_bounds(last.start(), r.end()).unwrap_or(*last);
                }
            }
            _ => merged.push(r),
        }
    }
    *ranges = merged;
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
        self.subscribe_with(range, state, Callbacks::new(callback))
    }

    pub(crate) fn subscribe_with<T: Send + 'static>(
        self: &Arc<Self>,
        range: VaRange,
        state: T,
        callbacks: Callbacks<T>,
    ) -> Result<Subscription<T>> {
        self.insert_node(range, state, callbacks)
    }

    /// `subscribe` with an aging callback too.
    pub(crate) fn subscribe_aging<T, F, Y>(
        self: &Arc<Self>,
        range: VaRange,
        state: T,
        callback: F,
        young: Y,
    ) -> Result<Subscription<T>>
    where
        T: Send + 'static,
        F: Fn(&mut T, &Invalidation) + Send + Sync + 'static,
        Y: Fn(&mut T, &AgeQuery, &mut Vec<VaRange>) + Send + Sync + 'static,
    {
        self.insert_node(range, state, Callbacks::new(callback).aging(young))
    }

    fn insert_node<T: Send + 'static>(
        self: &Arc<Self>,
        range: VaRange,
        state: T,
        callbacks: Callbacks<T>,
    ) -> Result<Subscription<T>> {
        let Callbacks {
            invalidate: callback,
            finish,
            young,
            bytes: callback_bytes,
        } = callbacks;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The node's Arc allocation, the boxed callbacks and the notifier's slot for it.
        let bytes = (2 * std::mem::size_of::<usize>()
            + std::mem::size_of::<SubNode<T>>()
            + callback_bytes
            + std::mem::size_of::<Arc<dyn Interval<Invalidation>>>()) as i64;
        let node = Arc::new(SubNode {
            seq: IntervalSeq::new(id, range.start(), range.end()),
            range,
            state: Mutex::new(state),
            callback,
            finish,
            young,
            removed: AtomicBool::new(false),
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

    /// `clear_young` (`clear`) or `test_young`: asks every overlapping subscriber that has an
    /// aging callback, one at a time under its own lock, and returns the union of the answers,
    /// sorted, merged and clipped to `range`.
    pub(crate) fn age(&self, range: VaRange, clear: bool) -> Result<Vec<VaRange>> {
        let what = if clear { "clear_young" } else { "test_young" };
        // A callback holds its subscriber's lock, and the query takes every overlapping one.
        if in_callback() {
            return Err(Error::CalledFromCallback { what });
        }
        if holds_any_subscriber_lock() {
            return Err(Error::SubscriberLockHeld { what });
        }
        if self.notifier.is_released() {
            return Err(Error::Released);
        }
        self.stats.aging_query();
        // The notifier's lock is held only while the Arcs are cloned: a concurrent invalidation
        // then waits at most for the one subscriber lock a callback holds.
        let nodes = self.notifier.overlapping(range.start(), range.end());
        let mut young = Vec::new();
        for node in &nodes {
            node.age(range, clear, &mut young);
        }
        merge_ranges(&mut young);
        Ok(young)
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
    /// The second pass of a two-pass subscriber ([`Callbacks::two_pass`]).
    finish: Option<Callback<T>>,
    young: Option<YoungCallback<T>>,
    /// Set under the state lock once the subscription was dropped: an aging query that cloned
    /// the node before the removal finds it under the same lock and skips the callback.
    removed: AtomicBool,
    registry: std::sync::Weak<Registry>,
    /// What this node adds to [`crate::Stats::registry_bytes`].
    bytes: i64,
}

impl<T: Send> SubNode<T> {
    /// Run `callback` (a first pass, which publishes `cur_seq`, or a second one) on the event
    /// clipped to this subscription, under its lock, catching a panic.
    fn call(&self, cur_seq: Option<u64>, callback: &Callback<T>, event: &Invalidation) {
        let Some(range) = event.range.intersect(&self.range) else {
            return;
        };
        let clipped = Invalidation {
            range,
            kind: event.kind,
            source: event.source,
        };
        let mut state = lock(&self.state);
        let held = HeldLock::new(self.seq.id());
        if let Some(cur_seq) = cur_seq {
            self.seq.set_seq(cur_seq);
        }
        let depth = CallbackDepth::enter();
        let outcome = catch_unwind(AssertUnwindSafe(|| callback(&mut state, &clipped)));
        drop(depth);
        drop(held);
        drop(state);
        if let Some(reg) = self.registry.upgrade() {
            if cur_seq.is_some() {
                reg.stats.invalidation();
            } else {
                reg.stats.invalidation_finish();
            }
            if outcome.is_err() {
                reg.stats.callback_panic();
            }
        }
        if outcome.is_err() {
            tracing::error!(range = ?clipped.range, kind = ?clipped.kind, second_pass = cur_seq.is_none(),
                "invalidation callback panicked; the subscriber may hold stale entries");
        }
    }
}

impl<T: Send> Interval<Invalidation> for SubNode<T> {
    fn seq_state(&self) -> &IntervalSeq {
        &self.seq
    }

    fn invalidate(&self, cur_seq: u64, event: &Invalidation) {
        self.call(Some(cur_seq), &self.callback, event);
    }

    fn finish(&self, event: &Invalidation) {
        if let Some(finish) = &self.finish {
            self.call(None, finish, event);
        }
    }

    fn age(&self, range: VaRange, clear: bool, out: &mut Vec<VaRange>) -> bool {
        let Some(young) = &self.young else {
            return false;
        };
        let Some(clipped) = range.intersect(&self.range) else {
            return false;
        };
        let query = AgeQuery {
            range: clipped,
            clear,
        };
        let mut state = lock(&self.state);
        if self.removed.load(Ordering::SeqCst) {
            return false;
        }
        let held = HeldLock::new(self.seq.id());
        // A fresh vector per subscriber: one cannot see, drop or reorder another's answers.
        let mut answer = Vec::new();
        let depth = CallbackDepth::enter();
        let outcome = catch_unwind(AssertUnwindSafe(|| young(&mut state, &query, &mut answer)));
        drop(depth);
        drop(held);
        drop(state);
        let registry = self.registry.upgrade();
        if let Some(reg) = &registry {
            reg.stats.aging_callback();
        }
        match outcome {
            Ok(()) => out.extend(answer.iter().filter_map(|r| r.intersect(&clipped))),
            Err(_) => {
                if let Some(reg) = &registry {
                    reg.stats.aging_callback_panic();
                }
                tracing::error!(range = ?clipped, clear,
                    "aging callback panicked; its whole range is reported young");
                out.push(clipped);
            }
        }
        true
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
/// (unless done from inside a callback, where it is deferred instead), and for a running aging
/// callback of it (unless done from that callback). No aging callback of it starts after the
/// drop returned.
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
    ///
    /// While a thread holds it, [`crate::AddressSpace::clear_young`] and `test_young` on that
    /// thread return [`Error::SubscriberLockHeld`] (they take every overlapping subscriber's
    /// lock, this one possibly included).
    pub fn lock(&self) -> SubscriberGuard<'_, T> {
        let guard = lock(&self.node.state);
        SubscriberGuard {
            guard,
            _held: HeldLock::new(self.node.seq.id()),
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
        let id = self.node.seq.id();
        self.registry.notifier.remove(id, !in_callback());
        if self.node.young.is_some() {
            // An aging query may have cloned the node before the removal: marking it under the
            // state lock waits for an aging callback running now, and keeps any later one from
            // starting. From inside this subscription's own callback the lock is ours already.
            if holds_subscriber_lock(id) {
                self.node.removed.store(true, Ordering::SeqCst);
            } else {
                let _state = lock(&self.node.state);
                self.node.removed.store(true, Ordering::SeqCst);
            }
        }
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
    /// Dropped after `guard`: the record outlives the lock, never the other way round.
    _held: HeldLock,
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
