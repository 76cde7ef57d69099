//! The page-table walker: four levels, 4 KiB leaves at level 1, 2 MiB leaves at level 2.
//!
//! The walker is pure: it reads entries through a callback (the device passes one that goes
//! through the IOMMU), so it can be tested without a device.

use accel_abi::pt::{self, Pte};
use accel_abi::{is_canonical, PT_LEVELS};

use crate::tlb::TlbEntry;
use crate::walk_cache::{TableStep, WalkStart};

/// Result of walking the table for one VA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Walk {
    /// A valid leaf maps the VA (permissions not yet checked): the translation, the IOVA of the
    /// leaf entry and its raw value as read (the ACCESSED/DIRTY update compares against it).
    Leaf {
        entry: TlbEntry,
        pte_iova: u64,
        raw: u64,
    },
    /// Some level's entry has VALID clear.
    NotPresent,
    /// The entry at this IOVA is malformed.
    BadPte { entry_iova: u64 },
    /// Reading the entry at this IOVA failed (IOMMU fault); the callback has recorded it.
    ReadFailed { entry_iova: u64 },
    /// The VA is not canonical.
    NonCanonical,
}

/// A walk from the root table `root_iova`.
pub(crate) fn from_root(root_iova: u64) -> WalkStart {
    WalkStart {
        level: PT_LEVELS,
        table: root_iova,
    }
}

/// Walk for `va` from the table `start` names (the root, or one the walk cache found).
/// `read_entry(iova)` returns the 8-byte entry at `iova`, or `None` if the read failed;
/// `on_table` is told every table pointer the walk follows (what the walk cache may keep).
pub(crate) fn walk(
    start: WalkStart,
    va: u64,
    mut read_entry: impl FnMut(u64) -> Option<u64>,
    mut on_table: impl FnMut(TableStep),
) -> Walk {
    if !is_canonical(va) {
        return Walk::NonCanonical;
    }
    let mut table = start.table;
    for level in (1..=start.level.min(PT_LEVELS)).rev() {
        let entry_iova = table + 8 * pt::index(va, level) as u64;
        let Some(raw) = read_entry(entry_iova) else {
            return Walk::ReadFailed { entry_iova };
        };
        match Pte::decode(raw, level) {
            Err(_) => return Walk::BadPte { entry_iova },
            Ok(Pte::NotPresent) => return Walk::NotPresent,
            Ok(Pte::Table { iova }) => {
                on_table(TableStep {
                    level,
                    next_table: iova,
                });
                table = iova;
            }
            Ok(Pte::Leaf { iova, perms }) => {
                let size = pt::leaf_size(level);
                return Walk::Leaf {
                    entry: TlbEntry {
                        va_base: va & !(size - 1),
                        size,
                        iova_base: iova,
                        perms,
                        dirty: pt::dirty(raw),
                    },
                    pte_iova: entry_iova,
                    raw,
                };
            }
        }
    }
    // Level 1 entries are leaves or malformed, so the loop always returns; be defensive anyway.
    Walk::NotPresent
}

#[cfg(test)]
mod tests {
    use super::*;
    use accel_abi::pt::Perms;
    use std::collections::HashMap;

    /// A page table in a hash map keyed by entry IOVA.
    struct Tables(HashMap<u64, u64>);

    impl Tables {
        fn set(&mut self, table: u64, va: u64, level: u32, raw: u64) {
            self.0.insert(table + 8 * pt::index(va, level) as u64, raw);
        }
        fn read(&self, iova: u64) -> Option<u64> {
            if iova >= 0xdead_0000 {
                return None;
            }
            Some(*self.0.get(&iova).unwrap_or(&0))
        }
    }

    const L4: u64 = 0x1000;
    const L3: u64 = 0x2000;
    const L2: u64 = 0x3000;
    const L1: u64 = 0x4000;

    fn base(va: u64) -> Tables {
        let mut t = Tables(HashMap::new());
        t.set(L4, va, 4, Pte::table(L3));
        t.set(L3, va, 3, Pte::table(L2));
        t
    }

    #[test]
    fn four_k_leaf() {
        let va = 0x7f00_1234_5678;
        let mut t = base(va);
        t.set(L2, va, 2, Pte::table(L1));
        t.set(L1, va, 1, Pte::leaf(0x9_9000, Perms::R));
        let mut steps = Vec::new();
        match walk(from_root(L4), va, |i| t.read(i), |s| steps.push(s)) {
            Walk::Leaf { entry: e, .. } => {
                assert_eq!(e.iova_of(va), 0x9_9678);
                assert_eq!(e.size, 4096);
                assert_eq!(e.perms, Perms::R);
                assert!(!e.dirty);
            }
            other => panic!("{other:?}"),
        }
        let levels: Vec<(u32, u64)> = steps.iter().map(|s| (s.level, s.next_table)).collect();
        assert_eq!(levels, [(4, L3), (3, L2), (2, L1)]);
        // From a cached level-1 table the walk reads one entry only.
        let mut reads = 0;
        let start = WalkStart {
            level: 1,
            table: L1,
        };
        let w = walk(
            start,
            va,
            |i| {
                reads += 1;
                t.read(i)
            },
            |_| panic!("no table pointer below level 1"),
        );
        assert!(matches!(w, Walk::Leaf { entry, .. } if entry.iova_of(va) == 0x9_9678));
        assert_eq!(reads, 1);
    }

    #[test]
    fn leaf_reports_its_entry_and_dirty_bit() {
        let va = 0x7f00_1234_5000;
        let mut t = base(va);
        t.set(L2, va, 2, Pte::table(L1));
        let raw = Pte::leaf(0x9_9000, Perms::RW) | pt::ACCESSED | pt::DIRTY;
        t.set(L1, va, 1, raw);
        match walk(from_root(L4), va, |i| t.read(i), |_| {}) {
            Walk::Leaf {
                entry,
                pte_iova,
                raw: got,
            } => {
                assert!(entry.dirty);
                assert_eq!(pte_iova, L1 + 8 * pt::index(va, 1) as u64);
                assert_eq!(got, raw);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_m_leaf() {
        let va = 0x4000_0000 + 0x12_3456;
        let mut t = base(va);
        t.set(L2, va, 2, Pte::leaf(0x8000_0000, Perms::RW));
        match walk(from_root(L4), va, |i| t.read(i), |_| {}) {
            Walk::Leaf { entry: e, .. } => {
                assert_eq!(e.va_base, 0x4000_0000);
                assert_eq!(e.iova_of(va), 0x8012_3456);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn not_present_bad_and_failed() {
        let va = 0x1000_0000;
        let mut t = base(va);
        assert_eq!(
            walk(from_root(L4), va, |i| t.read(i), |_| {}),
            Walk::NotPresent
        );
        // A misaligned large leaf is malformed.
        t.set(L2, va, 2, Pte::leaf(0x8000_1000, Perms::RW));
        let e = L2 + 8 * pt::index(va, 2) as u64;
        assert_eq!(
            walk(from_root(L4), va, |i| t.read(i), |_| {}),
            Walk::BadPte { entry_iova: e }
        );
        t.set(L2, va, 2, Pte::table(0xdead_0000));
        assert!(matches!(
            walk(from_root(L4), va, |i| t.read(i), |_| {}),
            Walk::ReadFailed { .. }
        ));
        assert_eq!(
            walk(from_root(L4), 1 << 48, |i| t.read(i), |_| {}),
            Walk::NonCanonical
        );
    }
}
