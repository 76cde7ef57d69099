//! The sequence protocol of the kernel's `mmu_interval_notifier`, carried over to userspace.
//!
//! One [`Notifier`] per address space holds a global sequence number (even = idle, odd = an
//! invalidation that hit at least one interval is running), the count of running invalidations,
//! the registered intervals and the inserts/removes deferred while an invalidation runs. Each
//! interval has its own sequence number, written only by its invalidate path *under the
//! subscriber's own lock* (`set_seq`), and compared by `read_retry` under that same lock.
//!
//! The rules, as in `mm/mmu_notifier.c`:
//! * `read_begin` returns the interval's seq; if that equals the running global seq (this interval
//!   was hit by the invalidation in progress) it first waits until the global seq moves on.
//! * `invalidate_start` bumps the running count, makes the global seq odd when any interval
//!   overlaps, and calls each overlapping interval's invalidate with that odd seq.
//! * `invalidate_end` drops the running count; the last one makes the global seq even again and
//!   applies deferred inserts/removes, then wakes waiters.
//! * inserting while an invalidation runs is deferred (global odd) or forces the global odd
//!   (global even), so a fault on the new interval cannot install before the invalidation ends.
//! * removing while an invalidation runs is deferred, and waits for it to end so that no callback
//!   runs after `remove` returns.
//!
//! Under `--cfg loom` the primitives come from loom and the tests at the bottom model-check it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{lock, AtomicU64, Condvar, Mutex, Ordering};
use crate::VaRange;
use sys_util::sync::ignore_poison;

/// The per-interval part of the protocol.
pub(crate) struct IntervalSeq {
    id: u64,
    start: u64,
    end: u64,
    seq: AtomicU64,
}

impl IntervalSeq {
    pub(crate) fn new(id: u64, start: u64, end: u64) -> Self {
        IntervalSeq {
            id,
            start,
            end,
            seq: AtomicU64::new(0),
        }
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }

    /// `mmu_interval_set_seq`: must be called under the subscriber lock, from the invalidate path.
    pub(crate) fn set_seq(&self, cur_seq: u64) {
        self.seq.store(cur_seq, Ordering::SeqCst);
    }

    /// `mmu_interval_read_retry` when called under the subscriber lock, `check_retry` otherwise.
    pub(crate) fn needs_retry(&self, seq: u64) -> bool {
        self.seq.load(Ordering::SeqCst) != seq
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// A subscriber as the core sees it.
pub(crate) trait Interval<E>: Send + Sync {
    /// The protocol state.
    fn seq_state(&self) -> &IntervalSeq;
    /// Takes the subscriber lock, calls `set_seq(cur_seq)`, tears down, unlocks. Must not return
    /// before the subscriber has stopped using the range.
    fn invalidate(&self, cur_seq: u64, event: &E);
    /// The second pass of a two-pass interval, called after every overlapping interval's
    /// `invalidate` and before the invalidation ends (waits for what `invalidate` started).
    /// One-pass intervals keep this default.
    fn finish(&self, event: &E) {
        let _ = event;
    }
    /// Answers an aging query over `range` (which overlaps the interval): pushes the parts of it
    /// the subscriber saw used into `out`, clearing its record of use with `clear`. Returns
    /// whether a callback ran; intervals without aging keep this default, which asks nothing.
    fn age(&self, range: VaRange, clear: bool, out: &mut Vec<VaRange>) -> bool {
        let _ = (range, clear, out);
        false
    }
}

enum Deferred<E> {
    Insert(Arc<dyn Interval<E>>),
    Remove(u64),
}

struct State<E> {
    invalidate_seq: u64,
    active: usize,
    intervals: Vec<Arc<dyn Interval<E>>>,
    deferred: Vec<Deferred<E>>,
    released: bool,
}

/// Why `read_begin` could not hand out a sequence number.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BeginError {
    /// The deadline passed while an invalidation of this interval was still running.
    Timeout,
    /// The address space was released.
    Released,
}

/// The per-address-space registry core.
pub(crate) struct Notifier<E> {
    state: Mutex<State<E>>,
    wq: Condvar,
}

/// Proof that an invalidation is running; pass it to [`Notifier::invalidate_end`].
#[must_use = "an invalidation must be ended or the address space stays excluded"]
pub(crate) struct Ticket {
    pub(crate) hits: usize,
}

impl<E> Notifier<E> {
    pub(crate) fn new() -> Self {
        Notifier {
            state: Mutex::new(State {
                invalidate_seq: 2,
                active: 0,
                intervals: Vec::new(),
                deferred: Vec::new(),
                released: false,
            }),
            wq: Condvar::new(),
        }
    }

    /// `mmu_interval_notifier_insert`. Fails only after release.
    pub(crate) fn insert(&self, node: Arc<dyn Interval<E>>) -> Result<(), BeginError> {
        let mut st = lock(&self.state);
        if st.released {
            return Err(BeginError::Released);
        }
        let seqs = node.seq_state();
        if st.active == 0 {
            // Idle: odd and different from the global, so read_begin does not wait.
            seqs.set_seq(st.invalidate_seq - 1);
            st.intervals.push(node);
        } else if st.invalidate_seq & 1 == 1 {
            // Fully excluded: apply at the last invalidate_end; read_begin waits for it.
            seqs.set_seq(st.invalidate_seq);
            st.deferred.push(Deferred::Insert(node));
        } else {
            // Invalidations run that hit nothing yet; we cannot know whether they cover the new
            // range, so assume they do.
            st.invalidate_seq |= 1;
            seqs.set_seq(st.invalidate_seq);
            st.intervals.push(node);
        }
        Ok(())
    }

    /// `mmu_interval_notifier_remove`. With `wait`, returns only once no callback for the interval
    /// runs or will run; without it (for removal from inside a callback) the removal is queued.
    pub(crate) fn remove(&self, id: u64, wait: bool) {
        let mut st = lock(&self.state);
        if st.active > 0 && st.invalidate_seq & 1 == 1 {
            let pending_insert = st
                .deferred
                .iter()
                .position(|d| matches!(d, Deferred::Insert(n) if n.seq_state().id() == id));
            match pending_insert {
                Some(pos) => {
                    st.deferred.swap_remove(pos);
                }
                None => st.deferred.push(Deferred::Remove(id)),
            }
            if wait {
                let seq = st.invalidate_seq;
                while st.invalidate_seq == seq {
                    st = ignore_poison(self.wq.wait(st));
                }
            }
        } else {
            st.intervals.retain(|n| n.seq_state().id() != id);
        }
    }

    /// `mmu_interval_read_begin`, bounded by `deadline`.
    pub(crate) fn read_begin(
        &self,
        node: &IntervalSeq,
        deadline: Option<Instant>,
    ) -> Result<u64, BeginError> {
        let mut st = lock(&self.state);
        let seq = node.seq.load(Ordering::SeqCst);
        while st.invalidate_seq == seq {
            let timeout = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Err(BeginError::Timeout),
                },
            };
            st = ignore_poison(self.wq.wait_timeout(st, timeout)).0;
        }
        if st.released {
            return Err(BeginError::Released);
        }
        Ok(seq)
    }

    /// `invalidate_range_start` for the intervals: calls every overlapping interval's invalidate
    /// (outside the core lock, so callbacks may insert or remove other intervals).
    pub(crate) fn invalidate_start(&self, start: u64, end: u64, event: &E) -> Ticket {
        let (hits, cur_seq) = {
            let mut st = lock(&self.state);
            st.active += 1;
            let hits: Vec<Arc<dyn Interval<E>>> = st
                .intervals
                .iter()
                .filter(|n| n.seq_state().overlaps(start, end))
                .cloned()
                .collect();
            if !hits.is_empty() {
                st.invalidate_seq |= 1;
            }
            (hits, st.invalidate_seq)
        };
        for node in &hits {
            node.invalidate(cur_seq, event);
        }
        // The second pass of two-pass subscribers, after every first pass: they wait for the
        // fences all the first passes started.
        for node in &hits {
            node.finish(event);
        }
        Ticket { hits: hits.len() }
    }

    /// The intervals overlapping `[start, end)`, registered or with their insert deferred behind a
    /// running invalidation, cloned under the core lock so that the caller calls into them
    /// without it: an invalidation waits only for the subscriber lock a caller holds, never for
    /// the core lock. One whose removal is deferred is still listed (its owner must refuse calls
    /// after its removal returned).
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Vec<Arc<dyn Interval<E>>> {
        let st = lock(&self.state);
        let deferred = st.deferred.iter().filter_map(|d| match d {
            Deferred::Insert(n) => Some(n),
            Deferred::Remove(_) => None,
        });
        st.intervals
            .iter()
            .chain(deferred)
            .filter(|n| n.seq_state().overlaps(start, end))
            .cloned()
            .collect()
    }

    /// `invalidate_range_end`.
    pub(crate) fn invalidate_end(&self, ticket: Ticket) {
        let _ = ticket;
        let mut st = lock(&self.state);
        st.active -= 1;
        if st.active == 0 && st.invalidate_seq & 1 == 1 {
            st.invalidate_seq += 1;
            for d in std::mem::take(&mut st.deferred) {
                match d {
                    Deferred::Insert(n) => st.intervals.push(n),
                    Deferred::Remove(id) => st.intervals.retain(|n| n.seq_state().id() != id),
                }
            }
        }
        drop(st);
        self.wq.notify_all();
    }

    /// Marks the address space released: later inserts and read_begins fail. The caller delivers
    /// the release invalidation itself (start/end over everything) before or after.
    pub(crate) fn mark_released(&self) -> bool {
        let mut st = lock(&self.state);
        let was = st.released;
        st.released = true;
        drop(st);
        self.wq.notify_all();
        !was
    }

    pub(crate) fn is_released(&self) -> bool {
        lock(&self.state).released
    }

    /// Number of intervals registered (deferred inserts excluded).
    pub(crate) fn interval_count(&self) -> usize {
        lock(&self.state).intervals.len()
    }

    /// Whether an invalidation is running.
    #[cfg(test)]
    pub(crate) fn is_invalidating(&self) -> bool {
        let st = lock(&self.state);
        st.active > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node {
        seq: IntervalSeq,
        dev: std::sync::Mutex<Option<u32>>,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Interval<()> for Node {
        fn seq_state(&self) -> &IntervalSeq {
            &self.seq
        }
        fn invalidate(&self, cur_seq: u64, _: &()) {
            let mut g = self.dev.lock().unwrap();
            self.seq.set_seq(cur_seq);
            *g = None;
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn node(id: u64, start: u64, end: u64) -> Arc<Node> {
        Arc::new(Node {
            seq: IntervalSeq::new(id, start, end),
            dev: std::sync::Mutex::new(None),
            calls: Default::default(),
        })
    }

    #[test]
    fn idle_read_begin_does_not_wait_and_collision_is_detected() {
        let n = Notifier::<()>::new();
        let a = node(1, 0, 0x2000);
        n.insert(a.clone()).unwrap();
        let seq = n.read_begin(&a.seq, None).unwrap();
        assert_eq!(seq % 2, 1, "interval seqs are odd");
        let t = n.invalidate_start(0x1000, 0x2000, &());
        assert_eq!(t.hits, 1);
        assert!(
            a.seq.needs_retry(seq),
            "the invalidation must force a retry"
        );
        n.invalidate_end(t);
        assert!(!n.is_invalidating());
        let seq2 = n.read_begin(&a.seq, None).unwrap();
        assert!(!a.seq.needs_retry(seq2));
    }

    #[test]
    fn non_overlapping_invalidation_calls_nothing_and_keeps_seq() {
        let n = Notifier::<()>::new();
        let a = node(1, 0, 0x2000);
        n.insert(a.clone()).unwrap();
        let seq = n.read_begin(&a.seq, None).unwrap();
        let t = n.invalidate_start(0x2000, 0x3000, &());
        assert_eq!(t.hits, 0);
        n.invalidate_end(t);
        assert!(!a.seq.needs_retry(seq));
        assert_eq!(a.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn read_begin_times_out_while_its_interval_is_invalidated() {
        let n = Notifier::<()>::new();
        let a = node(1, 0, 0x2000);
        n.insert(a.clone()).unwrap();
        let t = n.invalidate_start(0, 0x1000, &());
        let err = n.read_begin(&a.seq, Some(Instant::now() + Duration::from_millis(20)));
        assert_eq!(err, Err(BeginError::Timeout));
        n.invalidate_end(t);
        assert!(n.read_begin(&a.seq, Some(Instant::now())).is_ok());
    }

    #[test]
    fn insert_during_invalidation_is_deferred_until_the_end() {
        let n = Notifier::<()>::new();
        let a = node(1, 0, 0x2000);
        n.insert(a.clone()).unwrap();
        let t = n.invalidate_start(0, 0x1000, &());
        let b = node(2, 0x5000, 0x6000);
        n.insert(b.clone()).unwrap();
        assert_eq!(
            n.interval_count(),
            1,
            "insert deferred while the global seq is odd"
        );
        assert_eq!(
            n.read_begin(&b.seq, Some(Instant::now())),
            Err(BeginError::Timeout),
            "a deferred interval must not hand out a seq before the invalidation ends"
        );
        n.invalidate_end(t);
        assert_eq!(n.interval_count(), 2);
        assert!(n.read_begin(&b.seq, Some(Instant::now())).is_ok());
    }

    #[test]
    fn insert_during_a_miss_only_invalidation_forces_exclusion() {
        let n = Notifier::<()>::new();
        let t = n.invalidate_start(0, 0x1000, &()); // hits nothing: global stays even
        let b = node(2, 0, 0x1000);
        n.insert(b.clone()).unwrap();
        assert_eq!(n.interval_count(), 1, "inserted immediately");
        assert_eq!(
            n.read_begin(&b.seq, Some(Instant::now())),
            Err(BeginError::Timeout),
            "the running invalidation may cover the new interval"
        );
        n.invalidate_end(t);
        assert!(n.read_begin(&b.seq, Some(Instant::now())).is_ok());
    }

    #[test]
    fn remove_during_invalidation_waits_and_is_applied() {
        let n = Arc::new(Notifier::<()>::new());
        let a = node(1, 0, 0x2000);
        n.insert(a.clone()).unwrap();
        let t = n.invalidate_start(0, 0x1000, &());
        let n2 = n.clone();
        let remover = std::thread::spawn(move || n2.remove(1, true));
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !remover.is_finished(),
            "remove must wait for the running invalidation"
        );
        n.invalidate_end(t);
        remover.join().unwrap();
        assert_eq!(n.interval_count(), 0);
    }

    #[test]
    fn overlapping_lists_registered_and_deferred_intervals_that_overlap() {
        let n = Notifier::<()>::new();
        n.insert(node(1, 0, 0x2000)).unwrap();
        n.insert(node(2, 0x4000, 0x5000)).unwrap();
        let t = n.invalidate_start(0, 0x1000, &());
        n.insert(node(3, 0x1000, 0x3000)).unwrap(); // deferred behind the invalidation
        let ids = |start, end| -> Vec<u64> {
            let mut ids: Vec<u64> = n
                .overlapping(start, end)
                .iter()
                .map(|i| i.seq_state().id())
                .collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(ids(0x1000, 0x2000), [1, 3]);
        assert_eq!(ids(0x2000, 0x4000), [3]);
        assert_eq!(ids(0x3000, 0x4000), Vec::<u64>::new());
        assert_eq!(ids(0, 0x10_0000), [1, 2, 3]);
        n.invalidate_end(t);
        assert_eq!(ids(0, 0x10_0000), [1, 2, 3]);
    }

    #[test]
    fn release_fails_later_inserts_and_read_begins() {
        let n = Notifier::<()>::new();
        let a = node(1, 0, 0x2000);
        n.insert(a.clone()).unwrap();
        assert!(n.mark_released());
        assert_eq!(n.read_begin(&a.seq, None), Err(BeginError::Released));
        assert!(n.insert(node(2, 0, 0x1000)).is_err());
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model checks of the protocol. Run with
    //! `RUSTFLAGS="--cfg loom" cargo test -p mirror --release --lib loom`.
    use super::*;
    use loom::sync::atomic::AtomicUsize;

    /// A subscriber whose "device page table" holds one translation: the CPU value it copied.
    struct Dev {
        seq: IntervalSeq,
        pte: loom::sync::Mutex<Option<usize>>,
        removed: loom::sync::atomic::AtomicBool,
    }

    impl Interval<()> for Dev {
        fn seq_state(&self) -> &IntervalSeq {
            &self.seq
        }
        fn invalidate(&self, cur_seq: u64, _: &()) {
            assert!(
                !self.removed.load(Ordering::SeqCst),
                "callback ran after remove() returned"
            );
            let mut pte = self.pte.lock().unwrap();
            self.seq.set_seq(cur_seq);
            *pte = None;
        }
    }

    fn dev(id: u64) -> Arc<Dev> {
        Arc::new(Dev {
            seq: IntervalSeq::new(id, 0, 0x1000),
            pte: loom::sync::Mutex::new(None),
            removed: loom::sync::atomic::AtomicBool::new(false),
        })
    }

    /// One device fault: read_begin, walk the CPU without the lock, lock, retry-check, install.
    fn fault_once(n: &Notifier<()>, d: &Dev, cpu: &AtomicUsize) {
        let Ok(seq) = n.read_begin(&d.seq, None) else {
            return;
        };
        let observed = cpu.load(Ordering::SeqCst);
        let mut pte = d.pte.lock().unwrap();
        if !d.seq.needs_retry(seq) {
            *pte = Some(observed);
        }
    }

    fn assert_not_stale(d: &Dev, cpu: &AtomicUsize) {
        let pte = *d.pte.lock().unwrap();
        let now = cpu.load(Ordering::SeqCst);
        assert!(
            pte.is_none() || pte == Some(now),
            "stale device entry {pte:?} while the CPU maps {now}"
        );
    }

    /// One walker racing one invalidation that changes the CPU value from 1 to 2, either in the
    /// kernel's order (tear down, change, end) or userfaultfd's (change, then the event).
    fn race_walker_and_invalidation(change_before_event: bool) {
        loom::model(move || {
            let n = Arc::new(Notifier::<()>::new());
            let d = dev(1);
            n.insert(d.clone()).unwrap();
            let cpu = Arc::new(AtomicUsize::new(1));
            let (n2, d2, cpu2) = (n.clone(), d.clone(), cpu.clone());
            let walker = loom::thread::spawn(move || fault_once(&n2, &d2, &cpu2));
            if change_before_event {
                cpu.store(2, Ordering::SeqCst);
            }
            let t = n.invalidate_start(0, 0x1000, &());
            if !change_before_event {
                cpu.store(2, Ordering::SeqCst);
            }
            n.invalidate_end(t);
            walker.join().unwrap();
            assert_not_stale(&d, &cpu);
        });
    }

    #[test]
    fn loom_walker_racing_invalidation_never_installs_stale_entry() {
        race_walker_and_invalidation(false);
    }

    #[test]
    fn loom_event_after_change_still_leaves_no_stale_entry() {
        race_walker_and_invalidation(true);
    }

    #[test]
    fn loom_deferred_insert_cannot_install_pre_invalidation_value() {
        loom::model(|| {
            let n = Arc::new(Notifier::<()>::new());
            let other = dev(1);
            n.insert(other.clone()).unwrap();
            let cpu = Arc::new(AtomicUsize::new(1));
            let fresh = dev(2);
            let (n2, fresh2, cpu2) = (n.clone(), fresh.clone(), cpu.clone());
            let inserter = loom::thread::spawn(move || {
                n2.insert(fresh2.clone()).unwrap();
                fault_once(&n2, &fresh2, &cpu2);
            });
            let t = n.invalidate_start(0, 0x1000, &());
            cpu.store(2, Ordering::SeqCst);
            n.invalidate_end(t);
            inserter.join().unwrap();
            assert_not_stale(&fresh, &cpu);
            assert_eq!(n.interval_count(), 2, "deferred insert applied");
        });
    }

    #[test]
    fn loom_deferred_remove_waits_for_running_invalidation() {
        loom::model(|| {
            let n = Arc::new(Notifier::<()>::new());
            let d = dev(1);
            n.insert(d.clone()).unwrap();
            let (n2, d2) = (n.clone(), d.clone());
            let remover = loom::thread::spawn(move || {
                n2.remove(1, true);
                d2.removed.store(true, Ordering::SeqCst);
            });
            let t = n.invalidate_start(0, 0x1000, &());
            n.invalidate_end(t);
            remover.join().unwrap();
            assert_eq!(n.interval_count(), 0);
            // A later invalidation must not reach the removed interval (the callback asserts).
            let t = n.invalidate_start(0, 0x1000, &());
            assert_eq!(t.hits, 0);
            n.invalidate_end(t);
        });
    }
}
