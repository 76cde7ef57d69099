//! How the device reaches the bytes behind a DMA mapping.
//!
//! This is the only module of the crate with `unsafe` code: it owns mmap'd regions and turns
//! offsets into raw pointers. Everything else talks to memory through [`DmaMemory`].
//!
//! Two backends:
//! - [`SharedRegion`]: an mmap'd region (anonymous or from a file descriptor) owned by the
//!   object. The device and the driver both reach it directly; all device accesses are atomic
//!   loads and stores (relaxed, except the explicit release/acquire helpers), so concurrent CPU
//!   and device accesses are races on values, never undefined behaviour.
//! - [`ProcessMemory`]: memory of a process (this one or another) reached with
//!   `process_vm_readv`/`process_vm_writev`, so an unmapped or `PROT_NONE` page is an `EFAULT`
//!   error instead of a `SIGSEGV`.

use std::io::{IoSlice, IoSliceMut};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::mman::{MapFlags, ProtFlags};
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

use sys_util::sync::lock;

/// Why the memory behind a mapping could not be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaAccessError {
    /// The access goes beyond the end of the backing memory.
    #[error("access [{offset:#x}, +{len:#x}) is outside the backing memory of {size:#x} bytes")]
    OutOfBounds {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the backing memory.
        size: u64,
    },
    /// The backing memory is not mapped in its process (EFAULT from process_vm_*).
    #[error("backing memory not accessible (EFAULT)")]
    Fault,
    /// A write to a backing that is read-only.
    #[error("backing memory is read-only")]
    ReadOnly,
    /// An atomic access that is not 8-byte aligned.
    #[error("atomic access at {0:#x} is not 8-byte aligned")]
    Misaligned(u64),
    /// Another operating-system error (the errno).
    #[error("operating-system error {0}")]
    Os(Errno),
}

/// How the device reaches the bytes behind one DMA mapping. Offsets are relative to the start
/// of the mapping.
///
/// The device never issues an access that crosses a 4 KiB boundary of the IOVA space, and every
/// access is naturally aligned for its size up to 8 bytes.
pub trait DmaMemory: Send + Sync {
    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaAccessError>;
    /// Write `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DmaAccessError>;
    /// Add `value` to the little-endian u64 at `offset` (8-byte aligned); returns the old value.
    fn atomic_add_u64(&self, offset: u64, value: u64) -> Result<u64, DmaAccessError>;

    /// Compare-and-swap the little-endian u64 at `offset` (8-byte aligned): if it holds
    /// `current`, store `new` and return `Ok(Ok(current))`; otherwise store nothing and return
    /// `Ok(Err(actual))`. The walker sets ACCESSED/DIRTY in page-table leaves with it.
    ///
    /// Atomicity depends on the backend. [`SharedRegion`] does a real atomic compare-exchange,
    /// atomic against the driver's CPU accesses too. A backend that reaches its memory only by
    /// copies ([`ProcessMemory`], and the vfio-user server's message-based client memory) does a
    /// read, a compare and a write under a lock: atomic against other device work through that
    /// lock, **not** against the driver: a driver store between the device's read and write is
    /// overwritten by the device's value.
    fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, DmaAccessError>;

    /// Store a u32 so that every earlier write through this object is visible to a reader that
    /// observes the stored value with an acquire load. The device writes "done"/"valid" words
    /// with it.
    fn store_u32_release(&self, offset: u64, value: u32) -> Result<(), DmaAccessError> {
        fence(Ordering::Release);
        self.write(offset, &value.to_le_bytes())
    }

    /// Size of the backing memory in bytes, if known. `dma_map` refuses a mapping larger than
    /// this.
    fn size(&self) -> Option<u64> {
        None
    }
}

fn check_bounds(offset: u64, len: usize, size: u64) -> Result<(), DmaAccessError> {
    let len64 = len as u64;
    match offset.checked_add(len64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DmaAccessError::OutOfBounds {
            offset,
            len: len64,
            size,
        }),
    }
}

/// Owns one mmap'd range and unmaps it on drop.
struct MmapOwner {
    ptr: NonNull<u8>,
    len: NonZeroUsize,
}

// SAFETY: the pointer names a process-wide mapping, not thread-local data; the crate accesses it
// only through atomics, so moving the owner to another thread is sound.
unsafe impl Send for MmapOwner {}
// SAFETY: shared references only lead to atomic accesses (see `SharedRegion`).
unsafe impl Sync for MmapOwner {}

impl Drop for MmapOwner {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this object created and nobody else unmaps;
        // after drop no reference into it remains (SharedRegion hands out no long-lived
        // references that outlive it).
        let res = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len.get()) };
        if let Err(e) = res {
            tracing::error!("munmap of a SharedRegion failed: {e}");
        }
    }
}

/// An mmap'd memory region shared by the device and the driver.
///
/// The driver writes page tables and commands into it and reads fault records and completions
/// from it, through [`SharedRegion::as_ptr`] or through the safe accessors below; the device
/// reaches it through [`DmaMemory`]. Device accesses are relaxed atomic loads and stores of
/// bytes and aligned words; "done"/"valid" words are stored with release ordering.
pub struct SharedRegion {
    map: MmapOwner,
    writable: bool,
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("ptr", &self.map.ptr)
            .field("len", &self.map.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl SharedRegion {
    /// A zero-filled anonymous shared mapping of `len` bytes (rounded up to whole pages).
    pub fn anonymous(len: usize) -> Result<Arc<SharedRegion>, DmaAccessError> {
        let len = page_round(len)?;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses aliases nothing.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(DmaAccessError::Os)?;
        Ok(Arc::new(SharedRegion {
            map: MmapOwner {
                ptr: ptr.cast(),
                len,
            },
            writable: true,
        }))
    }

    /// Map `len` bytes of the file `fd` from `offset` (page aligned), shared. With `writable`
    /// false the mapping is read-only and device writes fail with [`DmaAccessError::ReadOnly`].
    pub fn from_fd(
        fd: impl AsFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> Result<Arc<SharedRegion>, DmaAccessError> {
        let len = page_round(len)?;
        let off = libc::off_t::try_from(offset).map_err(|_| DmaAccessError::Os(Errno::EINVAL))?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a shared file mapping at an address the kernel chooses aliases no Rust object;
        // the kernel validates fd, offset and length.
        let ptr = unsafe { nix::sys::mman::mmap(None, len, prot, MapFlags::MAP_SHARED, fd, off) }
            .map_err(DmaAccessError::Os)?;
        Ok(Arc::new(SharedRegion {
            map: MmapOwner {
                ptr: ptr.cast(),
                len,
            },
            writable,
        }))
    }

    /// First byte of the region. Valid for [`SharedRegion::len`] bytes while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// Length in bytes (a multiple of 4096).
    pub fn len(&self) -> usize {
        self.map.len.get()
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn byte(&self, offset: usize) -> &AtomicU8 {
        // SAFETY: callers check `offset < len`; the mapping is live for `&self` and any byte of
        // it may be accessed atomically (AtomicU8 has alignment 1).
        unsafe { AtomicU8::from_ptr(self.as_ptr().add(offset)) }
    }

    /// The u64 at `offset`, checked for bounds, alignment and (for `write`) writability.
    fn word64(&self, offset: u64, write: bool) -> Result<&AtomicU64, DmaAccessError> {
        self.check_word(offset, 8, write)?;
        // SAFETY: in bounds and 8-byte aligned (the mapping is page aligned); the memory lives
        // as long as `&self`, and every access the crate makes to it is atomic.
        Ok(unsafe { AtomicU64::from_ptr(self.as_ptr().add(offset as usize).cast()) })
    }

    /// The u32 at `offset`, checked like [`SharedRegion::word64`].
    fn word32(&self, offset: u64, write: bool) -> Result<&AtomicU32, DmaAccessError> {
        self.check_word(offset, 4, write)?;
        // SAFETY: as in `word64`, with 4-byte alignment.
        Ok(unsafe { AtomicU32::from_ptr(self.as_ptr().add(offset as usize).cast()) })
    }

    fn check_word(&self, offset: u64, size: usize, write: bool) -> Result<(), DmaAccessError> {
        if write && !self.writable {
            return Err(DmaAccessError::ReadOnly);
        }
        check_bounds(offset, size, self.len() as u64)?;
        if offset % size as u64 != 0 {
            return Err(DmaAccessError::Misaligned(offset));
        }
        Ok(())
    }

    /// The aligned u64 at `offset` as an atomic, if in bounds and 8-byte aligned.
    pub fn atomic_u64(&self, offset: u64) -> Option<&AtomicU64> {
        self.word64(offset, false).ok()
    }

    /// The aligned u32 at `offset` as an atomic, if in bounds and 4-byte aligned.
    pub fn atomic_u32(&self, offset: u64) -> Option<&AtomicU32> {
        self.word32(offset, false).ok()
    }

    /// Copy bytes out with relaxed atomic loads (aligned words where possible).
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaAccessError> {
        check_bounds(offset, buf.len(), self.len() as u64)?;
        let mut i = 0usize;
        while i < buf.len() {
            let off = offset + i as u64;
            if off % 8 == 0 && buf.len() - i >= 8 {
                if let Some(w) = self.atomic_u64(off) {
                    buf[i..i + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                    i += 8;
                    continue;
                }
            }
            buf[i] = self.byte(off as usize).load(Ordering::Relaxed);
            i += 1;
        }
        Ok(())
    }

    /// Copy bytes in with relaxed atomic stores (aligned words where possible). Works on
    /// read-only regions only if they were mapped writable.
    pub fn write_bytes(&self, offset: u64, buf: &[u8]) -> Result<(), DmaAccessError> {
        if !self.writable {
            return Err(DmaAccessError::ReadOnly);
        }
        check_bounds(offset, buf.len(), self.len() as u64)?;
        let mut i = 0usize;
        while i < buf.len() {
            let off = offset + i as u64;
            if off % 8 == 0 && buf.len() - i >= 8 {
                if let Some(w) = self.atomic_u64(off) {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(&buf[i..i + 8]);
                    w.store(u64::from_le_bytes(word), Ordering::Relaxed);
                    i += 8;
                    continue;
                }
            }
            self.byte(off as usize).store(buf[i], Ordering::Relaxed);
            i += 1;
        }
        Ok(())
    }

    /// Read the u64 at `offset` (8-byte aligned), relaxed.
    pub fn load_u64(&self, offset: u64) -> Result<u64, DmaAccessError> {
        Ok(self.word64(offset, false)?.load(Ordering::Relaxed))
    }

    /// Write the u64 at `offset` (8-byte aligned), relaxed.
    pub fn store_u64(&self, offset: u64, value: u64) -> Result<(), DmaAccessError> {
        self.word64(offset, true)?.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Read the u32 at `offset` (4-byte aligned) with acquire ordering: after it returns a
    /// "done"/"valid" word, the record body the device wrote before it is visible.
    pub fn load_u32_acquire(&self, offset: u64) -> Result<u32, DmaAccessError> {
        Ok(self.word32(offset, false)?.load(Ordering::Acquire))
    }

    /// Write the u32 at `offset` (4-byte aligned) with release ordering.
    pub fn store_u32(&self, offset: u64, value: u32) -> Result<(), DmaAccessError> {
        self.word32(offset, true)?.store(value, Ordering::Release);
        Ok(())
    }
}

impl DmaMemory for SharedRegion {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaAccessError> {
        self.read_bytes(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DmaAccessError> {
        self.write_bytes(offset, buf)
    }

    fn atomic_add_u64(&self, offset: u64, value: u64) -> Result<u64, DmaAccessError> {
        Ok(self
            .word64(offset, true)?
            .fetch_add(value, Ordering::AcqRel))
    }

    fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, DmaAccessError> {
        Ok(self.word64(offset, true)?.compare_exchange(
            current,
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ))
    }

    fn store_u32_release(&self, offset: u64, value: u32) -> Result<(), DmaAccessError> {
        self.store_u32(offset, value)
    }

    fn size(&self) -> Option<u64> {
        Some(self.len() as u64)
    }
}

fn page_round(len: usize) -> Result<NonZeroUsize, DmaAccessError> {
    let rounded = len
        .checked_add(4095)
        .map(|l| l & !4095)
        .ok_or(DmaAccessError::Os(Errno::EINVAL))?;
    NonZeroUsize::new(rounded).ok_or(DmaAccessError::Os(Errno::EINVAL))
}

/// Serialises `ProcessMemory` read-modify-writes (atomic add, compare-and-swap) against each
/// other.
static PROCESS_ATOMIC_LOCK: Mutex<()> = Mutex::new(());

/// A 64-bit atomic add on memory reached only by copies: a read and a write under `serial`, so it
/// is atomic against other device work through the same lock, not against the CPU. `base` is
/// the address `offset` is relative to, for the alignment check.
pub(crate) fn read_add_write<M: DmaMemory + ?Sized>(
    mem: &M,
    serial: &Mutex<()>,
    base: u64,
    offset: u64,
    value: u64,
) -> Result<u64, DmaAccessError> {
    if base.wrapping_add(offset) % 8 != 0 {
        return Err(DmaAccessError::Misaligned(offset));
    }
    let _serial = lock(serial);
    let mut word = [0u8; 8];
    mem.read(offset, &mut word)?;
    let old = u64::from_le_bytes(word);
    mem.write(offset, &old.wrapping_add(value).to_le_bytes())?;
    Ok(old)
}

/// A 64-bit compare-and-swap on memory reached only by copies: a read, a compare and (on a
/// match) a write under `serial`. Atomic against other device work through the same lock,
/// **not** against the CPU: a store the driver makes between the read and the write is lost.
/// `base` is the address `offset` is relative to, for the alignment check.
pub(crate) fn read_compare_write<M: DmaMemory + ?Sized>(
    mem: &M,
    serial: &Mutex<()>,
    base: u64,
    offset: u64,
    current: u64,
    new: u64,
) -> Result<Result<u64, u64>, DmaAccessError> {
    if base.wrapping_add(offset) % 8 != 0 {
        return Err(DmaAccessError::Misaligned(offset));
    }
    let _serial = lock(serial);
    let mut word = [0u8; 8];
    mem.read(offset, &mut word)?;
    let actual = u64::from_le_bytes(word);
    if actual != current {
        return Ok(Err(actual));
    }
    mem.write(offset, &new.to_le_bytes())?;
    Ok(Ok(actual))
}

/// Memory of a process reached with `process_vm_readv`/`process_vm_writev`.
///
/// An unmapped or `PROT_NONE` page makes the access fail with [`DmaAccessError::Fault`]; the
/// device records that as an IOMMU fault. `atomic_add_u64` is a read and a write, and
/// `compare_exchange_u64` a read, a compare and a write, under one emulator-wide lock: atomic
/// against other device work, **not** against concurrent CPU writes to the same word (a
/// limitation of this backend; use a [`SharedRegion`] for real atomics).
#[derive(Debug, Clone)]
pub struct ProcessMemory {
    pid: Pid,
    base: u64,
    len: u64,
}

impl ProcessMemory {
    /// This process's memory at `[base_va, base_va + len)`.
    pub fn current(base_va: u64, len: u64) -> ProcessMemory {
        ProcessMemory {
            pid: nix::unistd::getpid(),
            base: base_va,
            len,
        }
    }

    /// Process `pid`'s memory at `[base, base + len)` (needs ptrace permission over it).
    pub fn remote(pid: i32, base: u64, len: u64) -> ProcessMemory {
        ProcessMemory {
            pid: Pid::from_raw(pid),
            base,
            len,
        }
    }

    fn remote_iov(&self, offset: u64, len: usize) -> Result<RemoteIoVec, DmaAccessError> {
        check_bounds(offset, len, self.len)?;
        let addr = self
            .base
            .checked_add(offset)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or(DmaAccessError::Fault)?;
        Ok(RemoteIoVec { base: addr, len })
    }
}

fn map_vm_errno(e: Errno) -> DmaAccessError {
    match e {
        Errno::EFAULT => DmaAccessError::Fault,
        other => DmaAccessError::Os(other),
    }
}

impl ProcessMemory {
    /// Move `len` bytes in pieces: `step(done, remote)` transfers from byte `done` and returns
    /// how many bytes moved. process_vm_* may transfer less than asked; a transfer of 0 bytes
    /// stops at an inaccessible page, which is a fault.
    fn transfer(
        &self,
        offset: u64,
        len: usize,
        mut step: impl FnMut(usize, RemoteIoVec) -> nix::Result<usize>,
    ) -> Result<(), DmaAccessError> {
        let mut done = 0usize;
        while done < len {
            let remote = self.remote_iov(offset + done as u64, len - done)?;
            match step(done, remote).map_err(map_vm_errno)? {
                0 => return Err(DmaAccessError::Fault),
                n => done += n,
            }
        }
        Ok(())
    }
}

impl DmaMemory for ProcessMemory {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaAccessError> {
        let len = buf.len();
        self.transfer(offset, len, |done, remote| {
            process_vm_readv(
                self.pid,
                &mut [IoSliceMut::new(&mut buf[done..])],
                &[remote],
            )
        })
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DmaAccessError> {
        self.transfer(offset, buf.len(), |done, remote| {
            process_vm_writev(self.pid, &[IoSlice::new(&buf[done..])], &[remote])
        })
    }

    fn atomic_add_u64(&self, offset: u64, value: u64) -> Result<u64, DmaAccessError> {
        read_add_write(self, &PROCESS_ATOMIC_LOCK, self.base, offset, value)
    }

    fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, DmaAccessError> {
        read_compare_write(self, &PROCESS_ATOMIC_LOCK, self.base, offset, current, new)
    }

    fn size(&self) -> Option<u64> {
        Some(self.len)
    }
}
