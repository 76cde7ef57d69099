//! Device views: how a context's DMA-mapped ranges become visible to its device.
//!
//! A view is one of the three parts of a [`crate::runtime::Personality`] (with the bring-up and
//! the fault source): the mirror, the DMA mapper and the invalidation ordering are shared; what
//! a device makes of a DMA-mapped range is this:
//! - [`MxaView`]: a device with its own page table and TLB (MXA-1): install writes PTEs, removal
//!   clears them, the fence is a TLB invalidation;
//! - [`IommuView`]: a device without page faults or page tables (QEMU's edu): it addresses memory
//!   by IOVA, so mirrored ranges are mapped at IOVA == VA on submit, and the IOMMU unmap that
//!   follows every removal is the fence.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use accel_abi::pt::Perms;
use accel_abi::PAGE_SIZE;

use crate::device::Device;
use crate::pagetable::{PageSize, PageTable, TableMemory, Translation};
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
}

/// An MXA-1 address space: its page table, root register and TLB.
pub struct MxaView {
    device: Arc<Device>,
    asid: u16,
    pt: Option<PageTable>,
    fence_timeout: Duration,
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
        })
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
        if large {
            pt.map(&mut mem, va, PageSize::Large, iova, perms)?;
        } else {
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                pt.map(&mut mem, va + off, PageSize::Small, iova + off, perms)?;
            }
        }
        Ok(())
    }

    fn remove(&mut self, range: Range<u64>) -> Option<Range<u64>> {
        let pt = self.pt.as_mut()?;
        let tables = lock(&self.device.tables);
        pt.unmap(&tables, range).span
    }

    fn fence(&mut self, span: Range<u64>) -> Result<(), Error> {
        self.device
            .tlb_invalidate(self.asid, Some(span), self.fence_timeout)
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
            if confirmed {
                pt.destroy(&mut lock(&self.device.tables));
            } else {
                // The device may still walk these pages: they never go back to the pool.
                tracing::error!(asid = self.asid, "keeping the page-table pages out of use");
            }
        }
        confirmed
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
}

#[cfg(all(test, feature = "emulator"))]
mod tests {
    use super::*;
    use crate::runtime::{DeviceSpec, Runtime, RuntimeOptions};

    fn pages_in_use(device: &Device) -> usize {
        lock(&device.tables).in_use()
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
}
