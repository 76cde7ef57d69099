//! Driver-owned DMA memory: a memfd mapped shared into this process.
//!
//! Page tables, the command ring, the fault buffer and completion records live here. A memfd is
//! used (rather than anonymous memory) because every backend can hand it to the device: kernel
//! VFIO pins it by virtual address, the in-process emulator and a vfio-user server map the fd.
//! The device writes into it concurrently, so words are accessed atomically and byte ranges
//! only after the word that publishes them was read with `Acquire`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// Why a DMA buffer could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DmaBufferError {
    /// memfd_create, ftruncate or mmap failed.
    #[error("cannot create a {len}-byte DMA buffer ({what}): {source}")]
    Os {
        /// Requested length.
        len: usize,
        /// Which step failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Zero or unaligned length.
    #[error("DMA buffer length {0} is not a non-zero multiple of 4096")]
    BadLength(usize),
}

/// A page-aligned, memfd-backed buffer shared with the device.
#[derive(Debug)]
pub struct DmaBuffer {
    file: File,
    map: MmapRaw,
    len: usize,
}

impl DmaBuffer {
    /// Create a zeroed buffer of `len` bytes (a multiple of 4096).
    pub fn new(len: usize, name: &str) -> Result<DmaBuffer, DmaBufferError> {
        if len == 0 || len % 4096 != 0 {
            return Err(DmaBufferError::BadLength(len));
        }
        let os = |what| {
            move |e: nix::Error| DmaBufferError::Os {
                len,
                what,
                source: std::io::Error::from(e),
            }
        };
        let cname = std::ffi::CString::new(format!("mxa-{name}")).unwrap_or_default();
        let fd =
            nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .map_err(os("memfd_create"))?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(|e| DmaBufferError::Os {
            len,
            what: "ftruncate",
            source: e,
        })?;
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| DmaBufferError::Os {
                len,
                what: "mmap",
                source: e,
            })?;
        Ok(DmaBuffer { file, map, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The process virtual address of the first byte.
    pub fn va(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// The memfd behind the buffer (for backends that share memory by fd).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn check(&self, offset: usize, size: usize, align: usize) {
        assert!(
            offset % align == 0 && offset.checked_add(size).is_some_and(|e| e <= self.len),
            "DMA buffer access {offset:#x}+{size} outside {} bytes or misaligned",
            self.len
        );
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8, 8);
        // SAFETY: in bounds and 8-byte aligned (checked above); the mapping lives as long as
        // `self`, and every access to words of this memory (ours and the device's) is atomic,
        // read-modify-writes included (the shared mapping is ordinary cacheable memory, where
        // an atomic RMW is atomic against every other atomic access to the word).
        unsafe { &*(self.map.as_mut_ptr().add(offset) as *const AtomicU64) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4, 4);
        // SAFETY: as in `u64_at`, for a 4-byte aligned word.
        unsafe { &*(self.map.as_mut_ptr().add(offset) as *const AtomicU32) }
    }

    /// Atomic 64-bit load.
    pub fn load_u64(&self, offset: usize, order: Ordering) -> u64 {
        self.u64_at(offset).load(order)
    }

    /// Atomic 64-bit store.
    pub fn store_u64(&self, offset: usize, value: u64, order: Ordering) {
        self.u64_at(offset).store(value, order)
    }

    /// Atomic 64-bit AND with `mask`; returns the previous value. A read-modify-write of the
    /// whole word, so bits another party (the device's walker) sets in it meanwhile are kept.
    pub fn fetch_and_u64(&self, offset: usize, mask: u64, order: Ordering) -> u64 {
        self.u64_at(offset).fetch_and(mask, order)
    }

    /// Atomic 64-bit exchange; returns the previous value (including whatever bits another
    /// party set in it up to the exchange).
    pub fn swap_u64(&self, offset: usize, value: u64, order: Ordering) -> u64 {
        self.u64_at(offset).swap(value, order)
    }

    /// Atomic 64-bit compare-and-exchange: stores `new` if the word is `current`. `Ok` with
    /// the previous value if it stored, `Err` with the value found otherwise.
    pub fn compare_exchange_u64(
        &self,
        offset: usize,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        self.u64_at(offset)
            .compare_exchange(current, new, success, failure)
    }

    /// Atomic 32-bit load.
    pub fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        self.u32_at(offset).load(order)
    }

    /// Atomic 32-bit store.
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        self.u32_at(offset).store(value, order)
    }

    /// Copy bytes out. Call only for bytes published by a word read with `Acquire`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len(), 1);
        // SAFETY: in bounds (checked); the device does not write these bytes concurrently under
        // the publish protocol documented in docs/device.md.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Copy bytes in. Publish them afterwards with a `Release` store or a doorbell.
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len(), 1);
        // SAFETY: in bounds (checked); the device reads these bytes only after they are
        // published, per docs/device.md.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                data.len(),
            )
        }
    }

    /// Zero a byte range.
    pub fn zero(&self, offset: usize, len: usize) {
        self.check(offset, len, 1);
        // SAFETY: in bounds (checked); same publish protocol as `write`.
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(offset), 0, len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_bytes() {
        let b = DmaBuffer::new(8192, "t").unwrap();
        b.store_u64(8, 0x1122_3344_5566_7788, Ordering::Release);
        assert_eq!(b.load_u64(8, Ordering::Acquire), 0x1122_3344_5566_7788);
        let mut out = [0u8; 4];
        b.read(8, &mut out);
        assert_eq!(out, [0x88, 0x77, 0x66, 0x55]);
        b.write(4096, b"abc");
        assert_eq!(b.load_u32(4096, Ordering::Relaxed) & 0xff_ffff, 0x63_6261);
        b.zero(4096, 4);
        assert_eq!(b.load_u32(4096, Ordering::Relaxed), 0);
        assert_eq!(b.va() % 4096, 0);
    }

    #[test]
    fn read_modify_write_words() {
        let b = DmaBuffer::new(4096, "t").unwrap();
        b.store_u64(16, 0b1111, Ordering::Relaxed);
        assert_eq!(b.fetch_and_u64(16, !0b0100, Ordering::AcqRel), 0b1111);
        assert_eq!(b.load_u64(16, Ordering::Relaxed), 0b1011);
        assert_eq!(b.swap_u64(16, 7, Ordering::AcqRel), 0b1011);
        assert_eq!(b.load_u64(16, Ordering::Relaxed), 7);
        assert_eq!(
            b.compare_exchange_u64(16, 6, 9, Ordering::AcqRel, Ordering::Acquire),
            Err(7)
        );
        assert_eq!(b.load_u64(16, Ordering::Relaxed), 7);
        assert_eq!(
            b.compare_exchange_u64(16, 7, 9, Ordering::AcqRel, Ordering::Acquire),
            Ok(7)
        );
        assert_eq!(b.load_u64(16, Ordering::Relaxed), 9);
    }

    #[test]
    fn bad_lengths() {
        assert!(matches!(
            DmaBuffer::new(0, "t"),
            Err(DmaBufferError::BadLength(0))
        ));
        assert!(DmaBuffer::new(100, "t").is_err());
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_bounds_is_a_driver_bug() {
        let b = DmaBuffer::new(4096, "t").unwrap();
        b.load_u64(4096, Ordering::Relaxed);
    }
}
