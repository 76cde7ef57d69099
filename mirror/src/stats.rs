//! Counters and the event-latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::EventKind;

const BUCKETS: usize = 24;

#[derive(Default)]
pub(crate) struct StatsInner {
    by_kind: [AtomicU64; 7],
    invalidations: AtomicU64,
    invalidation_finishes: AtomicU64,
    retries: AtomicU64,
    budget_exhaustions: AtomicU64,
    callback_panics: AtomicU64,
    aging_queries: AtomicU64,
    aging_callbacks: AtomicU64,
    aging_callback_panics: AtomicU64,
    unexpected_messages: AtomicU64,
    latency_count: AtomicU64,
    latency_total_ns: AtomicU64,
    latency_max_ns: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS],
    registry_bytes: AtomicU64,
}

fn kind_index(kind: &EventKind) -> usize {
    match kind {
        EventKind::Unmap => 0,
        EventKind::Discard => 1,
        EventKind::Remap { .. } => 2,
        EventKind::Fork => 3,
        EventKind::Protect { .. } => 4,
        EventKind::Release => 5,
        EventKind::Explicit => 6,
    }
}

impl StatsInner {
    pub(crate) fn event(&self, kind: &EventKind) {
        self.by_kind[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn invalidation(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn invalidation_finish(&self) {
        self.invalidation_finishes.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn budget_exhausted(&self) {
        self.budget_exhaustions.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn callback_panic(&self) {
        self.callback_panics.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn aging_query(&self) {
        self.aging_queries.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn aging_callback(&self) {
        self.aging_callbacks.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn aging_callback_panic(&self) {
        self.aging_callback_panics.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn unexpected_message(&self) {
        self.unexpected_messages.fetch_add(1, Ordering::Relaxed);
    }
    /// The registry allocated (`bytes > 0`) or freed (`< 0`) bookkeeping memory.
    pub(crate) fn registry_bytes(&self, bytes: i64) {
        if bytes >= 0 {
            self.registry_bytes
                .fetch_add(bytes.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.registry_bytes
                .fetch_sub(bytes.unsigned_abs(), Ordering::Relaxed);
        }
    }
    pub(crate) fn latency(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_total_ns.fetch_add(ns, Ordering::Relaxed);
        self.latency_max_ns.fetch_max(ns, Ordering::Relaxed);
        let bucket = bucket_of(ns);
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let k = |i: usize| self.by_kind[i].load(Ordering::Relaxed);
        Stats {
            unmap_events: k(0),
            discard_events: k(1),
            remap_events: k(2),
            fork_events: k(3),
            protect_events: k(4),
            release_events: k(5),
            explicit_events: k(6),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            invalidation_finishes: self.invalidation_finishes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            budget_exhaustions: self.budget_exhaustions.load(Ordering::Relaxed),
            callback_panics: self.callback_panics.load(Ordering::Relaxed),
            aging_queries: self.aging_queries.load(Ordering::Relaxed),
            aging_callbacks: self.aging_callbacks.load(Ordering::Relaxed),
            aging_callback_panics: self.aging_callback_panics.load(Ordering::Relaxed),
            unexpected_messages: self.unexpected_messages.load(Ordering::Relaxed),
            registry_bytes: self.registry_bytes.load(Ordering::Relaxed),
            event_latency: LatencySummary {
                count: self.latency_count.load(Ordering::Relaxed),
                total_ns: self.latency_total_ns.load(Ordering::Relaxed),
                max_ns: self.latency_max_ns.load(Ordering::Relaxed),
                buckets: std::array::from_fn(|i| self.latency_buckets[i].load(Ordering::Relaxed)),
            },
        }
    }
}

/// Bucket `i` holds latencies in `[2^i, 2^(i+1))` microseconds; bucket 0 also holds < 1 µs.
fn bucket_of(ns: u64) -> usize {
    let us = ns / 1000;
    if us == 0 {
        0
    } else {
        (63 - us.leading_zeros() as usize).min(BUCKETS - 1)
    }
}

/// A copy of an address space's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// UNMAP events (munmap, mremap shrink/move, MAP_FIXED overlap) plus explicit munmap.
    pub unmap_events: u64,
    /// REMOVE events (MADV_DONTNEED/FREE/REMOVE) plus explicit discarding madvise.
    pub discard_events: u64,
    /// REMAP events plus explicit mremap.
    pub remap_events: u64,
    /// FORK events.
    pub fork_events: u64,
    /// Explicit protection changes (`protect`, `mprotect` wrapper).
    pub protect_events: u64,
    /// Releases (process exit through the pidfd, or shutdown).
    pub release_events: u64,
    /// Explicit `invalidate` calls.
    pub explicit_events: u64,
    /// Invalidate callbacks invoked (aging callbacks are counted in `aging_callbacks`).
    pub invalidations: u64,
    /// Second passes of two-pass subscribers ([`crate::Callbacks::two_pass`]) called.
    pub invalidation_finishes: u64,
    /// Fault-path retries after `read_retry` reported a collision.
    pub retries: u64,
    /// Faults that gave up because the retry budget ran out.
    pub budget_exhaustions: u64,
    /// Invalidate callbacks that panicked (caught and logged; aging callbacks that panicked are
    /// counted in `aging_callback_panics`).
    pub callback_panics: u64,
    /// `clear_young` and `test_young` calls that queried the subscribers (calls refused with an
    /// error are not counted).
    pub aging_queries: u64,
    /// Aging callbacks run, one per subscriber with an aging callback that overlapped a query
    /// (panicked ones included).
    pub aging_callbacks: u64,
    /// Aging callbacks that panicked (caught and logged; the subscriber's whole queried range was
    /// reported young).
    pub aging_callback_panics: u64,
    /// userfaultfd messages that should not arrive in WP_ASYNC mode (page faults, unknown events).
    pub unexpected_messages: u64,
    /// Memory the registry itself holds, in bytes: the registry and, per live subscription, its
    /// node (reference counts, sequence state, the subscriber state inline, the callback) and
    /// its interval slot. What a subscriber's state owns on the heap is the subscriber's and
    /// not counted here.
    pub registry_bytes: u64,
    /// Time from reading a userfaultfd event to all of its callbacks having returned.
    pub event_latency: LatencySummary,
}

/// A latency histogram with power-of-two microsecond buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Sum of all samples, ns.
    pub total_ns: u64,
    /// Largest sample, ns.
    pub max_ns: u64,
    /// `buckets[i]` counts samples in `[2^i, 2^(i+1))` µs (bucket 0 includes < 1 µs).
    pub buckets: [u64; BUCKETS],
}

impl LatencySummary {
    /// Mean latency, if there were samples.
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_nanos(self.total_ns / self.count))
    }

    /// Upper bound of the bucket holding the `q`-quantile (0.0..=1.0), e.g. `quantile_bound(0.99)`.
    pub fn quantile_bound(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let target = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(
                    Duration::from_micros(1u64 << (i + 1))
                        .min(Duration::from_nanos(self.max_ns.max(1))),
                );
            }
        }
        Some(Duration::from_nanos(self.max_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let s = StatsInner::default();
        s.latency(Duration::from_nanos(500));
        s.latency(Duration::from_micros(3));
        s.latency(Duration::from_micros(40));
        let snap = s.snapshot().event_latency;
        assert_eq!(snap.count, 3);
        assert_eq!(snap.buckets[0], 1);
        assert_eq!(snap.buckets[1], 1);
        assert_eq!(snap.buckets[5], 1);
        assert_eq!(snap.max_ns, 40_000);
        assert_eq!(snap.quantile_bound(1.0), Some(Duration::from_micros(40)));
        assert_eq!(snap.quantile_bound(0.5), Some(Duration::from_micros(4)));
    }
}
