//! IOVA allocation inside the ranges the IOMMU reports.
//!
//! Process memory is mapped at IOVA == VA whenever that range is free and inside the reported
//! ranges: it makes device-side addresses readable in logs and costs nothing. When it is not
//! possible (the IOMMU is narrower than the VA, or a stale mapping of a recently unmapped range
//! still occupies it) the allocator falls back to the highest free space, which on a 48-bit
//! IOMMU lies above every user-space VA (bit 47 set) and so never blocks a later identity map.

use std::collections::BTreeMap;
use std::ops::Range;

/// Why an IOVA could not be allocated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IovaError {
    /// No free space of that size.
    #[error("no free IOVA space for {len:#x} bytes (aligned to {align:#x}) in {ranges:x?}")]
    Exhausted {
        /// Requested length.
        len: u64,
        /// Requested alignment.
        align: u64,
        /// The ranges searched.
        ranges: Vec<Range<u64>>,
    },
    /// Zero length or unaligned request.
    #[error("bad IOVA request: len {len:#x}, align {align:#x}")]
    BadRequest {
        /// Requested length.
        len: u64,
        /// Requested alignment.
        align: u64,
    },
}

/// The device's IOVA space: which parts are in use.
#[derive(Debug)]
pub struct IovaSpace {
    ranges: Vec<Range<u64>>,
    used: BTreeMap<u64, u64>,
    used_bytes: u64,
}

impl IovaSpace {
    /// A space over `ranges` (`[start, end)`, any order).
    pub fn new(mut ranges: Vec<Range<u64>>) -> IovaSpace {
        ranges.retain(|r| r.start < r.end);
        ranges.sort_by_key(|r| r.start);
        IovaSpace {
            ranges,
            used: BTreeMap::new(),
            used_bytes: 0,
        }
    }

    /// Bytes currently allocated.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Number of allocations.
    pub fn allocations(&self) -> usize {
        self.used.len()
    }

    fn is_free(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if !self.ranges.iter().any(|r| r.start <= start && end <= r.end) {
            return false;
        }
        if let Some((&s, &e)) = self.used.range(..end).next_back() {
            if e > start && s < end {
                return false;
            }
        }
        true
    }

    /// Allocate `len` bytes, at `preferred` if that is free (identity mapping), else in the
    /// highest free gap, aligned to `align` (a power of two).
    pub fn alloc(
        &mut self,
        preferred: Option<u64>,
        len: u64,
        align: u64,
    ) -> Result<u64, IovaError> {
        if len == 0 || !align.is_power_of_two() || len % 4096 != 0 {
            return Err(IovaError::BadRequest { len, align });
        }
        if let Some(p) = preferred {
            if p % align == 0 && self.is_free(p, len) {
                self.insert(p, len);
                return Ok(p);
            }
        }
        let found = self
            .find_highest_gap(len, align)
            .ok_or_else(|| IovaError::Exhausted {
                len,
                align,
                ranges: self.ranges.clone(),
            })?;
        self.insert(found, len);
        Ok(found)
    }

    fn find_highest_gap(&self, len: u64, align: u64) -> Option<u64> {
        for r in self.ranges.iter().rev() {
            // Walk the gaps of this range from the top down.
            let mut gap_end = r.end;
            let mut used = self.used.range(r.start..r.end).rev().peekable();
            // An allocation that starts below r.start but reaches into it also bounds gaps.
            loop {
                let (gap_start, next_end) = match used.next() {
                    Some((&s, &e)) => (e.min(gap_end), Some(s)),
                    None => {
                        let floor = self
                            .used
                            .range(..r.start)
                            .next_back()
                            .map_or(r.start, |(_, &e)| e.max(r.start));
                        (floor, None)
                    }
                };
                if gap_end >= gap_start + len {
                    let candidate = (gap_end - len) & !(align - 1);
                    if candidate >= gap_start {
                        return Some(candidate);
                    }
                }
                match next_end {
                    Some(s) => gap_end = s,
                    None => break,
                }
            }
        }
        None
    }

    fn insert(&mut self, start: u64, len: u64) {
        self.used.insert(start, start + len);
        self.used_bytes += len;
    }

    /// Free the allocation that starts at `start`. Returns its length, or None if there is none
    /// (a driver bug the caller reports).
    pub fn free(&mut self, start: u64) -> Option<u64> {
        let end = self.used.remove(&start)?;
        let len = end - start;
        self.used_bytes -= len;
        Some(len)
    }
}

#[cfg(test)]
// One-range IOMMUs are the common case the tests describe.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn identity_when_free_else_high() {
        let mut s = IovaSpace::new(vec![4096..(1 << 48)]);
        assert_eq!(s.alloc(Some(0x7000_0000), 8192, 4096), Ok(0x7000_0000));
        let fallback = s.alloc(Some(0x7000_1000), 4096, 4096).unwrap();
        assert_eq!(fallback, (1 << 48) - 4096);
        assert_eq!(s.used_bytes(), 12288);
        assert_eq!(s.free(0x7000_0000), Some(8192));
        assert_eq!(s.alloc(Some(0x7000_1000), 4096, 4096), Ok(0x7000_1000));
        assert_eq!(s.free(0x1234_5000), None);
    }

    #[test]
    fn narrow_iommu_refuses_high_identity() {
        let mut s = IovaSpace::new(vec![0..(1 << 39)]);
        let iova = s.alloc(Some(0x7fff_0000_0000), 2 * MB, 2 * MB).unwrap();
        assert!(iova < (1 << 39));
        assert_eq!(iova % (2 * MB), 0);
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut s = IovaSpace::new(vec![0..16384]);
        s.alloc(None, 16384, 4096).unwrap();
        assert!(matches!(
            s.alloc(None, 4096, 4096),
            Err(IovaError::Exhausted { .. })
        ));
        assert!(matches!(
            s.alloc(None, 0, 4096),
            Err(IovaError::BadRequest { .. })
        ));
    }

    proptest! {
        #[test]
        fn allocations_never_overlap(ops in proptest::collection::vec((0u64..64, 1u64..8, any::<bool>()), 1..60)) {
            let mut s = IovaSpace::new(vec![0..(64 * 4096), (128 * 4096)..(160 * 4096)]);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (page, pages, free) in ops {
                if free && !live.is_empty() {
                    let (start, len) = live.remove((page as usize) % live.len());
                    prop_assert_eq!(s.free(start), Some(len));
                    continue;
                }
                if let Ok(iova) = s.alloc(Some(page * 4096), pages * 4096, 4096) {
                    for &(a, l) in &live {
                        prop_assert!(iova + pages * 4096 <= a || a + l <= iova);
                    }
                    prop_assert!(iova + pages * 4096 <= 64 * 4096 || (iova >= 128 * 4096 && iova + pages * 4096 <= 160 * 4096));
                    live.push((iova, pages * 4096));
                }
            }
            prop_assert_eq!(s.used_bytes(), live.iter().map(|l| l.1).sum::<u64>());
        }
    }
}
