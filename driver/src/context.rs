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
use std::time::Duration;

use accel_abi::{LARGE_PAGE_SIZE, PAGE_SIZE};
use mirror::{
    Access, AddressSpace, EventKind, Invalidation, PageSize as CpuPageSize, PageState,
    Subscription, VaRange,
};

use crate::arena::{Arena, ArenaTable};
use crate::backend::{DmaAccess, DmaSource};
use crate::dma::DmaSpace;
use crate::fault::{CancelReason, FaultHandler, PageFault};
use crate::pagetable::Translation;
use crate::view::DeviceView;
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
        let victims = self.overlapping(range.clone());
        if let Some(lost) = self.dma.backend().lost() {
            self.forget(victims, &lost);
            return true;
        }
        let mut span = range.clone();
        for m in &victims {
            span.start = span.start.min(m.va);
            span.end = span.end.max(m.va + m.len);
        }
        let mut fenced = true;
        if let Some(cached) = self.view.remove(span.clone()) {
            let fence_span = cached.start.min(span.start)..cached.end.max(span.end);
            self.counters.tlb_fences.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.view.fence(fence_span) {
                // Unmapping anyway is the safe side: the IOMMU then blocks whatever the device
                // still caches, instead of letting it reach memory that is about to be reused.
                // The IOVAs stay reserved, or a later mapping there would be reachable again.
                self.counters.fence_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, asid = self.label, "device fence failed; unmapping DMA anyway, IOVAs kept out of use");
                fenced = false;
            }
        }
        let mut unreachable = true;
        for m in &victims {
            self.mappings.remove(&m.va);
            let unmapped = if fenced {
                self.dma.unmap(m.iova, m.len)
            } else {
                self.dma.unmap_keep_iova(m.iova, m.len)
            };
            if let Err(e) = unmapped {
                tracing::error!(error = %e, iova = m.iova, len = m.len, "DMA unmap failed");
                unreachable = false;
            }
            self.counters
                .mapped_bytes
                .fetch_sub(m.len, Ordering::Relaxed);
        }
        unreachable
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
                self.tear_down(inv.range.start()..inv.range.end());
            }
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
    /// The context's mapped-bytes quota (its value) would be exceeded.
    Quota(u64),
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
        };
        let sub = mm
            .subscribe(
                VaRange::whole(),
                state,
                |state: &mut MirrorState, inv: &Invalidation| state.on_invalidate(inv),
            )
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
        let vmas = self
            .mm
            .walker()
            .vmas(range)
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
        // Register 2 MiB-aligned (within the VMAs): registering splits the VMA at the range's
        // ends, and a split inside a 2 MiB THP would break it into 4 KiB pages.
        let vma_start = vmas.first().map_or(start, |v| v.range.start());
        let vma_end = vmas.last().map_or(end, |v| v.range.end());
        let track = VaRange::from_bounds(
            (start & !(LARGE_PAGE_SIZE - 1)).max(vma_start),
            end.div_ceil(LARGE_PAGE_SIZE)
                .saturating_mul(LARGE_PAGE_SIZE)
                .min(vma_end),
        )
        .unwrap_or(range);
        match self.mm.track(track) {
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
                    tracing::warn!(error = %e, ?track, asid = self.asid, "mapping memory that cannot be registered for CPU events: its munmap/madvise/mremap will not reach the device; use the strict wrappers or invalidate() there (logged once per context; ContextStats::untracked_runs counts them)");
                } else {
                    tracing::debug!(error = %e, ?track, "could not register the range for CPU events");
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

    /// Fault in, snapshot, DMA-map. Runs without the subscriber lock.
    fn walk(&self, range: VaRange, access: Access, backing: &Backing) -> Result<Walked, WalkError> {
        if let Backing::Arena(_) = backing {
            // The device reaches the file's pages through our own mapping: the client's page
            // tables play no part, only its mapping of the file. That is checked again here,
            // inside the sequence count: an unregister or a munmap between the caller's check
            // and `read_begin` (before the range was registered for events) is seen now, one
            // after it collides and the retry sees it.
            let arena = self.resolve_arena(range)?;
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
            self.mm.fault(range, access)?;
            if let Some(found) = self.present(range, access)? {
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
        let mut map_range = range;
        let mut large = false;
        if self.options.large_pages {
            let block = range.start() & !(LARGE_PAGE_SIZE - 1);
            if range.end() <= block + LARGE_PAGE_SIZE {
                if let Ok(block_range) = VaRange::new(block, LARGE_PAGE_SIZE) {
                    if let Ok(snap) = self.quick_snapshot(block_range) {
                        let want = if access == Access::Write {
                            PageState::Write
                        } else {
                            PageState::Read
                        };
                        large = snap.pages().iter().all(|p| {
                            p.size == CpuPageSize::Thp
                                && (p.state == want
                                    || (want == PageState::Read && p.state == PageState::Write))
                        });
                        if large {
                            map_range = block_range;
                        }
                    }
                }
            }
        }
        if !large {
            let snap = self.quick_snapshot(range)?;
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
        }
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
        if let Some(max) = self.options.max_mapped_bytes {
            let mapped = self.counters.mapped_bytes.load(Ordering::Relaxed);
            if mapped.saturating_add(len) > max {
                return Err(WalkError::Quota(max));
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
        let iova = unsafe {
            self.dma.map(
                Some(map_range.start()),
                self.needs_identity,
                len,
                align,
                source,
                dma_access,
            )
        }
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
                return Err(Failure {
                    reason: CancelReason::Quota,
                    cause: Some(Error::QuotaExceeded {
                        quota: "mapped (pinned) bytes per context",
                        limit,
                    }),
                })
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
        let m = walked
            .mapping
            .take()
            .expect("a walk always carries its mapping");
        // Whatever the device had for this range (a read-only mapping being upgraded, a stale
        // record serviced twice) goes first, fenced, before the new leaves are written.
        state.tear_down(m.va..m.va + m.len);
        match state
            .view
            .install(m.va, m.len, m.iova, m.writable, walked.large)
        {
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
                let want = previous
                    .saturating_mul(2)
                    .clamp(block, self.options.max_run.max(block));
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
