//! Device page tables: one four-level radix table per device address space, in DMA memory.
//!
//! The table pages come from a [`TablePool`] of driver-owned DMA buffers. The entry format is
//! `accel_abi::pt`. This module writes entries; it does not invalidate the device TLB: every
//! caller that clears or replaces a valid leaf must fence the TLB (the returned
//! [`Cleared`] says whether that is needed) before it releases what the old leaf pointed to.
//!
//! Table pages are freed as they empty. Each table page keeps a count of its valid entries;
//! when an unmap leaves one at zero, its parent entry is cleared (cascading upward: an emptied
//! level-1 table can empty its level-2 parent, and so on; never the root), and so is an empty
//! level-1 table a 2 MiB leaf replaces. Such a page is not reused at once: a device walk in
//! flight, or a walk-cache entry of a device with [`crate::device::Caps::walk_cache`], may
//! still lead the device into it, and a reused page would translate an old VA through another
//! region's entries. It waits on the table's pending list until a **walk-inclusive** TLB
//! invalidation ([`crate::device::Device::tlb_invalidate`], not the leaf-only one) covering the
//! VA region it served has completed; only then does [`PageTable::reclaim_pending`] return it
//! to the pool. If that invalidation fails, the page must never be reused (the view keeps it
//! out of use for good).
//!
//! With ACCESSED/DIRTY enabled the device writes those bits into leaves concurrently (an
//! atomic compare-and-swap on the entry): leaves are therefore cleared with an atomic swap and
//! their bits cleared with an atomic AND, so a bit the device sets meanwhile is never lost or
//! written back into a cleared entry.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use accel_abi::pt::{self, Perms, Pte};
use accel_abi::{LARGE_PAGE_SIZE, PAGE_SIZE, PT_LEVELS};

use crate::backend::{DmaAccess, DmaSource};
use crate::dma::DmaSpace;
use crate::sys::dmabuf::{DmaBuffer, DmaBufferError};

/// Table pages per pool chunk (one DMA mapping each).
const CHUNK_PAGES: usize = 64;

/// Errors from page-table operations.
#[derive(Debug, thiserror::Error)]
pub enum PageTableError {
    /// Allocating DMA memory for table pages failed.
    #[error("page-table memory: {0}")]
    Memory(#[from] DmaBufferError),
    /// Mapping table pages for the device failed.
    #[error("page-table DMA map: {0}")]
    Map(Box<crate::Error>),
    /// The VA is not canonical or not aligned to the page size.
    #[error("cannot map VA {va:#x} with page size {size:#x}")]
    BadAddress {
        /// Virtual address.
        va: u64,
        /// Page size.
        size: u64,
    },
    /// A mapping of the other page size already covers the VA; unmap it first.
    #[error("VA {va:#x} is already mapped with a different page size")]
    Conflict {
        /// Virtual address.
        va: u64,
    },
    /// A table entry points at a table page the driver has no record of (a driver bug, or
    /// table memory overwritten): that one mapping fails; the table is left as it is.
    /// Counted in [`inconsistent_entries`].
    #[error("device page table inconsistent: level-{level} table entry for VA {va:#x} points at a table page without bookkeeping")]
    Inconsistent {
        /// Virtual address being mapped.
        va: u64,
        /// Level of the table the entry points at.
        level: u32,
    },
}

/// Table entries found without bookkeeping since start, in every page table of the process
/// ([`PageTableError::Inconsistent`]: each failed the one fault that met it, logged).
static INCONSISTENT_ENTRIES: AtomicU64 = AtomicU64::new(0);

/// How many times a mapping met a table entry without bookkeeping (see
/// [`PageTableError::Inconsistent`]). 0 in a healthy driver.
pub fn inconsistent_entries() -> u64 {
    INCONSISTENT_ENTRIES.load(Ordering::Relaxed)
}

/// The error for a table entry without bookkeeping, logged and counted. It fails only the
/// mapping that met it: a panic here would stop the single fault-service thread, and with it
/// fault servicing for every context of the device.
fn inconsistent(va: u64, level: u32) -> PageTableError {
    INCONSISTENT_ENTRIES.fetch_add(1, Ordering::Relaxed);
    let e = PageTableError::Inconsistent { va, level };
    tracing::error!(error = %e, "failing this mapping");
    e
}

/// A table page: where it lives in the pool and its IOVA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TableRef {
    chunk: usize,
    index: usize,
    iova: u64,
}

struct Chunk {
    buffer: DmaBuffer,
    iova: u64,
    /// Valid entries of each page (what the driver wrote; the device never adds or removes
    /// one), so emptiness is known without reading 512 entries.
    live: [u16; CHUNK_PAGES],
}

/// DMA memory for table pages, shared by every address space of a device.
pub struct TablePool {
    chunks: Vec<Chunk>,
    free: Vec<TableRef>,
    /// Map the chunks device-writable (the walker writes ACCESSED/DIRTY into them).
    device_writes: bool,
}

impl TablePool {
    /// An empty pool whose pages the device may only read.
    pub fn new() -> TablePool {
        TablePool::with_device_writes(false)
    }

    /// An empty pool; with `device_writes` its pages are DMA-mapped writable for the device
    /// (needed once the device maintains ACCESSED/DIRTY), otherwise read-only.
    pub fn with_device_writes(device_writes: bool) -> TablePool {
        TablePool {
            chunks: Vec::new(),
            free: Vec::new(),
            device_writes,
        }
    }

    /// Bytes of DMA memory the pool holds.
    pub fn bytes(&self) -> u64 {
        (self.chunks.len() * CHUNK_PAGES) as u64 * PAGE_SIZE
    }

    /// Table pages handed out and not yet returned.
    pub fn in_use(&self) -> usize {
        self.chunks.len() * CHUNK_PAGES - self.free.len()
    }

    /// Release every chunk (unmap from the device, free the memory). Call only when no address
    /// space uses the pool any more and the device is quiesced.
    pub fn destroy(&mut self, dma: &DmaSpace) -> Result<(), crate::Error> {
        self.free.clear();
        for chunk in self.chunks.drain(..) {
            dma.unmap(chunk.iova, chunk.buffer.len() as u64)?;
        }
        Ok(())
    }

    fn alloc(&mut self, dma: &DmaSpace) -> Result<TableRef, PageTableError> {
        if let Some(t) = self.free.pop() {
            let chunk = &mut self.chunks[t.chunk];
            chunk
                .buffer
                .zero(t.index * PAGE_SIZE as usize, PAGE_SIZE as usize);
            chunk.live[t.index] = 0;
            return Ok(t);
        }
        let len = CHUNK_PAGES * PAGE_SIZE as usize;
        let buffer = DmaBuffer::new(len, "page-tables")?;
        let access = if self.device_writes {
            DmaAccess::READ_WRITE
        } else {
            DmaAccess::READ_ONLY
        };
        let base = dma
            .map_buffer(
                Some(buffer.va()),
                false,
                len as u64,
                PAGE_SIZE,
                DmaSource::Buffer {
                    buffer: &buffer,
                    offset: 0,
                },
                access,
            )
            .map_err(|e| PageTableError::Map(Box::new(e)))?;
        let chunk = self.chunks.len();
        self.chunks.push(Chunk {
            buffer,
            iova: base,
            live: [0; CHUNK_PAGES],
        });
        // Hand out index 0 now; the rest go to the free list (highest first so pops ascend).
        for index in (1..CHUNK_PAGES).rev() {
            self.free.push(TableRef {
                chunk,
                index,
                iova: base + (index as u64) * PAGE_SIZE,
            });
        }
        Ok(TableRef {
            chunk,
            index: 0,
            iova: base,
        })
    }

    fn release(&mut self, t: TableRef) {
        self.free.push(t);
    }

    fn offset(t: TableRef, slot: usize) -> usize {
        t.index * PAGE_SIZE as usize + slot * 8
    }

    fn read(&self, t: TableRef, slot: usize) -> u64 {
        self.chunks[t.chunk]
            .buffer
            .load_u64(Self::offset(t, slot), Ordering::Acquire)
    }

    fn write(&self, t: TableRef, slot: usize, raw: u64) {
        // Release: a table page's zeroed contents are visible before the entry pointing at it.
        self.chunks[t.chunk]
            .buffer
            .store_u64(Self::offset(t, slot), raw, Ordering::Release)
    }

    /// Replace an entry the device may be updating; returns what it held at the swap
    /// (ACCESSED/DIRTY the walker set up to then included).
    fn swap(&self, t: TableRef, slot: usize, raw: u64) -> u64 {
        self.chunks[t.chunk]
            .buffer
            .swap_u64(Self::offset(t, slot), raw, Ordering::AcqRel)
    }

    /// Clear `bits` of an entry the device may be updating; returns the previous value.
    fn clear_bits(&self, t: TableRef, slot: usize, bits: u64) -> u64 {
        self.chunks[t.chunk]
            .buffer
            .fetch_and_u64(Self::offset(t, slot), !bits, Ordering::AcqRel)
    }

    fn live(&self, t: TableRef) -> u16 {
        self.chunks[t.chunk].live[t.index]
    }

    fn add_live(&mut self, t: TableRef, n: u16) {
        let live = &mut self.chunks[t.chunk].live[t.index];
        *live = live.saturating_add(n);
    }

    fn sub_live(&mut self, t: TableRef, n: u16) {
        let live = &mut self.chunks[t.chunk].live[t.index];
        *live = live.saturating_sub(n);
    }
}

impl Default for TablePool {
    fn default() -> Self {
        Self::new()
    }
}

/// What creating table pages needs: the pool and the device's DMA space.
pub struct TableMemory<'a> {
    /// Table-page pool.
    pub pool: &'a mut TablePool,
    /// The device's DMA space (to map new pool chunks).
    pub dma: &'a DmaSpace,
}

/// Page size of a device leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB (level-1 leaf).
    Small,
    /// 2 MiB (level-2 leaf).
    Large,
}

impl PageSize {
    /// Bytes.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Small => PAGE_SIZE,
            PageSize::Large => LARGE_PAGE_SIZE,
        }
    }
}

/// Append `r` to ascending, coalesced ranges `out`, merging it with the last one if they touch.
pub(crate) fn push_coalesced(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    if let Some(last) = out.last_mut() {
        if last.end == r.start {
            last.end = r.end;
            return;
        }
    }
    out.push(r);
}

/// The smallest range covering `a` and `b`.
pub(crate) fn hull(a: Option<Range<u64>>, b: Range<u64>) -> Range<u64> {
    match a {
        None => b,
        Some(a) => a.start.min(b.start)..a.end.max(b.end),
    }
}

/// What an unmap or replacing map cleared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Valid leaves cleared or replaced.
    pub leaves: u64,
    /// Smallest VA range covering them (empty if none): the range to invalidate in the TLB.
    pub span: Option<Range<u64>>,
    /// The VA ranges of those leaves that had DIRTY when cleared (coalesced, ascending within
    /// one call); a 2 MiB leaf contributes its 2 MiB.
    pub dirty: Vec<Range<u64>>,
    /// Table pages unlinked and put on the pending list (see [`PageTable::reclaim_pending`]).
    pub tables: usize,
}

impl Cleared {
    fn add(&mut self, va: u64, size: u64, old: u64) {
        self.leaves += 1;
        self.span = Some(hull(self.span.take(), va..va + size));
        if pt::dirty(old) {
            push_coalesced(&mut self.dirty, va..va + size);
        }
    }

    /// True if the TLB must be invalidated before what the old leaves pointed to is released.
    #[cfg(all(test, feature = "emulator"))]
    pub fn needs_fence(&self) -> bool {
        self.leaves > 0
    }
}

/// What a scan of leaf ACCESSED or DIRTY bits found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeafScan {
    /// Valid leaves looked at.
    pub leaves: u64,
    /// Of those, leaves with the bit set.
    pub marked: u64,
    /// Leaves whose bit this scan cleared.
    pub cleared: u64,
    /// Smallest VA range covering the cleared leaves: invalidate it (leaf-only is enough) so
    /// the device sets the bit again on its next use.
    pub cleared_span: Option<Range<u64>>,
}

/// A table page unlinked from the tree, waiting for a walk-inclusive fence.
#[derive(Debug, Clone)]
struct Pending {
    page: TableRef,
    /// The VA region the page translated (what its parent entry covered).
    region: Range<u64>,
}

/// Table pages taken off a table's pending list ([`PageTable::take_pending`]), waiting for the
/// walk-inclusive fence that makes them safe to reuse. Dropping them without
/// [`PageTable::reclaim`] keeps them out of use for good (the safe side when a fence failed).
#[derive(Debug)]
pub struct PendingTables {
    pages: Vec<Pending>,
}

impl PendingTables {
    /// The VA range the pages translated.
    pub fn span(&self) -> Range<u64> {
        self.pages
            .iter()
            .fold(None, |acc, p| Some(hull(acc, p.region.clone())))
            .unwrap_or(0..0)
    }

    /// How many pages.
    pub fn count(&self) -> usize {
        self.pages.len()
    }
}

/// A translation as the table holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// IOVA of the byte at the looked-up VA.
    pub iova: u64,
    /// Leaf permissions.
    pub perms: Perms,
    /// Leaf size.
    pub size: PageSize,
}

/// One device address space's page table.
pub struct PageTable {
    root: TableRef,
    /// Table pages by (level, first VA they cover), root excluded.
    tables: HashMap<(u32, u64), TableRef>,
    /// Table pages unlinked from the tree, not yet safe to reuse (see the module docs).
    pending: Vec<Pending>,
    /// Table pages returned to the pool by [`PageTable::reclaim_pending`] since creation.
    freed: u64,
    leaves_small: u64,
    leaves_large: u64,
}

impl PageTable {
    /// A new, empty table whose root comes from `pool`.
    pub fn new(mem: &mut TableMemory<'_>) -> Result<PageTable, PageTableError> {
        let root = mem.pool.alloc(mem.dma)?;
        Ok(PageTable {
            root,
            tables: HashMap::new(),
            pending: Vec::new(),
            freed: 0,
            leaves_small: 0,
            leaves_large: 0,
        })
    }

    /// IOVA of the root table (what goes into the ASID root register).
    pub fn root_iova(&self) -> u64 {
        self.root.iova
    }

    /// Number of (small, large) leaves installed.
    pub fn leaf_counts(&self) -> (u64, u64) {
        (self.leaves_small, self.leaves_large)
    }

    /// Number of table pages in the tree, root included (pending pages not counted).
    pub fn table_pages(&self) -> usize {
        self.tables.len() + 1
    }

    /// Table pages unlinked and waiting for a walk-inclusive fence.
    pub fn pending_pages(&self) -> usize {
        self.pending.len()
    }

    /// Table pages returned to the pool since creation.
    #[cfg(all(test, feature = "emulator"))]
    pub fn freed_pages(&self) -> u64 {
        self.freed
    }

    /// Smallest VA range covering what the pending pages translated: a walk-inclusive
    /// invalidation over it makes them safe to reuse. `None` if nothing is pending.
    pub fn pending_span(&self) -> Option<Range<u64>> {
        self.pending
            .iter()
            .fold(None, |acc, p| Some(hull(acc, p.region.clone())))
    }

    /// Return the pending table pages to the pool; how many. Call only after a walk-inclusive
    /// invalidation of this address space covering [`PageTable::pending_span`] completed.
    pub fn reclaim_pending(&mut self, pool: &mut TablePool) -> usize {
        let n = self.pending.len();
        for p in self.pending.drain(..) {
            pool.release(p.page);
        }
        self.freed += n as u64;
        n
    }

    /// Take the pending table pages out (for a two-pass fence: the invalidation that covers
    /// them is started now and waited for later, while other pages may become pending
    /// meanwhile). `None` if nothing is pending.
    pub fn take_pending(&mut self) -> Option<PendingTables> {
        if self.pending.is_empty() {
            return None;
        }
        Some(PendingTables {
            pages: std::mem::take(&mut self.pending),
        })
    }

    /// Return table pages taken with [`PageTable::take_pending`] to the pool; how many. Call
    /// only after a walk-inclusive invalidation covering [`PendingTables::span`] completed.
    pub fn reclaim(&mut self, pool: &mut TablePool, tables: PendingTables) -> usize {
        let n = tables.pages.len();
        for p in tables.pages {
            pool.release(p.page);
        }
        self.freed += n as u64;
        n
    }

    fn table_at(&self, level: u32, va: u64) -> Option<TableRef> {
        if level == PT_LEVELS {
            return Some(self.root);
        }
        self.tables
            .get(&(level, va & !(pt::span(level + 1) - 1)))
            .copied()
    }

    /// Walk to the table at `target` level covering `va`, creating missing tables.
    fn ensure_table(
        &mut self,
        mem: &mut TableMemory<'_>,
        va: u64,
        target: u32,
    ) -> Result<TableRef, PageTableError> {
        let mut table = self.root;
        for level in (target + 1..=PT_LEVELS).rev() {
            let slot = pt::index(va, level);
            let key = (level - 1, va & !(pt::span(level) - 1));
            match Pte::decode(mem.pool.read(table, slot), level) {
                Ok(Pte::Table { .. }) => {
                    table = *self
                        .tables
                        .get(&key)
                        .ok_or_else(|| inconsistent(va, key.0))?;
                }
                Ok(Pte::NotPresent) => {
                    let child = mem.pool.alloc(mem.dma)?;
                    mem.pool.write(table, slot, Pte::table(child.iova));
                    mem.pool.add_live(table, 1);
                    self.tables.insert(key, child);
                    table = child;
                }
                Ok(Pte::Leaf { .. }) | Err(_) => return Err(PageTableError::Conflict { va }),
            }
        }
        Ok(table)
    }

    /// Install a leaf mapping `va` (aligned to `size`) to `iova` with `perms`. Replacing a
    /// valid leaf of the same size is reported in the result (fence before releasing the old
    /// target). A 2 MiB leaf may replace an empty level-1 table, which goes to the pending
    /// list (reported in [`Cleared::tables`]); a level-1 table with live entries, or a 2 MiB
    /// leaf over a 4 KiB request, is a [`PageTableError::Conflict`].
    pub fn map(
        &mut self,
        mem: &mut TableMemory<'_>,
        va: u64,
        size: PageSize,
        iova: u64,
        perms: Perms,
    ) -> Result<Cleared, PageTableError> {
        let bytes = size.bytes();
        if !accel_abi::is_canonical(va) || va % bytes != 0 || iova % bytes != 0 || !perms.read {
            return Err(PageTableError::BadAddress { va, size: bytes });
        }
        let level = if size == PageSize::Large { 2 } else { 1 };
        let table = self.ensure_table(mem, va, level)?;
        let pool = &mut *mem.pool;
        let slot = pt::index(va, level);
        let leaf = Pte::leaf(iova, perms);
        let mut cleared = Cleared::default();
        match Pte::decode(pool.read(table, slot), level) {
            Ok(Pte::NotPresent) => {
                pool.write(table, slot, leaf);
                pool.add_live(table, 1);
            }
            Ok(Pte::Leaf { .. }) => {
                let old = pool.swap(table, slot, leaf);
                cleared.add(va, bytes, old);
            }
            Ok(Pte::Table { .. }) => {
                // A large leaf over a level-1 table: allowed only if that table is empty.
                let key = (1, va);
                let child = *self.tables.get(&key).ok_or_else(|| inconsistent(va, 1))?;
                if pool.live(child) != 0 {
                    return Err(PageTableError::Conflict { va });
                }
                pool.write(table, slot, leaf);
                self.tables.remove(&key);
                // A walk in flight or a walk-cache entry may still lead into it.
                self.pending.push(Pending {
                    page: child,
                    region: va..va + bytes,
                });
                cleared.tables += 1;
            }
            Err(_) => return Err(PageTableError::Conflict { va }),
        }
        if cleared.leaves == 0 {
            match size {
                PageSize::Small => self.leaves_small += 1,
                PageSize::Large => self.leaves_large += 1,
            }
        }
        Ok(cleared)
    }

    /// Clear every leaf that maps any byte of `range`. A 2 MiB leaf partly inside the range is
    /// cleared whole (the device re-faults what it still needs). Table pages left empty are
    /// unlinked and put on the pending list ([`Cleared::tables`]).
    pub fn unmap(&mut self, pool: &mut TablePool, range: Range<u64>) -> Cleared {
        let mut cleared = Cleared::default();
        let end = range.end.min(1 << accel_abi::VA_BITS);
        if range.start >= end {
            return cleared;
        }
        self.unmap_level(
            pool,
            self.root,
            PT_LEVELS,
            0,
            range.start..end,
            &mut cleared,
        );
        cleared
    }

    /// The slots of a table at `level` whose VA base is `table_base` that touch `range`.
    fn slots(level: u32, table_base: u64, range: &Range<u64>) -> Range<usize> {
        let span = pt::span(level);
        let first = ((range.start.max(table_base) - table_base) / span) as usize;
        let last_excl =
            (((range.end - table_base).min(span * pt::ENTRIES as u64)).div_ceil(span)) as usize;
        first..last_excl
    }

    fn unmap_level(
        &mut self,
        pool: &mut TablePool,
        table: TableRef,
        level: u32,
        table_base: u64,
        range: Range<u64>,
        cleared: &mut Cleared,
    ) {
        let span = pt::span(level);
        let mut removed = 0u16;
        for slot in Self::slots(level, table_base, &range) {
            let va = table_base + slot as u64 * span;
            match Pte::decode(pool.read(table, slot), level) {
                Ok(Pte::NotPresent) => {}
                Ok(Pte::Leaf { .. }) => {
                    // A swap, not a store: DIRTY set by the device up to now is in `old`, and
                    // its compare-and-swap on the old value fails from here on.
                    let old = pool.swap(table, slot, 0);
                    cleared.add(va, span, old);
                    removed += 1;
                    if level == 2 {
                        self.leaves_large -= 1;
                    } else {
                        self.leaves_small -= 1;
                    }
                }
                Ok(Pte::Table { .. }) => {
                    let key = (level - 1, va);
                    if let Some(child) = self.tables.get(&key).copied() {
                        let sub = range.start.max(va)..range.end.min(va + span);
                        self.unmap_level(pool, child, level - 1, va, sub, cleared);
                        if pool.live(child) == 0 {
                            pool.write(table, slot, 0);
                            self.tables.remove(&key);
                            self.pending.push(Pending {
                                page: child,
                                region: va..va + span,
                            });
                            cleared.tables += 1;
                            removed += 1;
                        }
                    }
                }
                // We never write malformed entries; clearing one is the safe answer. It stays
                // counted: a table that may hold an entry of ours is never freed early.
                Err(_) => {
                    tracing::warn!(
                        level,
                        va = format_args!("{va:#x}"),
                        "clearing a malformed page-table entry"
                    );
                    pool.write(table, slot, 0);
                }
            }
        }
        pool.sub_live(table, removed);
    }

    /// Scan the leaves mapping any byte of `range` for ACCESSED, pushing the VA ranges of
    /// those that have it into `out` (coalesced, ascending; a 2 MiB leaf gives its whole
    /// 2 MiB). With `clear`, clear ACCESSED in them (an atomic AND); then invalidate
    /// [`LeafScan::cleared_span`] so the device sets it again on its next use.
    pub fn scan_accessed(
        &self,
        pool: &TablePool,
        range: Range<u64>,
        clear: bool,
        out: &mut Vec<Range<u64>>,
    ) -> LeafScan {
        self.scan(pool, range, pt::ACCESSED, clear, out)
    }

    /// [`PageTable::scan_accessed`] for DIRTY (written since it was last cleared).
    pub fn scan_dirty(
        &self,
        pool: &TablePool,
        range: Range<u64>,
        clear: bool,
        out: &mut Vec<Range<u64>>,
    ) -> LeafScan {
        self.scan(pool, range, pt::DIRTY, clear, out)
    }

    fn scan(
        &self,
        pool: &TablePool,
        range: Range<u64>,
        bit: u64,
        clear: bool,
        out: &mut Vec<Range<u64>>,
    ) -> LeafScan {
        let mut scan = LeafScan::default();
        let end = range.end.min(1 << accel_abi::VA_BITS);
        if range.start < end {
            let walk = LeafWalk {
                pool,
                bit,
                clear,
                tables: &self.tables,
            };
            walk.level(self.root, PT_LEVELS, 0, range.start..end, out, &mut scan);
        }
        scan
    }

    /// Look up `va` as the device would walk it.
    pub fn translate(&self, pool: &TablePool, va: u64) -> Option<Translation> {
        if !accel_abi::is_canonical(va) {
            return None;
        }
        let mut table = self.root;
        for level in (1..=PT_LEVELS).rev() {
            match Pte::decode(pool.read(table, pt::index(va, level)), level).ok()? {
                Pte::NotPresent => return None,
                Pte::Leaf { iova, perms } => {
                    let size = if level == 2 {
                        PageSize::Large
                    } else {
                        PageSize::Small
                    };
                    return Some(Translation {
                        iova: iova + (va & (size.bytes() - 1)),
                        perms,
                        size,
                    });
                }
                Pte::Table { .. } => table = self.table_at(level - 1, va)?,
            }
        }
        None
    }

    /// The table page and slot of the leaf covering `va`, if there is one.
    #[cfg(all(test, feature = "emulator"))]
    fn leaf_slot(&self, pool: &TablePool, va: u64) -> Option<(TableRef, usize)> {
        let mut table = self.root;
        for level in (1..=PT_LEVELS).rev() {
            let slot = pt::index(va, level);
            match Pte::decode(pool.read(table, slot), level).ok()? {
                Pte::NotPresent => return None,
                Pte::Leaf { .. } => return Some((table, slot)),
                Pte::Table { .. } => table = self.table_at(level - 1, va)?,
            }
        }
        None
    }

    /// Test hook: set `bits` (ACCESSED, DIRTY) in the leaf covering `va` the way the device's
    /// walker does (a compare-and-swap); false if no leaf covers `va`.
    #[cfg(all(test, feature = "emulator"))]
    pub(crate) fn simulate_device_bits(&self, pool: &TablePool, va: u64, bits: u64) -> bool {
        let Some((table, slot)) = self.leaf_slot(pool, va) else {
            return false;
        };
        let buffer = &pool.chunks[table.chunk].buffer;
        let offset = TablePool::offset(table, slot);
        let mut seen = buffer.load_u64(offset, Ordering::Acquire);
        while let Err(now) = buffer.compare_exchange_u64(
            offset,
            seen,
            seen | bits,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            seen = now;
        }
        true
    }

    /// Test hook: the tables down to level 1 for `va`, with no leaf (what a mapping that
    /// failed after creating its tables leaves behind).
    #[cfg(all(test, feature = "emulator"))]
    pub(crate) fn build_empty_chain(
        &mut self,
        mem: &mut TableMemory<'_>,
        va: u64,
    ) -> Result<(), PageTableError> {
        self.ensure_table(mem, va, 1).map(|_| ())
    }

    /// Test hook: the raw leaf entry covering `va`.
    #[cfg(all(test, feature = "emulator"))]
    pub(crate) fn leaf_raw(&self, pool: &TablePool, va: u64) -> Option<u64> {
        let (table, slot) = self.leaf_slot(pool, va)?;
        Some(pool.read(table, slot))
    }

    /// Return every table page to the pool, the pending ones included. The device must no
    /// longer walk this table (its ASID root cleared and a walk-inclusive invalidation of the
    /// ASID completed).
    pub fn destroy(mut self, pool: &mut TablePool) {
        self.reclaim_pending(pool);
        for t in self.tables.into_values() {
            pool.release(t);
        }
        pool.release(self.root);
    }
}

/// A scan of one leaf bit over present tables only.
struct LeafWalk<'a> {
    pool: &'a TablePool,
    bit: u64,
    clear: bool,
    tables: &'a HashMap<(u32, u64), TableRef>,
}

impl LeafWalk<'_> {
    fn level(
        &self,
        table: TableRef,
        level: u32,
        table_base: u64,
        range: Range<u64>,
        out: &mut Vec<Range<u64>>,
        scan: &mut LeafScan,
    ) {
        let span = pt::span(level);
        for slot in PageTable::slots(level, table_base, &range) {
            let va = table_base + slot as u64 * span;
            let raw = self.pool.read(table, slot);
            match Pte::decode(raw, level) {
                Ok(Pte::Leaf { .. }) => {
                    scan.leaves += 1;
                    if raw & self.bit == 0 {
                        continue;
                    }
                    scan.marked += 1;
                    push_coalesced(out, va..va + span);
                    if self.clear {
                        // An AND, not a store: the device may be setting the other bit.
                        let old = self.pool.clear_bits(table, slot, self.bit);
                        if old & self.bit != 0 {
                            scan.cleared += 1;
                            scan.cleared_span = Some(hull(scan.cleared_span.take(), va..va + span));
                        }
                    }
                }
                Ok(Pte::Table { .. }) => {
                    if let Some(child) = self.tables.get(&(level - 1, va)).copied() {
                        let sub = range.start.max(va)..range.end.min(va + span);
                        self.level(child, level - 1, va, sub, out, scan);
                    }
                }
                Ok(Pte::NotPresent) | Err(_) => {}
            }
        }
    }
}

#[cfg(all(test, feature = "emulator"))]
mod tests {
    use super::*;
    use crate::backend::emulated::EmulatedBackend;

    struct Fixture {
        dma: DmaSpace,
        pool: TablePool,
    }

    impl Fixture {
        fn new() -> Fixture {
            let backend = EmulatedBackend::new(Default::default()).unwrap();
            Fixture {
                dma: DmaSpace::new(Box::new(backend)),
                pool: TablePool::new(),
            }
        }

        fn mem(&mut self) -> TableMemory<'_> {
            TableMemory {
                pool: &mut self.pool,
                dma: &self.dma,
            }
        }
    }

    #[test]
    fn map_translate_unmap() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let va = 0x7f00_0020_3000;
        assert!(
            t.map(&mut f.mem(), va, PageSize::Small, 0x5000, Perms::RW)
                .unwrap()
                .leaves
                == 0
        );
        let tr = t.translate(&f.pool, va + 0x10).unwrap();
        assert_eq!(tr.iova, 0x5010);
        assert_eq!(tr.size, PageSize::Small);
        assert!(t.translate(&f.pool, va + PAGE_SIZE).is_none());
        // Replacing is reported so the caller fences.
        let c = t
            .map(&mut f.mem(), va, PageSize::Small, 0x6000, Perms::R)
            .unwrap();
        assert!(c.needs_fence());
        assert_eq!(t.leaf_counts(), (1, 0));
        let c = t.unmap(&mut f.pool, va..va + 1);
        assert_eq!(c.leaves, 1);
        assert_eq!(c.span, Some(va..va + PAGE_SIZE));
        assert!(t.translate(&f.pool, va).is_none());
        assert_eq!(t.leaf_counts(), (0, 0));
    }

    #[test]
    fn large_leaves() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let va = 0x4000_0000;
        t.map(&mut f.mem(), va, PageSize::Large, 0x20_0000, Perms::RW)
            .unwrap();
        assert_eq!(
            t.translate(&f.pool, va + 0x12345).unwrap().size,
            PageSize::Large
        );
        // A 4 KiB map inside a 2 MiB leaf conflicts.
        assert!(matches!(
            t.map(
                &mut f.mem(),
                va + PAGE_SIZE,
                PageSize::Small,
                0x1000,
                Perms::R
            ),
            Err(PageTableError::Conflict { .. })
        ));
        // Unmapping one small page clears the whole large leaf.
        let c = t.unmap(&mut f.pool, va + PAGE_SIZE..va + 2 * PAGE_SIZE);
        assert_eq!(c.span, Some(va..va + LARGE_PAGE_SIZE));
        // Small pages first, then a large leaf over them: conflict until they are gone.
        t.map(&mut f.mem(), va, PageSize::Small, 0x1000, Perms::R)
            .unwrap();
        assert!(t
            .map(&mut f.mem(), va, PageSize::Large, 0x20_0000, Perms::R)
            .is_err());
        t.unmap(&mut f.pool, va..va + PAGE_SIZE);
        t.map(&mut f.mem(), va, PageSize::Large, 0x20_0000, Perms::R)
            .unwrap();
        assert_eq!(t.leaf_counts(), (0, 1));
    }

    /// A table entry with no bookkeeping behind it fails that one mapping with an error (and is
    /// counted); it used to panic, on the fault-service thread that serves every context.
    #[test]
    fn a_table_entry_without_bookkeeping_fails_the_mapping_not_the_thread() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let va = 0x7f00_0040_0000;
        t.map(&mut f.mem(), va, PageSize::Small, 0x5000, Perms::RW)
            .unwrap();
        let before = inconsistent_entries();
        // Lose the bookkeeping of the level-1 table under `va`, keep the table entries.
        let key = (1, va & !(pt::span(2) - 1));
        assert!(t.tables.remove(&key).is_some());
        let small = t.map(
            &mut f.mem(),
            va + PAGE_SIZE,
            PageSize::Small,
            0x6000,
            Perms::RW,
        );
        assert!(
            matches!(small, Err(PageTableError::Inconsistent { level: 1, .. })),
            "{small:?}"
        );
        let large = t.map(&mut f.mem(), va, PageSize::Large, 0x20_0000, Perms::RW);
        assert!(
            matches!(large, Err(PageTableError::Inconsistent { level: 1, .. })),
            "{large:?}"
        );
        assert_eq!(inconsistent_entries() - before, 2);
        // The rest of the table still works.
        t.map(&mut f.mem(), 0x1000_0000, PageSize::Small, 0x7000, Perms::R)
            .unwrap();
    }

    #[test]
    fn bad_addresses() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        assert!(t
            .map(&mut f.mem(), 1 << 48, PageSize::Small, 0, Perms::R)
            .is_err());
        assert!(t
            .map(&mut f.mem(), 0x1001, PageSize::Small, 0, Perms::R)
            .is_err());
        assert!(t
            .map(&mut f.mem(), 0x1000, PageSize::Large, 0, Perms::R)
            .is_err());
        assert_eq!(t.unmap(&mut f.pool, 5..5).leaves, 0);
    }

    #[test]
    fn wide_unmap_is_sparse() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        for i in 0..10u64 {
            let va = 0x1000_0000 + i * 0x4000_0000;
            t.map(
                &mut f.mem(),
                va,
                PageSize::Small,
                0x1000 * (i + 1),
                Perms::R,
            )
            .unwrap();
        }
        let c = t.unmap(&mut f.pool, 0..1 << 47);
        assert_eq!(c.leaves, 10);
        assert_eq!(t.leaf_counts(), (0, 0));
        // Ten level-1 and ten level-2 tables, and the one level-3 table above them.
        assert_eq!(c.tables, 21);
        assert_eq!(t.pending_pages(), 21);
        assert_eq!(t.table_pages(), 1);
    }

    const VA: u64 = 0x7f00_0020_3000;

    /// One 4 KiB leaf in a fresh region costs three table pages; unmapping it unlinks all
    /// three (cascading up to, not including, the root), but they stay out of the pool until
    /// reclaimed (a fence's job), and are not handed to new tables meanwhile.
    #[test]
    fn an_emptied_chain_waits_pending_then_returns_to_the_pool() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let baseline = f.pool.in_use();
        t.map(&mut f.mem(), VA, PageSize::Small, 0x5000, Perms::RW)
            .unwrap();
        assert_eq!(f.pool.in_use(), baseline + 3);
        assert_eq!(t.table_pages(), 4);
        let c = t.unmap(&mut f.pool, VA..VA + PAGE_SIZE);
        assert_eq!((c.leaves, c.tables), (1, 3));
        assert_eq!(t.pending_pages(), 3);
        assert_eq!(t.table_pages(), 1);
        // The level-3 table served the whole 512 GiB under its root entry.
        let l3 = pt::span(4);
        assert_eq!(
            t.pending_span(),
            Some(VA & !(l3 - 1)..(VA & !(l3 - 1)) + l3)
        );
        // The root entry is gone: nothing leads into the pending pages any more.
        assert_eq!(f.pool.read(t.root, pt::index(VA, 4)), 0);
        assert_eq!(
            f.pool.in_use(),
            baseline + 3,
            "pending pages are not free yet"
        );
        // A new mapping elsewhere does not get the pending pages.
        let other = 0x1000_0000;
        t.map(&mut f.mem(), other, PageSize::Small, 0x6000, Perms::R)
            .unwrap();
        assert_eq!(f.pool.in_use(), baseline + 6);
        assert_eq!(t.reclaim_pending(&mut f.pool), 3);
        assert_eq!((t.pending_pages(), t.freed_pages()), (0, 3));
        assert_eq!(f.pool.in_use(), baseline + 3);
        t.unmap(&mut f.pool, other..other + 1);
        t.reclaim_pending(&mut f.pool);
        assert_eq!(f.pool.in_use(), baseline);
        assert_eq!(t.freed_pages(), 6);
        // And the table still maps from scratch.
        t.map(&mut f.mem(), VA, PageSize::Small, 0x5000, Perms::RW)
            .unwrap();
        assert_eq!(t.translate(&f.pool, VA).unwrap().iova, 0x5000);
    }

    /// Only tables left empty go: a level-1 table with a sibling leaf stays, and so does a
    /// level-2 table with another level-1 table under it, until the last leaf goes.
    #[test]
    fn tables_with_live_entries_stay() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let l1_sibling = VA + PAGE_SIZE;
        let l2_sibling = VA + LARGE_PAGE_SIZE;
        for (i, va) in [VA, l1_sibling, l2_sibling].into_iter().enumerate() {
            t.map(
                &mut f.mem(),
                va,
                PageSize::Small,
                0x1000 * (i as u64 + 1),
                Perms::R,
            )
            .unwrap();
        }
        assert_eq!(t.table_pages(), 5);
        assert_eq!(t.unmap(&mut f.pool, VA..VA + 1).tables, 0);
        assert_eq!(t.unmap(&mut f.pool, l1_sibling..l1_sibling + 1).tables, 1);
        assert_eq!(t.translate(&f.pool, l2_sibling).unwrap().iova, 0x3000);
        assert_eq!(t.unmap(&mut f.pool, l2_sibling..l2_sibling + 1).tables, 3);
        assert_eq!(t.pending_pages(), 4);
        assert_eq!(t.table_pages(), 1);
    }

    /// Empty tables a failed mapping left behind are unlinked by the next unmap over them.
    #[test]
    fn an_empty_chain_without_leaves_is_unlinked_by_unmap() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        t.ensure_table(&mut f.mem(), VA, 1).unwrap();
        assert_eq!(t.table_pages(), 4);
        let c = t.unmap(&mut f.pool, 0..1 << 47);
        assert_eq!((c.leaves, c.span, c.tables), (0, None, 3));
        assert_eq!(t.pending_pages(), 3);
    }

    /// A 2 MiB leaf over an empty level-1 table unlinks that table: it goes pending (it was
    /// kept until destroy) and back to the pool once reclaimed.
    #[test]
    fn a_large_leaf_over_an_empty_level1_table_sends_it_pending() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let va = 0x4000_0000;
        t.ensure_table(&mut f.mem(), va, 1).unwrap();
        let in_use = f.pool.in_use();
        let c = t
            .map(&mut f.mem(), va, PageSize::Large, 0x20_0000, Perms::RW)
            .unwrap();
        assert_eq!((c.leaves, c.tables), (0, 1));
        assert_eq!(t.pending_span(), Some(va..va + LARGE_PAGE_SIZE));
        assert_eq!(t.leaf_counts(), (0, 1));
        assert_eq!(t.table_pages(), 3);
        assert_eq!(t.reclaim_pending(&mut f.pool), 1);
        assert_eq!(f.pool.in_use(), in_use - 1);
        // The leaf's level-2 table counts it: unmapping it empties the chain.
        assert_eq!(t.unmap(&mut f.pool, va..va + 1).tables, 2);
    }

    /// DIRTY the device set in leaves is reported when unmap clears them or map replaces
    /// them, coalesced; a 2 MiB leaf gives its 2 MiB.
    #[test]
    fn dirty_leaves_are_harvested_when_cleared() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let base = 0x4000_0000;
        let large = base + LARGE_PAGE_SIZE;
        for i in 0..4 {
            t.map(
                &mut f.mem(),
                base + i * PAGE_SIZE,
                PageSize::Small,
                0x1000 * (i + 1),
                Perms::RW,
            )
            .unwrap();
        }
        t.map(&mut f.mem(), large, PageSize::Large, 0x40_0000, Perms::RW)
            .unwrap();
        for va in [base, base + PAGE_SIZE, base + 3 * PAGE_SIZE, large + 0x1234] {
            assert!(t.simulate_device_bits(&f.pool, va, pt::ACCESSED | pt::DIRTY));
        }
        assert!(t.simulate_device_bits(&f.pool, base + 2 * PAGE_SIZE, pt::ACCESSED));
        // Replacing a dirty leaf reports it.
        let c = t
            .map(
                &mut f.mem(),
                base + 3 * PAGE_SIZE,
                PageSize::Small,
                0x9000,
                Perms::RW,
            )
            .unwrap();
        assert_eq!(c.dirty, vec![base + 3 * PAGE_SIZE..base + 4 * PAGE_SIZE]);
        assert!(t.simulate_device_bits(&f.pool, base + 3 * PAGE_SIZE, pt::DIRTY));
        // Unmapping one byte of the large leaf clears (and reports) all of it.
        let c = t.unmap(&mut f.pool, base..large + 1);
        assert_eq!(c.leaves, 5);
        assert_eq!(
            c.dirty,
            vec![
                base..base + 2 * PAGE_SIZE,
                base + 3 * PAGE_SIZE..base + 4 * PAGE_SIZE,
                large..large + LARGE_PAGE_SIZE
            ]
        );
    }

    /// ACCESSED and DIRTY scans: coalesced ranges of marked leaves only, 2 MiB leaves whole,
    /// clearing one bit atomically keeps the other, a cleared bit is not reported again.
    #[test]
    fn accessed_and_dirty_scans_report_and_clear() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let base = 0x4000_0000;
        let large = base + LARGE_PAGE_SIZE;
        for i in 0..8 {
            t.map(
                &mut f.mem(),
                base + i * PAGE_SIZE,
                PageSize::Small,
                0x1000 * (i + 1),
                Perms::RW,
            )
            .unwrap();
        }
        t.map(&mut f.mem(), large, PageSize::Large, 0x40_0000, Perms::RW)
            .unwrap();
        // Pages 1, 2, 3 and 6 were used; 2 was written; the large leaf was written.
        for i in [1, 3, 6] {
            t.simulate_device_bits(&f.pool, base + i * PAGE_SIZE, pt::ACCESSED);
        }
        t.simulate_device_bits(&f.pool, base + 2 * PAGE_SIZE, pt::ACCESSED | pt::DIRTY);
        t.simulate_device_bits(&f.pool, large, pt::ACCESSED | pt::DIRTY);
        let all = base..large + LARGE_PAGE_SIZE;
        let mut young = Vec::new();
        let s = t.scan_accessed(&f.pool, all.clone(), false, &mut young);
        assert_eq!(
            (s.leaves, s.marked, s.cleared, s.cleared_span),
            (9, 5, 0, None)
        );
        assert_eq!(
            young,
            vec![
                base + PAGE_SIZE..base + 4 * PAGE_SIZE,
                base + 6 * PAGE_SIZE..base + 7 * PAGE_SIZE,
                large..large + LARGE_PAGE_SIZE
            ]
        );
        // A range covering part of the large leaf reports the leaf whole.
        let mut part = Vec::new();
        t.scan_accessed(
            &f.pool,
            large + PAGE_SIZE..large + 2 * PAGE_SIZE,
            false,
            &mut part,
        );
        assert_eq!(part, vec![large..large + LARGE_PAGE_SIZE]);
        // Clearing ACCESSED over pages 0..4 only.
        young.clear();
        let s = t.scan_accessed(&f.pool, base..base + 4 * PAGE_SIZE, true, &mut young);
        assert_eq!((s.leaves, s.marked, s.cleared), (4, 3, 3));
        assert_eq!(s.cleared_span, Some(base + PAGE_SIZE..base + 4 * PAGE_SIZE));
        let page2 = t.leaf_raw(&f.pool, base + 2 * PAGE_SIZE).unwrap();
        assert!(!pt::accessed(page2) && pt::dirty(page2), "{page2:#x}");
        young.clear();
        t.scan_accessed(&f.pool, all.clone(), false, &mut young);
        assert_eq!(
            young,
            vec![
                base + 6 * PAGE_SIZE..base + 7 * PAGE_SIZE,
                large..large + LARGE_PAGE_SIZE
            ]
        );
        // DIRTY: page 2 and the large leaf; clearing it leaves ACCESSED of the large leaf.
        let mut dirty = Vec::new();
        let s = t.scan_dirty(&f.pool, all.clone(), true, &mut dirty);
        assert_eq!((s.marked, s.cleared), (2, 2));
        assert_eq!(
            dirty,
            vec![
                base + 2 * PAGE_SIZE..base + 3 * PAGE_SIZE,
                large..large + LARGE_PAGE_SIZE
            ]
        );
        assert_eq!(
            s.cleared_span,
            Some(base + 2 * PAGE_SIZE..large + LARGE_PAGE_SIZE)
        );
        assert!(pt::accessed(t.leaf_raw(&f.pool, large).unwrap()));
        dirty.clear();
        assert_eq!(t.scan_dirty(&f.pool, all, false, &mut dirty).marked, 0);
        assert!(dirty.is_empty());
        // The translations are untouched.
        assert_eq!(
            t.translate(&f.pool, base + 2 * PAGE_SIZE).unwrap().iova,
            0x3000
        );
    }

    /// The device sets DIRTY while the driver keeps clearing ACCESSED in the same leaves: the
    /// clearing is an atomic AND, so no DIRTY is lost (a load-and-store would drop one set
    /// between its two steps).
    #[test]
    fn clearing_accessed_never_loses_a_dirty_bit_the_device_sets_meanwhile() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let base = 0x4000_0000;
        let pages = 512;
        for i in 0..pages {
            t.map(
                &mut f.mem(),
                base + i * PAGE_SIZE,
                PageSize::Small,
                0x1000,
                Perms::RW,
            )
            .unwrap();
        }
        let all = base..base + pages * PAGE_SIZE;
        let done = std::sync::atomic::AtomicBool::new(false);
        let (t, pool) = (&t, &f.pool);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Each leaf is used in every round and written in one of them, the write
                // landing just after a use (when the clearing is most likely on it).
                let rounds = 200;
                for round in 0..rounds {
                    for i in 0..pages {
                        let va = base + i * PAGE_SIZE;
                        t.simulate_device_bits(pool, va, pt::ACCESSED);
                        if (i * 7) % rounds == round {
                            t.simulate_device_bits(pool, va, pt::DIRTY);
                        }
                    }
                }
                done.store(true, Ordering::Release);
            });
            let mut young = Vec::new();
            while !done.load(Ordering::Acquire) {
                young.clear();
                t.scan_accessed(pool, all.clone(), true, &mut young);
            }
        });
        let mut dirty = Vec::new();
        assert_eq!(
            t.scan_dirty(pool, all.clone(), false, &mut dirty).marked,
            pages
        );
        assert_eq!(dirty, vec![all]);
    }

    /// Map/unmap/reclaim cycles over many regions, each building and freeing a whole chain:
    /// the pool neither grows nor leaks.
    #[test]
    fn churn_keeps_the_pool_flat() {
        let mut f = Fixture::new();
        let mut t = PageTable::new(&mut f.mem()).unwrap();
        let mut after_warmup = None;
        for i in 0..20_000u64 {
            let va = (i % 2048) * pt::span(3) + ((i / 2048) % 512) * LARGE_PAGE_SIZE;
            t.map(&mut f.mem(), va, PageSize::Small, 0x1000, Perms::R)
                .unwrap();
            let c = t.unmap(&mut f.pool, va..va + PAGE_SIZE);
            assert!(c.tables >= 2, "cycle {i}: {c:?}");
            t.reclaim_pending(&mut f.pool);
            if i == 3 {
                after_warmup = Some((f.pool.bytes(), f.pool.in_use()));
            }
        }
        assert_eq!(Some((f.pool.bytes(), f.pool.in_use())), after_warmup);
        assert_eq!(t.table_pages(), 1);
    }
}
