//! Device page-table format.
//!
//! A four-level radix tree over a 48-bit VA, 512 eight-byte entries per 4 KiB table page, table
//! pages in DMA memory written by the driver. Level 4 is the root (named by the ASID root
//! register), level 1 holds 4 KiB leaves; a level-2 entry may be a 2 MiB large leaf. The index
//! into the level-`n` table is `VA[12 + 9n - 1 : 12 + 9(n-1)]`.
//!
//! Entry bits: 0 VALID, 1 READ, 2 WRITE, 3 LEAF, 5 ACCESSED, 6 DIRTY, 51..12 address (IOVA of
//! the next table, or of the page), everything else reserved and zero. LEAF must be clear at
//! levels 4 and 3, may be set at level 2 (then the address must be 2 MiB aligned) and must be set
//! at level 1. READ, WRITE, ACCESSED and DIRTY are reserved in non-leaf entries. A leaf with
//! WRITE but without READ is malformed. An entry with VALID clear is "not present" whatever its
//! other bits say.
//!
//! ACCESSED and DIRTY (revision 2) are written by the device's walker when
//! [`crate::regs::pt_ctrl::AD_ENABLE`] is set, the way an IOMMU or a CPU maintains them, and
//! cleared by the driver; a driver may also write them itself (a leaf installed with them set is
//! never updated). They grant nothing: permissions are READ and WRITE alone.

use crate::{AbiError, LARGE_PAGE_SIZE, PAGE_SIZE, PT_LEVELS};

/// Entries per table page.
pub const ENTRIES: usize = 512;
/// Bytes per table page.
pub const TABLE_BYTES: u64 = 4096;

/// Entry is valid.
pub const VALID: u64 = 1 << 0;
/// Leaf grants reads.
pub const READ: u64 = 1 << 1;
/// Leaf grants writes (and atomics, together with READ).
pub const WRITE: u64 = 1 << 2;
/// Entry is a leaf.
pub const LEAF: u64 = 1 << 3;
/// Leaf was used for an access since the bit was last cleared (revision 2, set by the walker).
pub const ACCESSED: u64 = 1 << 5;
/// Leaf was used for a write or atomic since the bit was last cleared (revision 2, set by the
/// walker together with ACCESSED).
pub const DIRTY: u64 = 1 << 6;
/// Address field mask (bits 51..12).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bits that must be zero in every valid entry (ACCESSED and DIRTY are also reserved in
/// non-leaf entries).
pub const RESERVED_MASK: u64 = !(ADDR_MASK | VALID | READ | WRITE | LEAF | ACCESSED | DIRTY);

/// True if the raw leaf entry `raw` has ACCESSED set.
pub fn accessed(raw: u64) -> bool {
    raw & ACCESSED != 0
}

/// True if the raw leaf entry `raw` has DIRTY set.
pub fn dirty(raw: u64) -> bool {
    raw & DIRTY != 0
}

/// Index into the table at `level` (1..=4) for `va`.
pub fn index(va: u64, level: u32) -> usize {
    debug_assert!((1..=PT_LEVELS).contains(&level));
    ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// Bytes mapped by one entry at `level` (4 KiB at level 1, 2 MiB at level 2, ...).
pub fn span(level: u32) -> u64 {
    1u64 << (12 + 9 * (level - 1))
}

/// Permissions of a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perms {
    /// Reads allowed.
    pub read: bool,
    /// Writes (and atomics) allowed.
    pub write: bool,
}

impl Perms {
    /// Read-only.
    pub const R: Perms = Perms {
        read: true,
        write: false,
    };
    /// Read-write.
    pub const RW: Perms = Perms {
        read: true,
        write: true,
    };
}

/// A decoded page-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pte {
    /// VALID clear.
    NotPresent,
    /// Pointer to the next-level table at this IOVA.
    Table {
        /// IOVA of the next table page (4 KiB aligned).
        iova: u64,
    },
    /// A leaf mapping a 4 KiB page (level 1) or a 2 MiB page (level 2).
    Leaf {
        /// IOVA of the page.
        iova: u64,
        /// Permissions.
        perms: Perms,
    },
}

impl Pte {
    /// Encode a table pointer.
    pub fn table(iova: u64) -> u64 {
        debug_assert_eq!(iova & !ADDR_MASK, 0);
        (iova & ADDR_MASK) | VALID
    }

    /// Encode a leaf. `iova` must be aligned to the leaf's size.
    pub fn leaf(iova: u64, perms: Perms) -> u64 {
        debug_assert_eq!(iova & !ADDR_MASK, 0);
        let mut v = (iova & ADDR_MASK) | VALID | LEAF;
        if perms.read {
            v |= READ;
        }
        if perms.write {
            v |= WRITE;
        }
        v
    }

    /// Decode the raw entry `raw` found at `level` (1..=4).
    pub fn decode(raw: u64, level: u32) -> Result<Pte, AbiError> {
        if raw & VALID == 0 {
            return Ok(Pte::NotPresent);
        }
        if raw & RESERVED_MASK != 0 {
            return Err(AbiError::BadField {
                field: "pte.reserved",
                value: raw,
            });
        }
        let iova = raw & ADDR_MASK;
        let leaf = raw & LEAF != 0;
        match (level, leaf) {
            (1, false) | (3, true) | (4, true) => Err(AbiError::BadField {
                field: "pte.leaf",
                value: raw,
            }),
            (2..=4, false) => {
                if raw & (READ | WRITE | ACCESSED | DIRTY) != 0 {
                    return Err(AbiError::BadField {
                        field: "pte.table_perms",
                        value: raw,
                    });
                }
                Ok(Pte::Table { iova })
            }
            (1 | 2, true) => {
                if level == 2 && iova % LARGE_PAGE_SIZE != 0 {
                    return Err(AbiError::BadField {
                        field: "pte.large_alignment",
                        value: raw,
                    });
                }
                let perms = Perms {
                    read: raw & READ != 0,
                    write: raw & WRITE != 0,
                };
                if perms.write && !perms.read {
                    return Err(AbiError::BadField {
                        field: "pte.write_without_read",
                        value: raw,
                    });
                }
                Ok(Pte::Leaf { iova, perms })
            }
            _ => Err(AbiError::BadField {
                field: "pte.level",
                value: u64::from(level),
            }),
        }
    }
}

/// Size of the page a leaf at `level` maps.
pub fn leaf_size(level: u32) -> u64 {
    if level == 2 {
        LARGE_PAGE_SIZE
    } else {
        PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn indices() {
        let va = 0x0000_7f12_3456_7000u64;
        assert_eq!(index(va, 1), ((va >> 12) & 0x1ff) as usize);
        assert_eq!(index(va, 4), ((va >> 39) & 0x1ff) as usize);
        assert_eq!(span(2), LARGE_PAGE_SIZE);
    }

    #[test]
    fn round_trip() {
        let raw = Pte::leaf(0x1234_5000, Perms::RW);
        assert_eq!(
            Pte::decode(raw, 1).unwrap(),
            Pte::Leaf {
                iova: 0x1234_5000,
                perms: Perms::RW
            }
        );
        let t = Pte::table(0x8000);
        assert_eq!(Pte::decode(t, 3).unwrap(), Pte::Table { iova: 0x8000 });
        assert_eq!(Pte::decode(0, 1).unwrap(), Pte::NotPresent);
        assert_eq!(Pte::decode(!VALID, 4).unwrap(), Pte::NotPresent);
    }

    #[test]
    fn malformed() {
        assert!(Pte::decode(Pte::leaf(0x20_0000, Perms::R), 3).is_err());
        assert!(Pte::decode(Pte::table(0x1000), 1).is_err());
        assert!(Pte::decode(Pte::leaf(0x1000, Perms::R), 2).is_err());
        assert!(Pte::decode(VALID | LEAF | WRITE, 1).is_err());
        assert!(Pte::decode(VALID | (1 << 60), 4).is_err());
        assert!(Pte::decode(Pte::table(0x1000) | READ, 4).is_err());
        assert!(Pte::decode(Pte::table(0x1000) | ACCESSED, 3).is_err());
        assert!(Pte::decode(Pte::table(0x1000) | DIRTY, 2).is_err());
    }

    #[test]
    fn accessed_and_dirty_are_leaf_bits_that_grant_nothing() {
        let raw = Pte::leaf(0x7000, Perms::R) | ACCESSED | DIRTY;
        assert_eq!(
            Pte::decode(raw, 1).unwrap(),
            Pte::Leaf {
                iova: 0x7000,
                perms: Perms::R
            }
        );
        assert!(accessed(raw) && dirty(raw));
        assert!(!accessed(Pte::leaf(0x7000, Perms::RW)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(raw in any::<u64>(), level in 1u32..=4) {
            let _ = Pte::decode(raw, level);
        }

        #[test]
        fn leaf_round_trips(page in 0u64..(1 << 40), w in any::<bool>()) {
            let perms = Perms { read: true, write: w };
            let raw = Pte::leaf(page << 12, perms);
            prop_assert_eq!(Pte::decode(raw, 1).unwrap(), Pte::Leaf { iova: page << 12, perms });
        }
    }
}
