//! Device views: how a context's DMA-mapped ranges become visible to its device.
//!
//! A view is one of the three parts of a [`crate::runtime::Personality`] (with the bring-up and
//! the fault source): the mirror, the DMA mapper and the invalidation ordering are shared; what
//! a device makes of a DMA-mapped range is this:
//! - [`MxaView`]: a device with its own page table and TLB (MXA-1): install writes PTEs, removal
//!   clears them (and unlinks table pages left empty), the fence is a TLB invalidation:
//!   leaf-only when only leaves changed, walk-inclusive when table pages wait to be reused;
//!   with ACCESSED/DIRTY enabled it also ages and tracks written pages;
//! - [`IommuView`]: a device without page faults or page tables (QEMU's edu): it addresses memory
//!   by IOVA, so mirrored ranges are mapped at IOVA == VA on submit, and the IOMMU unmap that
//!   follows every removal is the fence.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use accel_abi::pt::Perms;
use accel_abi::PAGE_SIZE;

use crate::device::{Device, TlbiTicket};
use crate::pagetable::{
    hull, push_coalesced, LeafScan, PageSize, PageTable, PendingTables, TableMemory, TablePool,
    Translation,
};
use crate::Error;
use sys_util::sync::lock;

/// A device's view of one mirrored address space.
pub trait DeviceView: Send {
    /// Make `[va, va + len)` reachable through the DMA mapping at `iova` (read-only unless
    /// `writable`); `large` asks for one 2 MiB page.
    fn install(
        &mut self,
        va: u64,
        len: u64,
        iova: u64,
        writable: bool,
        large: bool,
    ) -> Result<(), Error>;

    /// Drop every translation touching `range`. Returns the span the device may still cache
    /// (to fence), or `None` if it caches nothing.
    fn remove(&mut self, range: Range<u64>) -> Option<Range<u64>>;

    /// Return once the device uses no translation removed from `span`.
    fn fence(&mut self, span: Range<u64>) -> Result<(), Error>;

    /// Start the fence of `span` without waiting for it (the first pass of a two-pass
    /// invalidation); [`DeviceView::fence_finish`] waits. Views that cannot split it fence
    /// here and finish at once.
    fn fence_start(&mut self, span: Range<u64>) -> Result<StartedFence, Error> {
        self.fence(span)?;
        Ok(StartedFence::done())
    }

    /// Wait for a fence [`DeviceView::fence_start`] started: when this returns, the device uses
    /// no translation removed from its span.
    fn fence_finish(&mut self, started: StartedFence) -> Result<(), Error> {
        let _ = started;
        Ok(())
    }

    /// The device's current translation of `va`.
    fn lookup(&self, va: u64) -> Option<Translation>;

    /// True if the device addresses memory by IOVA itself, so ranges must map at IOVA == VA.
    fn needs_identity(&self) -> bool;

    /// (4 KiB leaves, 2 MiB leaves, table pages).
    fn footprint(&self) -> (u64, u64, usize);

    /// The address space is going away: stop the device walking it, fence, free resources.
    /// False if the device did not confirm (the root could not be cleared or the fence failed):
    /// the address space must then never be handed to anybody else.
    fn shut_down(&mut self) -> bool;

    /// Whether the device records use in its translations (ACCESSED/DIRTY bits, enabled).
    fn aging_supported(&self) -> bool;

    /// Push into `young` the page-aligned VA ranges of the leaves mapping any byte of `range`
    /// that have ACCESSED (coalesced, ascending; a 2 MiB leaf partly inside `range` gives its
    /// whole 2 MiB, since its one bit covers all of it). With `clear`, clear ACCESSED there
    /// and invalidate those translations (one leaf-only TLB invalidation over the span of the
    /// cleared leaves, waited for), so the next use sets it again.
    /// `Err(Error::Unsupported(..))` naming why when `!aging_supported()`.
    fn age(
        &mut self,
        range: Range<u64>,
        clear: bool,
        young: &mut Vec<Range<u64>>,
    ) -> Result<AgeScan, Error>;

    /// The same for DIRTY (written since last cleared); with `clear`, clear DIRTY and fence
    /// leaf-only (a translation cached with DIRTY would let writes go unrecorded). If that
    /// fence fails, `out` is filled all the same and DIRTY is cleared there: keep those ranges
    /// dirty, since later writes through a cached translation may go unrecorded.
    fn dirty(
        &mut self,
        range: Range<u64>,
        clear: bool,
        out: &mut Vec<Range<u64>>,
    ) -> Result<(), Error>;

    /// DIRTY ranges of leaves that `remove` (or a replacing `install`, or `shut_down`) cleared
    /// since the last call, so a tear-down or an eviction does not lose what the device wrote.
    /// Ascending and coalesced within one removal; removals in the order they happened.
    fn drain_removed_dirty(&mut self, out: &mut Vec<Range<u64>>);

    /// Table-page accounting of this view.
    fn table_stats(&self) -> TableStats;
}

/// A fence [`DeviceView::fence_start`] started and [`DeviceView::fence_finish`] waits for.
#[derive(Debug)]
#[must_use = "a started fence must be finished before the memory it covers is reused"]
pub struct StartedFence {
    ticket: TlbiTicket,
    /// Table pages the invalidation covers: back to the pool once it is fenced.
    tables: Option<PendingTables>,
    span: Range<u64>,
}

impl StartedFence {
    /// A fence that is already complete.
    pub fn done() -> StartedFence {
        StartedFence {
            ticket: TlbiTicket::Done,
            tables: None,
            span: 0..0,
        }
    }
}

/// What [`DeviceView::age`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgeScan {
    /// Leaves looked at (those mapping any byte of the range).
    pub leaves: u64,
    /// Of those, leaves with ACCESSED.
    pub young: u64,
    /// Leaves whose ACCESSED was cleared (with `clear`).
    pub cleared: u64,
}

/// Table-page accounting of a view ([`DeviceView::table_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Table pages in the view's page table, root included.
    pub in_use: usize,
    /// Table pages freed (emptied, fenced walk-inclusive, returned to the pool) since the view
    /// was made.
    pub freed: u64,
    /// Emptied table pages waiting for a walk-inclusive fence before they go back to the pool.
    pub pending: usize,
    /// Emptied table pages kept out of use for good because the fence that would have made
    /// them safe failed (the device may still walk them).
    pub kept_out: usize,
}

/// An MXA-1 address space: its page table, root register and TLB.
pub struct MxaView {
    device: Arc<Device>,
    asid: u16,
    pt: Option<PageTable>,
    fence_timeout: Duration,
    /// DIRTY ranges of cleared leaves, until [`DeviceView::drain_removed_dirty`].
    removed_dirty: Vec<Range<u64>>,
    /// Table pages returned to the pool (kept here too: the page table goes at shut-down).
    freed: u64,
    kept_out: usize,
}

impl MxaView {
    /// Create the page table of `asid` and point the device's root register at it.
    pub fn new(device: Arc<Device>, asid: u16, fence_timeout: Duration) -> Result<MxaView, Error> {
        let pt = {
            let mut tables = lock(&device.tables);
            PageTable::new(&mut TableMemory {
                pool: &mut tables,
                dma: device.dma(),
            })?
        };
        if let Err(e) = device.set_asid_root(asid, Some(pt.root_iova())) {
            // The device never saw this table: its pages go straight back to the pool.
            pt.destroy(&mut lock(&device.tables));
            return Err(e);
        }
        Ok(MxaView {
            device,
            asid,
            pt: Some(pt),
            fence_timeout,
            removed_dirty: Vec::new(),
            freed: 0,
            kept_out: 0,
        })
    }

    /// A walk-inclusive fence covering `tables` failed: the device may still walk them, so they
    /// never go back to the pool.
    fn keep_out(&mut self, tables: Option<PendingTables>, e: &Error, span: &Range<u64>) {
        let Some(tables) = tables else { return };
        self.kept_out += tables.count();
        tracing::error!(
            error = %e,
            asid = self.asid,
            pages = tables.count(),
            ?span,
            "walk-inclusive TLB fence failed; keeping the freed page-table pages out of use"
        );
    }

    fn note_dirty(&mut self, dirty: Vec<Range<u64>>) {
        for r in dirty {
            push_coalesced(&mut self.removed_dirty, r);
        }
    }

    /// Invalidate `span` grown over the pending table pages, walk-inclusive, and give those
    /// pages back to the pool; if the invalidation fails, keep them out of use for good.
    fn fence_pending(&mut self, span: Option<Range<u64>>) -> Result<(), Error> {
        let pending = self.pt.as_ref().and_then(PageTable::pending_span);
        let Some(span) = span.or(pending) else {
            return Ok(());
        };
        // The two passes back to back: one path for every fence of this view.
        let started = self.fence_start(span)?;
        self.fence_finish(started)
    }

    fn aging_unsupported(&self) -> Error {
        let caps = self.device.caps();
        Error::Unsupported(if !caps.accessed_dirty {
            "the device does not maintain ACCESSED/DIRTY bits (CAP_FEATURES lacks \
             ACCESSED_DIRTY: a revision-1 device)"
                .to_owned()
        } else {
            "ACCESSED/DIRTY tracking is off (DeviceOptions::accessed_dirty = false at bring-up)"
                .to_owned()
        })
    }

    /// An ACCESSED or DIRTY scan of the leaves (`scan`), then one leaf-only invalidation over
    /// the leaves it cleared, so the device sets the bits again on their next use.
    fn scan_leaves(
        &mut self,
        scan: impl FnOnce(&PageTable, &TablePool) -> LeafScan,
    ) -> Result<LeafScan, Error> {
        if !self.aging_supported() {
            return Err(self.aging_unsupported());
        }
        let pt = self
            .pt
            .as_ref()
            .ok_or(Error::InvalidArgument("address space shut down"))?;
        let result = scan(pt, &lock(&self.device.tables));
        if let Some(span) = result.cleared_span.clone() {
            self.device
                .tlb_invalidate_leaves(self.asid, Some(span), self.fence_timeout)?;
        }
        Ok(result)
    }
}

impl DeviceView for MxaView {
    fn install(
        &mut self,
        va: u64,
        len: u64,
        iova: u64,
        writable: bool,
        large: bool,
    ) -> Result<(), Error> {
        let perms = if writable { Perms::RW } else { Perms::R };
        let pt = self
            .pt
            .as_mut()
            .ok_or(Error::InvalidArgument("address space shut down"))?;
        let mut tables = lock(&self.device.tables);
        let mut mem = TableMemory {
            pool: &mut tables,
            dma: self.device.dma(),
        };
        let mut dirty = Vec::new();
        let mut unlinked_tables = 0;
        let mut result = Ok(());
        if large {
            match pt.map(&mut mem, va, PageSize::Large, iova, perms) {
                Ok(c) => {
                    dirty = c.dirty;
                    unlinked_tables = c.tables;
                }
                Err(e) => result = Err(e),
            }
        } else {
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                match pt.map(&mut mem, va + off, PageSize::Small, iova + off, perms) {
                    Ok(c) => dirty.extend(c.dirty),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        drop(tables);
        self.note_dirty(dirty);
        result?;
        // The large leaf replaced a level-2 entry that pointed at a table. A device with a walk
        // cache may keep walking through the old table (empty: it would fault on this VA
        // until the entry is dropped): drop it now. Elsewhere the next fence reclaims it.
        if unlinked_tables > 0 && self.device.caps().walk_cache {
            self.fence_pending(None)?;
        }
        Ok(())
    }

    fn remove(&mut self, range: Range<u64>) -> Option<Range<u64>> {
        let pt = self.pt.as_mut()?;
        let cleared = pt.unmap(&mut lock(&self.device.tables), range);
        // Pending table pages (from this call or an earlier one) need a fence too.
        let span = match pt.pending_span() {
            Some(pending) => Some(hull(cleared.span, pending)),
            None => cleared.span,
        };
        self.note_dirty(cleared.dirty);
        span
    }

    /// Leaf-only unless table pages are pending: then walk-inclusive over `span` grown to
    /// cover them, and they return to the pool (or, if it fails, stay out of use for good).
    fn fence(&mut self, span: Range<u64>) -> Result<(), Error> {
        self.fence_pending(Some(span))
    }

    /// Leaf-only unless table pages are pending, as [`DeviceView::fence`]; the pending pages
    /// are taken along and return to the pool when the fence is finished.
    fn fence_start(&mut self, span: Range<u64>) -> Result<StartedFence, Error> {
        let tables = self.pt.as_mut().and_then(PageTable::take_pending);
        let (span, leaf_only) = match &tables {
            Some(t) => (hull(Some(span), t.span()), false),
            None => (span, true),
        };
        let started = self.device.tlb_invalidate_start(
            self.asid,
            Some(span.clone()),
            leaf_only,
            self.fence_timeout,
        );
        match started {
            Ok(ticket) => Ok(StartedFence {
                ticket,
                tables,
                span,
            }),
            Err(e) => {
                self.keep_out(tables, &e, &span);
                Err(e)
            }
        }
    }

    fn fence_finish(&mut self, started: StartedFence) -> Result<(), Error> {
        let StartedFence {
            ticket,
            tables,
            span,
        } = started;
        match self.device.tlb_invalidate_wait(ticket, self.fence_timeout) {
            Ok(()) => {
                if let (Some(tables), Some(pt)) = (tables, self.pt.as_mut()) {
                    self.freed += pt.reclaim(&mut lock(&self.device.tables), tables) as u64;
                }
                Ok(())
            }
            Err(e) => {
                self.keep_out(tables, &e, &span);
                Err(e)
            }
        }
    }

    fn lookup(&self, va: u64) -> Option<Translation> {
        let tables = lock(&self.device.tables);
        self.pt.as_ref()?.translate(&tables, va)
    }

    fn needs_identity(&self) -> bool {
        false
    }

    fn footprint(&self) -> (u64, u64, usize) {
        self.pt.as_ref().map_or((0, 0, 0), |pt| {
            let (small, large) = pt.leaf_counts();
            (small, large, pt.table_pages())
        })
    }

    fn shut_down(&mut self) -> bool {
        let mut confirmed = true;
        if let Err(e) = self.device.set_asid_root(self.asid, None) {
            tracing::error!(error = %e, asid = self.asid, "clearing the ASID root failed");
            confirmed = false;
        }
        if let Err(e) = self
            .device
            .tlb_invalidate(self.asid, None, self.fence_timeout)
        {
            tracing::error!(error = %e, asid = self.asid, "final TLB fence failed");
            confirmed = false;
        }
        if let Some(pt) = self.pt.take() {
            let mut tables = lock(&self.device.tables);
            // What the device wrote through leaves nobody removed is not lost either.
            let mut dirty = Vec::new();
            if self.device.accessed_dirty() {
                pt.scan_dirty(&tables, 0..u64::MAX, false, &mut dirty);
            }
            if confirmed {
                self.freed += pt.pending_pages() as u64;
                pt.destroy(&mut tables);
                drop(tables);
            } else {
                drop(tables);
                // The device may still walk these pages: they never go back to the pool.
                self.kept_out += pt.pending_pages();
                tracing::error!(asid = self.asid, "keeping the page-table pages out of use");
            }
            self.note_dirty(dirty);
        }
        confirmed
    }

    fn aging_supported(&self) -> bool {
        self.device.accessed_dirty()
    }

    fn age(
        &mut self,
        range: Range<u64>,
        clear: bool,
        young: &mut Vec<Range<u64>>,
    ) -> Result<AgeScan, Error> {
        let scan = self.scan_leaves(|pt, pool| pt.scan_accessed(pool, range, clear, young))?;
        Ok(AgeScan {
            leaves: scan.leaves,
            young: scan.marked,
            cleared: scan.cleared,
        })
    }

    fn dirty(
        &mut self,
        range: Range<u64>,
        clear: bool,
        out: &mut Vec<Range<u64>>,
    ) -> Result<(), Error> {
        self.scan_leaves(|pt, pool| pt.scan_dirty(pool, range, clear, out))?;
        Ok(())
    }

    fn drain_removed_dirty(&mut self, out: &mut Vec<Range<u64>>) {
        out.append(&mut self.removed_dirty);
    }

    fn table_stats(&self) -> TableStats {
        TableStats {
            in_use: self.pt.as_ref().map_or(0, PageTable::table_pages),
            freed: self.freed,
            pending: self.pt.as_ref().map_or(0, PageTable::pending_pages),
            kept_out: self.kept_out,
        }
    }
}

impl Drop for MxaView {
    /// A view dropped without [`DeviceView::shut_down`] (its context failed to come up, e.g.
    /// the client died before the context subscribed to its mirror) still owns its table pages
    /// and the device's root register: shut down now, or the pages never return to the pool.
    fn drop(&mut self) {
        if self.pt.is_some() {
            self.shut_down();
        }
    }
}

/// A device that addresses memory by IOVA through the IOMMU alone (no page faults, no page
/// table of its own). Ranges are mapped on submit at IOVA == VA, so the device is handed plain
/// CPU pointers; the view only remembers what is installed.
#[derive(Debug, Default)]
pub struct IommuView {
    installed: BTreeMap<u64, (u64, bool)>,
}

impl IommuView {
    /// An empty view.
    pub fn new() -> IommuView {
        IommuView::default()
    }
}

impl DeviceView for IommuView {
    fn install(
        &mut self,
        va: u64,
        len: u64,
        iova: u64,
        writable: bool,
        _large: bool,
    ) -> Result<(), Error> {
        if iova != va {
            return Err(Error::IdentityUnavailable { va, len });
        }
        self.installed.insert(va, (len, writable));
        Ok(())
    }

    fn remove(&mut self, range: Range<u64>) -> Option<Range<u64>> {
        let doomed: Vec<u64> = self
            .installed
            .range(..range.end)
            .filter(|(va, (len, _))| **va + *len > range.start)
            .map(|(va, _)| *va)
            .collect();
        for va in doomed {
            self.installed.remove(&va);
        }
        // Nothing is cached on the device: the IOMMU unmap that follows is the fence.
        None
    }

    fn fence(&mut self, _span: Range<u64>) -> Result<(), Error> {
        Ok(())
    }

    fn lookup(&self, va: u64) -> Option<Translation> {
        let (start, (len, writable)) = self.installed.range(..=va).next_back()?;
        (va < start + len).then_some(Translation {
            iova: va,
            perms: if *writable { Perms::RW } else { Perms::R },
            size: PageSize::Small,
        })
    }

    fn needs_identity(&self) -> bool {
        true
    }

    fn footprint(&self) -> (u64, u64, usize) {
        let pages = self
            .installed
            .values()
            .map(|(len, _)| len / PAGE_SIZE)
            .sum();
        (pages, 0, 0)
    }

    fn shut_down(&mut self) -> bool {
        self.installed.clear();
        true
    }

    fn aging_supported(&self) -> bool {
        false
    }

    fn age(
        &mut self,
        _range: Range<u64>,
        _clear: bool,
        _young: &mut Vec<Range<u64>>,
    ) -> Result<AgeScan, Error> {
        Err(Error::Unsupported(IOMMU_ONLY_AGING.to_owned()))
    }

    fn dirty(
        &mut self,
        _range: Range<u64>,
        _clear: bool,
        _out: &mut Vec<Range<u64>>,
    ) -> Result<(), Error> {
        Err(Error::Unsupported(IOMMU_ONLY_AGING.to_owned()))
    }

    fn drain_removed_dirty(&mut self, _out: &mut Vec<Range<u64>>) {}

    fn table_stats(&self) -> TableStats {
        TableStats::default()
    }
}

/// Why an [`IommuView`] cannot age or track dirty pages.
const IOMMU_ONLY_AGING: &str = "the device has no page table of its own (it reaches memory \
     through the IOMMU alone), so nothing records which pages it used or wrote";

#[cfg(all(test, feature = "emulator"))]
mod tests {
    use super::*;
    use crate::device::testing::{Interposed, Knobs};
    use crate::device::DeviceOptions;
    use crate::runtime::{DeviceSpec, Runtime, RuntimeOptions};
    use accel_abi::pt;
    use accel_abi::regs::features::{ACCESSED_DIRTY, WALK_CACHE};
    use accel_abi::LARGE_PAGE_SIZE;
    use std::sync::Mutex;

    fn pages_in_use(device: &Device) -> usize {
        lock(&device.tables).in_use()
    }

    /// A device reporting `features` (see [`Interposed`]) and a view of ASID 5 on it.
    fn view_on(
        features: Option<u32>,
        fence_timeout: Duration,
    ) -> (Arc<Device>, MxaView, Arc<Mutex<Knobs>>) {
        let (backend, knobs) = Interposed::backend(features);
        let device =
            Arc::new(Device::bring_up(backend, DeviceOptions::default()).expect("bring-up"));
        let view = MxaView::new(device.clone(), 5, fence_timeout).expect("view");
        (device, view, knobs)
    }

    const SECOND: Duration = Duration::from_secs(5);
    /// A VA in a region no other mapping of a test touches.
    const VA: u64 = 0x7f00_0020_3000;

    fn simulate(view: &MxaView, va: u64, bits: u64) {
        let pt = view.pt.as_ref().unwrap();
        assert!(pt.simulate_device_bits(&lock(&view.device.tables), va, bits));
    }

    #[test]
    fn a_view_dropped_without_shut_down_returns_its_table_pages() {
        let runtime =
            Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).expect("emulator");
        let device = runtime.device().clone();
        let before = pages_in_use(&device);
        let asid = 7;
        let mut view = MxaView::new(device.clone(), asid, Duration::from_secs(5)).expect("view");
        view.install(0x4000_0000, PAGE_SIZE, 0x10_0000, true, false)
            .expect("install");
        assert!(pages_in_use(&device) > before, "the view holds table pages");
        // As when a context fails to come up after its view was made.
        drop(view);
        assert_eq!(pages_in_use(&device), before, "table pages leaked");
    }

    /// One 4 KiB leaf in a fresh region: three table pages, unlinked by the removal, back in
    /// the pool only after the (walk-inclusive) fence; a fence with nothing pending is
    /// leaf-only.
    #[test]
    fn emptied_table_pages_return_to_the_pool_after_a_walk_inclusive_fence() {
        let (device, mut view, _) = view_on(None, SECOND);
        let baseline = pages_in_use(&device);
        view.install(VA, PAGE_SIZE, 0x10_0000, true, false).unwrap();
        assert_eq!(pages_in_use(&device), baseline + 3);
        assert_eq!(
            view.table_stats(),
            TableStats {
                in_use: 4,
                ..Default::default()
            }
        );
        let span = view.remove(VA..VA + PAGE_SIZE).expect("a span to fence");
        // The span covers what the freed level-3 table served (512 GiB).
        let l3 = pt::span(4);
        assert_eq!(span, (VA & !(l3 - 1))..(VA & !(l3 - 1)) + l3);
        assert_eq!(
            view.table_stats(),
            TableStats {
                in_use: 1,
                pending: 3,
                ..Default::default()
            }
        );
        assert_eq!(
            pages_in_use(&device),
            baseline + 3,
            "not reusable before the fence"
        );
        let (walks, leaves) = device.tlbi_counts();
        view.fence(VA..VA + PAGE_SIZE).unwrap();
        assert_eq!(device.tlbi_counts(), (walks + 1, leaves));
        assert_eq!(pages_in_use(&device), baseline);
        assert_eq!(
            view.table_stats(),
            TableStats {
                in_use: 1,
                freed: 3,
                ..Default::default()
            }
        );

        // Two leaves in one level-1 table: removing one frees no table, and its fence is
        // leaf-only.
        view.install(VA, 2 * PAGE_SIZE, 0x10_0000, true, false)
            .unwrap();
        let span = view.remove(VA..VA + PAGE_SIZE).unwrap();
        assert_eq!(span, VA..VA + PAGE_SIZE);
        view.fence(span).unwrap();
        assert_eq!(device.tlbi_counts(), (walks + 1, leaves + 1));
        assert!(view.shut_down());
        assert_eq!(pages_in_use(&device), baseline - 1, "the root went too");
    }

    /// Table pages left empty without any leaf (a mapping that failed after creating them) are
    /// freed by a removal over them, which then reports a span although it cleared no leaf.
    #[test]
    fn a_removal_that_frees_only_table_pages_still_asks_for_a_fence() {
        let (device, mut view, _) = view_on(None, SECOND);
        let baseline = pages_in_use(&device);
        {
            let mut tables = lock(&device.tables);
            let mut mem = TableMemory {
                pool: &mut tables,
                dma: device.dma(),
            };
            view.pt
                .as_mut()
                .unwrap()
                .build_empty_chain(&mut mem, VA)
                .unwrap();
        }
        let span = view
            .remove(VA..VA + PAGE_SIZE)
            .expect("table pages were freed");
        assert!(span.contains(&VA), "{span:x?}");
        assert_eq!(view.table_stats().pending, 3);
        view.fence(span).unwrap();
        assert_eq!(pages_in_use(&device), baseline);
        // Nothing pending, nothing cleared: nothing to fence.
        assert_eq!(view.remove(VA..VA + PAGE_SIZE), None);
    }

    /// A 2 MiB leaf over an empty level-1 table sends it pending; the next fence reclaims it.
    /// On a device with a walk cache the install fences at once (walk-inclusive), or the
    /// device would keep walking the old table and fault on the new leaf.
    #[test]
    fn a_large_leaf_over_an_empty_level1_table_is_reclaimed_after_a_fence() {
        let va = 0x4000_0000;
        for walk_cache in [false, true] {
            let features = if walk_cache { WALK_CACHE } else { 0 };
            let (device, mut view, _) = view_on(Some(features), SECOND);
            {
                let mut tables = lock(&device.tables);
                let mut mem = TableMemory {
                    pool: &mut tables,
                    dma: device.dma(),
                };
                view.pt
                    .as_mut()
                    .unwrap()
                    .build_empty_chain(&mut mem, va)
                    .unwrap();
            }
            let with_l1 = pages_in_use(&device);
            let (walks, _) = device.tlbi_counts();
            view.install(va, LARGE_PAGE_SIZE, 0x20_0000, true, true)
                .unwrap();
            if walk_cache {
                assert_eq!(device.tlbi_counts().0, walks + 1);
                assert_eq!(view.table_stats().pending, 0);
            } else {
                assert_eq!(device.tlbi_counts().0, walks);
                assert_eq!(view.table_stats().pending, 1);
                assert_eq!(pages_in_use(&device), with_l1);
                view.fence(0x1000_0000..0x1000_1000).unwrap();
            }
            assert_eq!(
                pages_in_use(&device),
                with_l1 - 1,
                "walk cache {walk_cache}"
            );
            assert_eq!(view.table_stats().freed, 1);
            assert_eq!(view.lookup(va + 0x1234).unwrap().size, PageSize::Large);
        }
    }

    /// 100 000 map/remove/fence cycles of distinct VAs over 2048 1 GiB regions (four level-3
    /// tables' worth), each building and freeing a whole chain: the pool stays as it was after
    /// the first cycles.
    #[test]
    fn churn_over_many_regions_keeps_the_pool_flat() {
        let (device, mut view, _) = view_on(None, SECOND);
        let mut after_warmup = None;
        for i in 0..100_000u64 {
            let va = (i % 2048) * pt::span(3) + (i / 2048) * LARGE_PAGE_SIZE + (i % 7) * PAGE_SIZE;
            view.install(va, PAGE_SIZE, 0x10_0000, false, false)
                .unwrap();
            let span = view.remove(va..va + PAGE_SIZE).unwrap();
            view.fence(span).unwrap();
            if i == 3 {
                after_warmup = Some(device.table_pool_usage());
            }
        }
        assert_eq!(Some(device.table_pool_usage()), after_warmup);
        let stats = view.table_stats();
        assert_eq!((stats.in_use, stats.pending, stats.kept_out), (1, 0, 0));
        assert!(stats.freed >= 300_000, "{stats:?}");
    }

    /// A fence the device never confirms keeps the pending pages out of use for good.
    #[test]
    fn a_failed_fence_keeps_the_freed_table_pages_out_of_use() {
        let (device, mut view, knobs) = view_on(None, Duration::from_millis(20));
        let baseline = pages_in_use(&device);
        view.install(VA, PAGE_SIZE, 0x10_0000, true, false).unwrap();
        let span = view.remove(VA..VA + PAGE_SIZE).unwrap();
        lock(&knobs).swallow_tlbi = true;
        assert!(matches!(view.fence(span), Err(Error::Timeout(_))));
        lock(&knobs).swallow_tlbi = false;
        assert_eq!(
            view.table_stats(),
            TableStats {
                in_use: 1,
                kept_out: 3,
                ..Default::default()
            }
        );
        assert_eq!(pages_in_use(&device), baseline + 3);
        // The next cycle works, with new pages; the kept ones never come back.
        view.install(VA, PAGE_SIZE, 0x10_0000, true, false).unwrap();
        assert_eq!(pages_in_use(&device), baseline + 6);
        let span = view.remove(VA..VA + PAGE_SIZE).unwrap();
        view.fence(span).unwrap();
        assert_eq!(pages_in_use(&device), baseline + 3);
        assert_eq!(view.table_stats().freed, 3);
        assert!(view.shut_down());
        assert_eq!(
            pages_in_use(&device),
            baseline + 2,
            "root back, kept pages not"
        );
    }

    /// Aging with simulated device bits: ranges coalesced, a 2 MiB leaf whole, clearing fences
    /// leaf-only once over the cleared leaves, and the next scan sees them old.
    #[test]
    fn age_reports_and_clears_accessed_with_one_leaf_only_fence() {
        let (device, mut view, knobs) = view_on(Some(ACCESSED_DIRTY | WALK_CACHE), SECOND);
        assert!(view.aging_supported());
        let base = 0x4000_0000;
        let large = base + LARGE_PAGE_SIZE;
        view.install(base, 8 * PAGE_SIZE, 0x10_0000, true, false)
            .unwrap();
        view.install(large, LARGE_PAGE_SIZE, 0x20_0000, true, true)
            .unwrap();
        for i in [1, 2, 5] {
            simulate(&view, base + i * PAGE_SIZE, pt::ACCESSED);
        }
        simulate(&view, large + 0x5000, pt::ACCESSED);
        let all = base..large + LARGE_PAGE_SIZE;
        let mut young = Vec::new();
        let (walks, leaves) = device.tlbi_counts();
        let scan = view.age(all.clone(), false, &mut young).unwrap();
        assert_eq!(
            scan,
            AgeScan {
                leaves: 9,
                young: 4,
                cleared: 0
            }
        );
        assert_eq!(
            young,
            vec![
                base + PAGE_SIZE..base + 3 * PAGE_SIZE,
                base + 5 * PAGE_SIZE..base + 6 * PAGE_SIZE,
                large..large + LARGE_PAGE_SIZE
            ]
        );
        assert_eq!(
            device.tlbi_counts(),
            (walks, leaves),
            "a look fences nothing"
        );
        young.clear();
        let scan = view.age(all.clone(), true, &mut young).unwrap();
        assert_eq!(
            scan,
            AgeScan {
                leaves: 9,
                young: 4,
                cleared: 4
            }
        );
        assert_eq!(device.tlbi_counts(), (walks, leaves + 1));
        assert_eq!(
            *lock(&knobs).scopes.last().unwrap(),
            accel_abi::regs::TlbiScope::Range.encode(true)
        );
        young.clear();
        assert_eq!(view.age(all, false, &mut young).unwrap().young, 0);
        assert!(young.is_empty());
    }

    #[test]
    fn dirty_reports_and_clears_and_removal_harvests_it() {
        let (_device, mut view, _) = view_on(Some(ACCESSED_DIRTY), SECOND);
        let base = 0x4000_0000;
        view.install(base, 4 * PAGE_SIZE, 0x10_0000, true, false)
            .unwrap();
        simulate(&view, base, pt::ACCESSED | pt::DIRTY);
        simulate(&view, base + PAGE_SIZE, pt::ACCESSED | pt::DIRTY);
        let mut out = Vec::new();
        view.dirty(base..base + 4 * PAGE_SIZE, true, &mut out)
            .unwrap();
        assert_eq!(out, vec![base..base + 2 * PAGE_SIZE]);
        out.clear();
        view.dirty(base..base + 4 * PAGE_SIZE, false, &mut out)
            .unwrap();
        assert!(out.is_empty(), "cleared");
        // Written again, then removed: the removal keeps what the device wrote.
        simulate(&view, base + 3 * PAGE_SIZE, pt::ACCESSED | pt::DIRTY);
        simulate(&view, base + 2 * PAGE_SIZE, pt::ACCESSED);
        let span = view.remove(base..base + 4 * PAGE_SIZE).unwrap();
        view.fence(span).unwrap();
        view.drain_removed_dirty(&mut out);
        assert_eq!(out, vec![base + 3 * PAGE_SIZE..base + 4 * PAGE_SIZE]);
        out.clear();
        view.drain_removed_dirty(&mut out);
        assert!(out.is_empty(), "drained once");
        // Leaves still installed at shut-down are harvested too.
        view.install(base, PAGE_SIZE, 0x10_0000, true, false)
            .unwrap();
        simulate(&view, base, pt::DIRTY);
        assert!(view.shut_down());
        view.drain_removed_dirty(&mut out);
        assert_eq!(out, vec![base..base + PAGE_SIZE]);
    }

    #[test]
    fn aging_is_refused_naming_why_without_accessed_dirty() {
        let (_device, mut view, _) = view_on(Some(WALK_CACHE), SECOND);
        assert!(!view.aging_supported());
        let e = view.age(0..1 << 30, true, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("ACCESSED_DIRTY")),
            "{e}"
        );
        let e = view.dirty(0..1 << 30, false, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");

        let mut iommu = IommuView::new();
        assert!(!iommu.aging_supported());
        let e = iommu.age(0..1 << 30, false, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("IOMMU")),
            "{e}"
        );
        assert!(iommu.dirty(0..1 << 30, false, &mut Vec::new()).is_err());
        assert_eq!(iommu.table_stats(), TableStats::default());
    }
}
