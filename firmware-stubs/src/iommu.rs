//! The host IOMMU in front of the device: IOVA -> memory mappings established by the driver,
//! and the host-visible fault log (the analogue of the kernel's DMAR fault messages).
//!
//! Mappings are host state, not device state: a device reset leaves them alone.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::memory::{DmaAccessError, DmaMemory};

/// Permissions of a DMA mapping, as the IOMMU enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaPerms {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl DmaPerms {
    /// Read and write.
    pub const RW: DmaPerms = DmaPerms {
        read: true,
        write: true,
    };
    /// Read only.
    pub const R: DmaPerms = DmaPerms {
        read: true,
        write: false,
    };
}

/// Why `dma_map`/`dma_unmap` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// IOVA or length not 4 KiB aligned, zero length, or the range wraps.
    #[error("IOVA range {iova:#x}+{len:#x} is not page aligned, empty, or wraps")]
    BadRange {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps an existing mapping.
    #[error("IOVA range {iova:#x}+{len:#x} overlaps an existing mapping")]
    Overlap {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The mapping is larger than the memory object backing it.
    #[error("mapping of {len:#x} bytes exceeds its backing of {size:#x} bytes")]
    TooLarge {
        /// Length asked for.
        len: u64,
        /// Size of the backing.
        size: u64,
    },
    /// A mapping straddles the boundary of the range to unmap (TYPE1v2 refuses to split).
    #[error("unmap of {iova:#x}+{len:#x} would split the mapping at {mapping:#x}")]
    WouldSplit {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// IOVA of the mapping that would be split.
        mapping: u64,
    },
    /// Neither read nor write permission was requested.
    #[error("a DMA mapping needs read or write permission")]
    NoPermission,
}

/// Why an IOMMU fault was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuFaultReason {
    /// No mapping covers the IOVA.
    Unmapped,
    /// The mapping lacks the permission.
    Permission,
    /// The mapping exists but its backing memory could not be accessed.
    Backing(DmaAccessError),
}

/// One entry of the host-visible IOMMU fault log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuFaultEntry {
    /// The faulting IOVA.
    pub iova: u64,
    /// True for a write (or atomic) access.
    pub write: bool,
    /// When the fault was recorded.
    pub time: Instant,
    /// Why.
    pub reason: IommuFaultReason,
}

/// Counters of the DMA mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DmaStats {
    /// Number of live mappings.
    pub mappings: usize,
    /// Bytes covered by live mappings.
    pub mapped_bytes: u64,
}

pub(crate) struct Mapping {
    pub(crate) len: u64,
    pub(crate) mem: Arc<dyn DmaMemory>,
    pub(crate) perms: DmaPerms,
}

/// The mapping table. Device accesses hold a read lock on it (see `device.rs`) for the whole
/// translate-and-touch of one chunk, so a writer (unmap, TLB invalidation, reset) waits for
/// in-flight accesses.
#[derive(Default)]
pub(crate) struct Iommu {
    maps: BTreeMap<u64, Mapping>,
    bytes: u64,
}

const PAGE: u64 = accel_abi::PAGE_SIZE;

fn check_range(iova: u64, len: u64) -> Result<u64, DmaError> {
    let end = iova.checked_add(len);
    match end {
        Some(end) if len != 0 && iova % PAGE == 0 && len % PAGE == 0 => Ok(end),
        _ => Err(DmaError::BadRange { iova, len }),
    }
}

impl Iommu {
    pub(crate) fn map(
        &mut self,
        iova: u64,
        len: u64,
        mem: Arc<dyn DmaMemory>,
        perms: DmaPerms,
    ) -> Result<(), DmaError> {
        let end = check_range(iova, len)?;
        if !perms.read && !perms.write {
            return Err(DmaError::NoPermission);
        }
        if let Some(size) = mem.size() {
            if len > size {
                return Err(DmaError::TooLarge { len, size });
            }
        }
        let before = self.maps.range(..end).next_back();
        if let Some((&start, m)) = before {
            if start + m.len > iova {
                return Err(DmaError::Overlap { iova, len });
            }
        }
        self.maps.insert(iova, Mapping { len, mem, perms });
        self.bytes += len;
        Ok(())
    }

    /// TYPE1v2 semantics: remove every mapping fully inside the range; refuse (changing
    /// nothing) if one straddles either end. Returns the removed mappings so their memory
    /// objects are dropped outside the lock.
    pub(crate) fn unmap(&mut self, iova: u64, len: u64) -> Result<(u64, Vec<Mapping>), DmaError> {
        // A range may reach the top of the 64-bit space (`iova + len == 2^64`), as the kernel's
        // type1 allows: QEMU unmaps a whole vIOMMU address space in halves, the upper one
        // `[2^63, 2^64)`. Mappings never reach that far, so the exclusive end saturates.
        let end = match check_range(iova, len) {
            Err(_)
                if iova % PAGE == 0 && len % PAGE == 0 && iova.checked_add(len - 1).is_some() =>
            {
                u64::MAX
            }
            other => other?,
        };
        let mut inside = Vec::new();
        // A mapping starting before `iova` but reaching into the range straddles it.
        if let Some((&start, m)) = self.maps.range(..iova).next_back() {
            if start + m.len > iova {
                return Err(DmaError::WouldSplit {
                    iova,
                    len,
                    mapping: start,
                });
            }
        }
        for (&start, m) in self.maps.range(iova..end) {
            if start + m.len > end {
                return Err(DmaError::WouldSplit {
                    iova,
                    len,
                    mapping: start,
                });
            }
            inside.push(start);
        }
        let mut removed = Vec::with_capacity(inside.len());
        let mut bytes = 0;
        for start in inside {
            if let Some(m) = self.maps.remove(&start) {
                bytes += m.len;
                removed.push(m);
            }
        }
        self.bytes -= bytes;
        Ok((bytes, removed))
    }

    pub(crate) fn stats(&self) -> DmaStats {
        DmaStats {
            mappings: self.maps.len(),
            mapped_bytes: self.bytes,
        }
    }

    /// The mapping covering `[iova, iova + len)` entirely, with the offset into it.
    pub(crate) fn resolve(
        &self,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(&Mapping, u64), IommuFaultReason> {
        let (&start, m) = self
            .maps
            .range(..=iova)
            .next_back()
            .ok_or(IommuFaultReason::Unmapped)?;
        let offset = iova - start;
        match offset.checked_add(len) {
            Some(end) if end <= m.len => {}
            _ => return Err(IommuFaultReason::Unmapped),
        }
        let allowed = if write { m.perms.write } else { m.perms.read };
        if !allowed {
            return Err(IommuFaultReason::Permission);
        }
        Ok((m, offset))
    }
}

/// Bounded log of IOMMU faults: the most recent `cap` entries, plus a count of all of them.
pub(crate) struct FaultLog {
    entries: VecDeque<IommuFaultEntry>,
    cap: usize,
    total: u64,
}

impl FaultLog {
    pub(crate) fn new(cap: usize) -> Self {
        FaultLog {
            entries: VecDeque::with_capacity(cap),
            cap,
            total: 0,
        }
    }

    pub(crate) fn push(&mut self, e: IommuFaultEntry) {
        if self.entries.len() == self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
        self.total += 1;
    }

    pub(crate) fn snapshot(&self) -> Vec<IommuFaultEntry> {
        self.entries.iter().copied().collect()
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}
