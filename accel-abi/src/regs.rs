//! BAR0 register map.
//!
//! BAR0 is a 16 KiB memory BAR. Registers are 32 or 64 bits wide and must be accessed with
//! their own width at their own (naturally aligned) offset; any other access is a bad register
//! access (see [`ErrorCode::BadRegisterAccess`]). Ring indices (`CMDQ_TAIL`, `CMDQ_HEAD`,
//! `FAULT_BUF_GET`, `FAULT_BUF_PUT`) are free-running 32-bit counters: the slot is
//! `index % entries`, a ring is empty when `put == get` and full when `put - get == entries`
//! (wrapping arithmetic).

/// BAR0 size in bytes.
pub const BAR0_SIZE: u64 = 0x4000;

/// Value of [`ID`]: ASCII "MXA1" read as a little-endian u32.
pub const ID_VALUE: u32 = u32::from_le_bytes(*b"MXA1");
/// Value of [`VERSION`]: major 1, minor 1 (revision 2: [`CAP_FEATURES`], [`PT_CTRL`], the
/// ACCESSED/DIRTY leaf bits and the page-walk cache). A driver of minor 0 keeps working: it
/// never sets [`pt_ctrl::AD_ENABLE`] and never asks for [`tlbi_scope::LEAF_ONLY`], and every
/// invalidation it issues drops walk-cache entries too. Minor 2 (revision 3) adds the
/// invalidation queue, scoped replay and a writable lookahead depth
/// ([`features::TLBI_QUEUE`], [`features::SCOPED_REPLAY`], [`features::LOOKAHEAD_DEPTH`]); each
/// is optional, so a driver of minor 1 keeps working unchanged.
pub const VERSION_VALUE: u32 = (1 << 16) | 2;

/// Register width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// 32-bit register.
    W32,
    /// 64-bit register.
    W64,
}

impl Width {
    /// Access size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            Width::W32 => 4,
            Width::W64 => 8,
        }
    }
}

/// Access permitted on a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only; writes are bad register accesses.
    ReadOnly,
    /// Read-write.
    ReadWrite,
    /// Write-only (a doorbell or trigger); reads return all ones, like every bad register
    /// access, and are bad register accesses.
    WriteOnly,
    /// Read, and write 1 to clear the bits written.
    ReadWrite1Clear,
}

/// One register's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegInfo {
    /// Register name as in docs/device.md.
    pub name: &'static str,
    /// Width.
    pub width: Width,
    /// Access.
    pub access: Access,
}

macro_rules! registers {
    ($( $(#[$m:meta])* $name:ident = $off:expr, $w:ident, $a:ident; )*) => {
        $( $(#[$m])* pub const $name: u64 = $off; )*
        /// Every fixed register, for decoders and for the hostile-input tests.
        pub const FIXED_REGISTERS: &[(u64, RegInfo)] = &[
            $( ($off, RegInfo { name: stringify!($name), width: Width::$w, access: Access::$a }), )*
        ];
    };
}

registers! {
    /// Identity: [`ID_VALUE`].
    ID = 0x000, W32, ReadOnly;
    /// Version: `(major << 16) | minor`, [`VERSION_VALUE`].
    VERSION = 0x004, W32, ReadOnly;
    /// Number of address spaces (ASIDs are `0..CAP_ASIDS`): 64 in the standard configuration,
    /// anywhere in `1..=MAX_ASIDS` in general, so drivers must read it.
    CAP_ASIDS = 0x008, W32, ReadOnly;
    /// Page-table geometry: bits 3..0 levels (4), bits 15..8 VA bits (48). See [`cap_pt`].
    CAP_PT = 0x00c, W32, ReadOnly;
    /// Supported page sizes: bit n set means 2^n bytes. 4 KiB and 2 MiB.
    CAP_PAGE_SIZES = 0x010, W32, ReadOnly;
    /// Maximum fault-buffer entries (a power of two).
    CAP_FAULT_ENTRIES = 0x014, W32, ReadOnly;
    /// Maximum command-queue entries (a power of two).
    CAP_CMDQ_ENTRIES = 0x018, W32, ReadOnly;
    /// Number of MSI vectors (3: fault, completion, error).
    CAP_VECTORS = 0x01c, W32, ReadOnly;
    /// Largest `len` a command may carry, in bytes.
    CAP_MAX_TRANSFER = 0x020, W32, ReadOnly;
    /// Fault lookahead depth: how many further pages of the same operand an engine checks, and
    /// reports with [`crate::FaultRecord::FLAG_LOOKAHEAD`] records, when a work item stalls and
    /// [`fault_ctrl::LOOKAHEAD`] is set. 0: the device has no lookahead.
    CAP_FAULT_LOOKAHEAD = 0x024, W32, ReadOnly;
    /// Optional features (revision 2): [`features`] bits. 0 on a revision-1 device.
    CAP_FEATURES = 0x028, W32, ReadOnly;
    /// Page-table control (revision 2): [`pt_ctrl`] bits. Power-on value 0. Setting a bit whose
    /// feature [`CAP_FEATURES`] lacks, or a reserved bit, is a bad register value.
    PT_CTRL = 0x02c, W32, ReadWrite;
    /// Control: [`control`] bits.
    CONTROL = 0x030, W32, ReadWrite;
    /// Status: [`status`] bits.
    STATUS = 0x034, W32, ReadOnly;
    /// Reset trigger: write [`RESET_MAGIC`]; any other value is a bad register value.
    RESET = 0x038, W32, WriteOnly;
    /// First error since the last clear, an [`ErrorCode`]; 0 = none. Any write clears it and
    /// `ERROR_INFO`.
    ERROR_CODE = 0x040, W32, ReadWrite;
    /// Detail for `ERROR_CODE` (the offending offset, IOVA, or command index).
    ERROR_INFO = 0x048, W64, ReadOnly;
    /// Interrupt status, one bit per vector ([`intr`]); write 1 to clear.
    INTR_STATUS = 0x050, W32, ReadWrite1Clear;
    /// Interrupt mask, one bit per vector; 1 = masked. Power-on value 0.
    INTR_MASK = 0x054, W32, ReadWrite;
    /// Fault-buffer base IOVA (4 KiB aligned). Writable only while the buffer is disabled.
    FAULT_BUF_BASE = 0x060, W64, ReadWrite;
    /// Fault-buffer size in entries (power of two, 2..=CAP_FAULT_ENTRIES). Writable only while
    /// the buffer is disabled.
    FAULT_BUF_ENTRIES = 0x068, W32, ReadWrite;
    /// Fault-buffer control: [`fault_ctrl`] bits.
    FAULT_BUF_CTRL = 0x06c, W32, ReadWrite;
    /// Consumer index (driver-owned, free-running).
    FAULT_BUF_GET = 0x070, W32, ReadWrite;
    /// Producer index (device-owned, free-running).
    FAULT_BUF_PUT = 0x074, W32, ReadOnly;
    /// Write any value without [`replay::ASID_SCOPED`]: every stalled work item retries its
    /// access. With it (revision 3, [`features::SCOPED_REPLAY`]): only those of the address space
    /// in bits 15..0.
    FAULT_REPLAY = 0x078, W32, WriteOnly;
    /// Write `(code << 32) | work_id`: the stalled work item `work_id` completes with status
    /// `CANCELLED` and result `code`. Cancelling a work item that is not stalled is a bad
    /// register value (the item is untouched).
    FAULT_CANCEL = 0x080, W64, WriteOnly;
    /// Command-queue base IOVA (4 KiB aligned). Writable only while the queue is disabled.
    CMDQ_BASE = 0x090, W64, ReadWrite;
    /// Command-queue size in entries (power of two, 2..=CAP_CMDQ_ENTRIES). Writable only while
    /// the queue is disabled.
    CMDQ_ENTRIES = 0x098, W32, ReadWrite;
    /// Command-queue control: bit 0 enable.
    CMDQ_CTRL = 0x09c, W32, ReadWrite;
    /// Producer index, the doorbell (driver-owned, free-running).
    CMDQ_TAIL = 0x0a0, W32, ReadWrite;
    /// Consumer index: commands fetched by the device (free-running).
    CMDQ_HEAD = 0x0a4, W32, ReadOnly;
    /// Number of commands completed since reset (free-running).
    WORK_COMPLETED = 0x0a8, W32, ReadOnly;
    /// Value of the most recently completed `FENCE` command.
    FENCE_DONE = 0x0b0, W64, ReadOnly;
    /// TLB invalidation: address space.
    TLBI_ASID = 0x0c0, W32, ReadWrite;
    /// TLB invalidation: bits 1..0 the scope, a [`TlbiScope`]; bit 8
    /// [`tlbi_scope::LEAF_ONLY`]. Other bits reserved (a bad register value).
    TLBI_SCOPE = 0x0c4, W32, ReadWrite;
    /// TLB invalidation: first VA (scope `Range`; 4 KiB aligned).
    TLBI_VA = 0x0c8, W64, ReadWrite;
    /// TLB invalidation: length in bytes (scope `Range`; multiple of 4 KiB, non-zero).
    TLBI_SIZE = 0x0d0, W64, ReadWrite;
    /// TLB invalidation trigger: write a sequence number. The invalidation is performed, then
    /// `TLBI_DONE` becomes that number. Completion means no access that used a dropped
    /// translation is still in flight.
    TLBI_TRIGGER = 0x0d8, W32, WriteOnly;
    /// Sequence number of the most recently completed TLB invalidation.
    TLBI_DONE = 0x0dc, W32, ReadOnly;
    /// TLB lookups that hit (free-running, since reset).
    TLB_HITS = 0x0e0, W64, ReadOnly;
    /// TLB lookups that missed and walked the page table (free-running, since reset).
    TLB_MISSES = 0x0e8, W64, ReadOnly;
    /// TLB invalidations performed (free-running, since reset).
    TLBI_COUNT = 0x0f0, W32, ReadOnly;
    /// Page walks that started below the root thanks to the walk cache (free-running, since
    /// reset; revision 2, 0 without [`features::WALK_CACHE`]).
    WALK_CACHE_HITS = 0x0f8, W64, ReadOnly;
    /// ACCESSED/DIRTY updates the walker wrote into leaves (free-running, since reset;
    /// revision 2).
    AD_UPDATES = 0x100, W64, ReadOnly;
    /// Fault lookahead depth in use (revision 3, [`features::LOOKAHEAD_DEPTH`]): how many further
    /// pages an engine checks when [`fault_ctrl::LOOKAHEAD`] is set, `0..=CAP_FAULT_LOOKAHEAD`
    /// (a larger value is a bad register value). Power-on value `CAP_FAULT_LOOKAHEAD`. A driver
    /// adapts it to how much of each lookahead it could use. Without the feature: reads as 0,
    /// writes are bad register accesses.
    FAULT_LOOKAHEAD_DEPTH = 0x110, W32, ReadWrite;
    /// Invalidation-queue capacity in entries (revision 3, [`features::TLBI_QUEUE`]): a power
    /// of two; 0 without the feature.
    CAP_TLBIQ_ENTRIES = 0x114, W32, ReadOnly;
    /// Invalidation-queue base IOVA (4 KiB aligned). Writable only while the queue is disabled.
    TLBIQ_BASE = 0x118, W64, ReadWrite;
    /// Invalidation-queue size in entries (power of two, `2..=CAP_TLBIQ_ENTRIES`). Writable
    /// only while the queue is disabled.
    TLBIQ_ENTRIES = 0x120, W32, ReadWrite;
    /// Invalidation-queue control: [`tlbiq_ctrl`] bits.
    TLBIQ_CTRL = 0x124, W32, ReadWrite;
    /// Invalidation-queue producer index, the doorbell (driver-owned, free-running). Writing it
    /// makes the device perform every descriptor from `TLBIQ_HEAD` up to it, in order, then
    /// wait once for every in-flight access (one fence for all of them), then set `TLBIQ_HEAD`
    /// to it. Moving it backwards or more than `TLBIQ_ENTRIES` ahead of `TLBIQ_HEAD` is a bad
    /// doorbell (ignored).
    TLBIQ_TAIL = 0x128, W32, ReadWrite;
    /// Invalidation-queue consumer index (free-running): every descriptor before it has been
    /// performed *and fenced*. `TLBIQ_HEAD == TLBIQ_TAIL` is the one completion of a batch.
    TLBIQ_HEAD = 0x12c, W32, ReadOnly;
    /// Invalidation-queue descriptors performed since reset (free-running).
    TLBIQ_PERFORMED = 0x130, W64, ReadOnly;
    /// Fences the invalidation queue ran since reset (free-running): one per doorbell that
    /// performed at least one descriptor.
    TLBIQ_FENCES = 0x138, W64, ReadOnly;
}

/// Base of the per-address-space page-table root registers: `ASID_ROOT_BASE + 8 * asid`, 64-bit,
/// read-write. Bits 51..12: IOVA of the level-4 table; bit 0: valid. Other bits reserved (zero).
pub const ASID_ROOT_BASE: u64 = 0x1000;
/// Bit 0 of an ASID root register.
pub const ASID_ROOT_VALID: u64 = 1;
/// Largest CAP_ASIDS a device can report (the root registers must fit in BAR0).
pub const MAX_ASIDS: u32 = ((BAR0_SIZE - ASID_ROOT_BASE) / 8) as u32;

/// Offset of the root register of `asid`.
pub fn asid_root(asid: u16) -> u64 {
    ASID_ROOT_BASE + 8 * u64::from(asid)
}

/// Description of the register at `offset`, if it is one, given the device's ASID count.
pub fn describe(offset: u64, asids: u32) -> Option<RegInfo> {
    if let Some((_, info)) = FIXED_REGISTERS.iter().find(|(o, _)| *o == offset) {
        return Some(*info);
    }
    let end = ASID_ROOT_BASE + 8 * u64::from(asids.min(MAX_ASIDS));
    if (ASID_ROOT_BASE..end).contains(&offset) && offset % 8 == 0 {
        return Some(RegInfo {
            name: "ASID_ROOT",
            width: Width::W64,
            access: Access::ReadWrite,
        });
    }
    None
}

/// Value to write to [`RESET`].
pub const RESET_MAGIC: u32 = u32::from_le_bytes(*b"RSET");

/// [`CONTROL`] bits.
pub mod control {
    /// The engine runs work items. Clearing it stops fetching new commands; work items already
    /// fetched run to completion or stall.
    pub const ENABLE: u32 = 1 << 0;
    /// Every defined bit.
    pub const ALL: u32 = ENABLE;
}

/// [`STATUS`] bits.
pub mod status {
    /// CONTROL.ENABLE is set and the device is running.
    pub const ENABLED: u32 = 1 << 0;
    /// FAULT_BUF_CTRL.OVERFLOW is set.
    pub const FAULT_OVERFLOW: u32 = 1 << 1;
    /// ERROR_CODE is not zero.
    pub const ERROR: u32 = 1 << 2;
    /// At least one fetched work item has not completed.
    pub const BUSY: u32 = 1 << 3;
    /// At least one work item is stalled on a fault.
    pub const STALLED: u32 = 1 << 4;
}

/// [`INTR_STATUS`] / [`INTR_MASK`] bits (bit n = vector n).
pub mod intr {
    /// Fault vector.
    pub const FAULT: u32 = 1 << crate::vector::FAULT;
    /// Completion vector.
    pub const COMPLETION: u32 = 1 << crate::vector::COMPLETION;
    /// Error vector.
    pub const ERROR: u32 = 1 << crate::vector::ERROR;
    /// Every defined bit.
    pub const ALL: u32 = FAULT | COMPLETION | ERROR;
}

/// [`FAULT_BUF_CTRL`] bits.
pub mod fault_ctrl {
    /// The device posts fault records. While clear, a translation fault is fatal for its work
    /// item (status `PAGE_FAULT`) instead of stalling it.
    pub const ENABLE: u32 = 1 << 0;
    /// A record was dropped because the buffer was full (write 1 to clear).
    pub const OVERFLOW: u32 = 1 << 1;
    /// Lookahead: a work item that stalls on a page also gets records, flagged
    /// [`crate::FaultRecord::FLAG_LOOKAHEAD`], for the next pages of the same operand (up to
    /// [`super::CAP_FAULT_LOOKAHEAD`], or the depth written to [`super::FAULT_LOOKAHEAD_DEPTH`]
    /// on a revision-3 device, within the command's length) that would fault too, the way
    /// a GPU's many lanes fault on many pages at once. Ignored if that capability is 0.
    pub const LOOKAHEAD: u32 = 1 << 2;
}

/// [`CAP_FEATURES`] bits (revision 2).
pub mod features {
    /// The walker can maintain ACCESSED and DIRTY bits in leaf entries
    /// ([`crate::pt::ACCESSED`], [`crate::pt::DIRTY`]) once [`super::pt_ctrl::AD_ENABLE`] is set.
    pub const ACCESSED_DIRTY: u32 = 1 << 0;
    /// The device caches non-leaf entries (a page-walk cache). An invalidation without
    /// [`super::tlbi_scope::LEAF_ONLY`] drops them for its scope; with it they stay. A driver that
    /// frees a table page must invalidate without `LEAF_ONLY` before it reuses the page.
    pub const WALK_CACHE: u32 = 1 << 1;
    /// Revision 3: an invalidation queue ([`super::TLBIQ_BASE`] and the registers after it,
    /// [`crate::TlbiDescriptor`]): a driver posts the invalidations of several address spaces
    /// and rings once; the device performs them all and fences once.
    pub const TLBI_QUEUE: u32 = 1 << 2;
    /// Revision 3: a [`super::FAULT_REPLAY`] value with [`super::replay::ASID_SCOPED`] set retries
    /// only the stalled work items of the address space in bits 15..0.
    pub const SCOPED_REPLAY: u32 = 1 << 3;
    /// Revision 3: the lookahead depth is writable ([`super::FAULT_LOOKAHEAD_DEPTH`]).
    pub const LOOKAHEAD_DEPTH: u32 = 1 << 4;
    /// Every defined bit.
    pub const ALL: u32 = ACCESSED_DIRTY | WALK_CACHE | TLBI_QUEUE | SCOPED_REPLAY | LOOKAHEAD_DEPTH;
}

/// [`FAULT_REPLAY`] values (revision 3).
pub mod replay {
    /// Retry only the stalled items of the address space in bits 15..0 (needs
    /// [`super::features::SCOPED_REPLAY`]; an ASID at or beyond `CAP_ASIDS`, or bits 30..16
    /// set, is a bad register value and replays nothing). Without this bit every stalled item
    /// retries, whatever the rest of the value.
    pub const ASID_SCOPED: u32 = 1 << 31;
    /// Mask of the address space of a scoped replay.
    pub const ASID_MASK: u32 = 0xffff;
}

/// [`TLBIQ_CTRL`] bits (revision 3).
pub mod tlbiq_ctrl {
    /// The device accepts doorbells. Clearing it resets `TLBIQ_HEAD` and `TLBIQ_TAIL` to 0.
    pub const ENABLE: u32 = 1 << 0;
    /// Every defined bit.
    pub const ALL: u32 = ENABLE;
}

/// [`PT_CTRL`] bits (revision 2).
pub mod pt_ctrl {
    /// The walker sets ACCESSED in a leaf it translates an access through and DIRTY in a leaf
    /// it translates a write or atomic through, with an atomic compare-and-swap on the entry
    /// (the table pages must then be DMA-writable). While clear the device never writes table
    /// memory. Needs [`super::features::ACCESSED_DIRTY`].
    pub const AD_ENABLE: u32 = 1 << 0;
    /// Every defined bit.
    pub const ALL: u32 = AD_ENABLE;
}

/// [`TLBI_SCOPE`] bits beyond the scope field.
pub mod tlbi_scope {
    /// Mask of the scope field (a [`super::TlbiScope`]).
    pub const SCOPE_MASK: u32 = 0x3;
    /// Drop leaf translations only and keep walk-cache entries (only leaves changed: the driver
    /// freed no table page and repointed no table entry). Accepted, and without effect, on a
    /// device without [`super::features::WALK_CACHE`].
    pub const LEAF_ONLY: u32 = 1 << 8;
    /// Every defined bit.
    pub const ALL: u32 = SCOPE_MASK | LEAF_ONLY;
}

/// [`CMDQ_CTRL`] bits.
pub mod cmdq_ctrl {
    /// The device fetches commands from the queue.
    pub const ENABLE: u32 = 1 << 0;
}

/// [`CAP_PT`] encoding.
pub mod cap_pt {
    /// Encode levels and VA bits.
    pub fn encode(levels: u32, va_bits: u32) -> u32 {
        (levels & 0xf) | ((va_bits & 0xff) << 8)
    }
    /// Page-table levels.
    pub fn levels(v: u32) -> u32 {
        v & 0xf
    }
    /// Translated VA bits.
    pub fn va_bits(v: u32) -> u32 {
        (v >> 8) & 0xff
    }
}

/// Scope of a TLB invalidation ([`TLBI_SCOPE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum TlbiScope {
    /// `[TLBI_VA, TLBI_VA + TLBI_SIZE)` of address space `TLBI_ASID`.
    Range = 0,
    /// Everything of address space `TLBI_ASID`.
    Asid = 1,
    /// Everything.
    All = 2,
}

impl TlbiScope {
    /// Decode the scope field alone (no other bits set).
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Range),
            1 => Some(Self::Asid),
            2 => Some(Self::All),
            _ => None,
        }
    }

    /// Decode a whole [`TLBI_SCOPE`] value: the scope and whether
    /// [`tlbi_scope::LEAF_ONLY`] is set. `None` for a reserved bit or an unknown scope.
    pub fn decode(v: u32) -> Option<(Self, bool)> {
        if v & !tlbi_scope::ALL != 0 {
            return None;
        }
        let scope = Self::from_u32(v & tlbi_scope::SCOPE_MASK)?;
        Some((scope, v & tlbi_scope::LEAF_ONLY != 0))
    }

    /// The register value for this scope, keeping walk caches (`leaf_only`) or not.
    pub fn encode(self, leaf_only: bool) -> u32 {
        self as u32 | if leaf_only { tlbi_scope::LEAF_ONLY } else { 0 }
    }
}

/// Codes in [`ERROR_CODE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// No error.
    None = 0,
    /// Access to an undefined offset, with the wrong width, misaligned, or against the
    /// register's access mode. ERROR_INFO: the offset.
    BadRegisterAccess = 1,
    /// A value the register does not accept (reserved bits, not a power of two, misaligned
    /// IOVA, out of range, wrong RESET magic, writing ring geometry while enabled, cancelling
    /// an item that is not stalled). ERROR_INFO: the offset.
    BadRegisterValue = 2,
    /// `CMDQ_TAIL` moved backwards or more than `CMDQ_ENTRIES` ahead of `CMDQ_HEAD`. The write
    /// is ignored. ERROR_INFO: the value written.
    BadDoorbell = 3,
    /// A DMA access (command fetch, page-table walk, data, fault record, completion write) hit
    /// an IOVA with no mapping or without the needed permission, or bus mastering is off.
    /// ERROR_INFO: the IOVA.
    IommuFault = 4,
    /// A command failed to decode. ERROR_INFO: the command's work id.
    BadCommand = 5,
    /// A page-table entry was malformed. ERROR_INFO: the IOVA of the entry.
    BadPte = 6,
    /// An invalidation-queue descriptor was malformed (reserved bits, a bad scope, an ASID at or
    /// beyond `CAP_ASIDS`, a misaligned, empty or non-canonical range). The device performed it as an
    /// invalidation of every address space (it never keeps a translation the driver may have
    /// wanted gone), and went on. ERROR_INFO: the descriptor's free-running queue index.
    BadTlbiDescriptor = 7,
}

impl ErrorCode {
    /// Decode an `ERROR_CODE` value.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::BadRegisterAccess,
            2 => Self::BadRegisterValue,
            3 => Self::BadDoorbell,
            4 => Self::IommuFault,
            5 => Self::BadCommand,
            6 => Self::BadPte,
            7 => Self::BadTlbiDescriptor,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_do_not_overlap_and_are_aligned() {
        let mut spans: Vec<(u64, u64, &str)> = FIXED_REGISTERS
            .iter()
            .map(|(o, i)| (*o, *o + i.width.bytes() as u64, i.name))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{} overlaps {}", w[0].2, w[1].2);
        }
        for (o, i) in FIXED_REGISTERS {
            assert_eq!(o % i.width.bytes() as u64, 0, "{} misaligned", i.name);
            assert!(*o < ASID_ROOT_BASE, "{} inside the root array", i.name);
        }
    }

    #[test]
    fn describe_roots() {
        assert_eq!(describe(asid_root(63), 64).unwrap().name, "ASID_ROOT");
        assert!(describe(asid_root(64), 64).is_none());
        assert!(describe(asid_root(1) + 4, 64).is_none());
        assert_eq!(describe(CMDQ_TAIL, 64).unwrap().access, Access::ReadWrite);
        const { assert!(MAX_ASIDS >= 64) };
    }

    #[test]
    fn tlbi_scope_round_trips_and_refuses_reserved_bits() {
        for scope in [TlbiScope::Range, TlbiScope::Asid, TlbiScope::All] {
            for leaf_only in [false, true] {
                assert_eq!(
                    TlbiScope::decode(scope.encode(leaf_only)),
                    Some((scope, leaf_only))
                );
            }
        }
        assert_eq!(TlbiScope::decode(3), None);
        assert_eq!(TlbiScope::decode(1 << 4), None);
        assert_eq!(TlbiScope::decode(tlbi_scope::LEAF_ONLY | 3), None);
    }

    #[test]
    fn id_reads_as_text() {
        assert_eq!(&ID_VALUE.to_le_bytes(), b"MXA1");
    }
}
