//! Validated address ranges, access kinds and protections.

use crate::Error;

/// Base page size the crate works in (x86-64 and arm64 with 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;
/// The top of the mirrored user address space: 47-bit user VAs (4-level paging).
pub const VA_LIMIT: u64 = 1 << 47;

/// A page-aligned, non-empty, half-open virtual address range `[start, end)` below 2^47.
///
/// ```
/// use mirror::VaRange;
/// let r = VaRange::new(0x1000, 0x3000).unwrap();
/// assert_eq!((r.start(), r.end(), r.pages()), (0x1000, 0x4000, 3));
/// assert!(VaRange::new(0x1001, 0x1000).is_err()); // unaligned
/// assert!(VaRange::new(0x1000, 0).is_err()); // empty
/// assert!(VaRange::new(1 << 47, 0x1000).is_err()); // beyond 47 bits
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VaRange {
    start: u64,
    end: u64,
}

impl VaRange {
    /// Validates and builds `[start, start + len)`.
    pub fn new(start: u64, len: u64) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidRange { start, len, reason };
        if len == 0 {
            return Err(bad("zero length"));
        }
        if start % PAGE_SIZE != 0 {
            return Err(bad("start is not page aligned"));
        }
        if len % PAGE_SIZE != 0 {
            return Err(bad("length is not a multiple of the page size"));
        }
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad("range overflows"))?;
        if end > VA_LIMIT {
            return Err(bad("range extends beyond the 47-bit user address space"));
        }
        Ok(VaRange { start, end })
    }

    /// Builds `[start, end)`.
    pub fn from_bounds(start: u64, end: u64) -> Result<Self, Error> {
        if end <= start {
            return Err(Error::InvalidRange {
                start,
                len: end.wrapping_sub(start),
                reason: "end is not above start",
            });
        }
        Self::new(start, end - start)
    }

    /// The whole mirrored user address space, `[0, 2^47)`.
    pub const fn whole() -> Self {
        VaRange {
            start: 0,
            end: VA_LIMIT,
        }
    }

    /// First address.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// One past the last address.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: ranges are non-empty by construction.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Number of 4 KiB pages.
    pub const fn pages(&self) -> usize {
        (self.len() / PAGE_SIZE) as usize
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &VaRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether `other` lies entirely inside `self`.
    pub const fn contains_range(&self, other: &VaRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether `addr` lies inside.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The common part, if any.
    pub fn intersect(&self, other: &VaRange) -> Option<VaRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(VaRange { start, end })
    }

    /// Builds a range from kernel-reported bounds, rounding outwards to pages and clamping to the
    /// 47-bit limit; `None` if nothing remains.
    pub(crate) fn from_kernel(start: u64, end: u64) -> Option<VaRange> {
        let start = start & !(PAGE_SIZE - 1);
        let end = end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let end = end.min(VA_LIMIT);
        (start < end).then_some(VaRange { start, end })
    }
}

impl std::fmt::Debug for VaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// The access a device fault needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read access.
    Read,
    /// Write access (implies read).
    Write,
}

/// CPU protection of a range, as reported by the VMA or passed to `protect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Perms {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

impl Perms {
    /// No access (PROT_NONE).
    pub const NONE: Perms = Perms {
        read: false,
        write: false,
        exec: false,
    };
    /// Read only.
    pub const READ: Perms = Perms {
        read: true,
        write: false,
        exec: false,
    };
    /// Read and write.
    pub const READ_WRITE: Perms = Perms {
        read: true,
        write: true,
        exec: false,
    };

    /// From `libc::PROT_*` bits.
    pub fn from_prot(prot: libc::c_int) -> Perms {
        Perms {
            read: prot & libc::PROT_READ != 0,
            write: prot & libc::PROT_WRITE != 0,
            exec: prot & libc::PROT_EXEC != 0,
        }
    }

    /// To `libc::PROT_*` bits.
    pub fn to_prot(self) -> libc::c_int {
        let mut prot = libc::PROT_NONE;
        if self.read {
            prot |= libc::PROT_READ;
        }
        if self.write {
            prot |= libc::PROT_WRITE;
        }
        if self.exec {
            prot |= libc::PROT_EXEC;
        }
        prot
    }

    /// Whether `access` is allowed.
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write && self.read,
        }
    }
}
