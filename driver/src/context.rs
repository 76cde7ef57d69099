//! A context: one process address space mirrored into one device address space (ASID).
//!
//! Fault path (per run of faulting pages): `read_begin`; fault the CPU pages in and snapshot
//! them through `mirror`; DMA-map them (a pin on kernel VFIO); then under the subscriber lock,
//! `read_retry` and, if nothing collided, write the device PTEs. A collision drops the walk
//! (its DMA mapping is undone) and retries within the retry budget.
//!
//! Invalidation (the subscriber callback, under the same lock): clear the device PTEs of every
//! DMA mapping touching the range, one TLB invalidate for the span and wait for its fence, and
//! only then unmap the DMA mappings (unpin).

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accel_abi::{LARGE_PAGE_SIZE, PAGE_SIZE};
use mirror::{
    Access, AddressSpace, Callbacks, EventKind, Invalidation, PageSize as CpuPageSize, PageState,
    Subscription, VaRange,
};

use crate::arena::{Arena, ArenaTable};
use crate::backend::{DmaAccess, DmaSource};
use crate::dma::DmaSpace;
use crate::fault::{CancelReason, FaultHandler, PageFault};
use crate::pagetable::Translation;
use crate::service_cpu::{timed, Phase};
use crate::view::{DeviceView, StartedFence};
use crate::Error;
use sys_util::sync::lock;

/// Tunables of a context.
#[derive(Clone)]
pub struct ContextOptions {
    /// Map a whole 2 MiB device page when the CPU maps the faulting page as part of a 2 MiB THP.
    pub large_pages: bool,
    /// Extend each fault to the enclosing aligned block of this many bytes (0 = only the
    /// faulting pages), faulting in the neighbours too: fewer faults and far fewer DMA mappings
    /// (TYPE1 allows 65535) for sequential access, at the price of pinning neighbours. Default
    /// 64 KiB. Measured in the benchmarks.
    pub fault_around: u64,
    /// Longest run of pages one DMA mapping may cover.
    pub max_run: u64,
    /// How long a TLB fence may take before the invalidation reports an error.
    pub fence_timeout: Duration,
    /// Test hook, called between the CPU walk (DMA mapping made) and the install, with the
    /// run's range: a test invalidates from here to force a sequence collision.
    pub walk_hook: Option<Arc<dyn Fn(VaRange) + Send + Sync>>,
    /// How the device reaches the mirrored process's memory.
    pub reach: Reach,
    /// Most bytes this context may have DMA-mapped (pinned, on kernel VFIO) at once; a fault
    /// past it is cancelled with [`CancelReason::Quota`]. `None`: no limit of our own (kernel
    /// VFIO still has RLIMIT_MEMLOCK).
    pub max_mapped_bytes: Option<u64>,
    /// Refuse to map memory that cannot be registered for CPU change events (another
    /// userfaultfd owns the range, or the kernel refuses the VMA): such a fault is cancelled
    /// with [`CancelReason::Untracked`]. Off by default: the device then maps it anyway (as
    /// test_hmm's `userfaultfd_read` expects), the context warns once and counts it in
    /// `ContextStats::untracked_runs`, and coherence for that memory rests on the strict
    /// wrappers and `invalidate()`. A mirror built without userfaultfd (explicit-only) is not
    /// affected: its coherence is explicit by choice.
    pub require_events: bool,
    /// Most bytes this context keeps DMA-mapped (pinned, on kernel VFIO) at once. A fault that
    /// would go past it first evicts cold mappings: a CLOCK over the mappings, asking the
    /// address space which were used since the hand last passed ([`mirror::AddressSpace::clear_young`]:
    /// every device and context mirroring the address space answers, from its ACCESSED bits),
    /// and tearing the cold ones down like an invalidation (entries cleared, fenced, DMA
    /// unmapped, unpinned). An evicted page faults back on the device's next access. Only a run
    /// that cannot fit even after evicting everything evictable is cancelled
    /// ([`CancelReason::Quota`], naming this budget). `None`: no budget (mappings stay until the
    /// CPU changes them). Needs a device with page faults: on one without (edu) nothing can be
    /// evicted safely, and the budget refuses like [`Self::max_mapped_bytes`].
    pub pin_budget: Option<u64>,
    /// Thrashing protection under [`Self::pin_budget`]; `None` turns it off.
    pub thrash_protection: Option<ThrashProtection>,
}

/// Thrashing protection: a mapping whose pages the device keeps pulling back right after they
/// were evicted is kept mapped for a while, so that under a working set larger than the budget
/// part of it stays resident instead of every access faulting (a cyclic sweep over more than the
/// budget evicts each page just before its next use under any LRU-like policy). Protection
/// never lets the mapped bytes exceed the budget: at most `max_protected_percent` of the budget
/// is protected, and protected mappings are evicted too when nothing else can make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrashProtection {
    /// Refaults within [`Self::window`] of their eviction that mark a range as thrashing.
    pub refaults: u32,
    /// How soon after its eviction a refault counts.
    pub window: Duration,
    /// How long a thrashing mapping stays protected from eviction.
    pub protect_for: Duration,
    /// Share of the pin budget protected mappings may hold, in percent (0..=90).
    pub max_protected_percent: u32,
}

impl Default for ThrashProtection {
    /// Three refaults within a second protect for a second, up to half the budget (NVIDIA's UVM
    /// pins a page it sees fault 3 times within 500 us; our faults take tens of microseconds on
    /// the emulator, so the window is longer).
    fn default() -> Self {
        ThrashProtection {
            refaults: 3,
            window: Duration::from_secs(1),
            protect_for: Duration::from_secs(1),
            max_protected_percent: 50,
        }
    }
}

/// How the device reaches the pages of the mirrored address space.
#[derive(Clone, Debug, Default)]
pub enum Reach {
    /// The mirrored process is this one: by address (pinned on kernel VFIO), and MAP_SHARED
    /// files by fd where the backend can use one.
    #[default]
    Local,
    /// Another process (daemon mode): only through the memfd arenas it registered, which this
    /// process maps itself. Everything else is [`CancelReason::Unreachable`].
    Arenas(Arc<ArenaTable>),
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            large_pages: true,
            fault_around: 64 << 10,
            max_run: 2 << 20,
            fence_timeout: Duration::from_secs(5),
            walk_hook: None,
            reach: Reach::Local,
            max_mapped_bytes: None,
            require_events: false,
            pin_budget: None,
            thrash_protection: Some(ThrashProtection::default()),
        }
    }
}

impl std::fmt::Debug for ContextOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextOptions")
            .field("large_pages", &self.large_pages)
            .field("fault_around", &self.fault_around)
            .field("max_run", &self.max_run)
            .field("walk_hook", &self.walk_hook.is_some())
            .field("reach", &self.reach)
            .field("max_mapped_bytes", &self.max_mapped_bytes)
            .field("require_events", &self.require_events)
            .field("pin_budget", &self.pin_budget)
            .field("thrash_protection", &self.thrash_protection)
            .finish()
    }
}

/// Counters of one context.
#[derive(Debug, Default)]
pub struct ContextCounters {
    /// Distinct pages the fault service asked us to make accessible.
    pub faults: AtomicU64,
    /// Fault batches the service handed us (one per stall round trip).
    pub fault_batches: AtomicU64,
    /// Runs mapped although their memory could not be registered for CPU events.
    pub untracked_runs: AtomicU64,
    /// Runs whose memory this context had registered for CPU events already, with no event
    /// since: no registration asked of the kernel.
    pub track_skipped: AtomicU64,
    /// Runs whose pages were not all present for the access, so the fault service populated
    /// them (MADV_POPULATE_*); the other runs found every page present at the first look.
    pub populate_calls: AtomicU64,
    /// Runs serviced (one DMA mapping each).
    pub runs: AtomicU64,
    /// Pages made accessible to the device (device PTEs written, 4 KiB units).
    pub pages_mapped: AtomicU64,
    /// 2 MiB device leaves written.
    pub large_mappings: AtomicU64,
    /// Pages a work item was stalled on that could not be serviced (the item is cancelled).
    /// Hints that could not be serviced (lookahead pages, records a replay had already
    /// overtaken: `PageFault::hint`) are not counted.
    pub failures: AtomicU64,
    /// Invalidation callbacks run.
    pub invalidations: AtomicU64,
    /// TLB fences issued.
    pub tlb_fences: AtomicU64,
    /// TLB fences that failed or timed out (the DMA unmap still happened, so the IOMMU blocks
    /// the stale entries).
    pub fence_failures: AtomicU64,
    /// Bytes currently DMA-mapped for this context.
    pub mapped_bytes: AtomicU64,
    /// DMA mappings dropped on the host side only, without a fence or an unmap, because the
    /// device was lost (nothing on it can run, and every call to it would fail).
    pub dropped_on_lost_device: AtomicU64,
    /// Mappings evicted to stay under the pin budget.
    pub evictions: AtomicU64,
    /// Bytes those evictions unmapped.
    pub evicted_bytes: AtomicU64,
    /// Mappings installed over a range evicted within the thrashing window.
    pub refaults: AtomicU64,
    /// Eviction passes (one per fault that had to make room).
    pub eviction_passes: AtomicU64,
    /// Aging queries (`clear_young` over a batch of mappings) and the mappings they covered.
    pub aging_queries: AtomicU64,
    /// Mappings an aging query looked at.
    pub aging_mappings: AtomicU64,
    /// Mappings spared by the CLOCK because they were used since the hand last passed.
    pub second_chances: AtomicU64,
    /// Eviction passes that had no use information (the device keeps no ACCESSED bits, or
    /// another subscriber failed to answer): the CLOCK evicted in hand order (FIFO by address).
    pub aging_unavailable: AtomicU64,
    /// Mappings protected from eviction as thrashing.
    pub thrash_protections: AtomicU64,
    /// Faults refused because the run could not fit under the pin budget.
    pub budget_refusals: AtomicU64,
}

/// One DMA mapping of process memory, and the device leaves pointing into it.
#[derive(Debug, Clone)]
struct UserMapping {
    va: u64,
    len: u64,
    iova: u64,
    writable: bool,
    /// The arena whose local mapping the DMA mapping points into: kept mapped until the DMA
    /// mapping is gone.
    _arena: Option<Arc<Arena>>,
    /// Refaults of this range within the thrashing window so far (carried across evictions).
    refaults: u32,
    /// Kept from eviction until then (thrashing protection).
    protected_until: Option<Instant>,
}

/// A range evicted recently: a mapping installed over it within the window is a refault.
#[derive(Debug, Clone, Copy)]
struct Evicted {
    end: u64,
    at: Instant,
    refaults: u32,
    /// `MirrorState::installs` when it was evicted.
    installs: u64,
}

/// Most eviction records kept (older ones are forgotten first).
const EVICTION_HISTORY: usize = 1 << 16;
/// Mappings aged with one `clear_young` call (one TLB invalidation per device address space).
const AGING_BATCH: usize = 16;
/// Immediate refaults in a row after which a fault over the pin budget is refused instead of
/// evicting: the commands in flight need more than the budget and would evict each other for
/// ever.
const PING_PONG_LIMIT: u32 = 8;

/// A set of disjoint, non-adjacent page ranges (start -> end).
#[derive(Debug, Default)]
struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        let touching: Vec<u64> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, _)| *s)
            .collect();
        for s in touching {
            let e = self.0.remove(&s).unwrap_or(s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Remove `r` from the set, splitting ranges that straddle its ends.
    fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .0
            .range(..r.end)
            .rev()
            .take_while(|(_, e)| **e > r.start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in hit {
            self.0.remove(&s);
            if s < r.start {
                self.0.insert(s, r.start);
            }
            if e > r.end {
                self.0.insert(r.end, e);
            }
        }
    }

    /// The parts of the set inside `r`.
    fn within(&self, r: Range<u64>) -> Vec<Range<u64>> {
        if r.start >= r.end {
            return Vec::new();
        }
        self.0
            .range(..r.end)
            .rev()
            .take_while(|(_, e)| **e > r.start)
            .map(|(s, e)| (*s).max(r.start)..(*e).min(r.end))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    }
}

/// The subscriber state: everything the invalidate callback and the install step touch.
pub(crate) struct MirrorState {
    dma: Arc<DmaSpace>,
    view: Box<dyn DeviceView>,
    label: u16,
    mappings: BTreeMap<u64, UserMapping>,
    counters: Arc<ContextCounters>,
    released: bool,
    /// Page ranges taken away from the device, with the work item whose submitter stopped
    /// waiting for it: that caller got its memory back, so no fault may map it again while the
    /// item can still run (see [`ContextCore::revoke`]).
    revoked: Vec<(u32, Range<u64>)>,
    /// Where the CLOCK hand stands: the next mapping at or after this VA is looked at first.
    clock_hand: u64,
    /// Ranges evicted recently, by start.
    evicted: BTreeMap<u64, Evicted>,
    /// Bytes of mappings currently protected from eviction.
    protected_bytes: u64,
    /// Mappings installed so far (an eviction record remembers the count at its eviction).
    installs: u64,
    /// Refaults in a row that came back at once (at most two installs after their eviction):
    /// the runs in flight need more than the budget and evict each other.
    ping_pong: u32,
    /// The service round (fault batch or prefault) in which `ping_pong` reached its limit: every fault of that batch that
    /// needs an eviction is refused (its runs fall back to single pages, which must not start
    /// the ping-pong again), so the stalled item is cancelled.
    refuse_in_batch: Option<u64>,
    /// Pages the device wrote through leaves that are gone now (evicted or revoked) while the
    /// CPU mapping stayed: kept for [`ContextCore::dirty`]. A CPU change of a range forgets its
    /// part (what was written there is no longer the process's memory at that address).
    dirty_log: RangeSet,
    /// Ranges registered for CPU events by this context's runs (`AddressSpace::track`) that no
    /// event has touched since: a fault there needs no new registration. Only ranges the
    /// kernel registered whole are recorded, only when no event came between the registration
    /// and the record, and every event removes its range, so a VMA mapped later at the same
    /// address (which needs an unmap of the old one first, an event) is registered anew.
    tracked: RangeSet,
    /// Tear-downs an invalidation's first pass started, finished by its second pass.
    started: Vec<Teardown>,
}

/// A tear-down between its two passes: the victims left the view and the bookkeeping, their
/// fence was started (or failed to start), they are still DMA-mapped and pinned.
struct Teardown {
    victims: Vec<UserMapping>,
    fence: Option<Result<StartedFence, Error>>,
}

impl MirrorState {
    /// Whether any page of `range` is revoked.
    fn is_revoked(&self, range: Range<u64>) -> bool {
        self.revoked
            .iter()
            .any(|(_, r)| r.start < range.end && range.start < r.end)
    }

    /// Mappings touching `range`.
    fn overlapping(&self, range: Range<u64>) -> Vec<UserMapping> {
        let mut out: Vec<UserMapping> = self
            .mappings
            .range(..range.end)
            .rev()
            .take_while(|(_, m)| m.va + m.len > range.start)
            .map(|(_, m)| m.clone())
            .collect();
        out.reverse();
        out
    }

    /// Whether a mapping lets the device reach `page` (for writing, if `write`).
    fn reaches(&self, page: u64, write: bool) -> bool {
        self.mappings
            .range(..=page)
            .next_back()
            .is_some_and(|(_, m)| page < m.va + m.len && (m.writable || !write))
    }

    /// The parts of `range` no mapping covers.
    fn gaps(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut cursor = range.start;
        for m in self.overlapping(range.clone()) {
            if m.va > cursor {
                gaps.push(cursor..m.va);
            }
            cursor = cursor.max(m.va + m.len);
        }
        if cursor < range.end {
            gaps.push(cursor..range.end);
        }
        gaps
    }

    /// Tear down the device's view of `range`: the translations of every mapping touching it,
    /// one fence, then the DMA mappings (unpin). Returns whether the device can no longer reach
    /// any page of `range`: false only if a DMA unmap failed (a failed fence alone still ends
    /// with the IOMMU blocking the unmapped IOVAs, which stay reserved).
    fn tear_down(&mut self, range: Range<u64>) -> bool {
        self.tear_down_ranges(std::slice::from_ref(&range))
    }

    /// [`Self::tear_down`] of several ranges with one fence for all of them (an eviction).
    fn tear_down_ranges(&mut self, ranges: &[Range<u64>]) -> bool {
        match self.start_tear_down(ranges) {
            Some(teardown) => self.finish_tear_down(teardown),
            None => true,
        }
    }

    /// The first pass of a tear-down: the mappings touching `ranges` leave the view (their
    /// device entries are cleared) and the bookkeeping (no other path finds them any more),
    /// and their fence is started. `None` if nothing is left to wait for (a lost device's
    /// mappings are dropped on the host side at once).
    fn start_tear_down(&mut self, ranges: &[Range<u64>]) -> Option<Teardown> {
        let mut victims = Vec::new();
        for range in ranges {
            victims.extend(self.overlapping(range.clone()));
        }
        victims.sort_by_key(|m| m.va);
        victims.dedup_by_key(|m| m.va);
        if let Some(lost) = self.dma.backend().lost() {
            self.forget(victims, &lost);
            return None;
        }
        // Each range is removed on its own (its span grown to the mappings touching it): the
        // union of disjoint ranges would clear other mappings' entries between them. The fence
        // covers everything removed at once.
        let mut fence_span: Option<Range<u64>> = None;
        for range in ranges {
            let mut span = range.clone();
            for m in victims
                .iter()
                .filter(|m| m.va < range.end && m.va + m.len > range.start)
            {
                span.start = span.start.min(m.va);
                span.end = span.end.max(m.va + m.len);
            }
            if let Some(cached) = self.view.remove(span.clone()) {
                let grown = cached.start.min(span.start)..cached.end.max(span.end);
                fence_span = Some(match fence_span {
                    None => grown,
                    Some(f) => f.start.min(grown.start)..f.end.max(grown.end),
                });
            }
        }
        let mut written = Vec::new();
        self.view.drain_removed_dirty(&mut written);
        for r in written {
            self.dirty_log.insert(r);
        }
        for m in &victims {
            self.mappings.remove(&m.va);
            if m.protected_until.is_some() {
                self.protected_bytes = self.protected_bytes.saturating_sub(m.len);
            }
        }
        let fence = match fence_span {
            Some(span) => {
                self.counters.tlb_fences.fetch_add(1, Ordering::Relaxed);
                match self.view.fence_start(span) {
                    Ok(started) => Some(Ok(started)),
                    Err(e) => Some(Err(e)),
                }
            }
            None => None,
        };
        Some(Teardown { victims, fence })
    }

    /// The second pass: wait for the fence, then unmap (and unpin) the victims. True if every
    /// victim is unreachable by the device now.
    fn finish_tear_down(&mut self, teardown: Teardown) -> bool {
        let Teardown { victims, fence } = teardown;
        let fenced = match fence {
            None => Ok(()),
            Some(Ok(started)) => self.view.fence_finish(started),
            Some(Err(e)) => Err(e),
        };
        let fenced = match fenced {
            Ok(()) => true,
            Err(e) => {
                // Unmapping anyway is the safe side: the IOMMU then blocks whatever the device
                // still caches, instead of letting it reach memory that is about to be reused.
                // The IOVAs stay reserved, or a later mapping there would be reachable again.
                self.counters.fence_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, asid = self.label, "device fence failed; unmapping DMA anyway, IOVAs kept out of use");
                false
            }
        };
        let mut unreachable = true;
        for m in &victims {
            let unmapped = if fenced {
                self.dma.unmap(m.iova, m.len)
            } else {
                self.dma.unmap_keep_iova(m.iova, m.len)
            };
            match unmapped {
                Ok(()) => {
                    self.counters
                        .mapped_bytes
                        .fetch_sub(m.len, Ordering::Relaxed);
                }
                Err(e) => {
                    // The pages may still be pinned and reachable: they stay counted (against
                    // the pin budget too), for good.
                    tracing::error!(error = %e, iova = m.iova, len = m.len, "DMA unmap failed; its bytes stay counted as mapped");
                    unreachable = false;
                }
            }
        }
        unreachable
    }

    /// Evict the mappings starting at `victims` (those still there with the same length):
    /// torn down with one fence, remembered for refault detection. Returns the bytes freed.
    fn evict(&mut self, victims: &[(u64, u64)], now: Instant) -> u64 {
        let mut ranges = Vec::new();
        let mut records = Vec::new();
        for &(va, len) in victims {
            if let Some(m) = self.mappings.get(&va).filter(|m| m.len == len) {
                ranges.push(va..va + len);
                records.push((
                    va,
                    Evicted {
                        end: va + len,
                        at: now,
                        refaults: m.refaults,
                        installs: self.installs,
                    },
                ));
            }
        }
        if ranges.is_empty() {
            return 0;
        }
        let before = self.counters.mapped_bytes.load(Ordering::Relaxed);
        self.tear_down_ranges(&ranges);
        let freed = before.saturating_sub(self.counters.mapped_bytes.load(Ordering::Relaxed));
        self.counters
            .evictions
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(freed, Ordering::Relaxed);
        if self.evicted.len() + records.len() > EVICTION_HISTORY {
            // Forget the oldest half: a refault that long after its eviction is no thrashing.
            let mut ages: Vec<Instant> = self.evicted.values().map(|e| e.at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.evicted.retain(|_, e| e.at > cut);
        }
        self.evicted.extend(records);
        freed
    }

    /// A mapping of `[va, va + len)` is being installed: if it covers ranges evicted within
    /// the thrashing window, it is a refault; enough of them protect it. Returns its refault
    /// count and protection.
    fn note_refault(
        &mut self,
        va: u64,
        len: u64,
        now: Instant,
        policy: Option<(ThrashProtection, u64)>,
        longest: u64,
    ) -> (u32, Option<Instant>) {
        let end = va + len;
        self.installs += 1;
        // No mapping is longer than `longest`, so no record starting further back overlaps.
        let hits: Vec<(u64, Evicted)> = self
            .evicted
            .range(va.saturating_sub(longest)..end)
            .filter(|(_, e)| e.end > va)
            .map(|(s, e)| (*s, *e))
            .collect();
        if hits.is_empty() {
            self.ping_pong = 0;
            return (0, None);
        }
        for (s, _) in &hits {
            self.evicted.remove(s);
        }
        let at_once = hits.iter().any(|(_, e)| self.installs - e.installs <= 2);
        self.ping_pong = if at_once { self.ping_pong + 1 } else { 0 };
        // The same window counts refaults whether protection is on or not.
        let window = policy.map_or(ThrashProtection::default().window, |(p, _)| p.window);
        let recent: Vec<&Evicted> = hits
            .iter()
            .map(|(_, e)| e)
            .filter(|e| now.saturating_duration_since(e.at) <= window)
            .collect();
        if recent.is_empty() {
            return (0, None);
        }
        self.counters.refaults.fetch_add(1, Ordering::Relaxed);
        let Some((policy, budget)) = policy else {
            return (0, None);
        };
        let refaults = recent.iter().map(|e| e.refaults).max().unwrap_or(0) + 1;
        let cap = budget / 100 * u64::from(policy.max_protected_percent.min(90));
        if refaults >= policy.refaults && self.protected_bytes + len <= cap {
            self.protected_bytes += len;
            self.counters
                .thrash_protections
                .fetch_add(1, Ordering::Relaxed);
            return (0, Some(now + policy.protect_for));
        }
        (refaults, None)
    }

    /// The aging callback: which parts of `query.range` the device used (ACCESSED), clearing
    /// the bits (and the translations that would hide later use) if asked.
    fn on_age(&mut self, query: &mirror::AgeQuery, young: &mut Vec<VaRange>) {
        if !self.view.aging_supported() {
            return;
        }
        let range = query.range.start()..query.range.end();
        let mut used = Vec::new();
        match self.view.age(range.clone(), query.clear, &mut used) {
            Ok(_) => young.extend(
                used.into_iter()
                    .filter_map(|r| VaRange::from_bounds(r.start, r.end).ok()),
            ),
            Err(e) => {
                // The safe answer: nothing here is evicted on a broken answer.
                tracing::warn!(error = %e, asid = self.label, ?range, "aging the device's entries failed; reporting the range used");
                young.push(query.range);
            }
        }
    }

    /// Tear-down on a lost device: drop `victims` (and the arenas and pages they hold) on the
    /// host side at once. No fence, no unmap: the device cannot run anything any more, and a
    /// call to it would only fail (or, for a server that is gone, wait for nobody).
    fn forget(&mut self, victims: Vec<UserMapping>, lost: &crate::backend::DeviceLost) -> usize {
        if victims.is_empty() {
            return 0;
        }
        let bytes: u64 = victims.iter().map(|m| m.len).sum();
        for m in &victims {
            self.mappings.remove(&m.va);
        }
        self.counters
            .mapped_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
        self.counters
            .dropped_on_lost_device
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        tracing::info!(
            asid = self.label,
            mappings = victims.len(),
            bytes,
            %lost,
            "released DMA mappings on the host side only: the device is lost"
        );
        victims.len()
    }

    fn on_invalidate(&mut self, inv: &Invalidation) {
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("invalidate", asid = self.label, range = ?inv.range, kind = ?inv.kind);
        let _enter = span.enter();
        match inv.kind {
            // Fork changes nothing the device sees: pinned pages stay with the parent (the
            // kernel copies them for the child), and VA-based access follows the parent's
            // page tables. See docs/semantics.md.
            EventKind::Fork => {}
            EventKind::Release => {
                self.tear_down(0..u64::MAX);
                self.released = true;
            }
            _ => {
                let range = inv.range.start()..inv.range.end();
                self.tracked.remove(range.clone());
                // The first pass: entries cleared and the fence started; the second pass
                // (`on_invalidate_finish`, after every other address space's first pass) waits
                // for it and unpins.
                if let Some(teardown) = self.start_tear_down(std::slice::from_ref(&range)) {
                    self.started.push(teardown);
                }
                // What the device wrote there is not the process's memory at that address
                // any more (unmapped, discarded or moved).
                self.dirty_log.remove(range);
            }
        }
    }

    /// The second pass of an invalidation: finish every tear-down the first pass started.
    fn on_invalidate_finish(&mut self) {
        for teardown in std::mem::take(&mut self.started) {
            self.finish_tear_down(teardown);
        }
    }
}

/// A MAP_SHARED file VMA (memfd, shmem, tmpfs, a regular file) whose pages can be handed to
/// the device by fd.
#[derive(Debug, Clone, Copy)]
struct SharedFile {
    start: u64,
    end: u64,
    offset: u64,
}

impl SharedFile {
    /// The file behind the VMA, through /proc/self/map_files (which needs CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE; without them the memory goes by address instead). Returns the
    /// fd, the file offset of the VMA start, and the VMA start.
    fn open(self, write: bool) -> Option<(std::fs::File, u64, u64)> {
        let path = format!("/proc/self/map_files/{:x}-{:x}", self.start, self.end);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path);
        match file {
            Ok(f) => Some((f, self.offset, self.start)),
            Err(e) => {
                tracing::debug!(error = %e, path, "shared file not reachable by fd; mapping it by address");
                None
            }
        }
    }
}

/// A walk's result: a DMA mapping not yet installed. Dropping it undoes the mapping (a retry).
struct Walked {
    dma: Arc<DmaSpace>,
    mapping: Option<UserMapping>,
    large: bool,
}

impl Drop for Walked {
    fn drop(&mut self) {
        if let Some(m) = self.mapping.take() {
            if let Err(e) = self.dma.unmap(m.iova, m.len) {
                tracing::error!(error = %e, "undoing a DMA mapping after a collision failed");
            }
        }
    }
}

/// A process address space mirrored into one device view: the subscription, the DMA
/// mappings and the fault path. The runtime's [`crate::Context`] wraps one, with the view its
/// [`crate::runtime::Personality`] gives it: faults reach it through the personality's fault
/// source (MXA-1), or a device without page faults (edu, with an [`crate::view::IommuView`])
/// maps through [`ContextCore::map_for_device`] on submit.
pub struct ContextCore {
    pub(crate) dma: Arc<DmaSpace>,
    pub(crate) asid: u16,
    pub(crate) mm: Arc<AddressSpace>,
    pub(crate) sub: Subscription<MirrorState>,
    pub(crate) counters: Arc<ContextCounters>,
    pub(crate) options: ContextOptions,
    needs_identity: bool,
    /// Serializes fault servicing of this context (the service thread is single, but
    /// explicit prefaults from API threads may run at the same time).
    service_lock: Mutex<()>,
    /// Revoked ranges (`MirrorState::revoked.len()`): the fault path skips looking when 0.
    revoked: AtomicU64,
    /// The limit the latest refused run met (to explain a `Quota` cancel to the submitter).
    last_limit: Mutex<Option<Limit>>,
    /// Fault batches and prefaults begun (each a round of runs under the service lock).
    service_rounds: AtomicU64,
}

fn cancel_reason(e: &mirror::Error) -> CancelReason {
    match e {
        mirror::Error::Fault { .. } | mirror::Error::SpecialMapping { .. } => {
            CancelReason::NoMapping
        }
        mirror::Error::PermissionDenied { .. } => CancelReason::Permission,
        mirror::Error::RetryBudgetExhausted { .. } => CancelReason::RetryBudget,
        mirror::Error::Released => CancelReason::NoContext,
        _ => CancelReason::Other,
    }
}

enum WalkError {
    Mirror(mirror::Error),
    Cancel(CancelReason),
    Dma(Error),
    /// A limit of the context would be exceeded: its description and value.
    Quota(Limit),
}

/// A limit on what a context maps, as an error names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// [`ContextOptions::max_mapped_bytes`].
    MappedBytes(u64),
    /// [`ContextOptions::pin_budget`]: the run does not fit even after evicting what can be.
    PinBudget(u64),
}

impl Limit {
    /// The error a caller sees.
    pub(crate) fn error(self) -> Error {
        match self {
            Limit::MappedBytes(limit) => Error::QuotaExceeded {
                quota: "mapped (pinned) bytes of this context (the command was cancelled, its \
                        pages would not fit; raise it with ContextOptions::max_mapped_bytes)",
                limit,
            },
            Limit::PinBudget(limit) => Error::QuotaExceeded {
                quota: "pin budget of this context (the command was cancelled: the faulting run \
                        did not fit even after evicting every mapping that could be evicted; \
                        raise ContextOptions::pin_budget)",
                limit,
            },
        }
    }
}

/// Where the pages of a run live.
enum Backing {
    /// In this process (the mirrored one); `true` if in a MAP_SHARED file, reachable by fd.
    Process(bool),
    /// In an arena the mirrored process shares with us.
    Arena(Arc<Arena>),
}

/// Why a run could not be serviced: the cancel code for the device, and the underlying error
/// when there is one worth handing to a caller (a DMA map refused past RLIMIT_MEMLOCK).
struct Failure {
    reason: CancelReason,
    cause: Option<Error>,
}

impl From<CancelReason> for Failure {
    fn from(reason: CancelReason) -> Self {
        Failure {
            reason,
            cause: None,
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        f.cause.unwrap_or(Error::Cancelled { reason: f.reason })
    }
}

impl From<mirror::Error> for WalkError {
    fn from(e: mirror::Error) -> Self {
        WalkError::Mirror(e)
    }
}

impl ContextCore {
    /// Mirror `mm` into `view` over `dma`. `label` names the device address space in logs.
    pub fn new(
        dma: Arc<DmaSpace>,
        label: u16,
        mm: Arc<AddressSpace>,
        view: Box<dyn DeviceView>,
        options: ContextOptions,
    ) -> Result<ContextCore, Error> {
        let counters = Arc::new(ContextCounters::default());
        let needs_identity = view.needs_identity();
        let state = MirrorState {
            dma: dma.clone(),
            view,
            label,
            mappings: BTreeMap::new(),
            counters: counters.clone(),
            released: false,
            revoked: Vec::new(),
            clock_hand: 0,
            evicted: BTreeMap::new(),
            protected_bytes: 0,
            installs: 0,
            ping_pong: 0,
            refuse_in_batch: None,
            dirty_log: RangeSet::default(),
            tracked: RangeSet::default(),
            started: Vec::new(),
        };
        let callbacks =
            Callbacks::new(|state: &mut MirrorState, inv: &Invalidation| state.on_invalidate(inv))
                .two_pass(|state: &mut MirrorState, _: &Invalidation| state.on_invalidate_finish())
                .aging(
                    |state: &mut MirrorState,
                     query: &mirror::AgeQuery,
                     young: &mut Vec<VaRange>| { state.on_age(query, young) },
                );
        let sub = mm
            .subscribe_with(VaRange::whole(), state, callbacks)
            .map_err(Error::Mirror)?;
        Ok(ContextCore {
            dma,
            asid: label,
            mm,
            sub,
            counters,
            options,
            needs_identity,
            service_lock: Mutex::new(()),
            revoked: AtomicU64::new(0),
            last_limit: Mutex::new(None),
            service_rounds: AtomicU64::new(0),
        })
    }

    /// The device's current translation of `va` (introspection for tests and the demo).
    pub fn translate(&self, va: u64) -> Option<Translation> {
        self.sub.lock().view.lookup(va)
    }

    /// (mappings, mapped bytes, small leaves, large leaves, table pages).
    pub fn footprint(&self) -> (usize, u64, u64, u64, usize) {
        let state = self.sub.lock();
        let (small, large, tables) = state.view.footprint();
        let bytes = state.mappings.values().map(|m| m.len).sum();
        (state.mappings.len(), bytes, small, large, tables)
    }

    /// The mirrored address space.
    pub fn address_space(&self) -> &Arc<AddressSpace> {
        &self.mm
    }

    /// The device view's table-page accounting.
    pub fn table_stats(&self) -> crate::view::TableStats {
        self.sub.lock().view.table_stats()
    }

    /// Counters.
    pub fn counters(&self) -> &ContextCounters {
        &self.counters
    }

    /// Service one run of pages `[start, end)` needing `write` (or not).
    fn service_run(&self, start: u64, end: u64, write: bool) -> Result<(), Failure> {
        let range =
            VaRange::from_bounds(start, end).map_err(|_| Failure::from(CancelReason::NoMapping))?;
        // Checked again, authoritatively, at the install; here it saves the walk and the map.
        if self.revoked.load(Ordering::Acquire) > 0 && self.sub.lock().is_revoked(start..end) {
            return Err(CancelReason::Revoked.into());
        }
        let vmas = timed(Phase::Walk, || self.mm.walker().vmas(range))
            .map_err(|e| Failure::from(cancel_reason(&e)))?;
        // Every byte must be covered by readable, non-special VMAs.
        let mut cursor = start;
        let mut writable = true;
        for v in &vmas {
            if v.range.start() > cursor {
                break;
            }
            if v.kind == mirror::VmaKind::Special {
                return Err(CancelReason::NoMapping.into());
            }
            if !v.perms.read {
                return Err(CancelReason::NoMapping.into());
            }
            writable &= v.perms.write;
            cursor = v.range.end();
        }
        if cursor < end {
            return Err(CancelReason::NoMapping.into());
        }
        let backing = match &self.options.reach {
            Reach::Local => Backing::Process(matches!(
                vmas.as_slice(),
                [v] if v.shared && v.kind == mirror::VmaKind::File && v.range.contains_range(&range)
            )),
            Reach::Arenas(table) => {
                let arena = table
                    .resolve(&vmas, start, end)
                    .ok_or(CancelReason::Unreachable)?;
                writable &= arena.writable();
                Backing::Arena(arena)
            }
        };
        if write && !writable {
            return Err(CancelReason::Permission.into());
        }
        // Map writable VMAs for writing even on a read fault: populating for write breaks
        // copy-on-write up front, so the device never mirrors a page (like the shared zero
        // page) that the CPU will replace without any event.
        let access = if writable {
            Access::Write
        } else {
            Access::Read
        };
        let tracked = self.track_run(range, &vmas);
        match tracked {
            Ok(()) => {}
            // Explicit-only mirror (no userfaultfd): coherence is explicit by configuration.
            Err(mirror::Error::Unsupported { .. }) => {}
            Err(mirror::Error::Released) => return Err(CancelReason::NoContext.into()),
            Err(e) if self.options.require_events => {
                return Err(Failure {
                    reason: CancelReason::Untracked,
                    cause: Some(Error::Mirror(e)),
                })
            }
            Err(e) => {
                let first = self.counters.untracked_runs.fetch_add(1, Ordering::Relaxed) == 0;
                if first {
                    tracing::warn!(error = %e, ?range, asid = self.asid, "mapping memory that cannot be registered for CPU events: its munmap/madvise/mremap will not reach the device; use the strict wrappers or invalidate() there (logged once per context; ContextStats::untracked_runs counts them)");
                } else {
                    tracing::debug!(error = %e, ?range, "could not register the range for CPU events");
                }
            }
        }
        let result = self.sub.mirror_range(
            |_seq| Ok(self.walk(range, access, &backing)),
            |state, walked| self.install(state, walked),
        );
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(failure),
            Err(e) => Err(cancel_reason(&e).into()),
        }
    }

    /// Under [`ContextOptions::pin_budget`], evict cold mappings until `need` more bytes fit.
    /// `keep` (the run being mapped) is never a victim. Runs without the subscriber lock (the
    /// aging query takes every subscriber's lock, ours included) and under the service lock,
    /// so the mapped-bytes count only grows through this context's own installs.
    fn make_room(&self, need: u64, keep: Range<u64>) -> Result<(), WalkError> {
        let Some(budget) = self.options.pin_budget else {
            return Ok(());
        };
        let refuse = || {
            self.counters
                .budget_refusals
                .fetch_add(1, Ordering::Relaxed);
            WalkError::Quota(Limit::PinBudget(budget))
        };
        if need > budget {
            return Err(refuse());
        }
        // A device without page faults cannot take a page back: what it was given on submit
        // must stay mapped until the command ends. The budget only refuses there.
        let can_evict = !self.needs_identity;
        for round in 0..4 {
            let mapped = self.counters.mapped_bytes.load(Ordering::Relaxed);
            if mapped.saturating_add(need) <= budget {
                return Ok(());
            }
            if !can_evict {
                return Err(refuse());
            }
            if round == 0 {
                let mut state = self.sub.lock();
                let batch = self.service_rounds.load(Ordering::Relaxed);
                if state.refuse_in_batch == Some(batch) {
                    drop(state);
                    return Err(refuse());
                }
                if state.ping_pong >= PING_PONG_LIMIT {
                    // Evicting again would only bring back what the runs in flight need:
                    // together they need more than the budget. Refusing cancels one of them.
                    state.ping_pong = 0;
                    state.refuse_in_batch = Some(batch);
                    drop(state);
                    tracing::warn!(asid = self.asid, budget, "the device's commands in flight need more than the pin budget: cancelling the faulting one");
                    return Err(refuse());
                }
                // What this run replaces (a read-only mapping upgraded for writing) goes first:
                // the install would tear it down anyway, and pinning the new mapping while the
                // old one is still pinned would take the pins past the budget for a moment.
                if !state.overlapping(keep.clone()).is_empty() {
                    state.tear_down(keep.clone());
                    continue;
                }
            }
            self.counters
                .eviction_passes
                .fetch_add(1, Ordering::Relaxed);
            let victims = self.pick_victims(mapped + need - budget, &keep);
            if victims.is_empty() {
                return Err(refuse());
            }
            self.sub.lock().evict(&victims, Instant::now());
        }
        let mapped = self.counters.mapped_bytes.load(Ordering::Relaxed);
        if mapped.saturating_add(need) <= budget {
            Ok(())
        } else {
            Err(refuse())
        }
    }

    /// The CLOCK: from the hand on, mappings in address order, in batches whose use is asked of
    /// the whole address space (`clear_young`: every subscriber's ACCESSED bits, cleared as they
    /// are read). A used mapping gets a second chance; an unused one is a victim, until `want`
    /// bytes are found. If a whole round finds too few (everything was used), the round's
    /// mappings go in hand order; protected mappings only when nothing else is left.
    fn pick_victims(&self, want: u64, keep: &Range<u64>) -> Vec<(u64, u64)> {
        let now = Instant::now();
        // (va, len, protected) in hand order.
        let candidates: Vec<(u64, u64, bool)> = {
            let mut state = self.sub.lock();
            let hand = state.clock_hand;
            let mut expired = 0;
            let mut list: Vec<(u64, u64, bool)> = Vec::with_capacity(state.mappings.len());
            let (after, before) = {
                let after: Vec<u64> = state.mappings.range(hand..).map(|(va, _)| *va).collect();
                let before: Vec<u64> = state.mappings.range(..hand).map(|(va, _)| *va).collect();
                (after, before)
            };
            for va in after.into_iter().chain(before) {
                let Some(m) = state.mappings.get_mut(&va) else {
                    continue;
                };
                if m.va < keep.end && m.va + m.len > keep.start {
                    continue;
                }
                if m.protected_until.is_some_and(|t| t <= now) {
                    m.protected_until = None;
                    expired += m.len;
                }
                list.push((m.va, m.len, m.protected_until.is_some()));
            }
            state.protected_bytes = state.protected_bytes.saturating_sub(expired);
            list
        };
        let mut victims = Vec::new();
        let mut spared = Vec::new();
        let mut found = 0u64;
        let mut last_examined = None;
        let aging = self.sub.lock().view.aging_supported();
        if !aging {
            self.counters
                .aging_unavailable
                .fetch_add(1, Ordering::Relaxed);
        }
        let unprotected: Vec<(u64, u64)> = candidates
            .iter()
            .filter(|c| !c.2)
            .map(|c| (c.0, c.1))
            .collect();
        'round: for batch in unprotected.chunks(AGING_BATCH) {
            let young = if aging {
                self.young_parts(batch)
            } else {
                Vec::new()
            };
            for &(va, len) in batch {
                last_examined = Some(va + len);
                let used = young.iter().any(|y| y.start() < va + len && y.end() > va);
                if used {
                    spared.push((va, len));
                    continue;
                }
                victims.push((va, len));
                found += len;
                if found >= want {
                    break 'round;
                }
            }
        }
        self.counters
            .second_chances
            .fetch_add(spared.len() as u64, Ordering::Relaxed);
        // Everything was used since the hand last passed: their bits are clear now, and the
        // hand order (oldest first from where it stands) decides.
        for &(va, len) in &spared {
            if found >= want {
                break;
            }
            victims.push((va, len));
            found += len;
        }
        for &(va, len, _) in candidates.iter().filter(|c| c.2) {
            if found >= want {
                break;
            }
            victims.push((va, len));
            found += len;
        }
        if let Some(hand) = last_examined {
            self.sub.lock().clock_hand = hand;
        }
        victims
    }

    /// Which parts of a batch of mappings were used since last asked, clearing the record: the
    /// whole address space answers (every device or context mirroring it).
    fn young_parts(&self, batch: &[(u64, u64)]) -> Vec<VaRange> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Vec::new();
        };
        let Ok(span) = VaRange::from_bounds(first.0, last.0 + last.1) else {
            return Vec::new();
        };
        self.counters.aging_queries.fetch_add(1, Ordering::Relaxed);
        self.counters
            .aging_mappings
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        match self.mm.clear_young(span) {
            Ok(young) => young,
            Err(e) => {
                // Without an answer nothing in the batch is known cold: spare it all.
                tracing::warn!(error = %e, ?span, "aging query failed; sparing the batch");
                self.counters
                    .aging_unavailable
                    .fetch_add(1, Ordering::Relaxed);
                vec![span]
            }
        }
    }

    /// Pages of `range` the device wrote (DIRTY) since the last `dirty(.., true)`: from the
    /// device's current entries and from entries gone since (evicted, revoked) over memory the
    /// CPU has not changed. With `clear`, the record is cleared (and the device's translations
    /// invalidated, so its next write is seen again). Coalesced, ascending.
    pub fn dirty(&self, range: Range<u64>, clear: bool) -> Result<Vec<Range<u64>>, Error> {
        let mut state = self.sub.lock();
        if !state.view.aging_supported() {
            return Err(Error::Unsupported(
                "dirty tracking: the device keeps no DIRTY bits (MXA-1 revision 2 with \
                 CAP_FEATURES.ACCESSED_DIRTY and DeviceOptions::accessed_dirty)"
                    .into(),
            ));
        }
        // Whole pages: the device's record is per page (per 2 MiB for a large leaf).
        let range = range.start & !(PAGE_SIZE - 1)..range.end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut out = Vec::new();
        if let Err(e) = state.view.dirty(range.clone(), clear, &mut out) {
            // The bits in `out` may be cleared already: keep them recorded, not lost.
            for r in out {
                state.dirty_log.insert(r);
            }
            return Err(e);
        }
        let mut set = RangeSet::default();
        for r in state.dirty_log.within(range.clone()) {
            set.insert(r);
        }
        if clear {
            state.dirty_log.remove(range.clone());
        }
        // A leaf that reaches past the range is reported whole: with `clear` its one bit was
        // cleared for all of it, so clipping would lose the rest.
        for r in out {
            set.insert(r);
        }
        Ok(set.0.into_iter().map(|(s, e)| s..e).collect())
    }

    /// The limit the latest refused run met, if any.
    pub(crate) fn last_limit(&self) -> Option<Limit> {
        *lock(&self.last_limit)
    }

    /// Register the run's memory for CPU events, unless a registration no event has touched
    /// since covers it already. Registers 2 MiB-aligned, within the run's VMAs (`vmas`, looked
    /// up by the caller, so `track_vmas` does not look them up again): registering splits a VMA
    /// at the range's ends, and a split inside a 2 MiB THP would break it into 4 KiB pages.
    /// A mapping cut into many small VMAs is registered one VMA at a time: looking up the
    /// VMAs of the whole block to register it at once measured slower on the bench machine
    /// (one PROCMAP_QUERY per VMA, about 4 us each there, costs more than the UFFDIO_REGISTER
    /// it saves).
    fn track_run(&self, range: VaRange, vmas: &[mirror::Vma]) -> Result<(), mirror::Error> {
        let covered = {
            let within = self.sub.lock().tracked.within(range.start()..range.end());
            within.len() == 1 && within[0] == (range.start()..range.end())
        };
        if covered {
            self.counters.track_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let vma_start = vmas.first().map_or(range.start(), |v| v.range.start());
        let vma_end = vmas.last().map_or(range.end(), |v| v.range.end());
        let window = VaRange::from_bounds(
            (range.start() & !(LARGE_PAGE_SIZE - 1)).max(vma_start),
            range
                .end()
                .div_ceil(LARGE_PAGE_SIZE)
                .saturating_mul(LARGE_PAGE_SIZE)
                .min(vma_end),
        )
        .unwrap_or(range);
        // An event counted after this was read may have unregistered what is registered
        // below: then the registration is not remembered.
        let events_before = self.counters.invalidations.load(Ordering::Acquire);
        self.mm.track_vmas(window, vmas)?;
        let mut state = self.sub.lock();
        if self.counters.invalidations.load(Ordering::Acquire) == events_before {
            state.tracked.insert(window.start()..window.end());
        }
        Ok(())
    }

    /// Fault in, snapshot, DMA-map. Runs without the subscriber lock.
    fn walk(&self, range: VaRange, access: Access, backing: &Backing) -> Result<Walked, WalkError> {
        if let Backing::Arena(_) = backing {
            // The device reaches the file's pages through our own mapping: the client's page
            // tables play no part, only its mapping of the file. That is checked again here,
            // inside the sequence count: an unregister or a munmap between the caller's check
            // and `read_begin` (before the range was registered for events) is seen now, one
            // after it collides and the retry sees it.
            let arena = timed(Phase::Walk, || self.resolve_arena(range))?;
            if access == Access::Write && !arena.writable() {
                return Err(WalkError::Cancel(CancelReason::Permission));
            }
            let walked = self.map_dma(range, false, access, &Backing::Arena(arena));
            if let Some(hook) = &self.options.walk_hook {
                hook(range);
            }
            return walked;
        }
        let mut attempts = 0;
        let (map_range, large) = loop {
            let found = timed(Phase::Walk, || {
                // Pages the CPU has already populated for the access need no populate call
                // (which costs about as much per page as the rest of the fault service): look
                // first, populate only if something is missing.
                if let Some(found) = self.present(range, access)? {
                    return Ok(Some(found));
                }
                self.counters.populate_calls.fetch_add(1, Ordering::Relaxed);
                self.mm.fault(range, access)?;
                self.present(range, access)
            })?;
            if let Some(found) = found {
                break found;
            }
            // Populated a moment ago, gone now (a racing MADV_DONTNEED whose event has not
            // arrived yet): populate again, a few times.
            attempts += 1;
            if attempts == 4 {
                return Err(WalkError::Cancel(CancelReason::Other));
            }
        };
        let walked = self.map_dma(map_range, large, access, backing);
        if let Some(hook) = &self.options.walk_hook {
            hook(range);
        }
        walked
    }

    /// The MAP_SHARED file VMA holding all of `range`, if one does.
    fn shared_file(&self, range: VaRange) -> Option<SharedFile> {
        match self.mm.walker().vmas(range).ok()?.as_slice() {
            [v] if v.shared
                && v.kind == mirror::VmaKind::File
                && v.range.contains_range(&range) =>
            {
                Some(SharedFile {
                    start: v.range.start(),
                    end: v.range.end(),
                    offset: v.offset,
                })
            }
            _ => None,
        }
    }

    /// The arena that holds `range`, if the mirrored process maps it there as registered.
    fn resolve_arena(&self, range: VaRange) -> Result<Arc<Arena>, WalkError> {
        let Reach::Arenas(table) = &self.options.reach else {
            return Err(WalkError::Cancel(CancelReason::Unreachable));
        };
        let vmas = self.mm.walker().vmas(range)?;
        table
            .resolve(&vmas, range.start(), range.end())
            .ok_or(WalkError::Cancel(CancelReason::Unreachable))
    }

    /// The range to map and whether it is one 2 MiB page, if every page is present with the
    /// access; `None` if some page is not.
    /// PAGEMAP_SCAN-only snapshot (a few ns/page) where the kernel supports it. It may call a
    /// copy-on-write page still shared after a fork `Write`; the pages were just populated for
    /// the access, and a write pin breaks any such sharing anyway.
    fn quick_snapshot(&self, range: VaRange) -> Result<mirror::Snapshot, mirror::Error> {
        match self.mm.snapshot_fast(range) {
            Err(mirror::Error::Unsupported { .. }) => self.mm.snapshot(range),
            other => other,
        }
    }

    fn present(
        &self,
        range: VaRange,
        access: Access,
    ) -> Result<Option<(VaRange, bool)>, WalkError> {
        // The run first: a 4 KiB page answers without a look at the other 511 pages of its
        // 2 MiB block; only a run of THP pages is worth checking its whole block for.
        let snap = self.quick_snapshot(range)?;
        // Under a small budget a 2 MiB mapping would evict too much at once (or not fit).
        let budget_allows_large = self
            .options
            .pin_budget
            .is_none_or(|b| b >= 8 * LARGE_PAGE_SIZE);
        let block = range.start() & !(LARGE_PAGE_SIZE - 1);
        let in_thp = snap.pages().iter().all(|p| p.size == CpuPageSize::Thp);
        if self.options.large_pages
            && budget_allows_large
            && in_thp
            && range.end() <= block + LARGE_PAGE_SIZE
        {
            if let Ok(block_range) = VaRange::new(block, LARGE_PAGE_SIZE) {
                if let Ok(block_snap) = self.quick_snapshot(block_range) {
                    let want = if access == Access::Write {
                        PageState::Write
                    } else {
                        PageState::Read
                    };
                    let large = block_snap.pages().iter().all(|p| {
                        p.size == CpuPageSize::Thp
                            && (p.state == want
                                || (want == PageState::Read && p.state == PageState::Write))
                    });
                    if large {
                        return Ok(Some((block_range, true)));
                    }
                }
            }
        }
        let ok = snap.pages().iter().all(|p| match access {
            Access::Write => p.state == PageState::Write,
            Access::Read => matches!(
                p.state,
                PageState::Read | PageState::Write | PageState::Zero
            ),
        });
        if !ok {
            return Ok(None);
        }
        let (map_range, large) = (range, false);
        Ok(Some((map_range, large)))
    }

    fn map_dma(
        &self,
        map_range: VaRange,
        large: bool,
        access: Access,
        backing: &Backing,
    ) -> Result<Walked, WalkError> {
        let len = map_range.len();
        self.make_room(len, map_range.start()..map_range.end())?;
        if let Some(max) = self.options.max_mapped_bytes {
            let mapped = self.counters.mapped_bytes.load(Ordering::Relaxed);
            if mapped.saturating_add(len) > max {
                return Err(WalkError::Quota(Limit::MappedBytes(max)));
            }
        }
        let align = if large { LARGE_PAGE_SIZE } else { PAGE_SIZE };
        let dma_access = if access == Access::Write {
            DmaAccess::READ_WRITE
        } else {
            DmaAccess::READ_ONLY
        };
        // Shared file memory (memfd, shmem, tmpfs) goes by fd where we can get one, so a
        // device in another process maps the pages itself instead of asking for every access.
        // The VMA is looked up again: registering the run for events (after the caller's
        // lookup) splits a VMA that straddles a 2 MiB boundary, and /proc/self/map_files names
        // VMAs by their bounds. (With the stale bounds the open failed and the memory went by
        // address instead, about one run in thirty: a flaky test found it.)
        let file = match backing {
            Backing::Process(true) => self
                .shared_file(map_range)
                .and_then(|f| f.open(access == Access::Write)),
            Backing::Process(false) | Backing::Arena(_) => None,
        };
        let (source, arena) = match (backing, &file) {
            (Backing::Arena(arena), _) => {
                let run = arena.run(map_range.start());
                let source = DmaSource::SharedFd {
                    va: run.local_va,
                    fd: run.fd,
                    offset: run.offset,
                };
                (source, Some(arena.clone()))
            }
            (_, Some((fd, base_offset, vma_start))) => {
                let source = DmaSource::SharedFd {
                    va: map_range.start(),
                    fd: fd.as_fd(),
                    offset: base_offset + (map_range.start() - vma_start),
                };
                (source, None)
            }
            (_, None) => {
                let source = DmaSource::ProcessVa {
                    va: map_range.start(),
                };
                (source, None)
            }
        };
        // SAFETY: the device reaches this memory only for commands submitted through the
        // unsafe `Context::submit` (or a daemon's SUBMIT on a client's arenas), whose contract
        // lends it to the device until the command's wait returns (and a wait that returns
        // early revokes it, fenced, first); every CPU change of the mapping tears this DMA
        // mapping down (fenced) before the hold on the pages is released (section 1 of
        // docs/semantics.md), and so does the context's release.
        let iova = timed(Phase::DmaMap, || unsafe {
            self.dma.map(
                Some(map_range.start()),
                self.needs_identity,
                len,
                align,
                source,
                dma_access,
            )
        })
        .map_err(|e| {
            tracing::warn!(error = %e, range = ?map_range, "DMA map failed");
            WalkError::Dma(e)
        })?;
        Ok(Walked {
            dma: self.dma.clone(),
            mapping: Some(UserMapping {
                va: map_range.start(),
                len,
                iova,
                writable: access == Access::Write,
                _arena: arena,
                refaults: 0,
                protected_until: None,
            }),
            large,
        })
    }

    /// Under the subscriber lock, after `read_retry` said nothing collided.
    fn install(
        &self,
        state: &mut MirrorState,
        walked: Result<Walked, WalkError>,
    ) -> Result<(), Failure> {
        let mut walked = match walked {
            Ok(w) => w,
            Err(WalkError::Mirror(e)) => return Err(cancel_reason(&e).into()),
            Err(WalkError::Cancel(r)) => return Err(r.into()),
            Err(WalkError::Dma(e)) => {
                return Err(Failure {
                    reason: CancelReason::DmaMap,
                    cause: Some(e),
                })
            }
            Err(WalkError::Quota(limit)) => {
                *lock(&self.last_limit) = Some(limit);
                return Err(Failure {
                    reason: CancelReason::Quota,
                    cause: Some(limit.error()),
                });
            }
        };
        if state.released {
            return Err(CancelReason::NoContext.into());
        }
        if let Some(m) = &walked.mapping {
            if state.is_revoked(m.va..m.va + m.len) {
                // Dropping `walked` undoes its DMA mapping.
                return Err(CancelReason::Revoked.into());
            }
        }
        let mut m = walked
            .mapping
            .take()
            .expect("a walk always carries its mapping");
        let policy = self.options.thrash_protection.zip(self.options.pin_budget);
        let longest = self.options.max_run.max(LARGE_PAGE_SIZE);
        (m.refaults, m.protected_until) =
            state.note_refault(m.va, m.len, Instant::now(), policy, longest);
        // Whatever the device had for this range (a read-only mapping being upgraded, a stale
        // record serviced twice) goes first, fenced, before the new leaves are written.
        state.tear_down(m.va..m.va + m.len);
        let installed = timed(Phase::PageTable, || {
            state
                .view
                .install(m.va, m.len, m.iova, m.writable, walked.large)
        });
        match installed {
            Ok(()) => {
                let (va, len) = (m.va, m.len);
                state.mappings.insert(va, m);
                let c = &state.counters;
                c.mapped_bytes.fetch_add(len, Ordering::Relaxed);
                c.pages_mapped.fetch_add(len / PAGE_SIZE, Ordering::Relaxed);
                if walked.large {
                    c.large_mappings.fetch_add(1, Ordering::Relaxed);
                }
                c.runs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "making the mapping visible to the device failed");
                // Part of it may be visible already: tear it down (fenced) like any mapping.
                let (va, len) = (m.va, m.len);
                state.mappings.insert(va, m);
                state
                    .counters
                    .mapped_bytes
                    .fetch_add(len, Ordering::Relaxed);
                state.tear_down(va..va + len);
                Err(Failure {
                    reason: CancelReason::Other,
                    cause: Some(e),
                })
            }
        }
    }

    /// The run `[start, end)` grown for fault-around, clipped to the VMA that holds the run:
    /// fault-around never reaches into a neighbouring VMA, nor registers one for events.
    /// Adjacent anonymous mappings with the same flags merge into one VMA, though, so the block
    /// can cover a neighbour's memory of this process (another allocation, the emulator's own
    /// buffers): memory any command could name anyway, since the device sees the whole address
    /// space; the cost is pinning it, and its owner's munmap then waits for our event reader.
    ///
    /// A run that starts where an existing mapping ends is a sequential stream: it grows to
    /// twice that mapping (up to `max_run`), so a stream converges on 2 MiB mappings and a
    /// large mirror stays far below TYPE1's 65535-mapping limit. Otherwise it grows to the
    /// enclosing aligned `fault_around` block.
    fn fault_around_window(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        let block = self.options.fault_around;
        if block <= PAGE_SIZE || !block.is_power_of_two() {
            return None;
        }
        let run = VaRange::from_bounds(start, end).ok()?;
        let vma = self
            .mm
            .walker()
            .vmas(run)
            .ok()?
            .into_iter()
            .find(|v| v.range.contains(start))?;
        if !vma.range.contains_range(&run) {
            return None;
        }
        let stream = {
            let state = self.sub.lock();
            state
                .mappings
                .range(..start)
                .next_back()
                .filter(|(_, m)| m.va + m.len == start)
                .map(|(_, m)| m.len)
        };
        let (grown_start, grown_end) = match stream {
            Some(previous) => {
                // Under a pin budget a stream grows to an eighth of it at most, so eviction
                // works on pieces small against the budget.
                let longest = self
                    .options
                    .pin_budget
                    .map_or(self.options.max_run, |b| self.options.max_run.min(b / 8));
                let want = previous.saturating_mul(2).clamp(block, longest.max(block));
                (start, start.saturating_add(want).max(end))
            }
            None => (
                start & !(block - 1),
                end.div_ceil(block).saturating_mul(block),
            ),
        };
        let grown_start = grown_start.max(vma.range.start());
        let grown_end = grown_end.min(vma.range.end());
        (grown_start < start || grown_end > end).then_some((grown_start, grown_end))
    }

    /// Make `[start, end)` accessible to the device now (prefault), as if it had faulted.
    pub fn prefault(&self, start: u64, end: u64, write: bool) -> Result<(), Error> {
        let _serial = lock(&self.service_lock);
        self.service_rounds.fetch_add(1, Ordering::Relaxed);
        self.prefault_serialized(start, end, write)
    }

    fn prefault_serialized(&self, start: u64, end: u64, write: bool) -> Result<(), Error> {
        let mut at = start & !(PAGE_SIZE - 1);
        while at < end {
            let run_end = (at + self.options.max_run).min(end.div_ceil(PAGE_SIZE) * PAGE_SIZE);
            self.service_run(at, run_end, write)?;
            at = run_end;
        }
        Ok(())
    }

    /// Map `[addr, addr + len)` for a device that has no page faults, on submit: the device
    /// reaches it at IOVA == VA until the CPU mapping changes. Returns that IOVA.
    ///
    /// Pages already mapped with the access stay mapped (two buffers may share a page, and a
    /// transfer on one must not unmap the other); a read-only mapping under a write request is
    /// replaced (fenced first); the gaps are mapped. A refused DMA map returns the backend's
    /// error (e.g. the RLIMIT_MEMLOCK one).
    pub fn map_for_device(&self, addr: u64, len: u64, write: bool) -> Result<u64, Error> {
        if len == 0 {
            return Err(Error::InvalidArgument("map_for_device: empty range"));
        }
        let end = addr
            .checked_add(len)
            .ok_or(Error::InvalidArgument("map_for_device: range wraps"))?;
        let (start, end) = (addr & !(PAGE_SIZE - 1), end.div_ceil(PAGE_SIZE) * PAGE_SIZE);
        let _serial = lock(&self.service_lock);
        let gaps = {
            let mut state = self.sub.lock();
            if write {
                for m in state.overlapping(start..end) {
                    if !m.writable {
                        state.tear_down(m.va..m.va + m.len);
                    }
                }
            }
            state.gaps(start..end)
        };
        for gap in gaps {
            self.prefault_serialized(gap.start, gap.end, write)?;
        }
        Ok(addr)
    }

    /// Returns once no fault servicing of this context is under way. After [`Self::shut_down`],
    /// servicing that starts later does nothing (it finds the context released first).
    pub fn wait_for_service(&self) {
        drop(lock(&self.service_lock));
    }

    /// Take `ranges` away from the device for as long as work item `work_id` may run: under
    /// the subscriber lock, mark them revoked (no fault, prefault or walk in progress can map
    /// them again: the install refuses, [`CancelReason::Revoked`]), then tear their device
    /// entries down and fence. When this returns true, no access of the device to those pages
    /// can happen until [`Self::lift_revoked`]: translations dropped and fenced, DMA unmapped,
    /// and the item, when it next touches them, faults and is cancelled. False if a DMA unmap
    /// failed: the device may still reach them.
    pub fn revoke(&self, work_id: u32, ranges: &[Range<u64>]) -> bool {
        let mut state = self.sub.lock();
        let mut unreachable = true;
        for range in ranges {
            let pages = range.start & !(PAGE_SIZE - 1)..range.end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            state.revoked.push((work_id, pages.clone()));
            self.revoked.fetch_add(1, Ordering::AcqRel);
            unreachable &= state.tear_down(pages);
        }
        unreachable
    }

    /// Work item `work_id` has completed: its revoked ranges may be mapped again.
    pub fn lift_revoked(&self, work_id: u32) {
        let mut state = self.sub.lock();
        let before = state.revoked.len();
        state.revoked.retain(|(id, _)| *id != work_id);
        self.revoked
            .fetch_sub((before - state.revoked.len()) as u64, Ordering::AcqRel);
    }

    /// Page ranges currently revoked (see [`Self::revoke`]).
    pub fn revoked_ranges(&self) -> usize {
        self.sub.lock().revoked.len()
    }

    /// Quiesce and tear down: every mapping unmapped after the device's view is fenced, then
    /// the view itself released. Faults fail afterwards. False if the device did not confirm a
    /// fence: the device address space must then never be reused.
    pub fn shut_down(&self) -> bool {
        let mut state = self.sub.lock();
        let fences_before = self.counters.fence_failures.load(Ordering::Relaxed);
        state.tear_down(0..u64::MAX);
        if self.dma.backend().lost().is_some() {
            // Nothing to stop or fence on a device that is gone: the view's page-table pages
            // go back with the device's memory when it is dropped. Not confirmed, and it
            // never needs to be: the address space can never be used again.
            state.released = true;
            return false;
        }
        let confirmed = state.view.shut_down();
        state.released = true;
        confirmed && self.counters.fence_failures.load(Ordering::Relaxed) == fences_before
    }
}

impl FaultHandler for ContextCore {
    fn service(&self, faults: &[PageFault]) -> Vec<Result<(), CancelReason>> {
        let _serial = lock(&self.service_lock);
        self.service_rounds.fetch_add(1, Ordering::Relaxed);
        if self.sub.lock().released {
            // Torn down while this batch waited for the lock: map nothing (no DMA mapping may
            // outlive the tear-down, not even for the moment an install takes to fail).
            return vec![Err(CancelReason::NoContext); faults.len()];
        }
        self.counters
            .faults
            .fetch_add(faults.len() as u64, Ordering::Relaxed);
        self.counters.fault_batches.fetch_add(1, Ordering::Relaxed);
        let mut out = vec![Ok(()); faults.len()];
        // Pages the device can already reach with the access: a stale record (its item was
        // replayed and re-faulted, or an earlier batch mapped the page). The replay finds them
        // mapped; servicing them again would tear the mapping down, fence and map it anew.
        let todo: Vec<(usize, PageFault)> = {
            let state = self.sub.lock();
            faults
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, f)| !state.reaches(f.page, f.access.needs_write()))
                .collect()
        };
        let mut i = 0;
        while i < todo.len() {
            // A run: consecutive pages, optionally grown to the fault-around block.
            let mut j = i + 1;
            let mut write = todo[i].1.access.needs_write();
            let start = todo[i].1.page;
            let mut end = start + PAGE_SIZE;
            while j < todo.len() && todo[j].1.page == end && end - start < self.options.max_run {
                write |= todo[j].1.access.needs_write();
                end += PAGE_SIZE;
                j += 1;
            }
            if let Some((grown_start, grown_end)) = self.fault_around_window(start, end) {
                // Fault-around is best effort: if the grown run fails, fall back to the faults.
                if self.service_run(grown_start, grown_end, write).is_ok() {
                    // Later faults inside the grown run are satisfied already.
                    while j < todo.len() && todo[j].1.page < grown_end {
                        j += 1;
                    }
                    i = j;
                    continue;
                }
            }
            let run = self.service_run(start, end, write).map_err(|f| f.reason);
            if run.is_err() && j - i > 1 {
                // Find exactly which pages fail (a run may straddle a VMA boundary).
                for &(k, f) in &todo[i..j] {
                    out[k] = self
                        .service_run(f.page, f.page + PAGE_SIZE, f.access.needs_write())
                        .map_err(|f| f.reason);
                }
            } else {
                for &(k, _) in &todo[i..j] {
                    out[k] = run;
                }
            }
            i = j;
        }
        // Hints (lookahead pages, records a replay has overtaken) that fail cancel nothing and
        // are no failure of the context: only pages a work item is stalled on count.
        let failures = out
            .iter()
            .zip(faults)
            .filter(|(o, f)| o.is_err() && !f.hint)
            .count() as u64;
        self.counters
            .failures
            .fetch_add(failures, Ordering::Relaxed);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;
    use proptest::prelude::*;

    /// Operations on a RangeSet over 64 slots of 16 bytes, mirrored on a bitmap.
    #[derive(Debug, Clone)]
    enum SetOp {
        Insert(u64, u64),
        Remove(u64, u64),
    }

    fn op() -> impl Strategy<Value = SetOp> {
        (any::<bool>(), 0u64..64, 0u64..64).prop_map(|(insert, a, b)| {
            let (lo, hi) = (a.min(b) * 16, a.max(b) * 16);
            if insert {
                SetOp::Insert(lo, hi)
            } else {
                SetOp::Remove(lo, hi)
            }
        })
    }

    proptest! {
        /// The set holds exactly the bytes the model holds, as disjoint, non-adjacent ranges,
        /// and `within` answers every query like the model.
        #[test]
        fn range_set_matches_a_bitmap(ops in proptest::collection::vec(op(), 0..40),
                                      q in (0u64..64, 0u64..64)) {
            let mut set = RangeSet::default();
            let mut model = [false; 64];
            for o in &ops {
                match *o {
                    SetOp::Insert(lo, hi) => {
                        set.insert(lo..hi);
                        model[(lo / 16) as usize..(hi / 16) as usize].fill(true);
                    }
                    SetOp::Remove(lo, hi) => {
                        set.remove(lo..hi);
                        model[(lo / 16) as usize..(hi / 16) as usize].fill(false);
                    }
                }
            }
            let ranges: Vec<(u64, u64)> = set.0.iter().map(|(s, e)| (*s, *e)).collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "disjoint and not adjacent: {ranges:?}");
            }
            for (i, &bit) in model.iter().enumerate() {
                let at = i as u64 * 16;
                let held = ranges.iter().any(|&(s, e)| s <= at && at < e);
                prop_assert_eq!(held, bit, "slot {} in {:?}", i, ranges);
            }
            let (lo, hi) = (q.0.min(q.1) * 16, q.0.max(q.1) * 16);
            let got: u64 = set.within(lo..hi).iter().map(|r| r.end - r.start).sum();
            let want = model[(lo / 16) as usize..(hi / 16) as usize].iter().filter(|b| **b).count() as u64 * 16;
            prop_assert_eq!(got, want);
            prop_assert!(set.within(lo..lo).is_empty());
        }
    }
}
