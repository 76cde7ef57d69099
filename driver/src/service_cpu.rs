//! Where the fault service's own CPU time goes: thread CPU clocks read around the phases of a
//! batch (walking the CPU mappings, DMA mapping, writing the device page table, the replay)
//! and around the whole batch, so "the rest" (draining, sorting, locking, event registration,
//! bookkeeping) is the difference.
//!
//! Off by default ([`crate::fault::FaultService::set_cpu_accounting`]): each phase costs two
//! reads of `CLOCK_THREAD_CPUTIME_ID`, a system call (about 510 ns a read on the 2-vCPU VM
//! this was written on: a C loop of a million `clock_gettime` calls), which a batch of one
//! page would notice. The cost of one read is calibrated once per process (the least of 64
//! back-to-back pairs) and subtracted: once from every phase, and once per read inside the
//! interval from the batch total. The figures are CPU time of the service thread alone, so a
//! device sharing the CPU does not inflate them: they are what carries over to a real device.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A phase of fault service that is timed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Looking the CPU mappings up: the VMA query, populating the pages, the page-state
    /// snapshot.
    Walk = 0,
    /// Mapping the pages for DMA (pinning them, the IOMMU).
    DmaMap = 1,
    /// Writing the device's page-table entries.
    PageTable = 2,
    /// Telling the device to retry its stalled work items.
    Replay = 3,
}

const PHASES: usize = 4;

thread_local! {
    /// Nanoseconds per phase of the batch this thread is servicing, while accounting is on.
    static CURRENT: Cell<Option<[u64; PHASES]>> = const { Cell::new(None) };
    /// Clock reads the phases of the current batch made.
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Thread CPU time now, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64),
        // Never fails for the calling thread's own clock; a 0 makes the phase read as free
        // rather than failing the fault.
        Err(_) => 0,
    }
}

/// What one read of the thread CPU clock adds to an interval it ends, in nanoseconds:
/// calibrated once, the least of 64 back-to-back pairs (preemption only makes a pair longer).
pub fn clock_read_ns() -> u64 {
    static COST: OnceLock<u64> = OnceLock::new();
    *COST.get_or_init(|| {
        (0..64)
            .map(|_| {
                let a = thread_cpu_ns();
                thread_cpu_ns().saturating_sub(a)
            })
            .min()
            .unwrap_or(0)
    })
}

/// Run `f`, adding its thread CPU time to `phase` if this thread is accounting a batch. Phases
/// must not nest (each would count the inner one too).
pub(crate) fn timed<R>(phase: Phase, f: impl FnOnce() -> R) -> R {
    if CURRENT.with(|c| c.get().is_none()) {
        return f();
    }
    let t0 = thread_cpu_ns();
    let r = f();
    let spent = thread_cpu_ns()
        .saturating_sub(t0)
        .saturating_sub(clock_read_ns());
    CURRENT.with(|c| {
        if let Some(mut acc) = c.get() {
            acc[phase as usize] += spent;
            c.set(Some(acc));
        }
        READS.with(|n| n.set(n.get() + 2));
    });
    r
}

/// The accounting of one batch on the service thread: started before the drain, ended after
/// the replay.
pub(crate) struct BatchTimer {
    start: u64,
}

impl BatchTimer {
    /// Start accounting a batch on this thread.
    pub(crate) fn start() -> BatchTimer {
        clock_read_ns();
        CURRENT.with(|c| c.set(Some([0; PHASES])));
        READS.with(|n| n.set(0));
        BatchTimer {
            start: thread_cpu_ns(),
        }
    }

    /// Stop, and add the batch's figures to `into`.
    pub(crate) fn finish(self, into: &ServiceCpuCounters) {
        // The phases' reads and the closing read itself are the clock's, not the service's.
        let reads = READS.with(|n| n.take()) + 1;
        let total = thread_cpu_ns()
            .saturating_sub(self.start)
            .saturating_sub(reads * clock_read_ns());
        let phases = CURRENT.with(|c| c.take()).unwrap_or([0; PHASES]);
        into.batches.fetch_add(1, Ordering::Relaxed);
        into.total_ns.fetch_add(total, Ordering::Relaxed);
        for (counter, ns) in [
            &into.walk_ns,
            &into.dma_map_ns,
            &into.page_table_ns,
            &into.replay_ns,
        ]
        .into_iter()
        .zip(phases)
        {
            counter.fetch_add(ns, Ordering::Relaxed);
        }
    }
}

/// Counters of the service's own CPU time (all 0 while accounting is off).
#[derive(Debug, Default)]
pub struct ServiceCpuCounters {
    batches: AtomicU64,
    total_ns: AtomicU64,
    walk_ns: AtomicU64,
    dma_map_ns: AtomicU64,
    page_table_ns: AtomicU64,
    replay_ns: AtomicU64,
}

impl ServiceCpuCounters {
    /// The figures so far.
    pub fn snapshot(&self) -> ServiceCpu {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServiceCpu {
            batches: get(&self.batches),
            total_ns: get(&self.total_ns),
            walk_ns: get(&self.walk_ns),
            dma_map_ns: get(&self.dma_map_ns),
            page_table_ns: get(&self.page_table_ns),
            replay_ns: get(&self.replay_ns),
        }
    }
}

/// The fault service's own CPU time, split by phase
/// ([`crate::fault::FaultService::cpu_cost`]). Subtract two snapshots for an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCpu {
    /// Batches accounted.
    pub batches: u64,
    /// Thread CPU time of those batches, drain to replay, in nanoseconds.
    pub total_ns: u64,
    /// Of which looking the CPU mappings up: VMA queries, populating the pages, page-state
    /// snapshots.
    pub walk_ns: u64,
    /// Of which DMA mapping (pinning, the IOMMU).
    pub dma_map_ns: u64,
    /// Of which writing device page-table entries.
    pub page_table_ns: u64,
    /// Of which the replay.
    pub replay_ns: u64,
}

impl ServiceCpu {
    /// Everything not in a named phase: draining and sorting records, registering the memory
    /// for CPU events, locks, bookkeeping, cancels.
    pub fn rest_ns(&self) -> u64 {
        self.total_ns
            .saturating_sub(self.walk_ns + self.dma_map_ns + self.page_table_ns + self.replay_ns)
    }

    /// The figures accumulated since `earlier`.
    pub fn since(&self, earlier: &ServiceCpu) -> ServiceCpu {
        ServiceCpu {
            batches: self.batches.saturating_sub(earlier.batches),
            total_ns: self.total_ns.saturating_sub(earlier.total_ns),
            walk_ns: self.walk_ns.saturating_sub(earlier.walk_ns),
            dma_map_ns: self.dma_map_ns.saturating_sub(earlier.dma_map_ns),
            page_table_ns: self.page_table_ns.saturating_sub(earlier.page_table_ns),
            replay_ns: self.replay_ns.saturating_sub(earlier.replay_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burn(ms: u64) {
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(ms) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }

    #[test]
    fn phases_are_counted_only_inside_an_accounted_batch_and_the_rest_is_the_difference() {
        let counters = ServiceCpuCounters::default();
        // Outside a batch nothing is recorded, and the closure still runs.
        assert_eq!(timed(Phase::Walk, || 5), 5);
        let timer = BatchTimer::start();
        timed(Phase::Walk, || burn(20));
        timed(Phase::PageTable, || burn(10));
        burn(10);
        timer.finish(&counters);
        let s = counters.snapshot();
        assert_eq!(s.batches, 1);
        // CPU time, so at least what was burnt on this thread (a preempted thread burns less
        // CPU than wall time, never more).
        assert!(s.walk_ns > 0 && s.page_table_ns > 0, "{s:?}");
        assert!(
            s.walk_ns <= 25_000_000 && s.page_table_ns <= 15_000_000,
            "{s:?}"
        );
        assert_eq!(s.dma_map_ns, 0);
        assert_eq!(s.replay_ns, 0);
        assert!(s.total_ns >= s.walk_ns + s.page_table_ns, "{s:?}");
        assert!(s.rest_ns() > 0, "the unphased 10 ms: {s:?}");
        // The batch ended: nothing more is recorded.
        timed(Phase::DmaMap, || burn(5));
        assert_eq!(counters.snapshot().dma_map_ns, 0);
        let later = counters.snapshot();
        assert_eq!(later.since(&s), ServiceCpu::default());
    }
}
