//! [`Mapping`]: an owned `mmap` region, for tests, examples and buffers a device will mirror.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

use crate::{Error, VaRange};

/// An owned memory mapping of the current process, unmapped on drop.
///
/// Dropping a `Mapping` inside a tracked range produces a userfaultfd UNMAP event like any munmap.
///
/// ```
/// use mirror::Mapping;
/// let m = Mapping::anonymous(4 * 4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
/// assert_eq!(m.range().len(), 4 * 4096);
/// ```
#[derive(Debug)]
pub struct Mapping {
    addr: u64,
    len: u64,
    released: bool,
}

impl Mapping {
    /// Maps `len` bytes of private anonymous memory with protection `prot` (`libc::PROT_*`).
    pub fn anonymous(len: usize, prot: libc::c_int) -> Result<Self, Error> {
        Self::map_at(
            0,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            None,
            0,
        )
    }

    /// Maps memory with explicit `mmap` flags (`libc::MAP_*`), optionally backed by `fd` at `offset`.
    pub fn with_flags(
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
    ) -> Result<Self, Error> {
        Self::map_at(0, len, prot, flags, fd, offset)
    }

    /// Maps private anonymous memory at exactly `addr` with MAP_FIXED_NOREPLACE, which fails
    /// (EEXIST) instead of replacing anything already mapped there.
    pub fn anonymous_at(addr: u64, len: usize, prot: libc::c_int) -> Result<Self, Error> {
        let r = VaRange::new(addr, len as u64)?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
        let m = Self::map_at(r.start(), len, prot, flags, None, 0)?;
        if m.addr != r.start() {
            // Kernels before 4.17 treat the flag as a hint.
            return Err(Error::InvalidArgument {
                what: "the kernel ignored MAP_FIXED_NOREPLACE",
            });
        }
        Ok(m)
    }

    /// Maps `len` bytes of anonymous memory aligned to `align` (a power of two), by over-mapping
    /// and trimming; used to get 2 MiB-aligned buffers for THP.
    pub fn anonymous_aligned(len: usize, align: usize, prot: libc::c_int) -> Result<Self, Error> {
        if !align.is_power_of_two() || len == 0 {
            return Err(Error::InvalidArgument {
                what: "alignment must be a power of two and length non-zero",
            });
        }
        let over = Self::anonymous(len + align, prot)?;
        let base = over.addr;
        let aligned = (base + align as u64 - 1) & !(align as u64 - 1);
        let over_end = base + (len + align) as u64;
        let mut over = over;
        over.released = true; // we take the pieces over by hand below
                              // SAFETY: both trimmed pieces belong to the mapping we just created and nothing uses them.
        unsafe {
            if aligned > base {
                trim(base, aligned - base)?;
            }
            if over_end > aligned + len as u64 {
                trim(aligned + len as u64, over_end - aligned - len as u64)?;
            }
        }
        Ok(Mapping {
            addr: aligned,
            len: len as u64,
            released: false,
        })
    }

    /// `mmap` with a hint; MAP_FIXED is always stripped so nothing mapped can be replaced
    /// (MAP_FIXED_NOREPLACE may be passed).
    fn map_at(
        hint: u64,
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        fd: Option<BorrowedFd<'_>>,
        offset: u64,
    ) -> Result<Self, Error> {
        if len == 0 {
            return Err(Error::InvalidArgument {
                what: "mapping length must be non-zero",
            });
        }
        let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: without MAP_FIXED the kernel never replaces an existing mapping (the hint is only
        // a hint, and MAP_FIXED_NOREPLACE fails instead); the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                len,
                prot,
                flags & !libc::MAP_FIXED,
                raw_fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::sys("mmap", Errno::last()));
        }
        Ok(Mapping {
            addr: ptr as u64,
            len: len as u64,
            released: false,
        })
    }

    /// The mapped range.
    pub fn range(&self) -> VaRange {
        VaRange::new(self.addr, self.len).expect("a successful mmap yields a valid range")
    }

    /// The start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// A raw pointer to the start.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false: a mapping has a non-zero length.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Gives up ownership without unmapping (the caller has unmapped or moved the range itself,
    /// e.g. through [`crate::AddressSpace::munmap`]).
    pub fn forget(mut self) -> VaRange {
        self.released = true;
        self.range()
    }

    /// Writes `value` to the byte at `offset` through a volatile store (so tests can fault pages in
    /// by touching them).
    pub fn write_byte(&self, offset: usize, value: u8) {
        assert!(offset < self.len(), "offset {offset} beyond mapping");
        // SAFETY: offset is within the mapping we own; a volatile byte store has no aliasing
        // requirements. A PROT_READ mapping would fault: that is the caller's test intent.
        unsafe { std::ptr::write_volatile(self.as_ptr().add(offset), value) }
    }

    /// Reads the byte at `offset` through a volatile load.
    pub fn read_byte(&self, offset: usize) -> u8 {
        assert!(offset < self.len(), "offset {offset} beyond mapping");
        // SAFETY: offset is within the mapping we own; a volatile byte load is always aligned.
        unsafe { std::ptr::read_volatile(self.as_ptr().add(offset)) }
    }
}

impl Mapping {
    fn sub_range(&self, offset: usize, len: usize) -> Result<VaRange, Error> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(Error::InvalidArgument {
                what: "sub-range beyond the mapping",
            });
        }
        VaRange::new(self.addr + offset as u64, len as u64)
    }

    /// MADV_DONTNEED on part of the mapping: the pages are dropped (private anonymous memory reads
    /// back as zeros). Safe because the mapping is only reachable through raw accesses.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), Error> {
        let r = self.sub_range(offset, len)?;
        // SAFETY: we own the range and hand out no references into it, only volatile accesses.
        unsafe { super::mm::madvise(r.start(), r.len(), libc::MADV_DONTNEED) }
            .map_err(|e| Error::sys_range("madvise(MADV_DONTNEED)", r.start(), r.end(), e))
    }

    /// Changes the protection of part of the mapping.
    pub fn protect(&self, offset: usize, len: usize, prot: libc::c_int) -> Result<(), Error> {
        let r = self.sub_range(offset, len)?;
        // SAFETY: we own the range; removing access can only make later raw accesses fault, which
        // is what the caller asks for.
        unsafe { super::mm::mprotect(r.start(), r.len(), prot) }
            .map_err(|e| Error::sys_range("mprotect", r.start(), r.end(), e))
    }

    /// Splits the mapping at `offset` (page aligned) into two owned mappings.
    pub fn split_at(mut self, offset: usize) -> Result<(Mapping, Mapping), Error> {
        if offset == 0 || offset >= self.len() || offset as u64 % crate::PAGE_SIZE != 0 {
            return Err(Error::InvalidArgument {
                what: "split offset must be page aligned and inside the mapping",
            });
        }
        self.released = true;
        let head = Mapping {
            addr: self.addr,
            len: offset as u64,
            released: false,
        };
        let tail = Mapping {
            addr: self.addr + offset as u64,
            len: self.len - offset as u64,
            released: false,
        };
        Ok((head, tail))
    }

    /// Moves the mapping with `mremap(MREMAP_MAYMOVE)` to a new, larger or smaller size; the old
    /// range is unmapped by the kernel (a REMAP + UNMAP pair when tracked).
    pub fn remap(mut self, new_len: usize) -> Result<Mapping, Error> {
        if new_len == 0 {
            return Err(Error::InvalidArgument {
                what: "new length must be non-zero",
            });
        }
        // A fresh reservation forces a real move (a pure grow in place would not).
        let target = Mapping::anonymous(new_len, libc::PROT_NONE)?;
        let to = target.addr;
        let mut target = target;
        target.released = true;
        // SAFETY: we own both the old mapping and the reservation at `to`; the reservation is
        // replaced atomically by MREMAP_FIXED and nothing references either range.
        let new_addr = unsafe {
            super::mm::mremap(
                self.addr,
                self.len,
                new_len as u64,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to,
            )
        };
        match new_addr {
            Ok(a) => {
                self.released = true;
                Ok(Mapping {
                    addr: a,
                    len: new_len as u64,
                    released: false,
                })
            }
            Err(e) => {
                target.released = false; // unmap the reservation on drop
                Err(Error::sys_range(
                    "mremap",
                    self.addr,
                    self.addr + self.len,
                    e,
                ))
            }
        }
    }
}

/// # Safety
/// The range must be part of a mapping the caller owns and nothing may use it.
unsafe fn trim(addr: u64, len: u64) -> Result<(), Error> {
    // SAFETY: guaranteed by the caller.
    unsafe { super::mm::munmap(addr, len) }.map_err(|e| Error::sys("munmap", e))
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.released {
            // SAFETY: we own the mapping and Rust code can only reach it through `&self`, which is
            // gone once we are dropped.
            if let Err(e) = unsafe { super::mm::munmap(self.addr, self.len) } {
                tracing::warn!(addr = self.addr, len = self.len, error = %e, "munmap on drop failed");
            }
        }
    }
}
