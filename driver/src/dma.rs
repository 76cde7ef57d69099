//! A device's DMA space: its backend and the IOVA space of its IOMMU.
//!
//! Every DMA mapping the driver makes (rings, page-table pages, mirrored process memory) goes
//! through [`DmaSpace::map`], which allocates the IOVA (identity when possible), maps, and gives
//! the IOVA back if the map fails; [`DmaSpace::unmap`] is its inverse.

use std::sync::{Mutex, MutexGuard};

use crate::backend::{Backend, DmaAccess, DmaSource};
use crate::iova::IovaSpace;
use crate::Error;
use sys_util::sync::lock;

/// A backend and its IOVA space.
pub struct DmaSpace {
    backend: Box<dyn Backend>,
    iova: Mutex<IovaSpace>,
    poisoned: std::sync::atomic::AtomicU64,
}

impl DmaSpace {
    /// Wrap `backend`, with the IOVA ranges it reports.
    pub fn new(backend: Box<dyn Backend>) -> DmaSpace {
        let iova = IovaSpace::new(backend.iova_ranges());
        DmaSpace {
            backend,
            iova: Mutex::new(iova),
            poisoned: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// The IOVA space (bytes and allocations in use).
    pub fn iova(&self) -> MutexGuard<'_, IovaSpace> {
        lock(&self.iova)
    }

    /// [`DmaSpace::map`] of a driver-owned buffer ([`DmaSource::Buffer`]): safe, because the
    /// device reaches a buffer through its file, never through memory a Rust object owns.
    /// Any other source is refused with `InvalidArgument`.
    pub fn map_buffer(
        &self,
        preferred: Option<u64>,
        exact: bool,
        len: u64,
        align: u64,
        source: DmaSource<'_>,
        access: DmaAccess,
    ) -> Result<u64, Error> {
        if !matches!(source, DmaSource::Buffer { .. }) {
            return Err(Error::InvalidArgument(
                "DmaSpace::map_buffer maps driver-owned buffers only; process memory needs the unsafe DmaSpace::map",
            ));
        }
        // SAFETY: a `Buffer` source asks nothing of the caller (`Backend::dma_map`).
        unsafe { self.map(preferred, exact, len, align, source, access) }
    }

    /// Map `len` bytes of `source` at an IOVA aligned to `align`: `preferred` (identity) if free,
    /// else anywhere; with `exact`, only at `preferred`. Returns the IOVA.
    ///
    /// # Safety
    /// As [`Backend::dma_map`]: the device may reach process memory named by `source` until
    /// [`DmaSpace::unmap`] (or [`DmaSpace::unmap_keep_iova`]) of the mapping has returned.
    pub unsafe fn map(
        &self,
        preferred: Option<u64>,
        exact: bool,
        len: u64,
        align: u64,
        source: DmaSource<'_>,
        access: DmaAccess,
    ) -> Result<u64, Error> {
        let iova = self.iova().alloc(preferred, len, align)?;
        if exact && Some(iova) != preferred {
            self.iova().free(iova);
            return Err(Error::IdentityUnavailable {
                va: preferred.unwrap_or(0),
                len,
            });
        }
        // SAFETY: forwarded to our caller.
        if let Err(e) = unsafe { self.backend.dma_map(iova, len, source, access) } {
            self.iova().free(iova);
            return Err(e.into());
        }
        Ok(iova)
    }

    /// Unmap a mapping but keep its IOVA range reserved for good: for a range a device may still
    /// cache translations to (its fence failed), so no later mapping becomes reachable there.
    pub fn unmap_keep_iova(&self, iova: u64, len: u64) -> Result<(), Error> {
        self.backend.dma_unmap(iova, len)?;
        self.poisoned
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// IOVA bytes kept out of use after failed fences.
    pub fn poisoned_bytes(&self) -> u64 {
        self.poisoned.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Unmap a mapping made by [`DmaSpace::map`]. If the backend fails, the IOVA range stays
    /// reserved (the mapping may still exist) and the error is returned.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), Error> {
        self.backend.dma_unmap(iova, len)?;
        self.iova().free(iova);
        Ok(())
    }
}
