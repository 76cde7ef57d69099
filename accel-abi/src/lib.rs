//! The register-level interface of the MXA-1 mirror accelerator.
//!
//! This crate is the "hardware header": every register offset, bit, page-table-entry format,
//! fault-record, command and completion layout of the device lives here, once, with encode and
//! decode. The driver (`driver`) and the emulated device (`firmware-stubs`) both use it, so they
//! cannot disagree about a bit. The prose specification is `docs/device.md`; where this file and
//! that document disagree, both are wrong until one is fixed.
//!
//! All multi-byte values are little-endian. All structures in DMA memory are naturally aligned.
//!
//! ```
//! use accel_abi::{Command, Opcode};
//! let cmd = Command::fill(3, 0x7000_0000, 4096, 0xabab_abab_abab_abab).with_completion(0x1000);
//! let bytes = cmd.encode();
//! assert_eq!(Command::decode(&bytes).unwrap(), cmd);
//! assert_eq!(cmd.opcode, Opcode::Fill);
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod pt;
pub mod regs;

mod records;
pub use records::*;

/// Device page size for 4 KiB leaves.
pub const PAGE_SIZE: u64 = 4096;
/// Device page size for 2 MiB large leaves (level-2 leaves).
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;
/// Number of virtual-address bits the device translates.
pub const VA_BITS: u32 = 48;
/// Page-table levels (level 4 is the root, level 1 holds 4 KiB leaves).
pub const PT_LEVELS: u32 = 4;

/// MSI vector numbers.
pub mod vector {
    /// A fault record was posted (or the fault buffer overflowed).
    pub const FAULT: u32 = 0;
    /// A command with [`crate::CommandFlags::IRQ`] completed.
    pub const COMPLETION: u32 = 1;
    /// `ERROR_CODE` became non-zero (bad register access, IOMMU fault, ...).
    pub const ERROR: u32 = 2;
    /// Number of vectors.
    pub const COUNT: u32 = 3;
}

/// An error decoding a structure read from the device, from DMA memory or from a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiError {
    /// The opcode byte of a command names no command.
    UnknownOpcode(u8),
    /// A reserved field or bit is not zero.
    ReservedNotZero {
        /// Byte offset of the offending field inside the structure.
        offset: usize,
    },
    /// An access kind byte names no access kind.
    UnknownAccessKind(u8),
    /// A fault reason byte names no reason.
    UnknownFaultReason(u8),
    /// A completion status names no status.
    UnknownStatus(u32),
    /// A field holds a value the specification forbids (alignment, size, flag combination).
    BadField {
        /// Name of the field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
}

impl core::fmt::Display for AbiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AbiError::UnknownOpcode(op) => write!(f, "unknown command opcode {op:#04x}"),
            AbiError::ReservedNotZero { offset } => {
                write!(f, "reserved field at byte offset {offset} is not zero")
            }
            AbiError::UnknownAccessKind(k) => write!(f, "unknown access kind {k}"),
            AbiError::UnknownFaultReason(r) => write!(f, "unknown fault reason {r}"),
            AbiError::UnknownStatus(s) => write!(f, "unknown completion status {s}"),
            AbiError::BadField { field, value } => {
                write!(f, "field `{field}` holds a forbidden value {value:#x}")
            }
        }
    }
}

impl std::error::Error for AbiError {}

/// True if `va` is a canonical device virtual address: bits 63..48 are zero.
///
/// The device mirrors user-space addresses only, so the upper half (kernel addresses, bit 47
/// sign-extended) is not translatable either.
pub fn is_canonical(va: u64) -> bool {
    va >> VA_BITS == 0
}

/// FNV-1a over bytes: the checksum the `CHECKSUM` command computes.
///
/// `state` starts at [`FNV_OFFSET`]; feeding the data in pieces gives the same result as one call.
pub fn fnv1a_update(mut state: u64, data: &[u8]) -> u64 {
    for &b in data {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The `FILL` pattern byte at byte `index` of the destination (the 8-byte pattern repeats
/// from the first destination byte, little-endian).
pub fn fill_byte(pattern: u64, index: u64) -> u8 {
    pattern.to_le_bytes()[(index % 8) as usize]
}

pub(crate) fn rd_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn rd_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn rd_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn wr_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn wr_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn wr_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_boundary() {
        assert!(is_canonical(0));
        assert!(is_canonical((1 << 48) - 1));
        assert!(!is_canonical(1 << 48));
        assert!(!is_canonical(0xffff_8000_0000_0000));
    }

    #[test]
    fn fnv_is_incremental() {
        let data = b"mirror accelerator";
        let whole = fnv1a_update(FNV_OFFSET, data);
        let split = fnv1a_update(fnv1a_update(FNV_OFFSET, &data[..7]), &data[7..]);
        assert_eq!(whole, split);
        // Known FNV-1a 64 vector: "a" -> 0xaf63dc4c8601ec8c.
        assert_eq!(fnv1a_update(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn fill_pattern_repeats_from_start() {
        let p = 0x0807_0605_0403_0201;
        assert_eq!(fill_byte(p, 0), 1);
        assert_eq!(fill_byte(p, 7), 8);
        assert_eq!(fill_byte(p, 8), 1);
    }
}
