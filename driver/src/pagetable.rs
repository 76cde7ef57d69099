//! Device page tables: one four-level radix table per device address space, in DMA memory.
//!
//! The table pages come from a [`TablePool`] of driver-owned DMA buffers. The entry format is
//! `accel_abi::pt`. This module writes entries; it does not invalidate the device TLB: every
//! caller that clears or replaces a valid leaf must fence the TLB (the returned
//! [`Cleared`] says whether that is needed) before it releases what the old leaf pointed to.
//! Empty table pages are kept until the address space is destroyed, so a device walk in flight
//! never reads a table page that was recycled under it.

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
}

/// DMA memory for table pages, shared by every address space of a device.
pub struct TablePool {
    chunks: Vec<Chunk>,
    free: Vec<TableRef>,
}

impl TablePool {
    /// An empty pool.
    pub fn new() -> TablePool {
        TablePool {
            chunks: Vec::new(),
            free: Vec::new(),
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
            self.chunks[t.chunk]
                .buffer
                .zero(t.index * PAGE_SIZE as usize, PAGE_SIZE as usize);
            return Ok(t);
        }
        let len = CHUNK_PAGES * PAGE_SIZE as usize;
        let buffer = DmaBuffer::new(len, "page-tables")?;
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
                DmaAccess::READ_ONLY,
            )
            .map_err(|e| PageTableError::Map(Box::new(e)))?;
        let chunk = self.chunks.len();
        self.chunks.push(Chunk { buffer, iova: base });
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

    fn read(&self, t: TableRef, slot: usize) -> u64 {
        self.chunks[t.chunk]
            .buffer
            .load_u64(t.index * PAGE_SIZE as usize + slot * 8, Ordering::Acquire)
    }

    fn write(&self, t: TableRef, slot: usize, raw: u64) {
        // Release: a table page's zeroed contents are visible before the entry pointing at it.
        self.chunks[t.chunk].buffer.store_u64(
            t.index * PAGE_SIZE as usize + slot * 8,
            raw,
            Ordering::Release,
        )
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

/// What an unmap or replacing map cleared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Valid leaves cleared or replaced.
    pub leaves: u64,
    /// Smallest VA range covering them (empty if none): the range to invalidate in the TLB.
    pub span: Option<Range<u64>>,
}

impl Cleared {
    fn add(&mut self, va: u64, size: u64) {
        self.leaves += 1;
        self.span = Some(match self.span.take() {
            None => va..va + size,
            Some(r) => r.start.min(va)..r.end.max(va + size),
        });
    }

    /// True if the TLB must be invalidated before what the old leaves pointed to is released.
    #[cfg(all(test, feature = "emulator"))]
    pub fn needs_fence(&self) -> bool {
        self.leaves > 0
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
    /// Emptied level-1 tables replaced by large leaves, recycled only on destroy.
    retired: Vec<TableRef>,
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
            retired: Vec::new(),
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

    /// Number of table pages in use, root included.
    pub fn table_pages(&self) -> usize {
        self.tables.len() + 1
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
    /// target). A 2 MiB leaf may replace an empty level-1 table; a level-1 table with live
    /// entries, or a 2 MiB leaf over a 4 KiB request, is a [`PageTableError::Conflict`].
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
        let mut cleared = Cleared::default();
        match Pte::decode(pool.read(table, slot), level) {
            Ok(Pte::NotPresent) => {}
            Ok(Pte::Leaf { .. }) => cleared.add(va, bytes),
            Ok(Pte::Table { .. }) => {
                // A large leaf over a level-1 table: allowed only if that table is empty.
                let key = (1, va);
                let child = *self.tables.get(&key).ok_or_else(|| inconsistent(va, 1))?;
                if (0..pt::ENTRIES).any(|s| pool.read(child, s) & pt::VALID != 0) {
                    return Err(PageTableError::Conflict { va });
                }
                // A walk in flight may still read it: recycle it only on destroy.
                self.tables.remove(&key);
                self.retired.push(child);
            }
            Err(_) => return Err(PageTableError::Conflict { va }),
        }
        pool.write(table, slot, Pte::leaf(iova, perms));
        if cleared.leaves == 0 {
            match size {
                PageSize::Small => self.leaves_small += 1,
                PageSize::Large => self.leaves_large += 1,
            }
        }
        Ok(cleared)
    }

    /// Clear every leaf that maps any byte of `range`. A 2 MiB leaf partly inside the range is
    /// cleared whole (the device re-faults what it still needs).
    pub fn unmap(&mut self, pool: &TablePool, range: Range<u64>) -> Cleared {
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

    fn unmap_level(
        &mut self,
        pool: &TablePool,
        table: TableRef,
        level: u32,
        table_base: u64,
        range: Range<u64>,
        cleared: &mut Cleared,
    ) {
        let span = pt::span(level);
        let first = ((range.start.max(table_base) - table_base) / span) as usize;
        let last_excl =
            (((range.end - table_base).min(span * pt::ENTRIES as u64)).div_ceil(span)) as usize;
        for slot in first..last_excl {
            let va = table_base + slot as u64 * span;
            match Pte::decode(pool.read(table, slot), level) {
                Ok(Pte::NotPresent) => {}
                Ok(Pte::Leaf { .. }) => {
                    pool.write(table, slot, 0);
                    cleared.add(va, span);
                    if level == 2 {
                        self.leaves_large -= 1;
                    } else {
                        self.leaves_small -= 1;
                    }
                }
                Ok(Pte::Table { .. }) => {
                    if let Some(child) = self.tables.get(&(level - 1, va)).copied() {
                        let sub = range.start.max(va)..range.end.min(va + span);
                        self.unmap_level(pool, child, level - 1, va, sub, cleared);
                    }
                }
                // We never write malformed entries; clearing one is the safe answer.
                Err(_) => pool.write(table, slot, 0),
            }
        }
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

    /// Return every table page to the pool. The device must no longer walk this table (its
    /// ASID root cleared and the TLB fenced).
    pub fn destroy(self, pool: &mut TablePool) {
        for t in self.tables.into_values().chain(self.retired) {
            pool.release(t);
        }
        pool.release(self.root);
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
        let c = t.unmap(&f.pool, va..va + 1);
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
        let c = t.unmap(&f.pool, va + PAGE_SIZE..va + 2 * PAGE_SIZE);
        assert_eq!(c.span, Some(va..va + LARGE_PAGE_SIZE));
        // Small pages first, then a large leaf over them: conflict until they are gone.
        t.map(&mut f.mem(), va, PageSize::Small, 0x1000, Perms::R)
            .unwrap();
        assert!(t
            .map(&mut f.mem(), va, PageSize::Large, 0x20_0000, Perms::R)
            .is_err());
        t.unmap(&f.pool, va..va + PAGE_SIZE);
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
        assert_eq!(t.unmap(&f.pool, 5..5).leaves, 0);
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
        let c = t.unmap(&f.pool, 0..1 << 47);
        assert_eq!(c.leaves, 10);
        assert_eq!(t.leaf_counts(), (0, 0));
    }
}
