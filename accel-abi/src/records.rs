//! Structures in DMA memory: commands, completion records, fault records.

use crate::{rd_u16, rd_u32, rd_u64, wr_u16, wr_u32, wr_u64, AbiError};

/// Kind of device access that faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum AccessKind {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
    /// Atomic read-modify-write (needs read and write permission).
    Atomic = 2,
    /// Prefetch hint (needs read permission).
    Prefetch = 3,
}

impl AccessKind {
    /// Decode.
    pub fn from_u8(v: u8) -> Result<Self, AbiError> {
        Ok(match v {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Atomic,
            3 => Self::Prefetch,
            _ => return Err(AbiError::UnknownAccessKind(v)),
        })
    }

    /// True if the access needs write permission.
    pub fn needs_write(self) -> bool {
        matches!(self, Self::Write | Self::Atomic)
    }
}

/// Why a translation faulted. Both reasons stall the work item (replayable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// No valid leaf maps the address.
    NotPresent = 1,
    /// A leaf maps it without the permission the access needs.
    Permission = 2,
}

impl FaultReason {
    /// Decode.
    pub fn from_u8(v: u8) -> Result<Self, AbiError> {
        Ok(match v {
            1 => Self::NotPresent,
            2 => Self::Permission,
            _ => return Err(AbiError::UnknownFaultReason(v)),
        })
    }
}

/// A fault record, 32 bytes in the fault buffer.
///
/// Layout: 0 `va` u64; 8 `work_id` u32; 12 `asid` u16; 14 `access` u8; 15 `reason` u8;
/// 16 `timestamp_ns` u64; 24 reserved u32; 28 `flags` u32 (bit 0 VALID, bit 1 LOOKAHEAD). The device writes
/// bytes 0..28 first and the flags word last; the driver clears the flags word when it has
/// consumed the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    /// Faulting virtual address (the byte address of the access).
    pub va: u64,
    /// Work id of the stalled work item (its command's free-running queue index).
    pub work_id: u32,
    /// Address space.
    pub asid: u16,
    /// Access kind.
    pub access: AccessKind,
    /// Reason.
    pub reason: FaultReason,
    /// Device time of the fault, nanoseconds since reset.
    pub timestamp_ns: u64,
    /// A lookahead record ([`Self::FLAG_LOOKAHEAD`]): the item has not reached `va` yet.
    pub lookahead: bool,
}

impl FaultRecord {
    /// Size in bytes.
    pub const SIZE: usize = 32;
    /// Offset of the flags word (written last).
    pub const FLAGS_OFFSET: usize = 28;
    /// VALID bit of the flags word.
    pub const FLAG_VALID: u32 = 1;
    /// LOOKAHEAD bit: the work item stalled on an earlier page of the same operand and has not
    /// reached `va` yet; the device found that it would fault there too. Servicing it is
    /// optional and failing to service it must not cancel the item: after the replay the item
    /// faults again, without this bit, if the page still does not translate.
    pub const FLAG_LOOKAHEAD: u32 = 1 << 1;

    /// The flags word to publish the record with (written last, after the body).
    pub fn flags(&self) -> u32 {
        if self.lookahead {
            Self::FLAG_VALID | Self::FLAG_LOOKAHEAD
        } else {
            Self::FLAG_VALID
        }
    }

    /// Encode the 28-byte body (everything but the flags word).
    pub fn encode_body(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        wr_u64(&mut b, 0, self.va);
        wr_u32(&mut b, 8, self.work_id);
        wr_u16(&mut b, 12, self.asid);
        b[14] = self.access as u8;
        b[15] = self.reason as u8;
        wr_u64(&mut b, 16, self.timestamp_ns);
        b
    }

    /// Encode the whole record with VALID set.
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..28].copy_from_slice(&self.encode_body());
        wr_u32(&mut b, 28, self.flags());
        b
    }

    /// Decode a record. `Ok(None)` if VALID is clear (the slot is not yet written).
    pub fn decode(b: &[u8; 32]) -> Result<Option<Self>, AbiError> {
        let flags = rd_u32(b, 28);
        if flags & Self::FLAG_VALID == 0 {
            return Ok(None);
        }
        if flags & !(Self::FLAG_VALID | Self::FLAG_LOOKAHEAD) != 0 {
            return Err(AbiError::ReservedNotZero { offset: 28 });
        }
        if rd_u32(b, 24) != 0 {
            return Err(AbiError::ReservedNotZero { offset: 24 });
        }
        Ok(Some(FaultRecord {
            va: rd_u64(b, 0),
            work_id: rd_u32(b, 8),
            asid: rd_u16(b, 12),
            access: AccessKind::from_u8(b[14])?,
            reason: FaultReason::from_u8(b[15])?,
            timestamp_ns: rd_u64(b, 16),
            lookahead: flags & Self::FLAG_LOOKAHEAD != 0,
        }))
    }
}

/// Command opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Copy `len` bytes from `src` to `dst` (VAs of the command's address space). Overlapping
    /// ranges give unspecified destination contents.
    Copy = 0x01,
    /// Fill `len` bytes at `dst` with the 8-byte `value` pattern ([`crate::fill_byte`]).
    Fill = 0x02,
    /// Atomically add `value` to the u64 at `dst` (8-byte aligned); result: the old value.
    AtomicAdd = 0x03,
    /// Read `len` bytes at `src`; result: their FNV-1a 64 ([`crate::fnv1a_update`]).
    Checksum = 0x04,
    /// Complete after every earlier command has completed; then `FENCE_DONE = value`.
    Fence = 0x05,
    /// Touch `len` bytes at `src` for reading, as prefetch accesses (warms the TLB).
    Prefetch = 0x06,
}

impl Opcode {
    /// Decode.
    pub fn from_u8(v: u8) -> Result<Self, AbiError> {
        Ok(match v {
            0x01 => Self::Copy,
            0x02 => Self::Fill,
            0x03 => Self::AtomicAdd,
            0x04 => Self::Checksum,
            0x05 => Self::Fence,
            0x06 => Self::Prefetch,
            _ => return Err(AbiError::UnknownOpcode(v)),
        })
    }
}

/// Command flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandFlags(pub u8);

impl CommandFlags {
    /// Raise the completion vector when this command completes.
    pub const IRQ: u8 = 1 << 0;
    /// Every defined bit.
    pub const ALL: u8 = Self::IRQ;
}

/// A command, 64 bytes in the command queue.
///
/// Layout: 0 `opcode` u8; 1 `flags` u8; 2 `asid` u16; 4 reserved u32; 8 `dst` u64; 16 `src`
/// u64; 24 `len` u64; 32 `value` u64; 40 `completion` u64 (IOVA of a 16-byte
/// [`Completion`], 16-byte aligned, 0 = none); 48..64 reserved.
///
/// Operand use per opcode (unused operands must be zero):
/// `COPY` dst, src, len; `FILL` dst, len, value; `ATOMIC_ADD` dst, value;
/// `CHECKSUM` src, len; `FENCE` value; `PREFETCH` src, len.
/// `len` must be non-zero and at most `CAP_MAX_TRANSFER` where used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: Opcode,
    /// Flags.
    pub flags: CommandFlags,
    /// Address space the VAs belong to.
    pub asid: u16,
    /// Destination VA.
    pub dst: u64,
    /// Source VA.
    pub src: u64,
    /// Length in bytes.
    pub len: u64,
    /// Immediate value.
    pub value: u64,
    /// IOVA of the completion record, or 0.
    pub completion: u64,
}

impl Command {
    /// Size in bytes.
    pub const SIZE: usize = 64;

    fn new(opcode: Opcode, asid: u16) -> Self {
        Command {
            opcode,
            flags: CommandFlags::default(),
            asid,
            dst: 0,
            src: 0,
            len: 0,
            value: 0,
            completion: 0,
        }
    }

    /// `COPY`.
    pub fn copy(asid: u16, dst: u64, src: u64, len: u64) -> Self {
        Command {
            dst,
            src,
            len,
            ..Self::new(Opcode::Copy, asid)
        }
    }

    /// `FILL`.
    pub fn fill(asid: u16, dst: u64, len: u64, pattern: u64) -> Self {
        Command {
            dst,
            len,
            value: pattern,
            ..Self::new(Opcode::Fill, asid)
        }
    }

    /// `ATOMIC_ADD`.
    pub fn atomic_add(asid: u16, dst: u64, value: u64) -> Self {
        Command {
            dst,
            value,
            ..Self::new(Opcode::AtomicAdd, asid)
        }
    }

    /// `CHECKSUM`.
    pub fn checksum(asid: u16, src: u64, len: u64) -> Self {
        Command {
            src,
            len,
            ..Self::new(Opcode::Checksum, asid)
        }
    }

    /// `FENCE`.
    pub fn fence(value: u64) -> Self {
        Command {
            value,
            ..Self::new(Opcode::Fence, 0)
        }
    }

    /// `PREFETCH`.
    pub fn prefetch(asid: u16, src: u64, len: u64) -> Self {
        Command {
            src,
            len,
            ..Self::new(Opcode::Prefetch, asid)
        }
    }

    /// Set the completion-record IOVA.
    pub fn with_completion(mut self, iova: u64) -> Self {
        self.completion = iova;
        self
    }

    /// Request a completion interrupt.
    pub fn with_irq(mut self) -> Self {
        self.flags.0 |= CommandFlags::IRQ;
        self
    }

    /// Encode.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.opcode as u8;
        b[1] = self.flags.0;
        wr_u16(&mut b, 2, self.asid);
        wr_u64(&mut b, 8, self.dst);
        wr_u64(&mut b, 16, self.src);
        wr_u64(&mut b, 24, self.len);
        wr_u64(&mut b, 32, self.value);
        wr_u64(&mut b, 40, self.completion);
        b
    }

    /// Decode and validate everything that does not depend on device capabilities (the length
    /// limit and the ASID range are checked by the device).
    pub fn decode(b: &[u8; 64]) -> Result<Self, AbiError> {
        let opcode = Opcode::from_u8(b[0])?;
        let flags = b[1];
        if flags & !CommandFlags::ALL != 0 {
            return Err(AbiError::ReservedNotZero { offset: 1 });
        }
        if rd_u32(b, 4) != 0 {
            return Err(AbiError::ReservedNotZero { offset: 4 });
        }
        if rd_u64(b, 48) != 0 || rd_u64(b, 56) != 0 {
            return Err(AbiError::ReservedNotZero { offset: 48 });
        }
        let cmd = Command {
            opcode,
            flags: CommandFlags(flags),
            asid: rd_u16(b, 2),
            dst: rd_u64(b, 8),
            src: rd_u64(b, 16),
            len: rd_u64(b, 24),
            value: rd_u64(b, 32),
            completion: rd_u64(b, 40),
        };
        cmd.validate()?;
        Ok(cmd)
    }

    fn validate(&self) -> Result<(), AbiError> {
        let unused = |field: &'static str, value: u64| {
            if value != 0 {
                Err(AbiError::BadField { field, value })
            } else {
                Ok(())
            }
        };
        let nonzero_len = || {
            if self.len == 0 {
                Err(AbiError::BadField {
                    field: "len",
                    value: 0,
                })
            } else {
                Ok(())
            }
        };
        if self.completion % 16 != 0 {
            return Err(AbiError::BadField {
                field: "completion",
                value: self.completion,
            });
        }
        match self.opcode {
            Opcode::Copy => {
                unused("value", self.value)?;
                nonzero_len()
            }
            Opcode::Fill => {
                unused("src", self.src)?;
                nonzero_len()
            }
            Opcode::AtomicAdd => {
                unused("src", self.src)?;
                unused("len", self.len)?;
                if self.dst % 8 != 0 {
                    return Err(AbiError::BadField {
                        field: "dst",
                        value: self.dst,
                    });
                }
                Ok(())
            }
            Opcode::Checksum | Opcode::Prefetch => {
                unused("dst", self.dst)?;
                unused("value", self.value)?;
                nonzero_len()
            }
            Opcode::Fence => {
                unused("dst", self.dst)?;
                unused("src", self.src)?;
                unused("len", self.len)?;
                unused("asid", u64::from(self.asid))
            }
        }
    }
}

/// Completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// Success; `result` per opcode (old value, checksum, 0).
    Ok = 0,
    /// Cancelled by the driver through `FAULT_CANCEL`; `result` = the driver's code.
    Cancelled = 1,
    /// The command failed to decode or violates a device limit; `result` = 0.
    BadCommand = 2,
    /// An operand VA is not canonical (bits 63..48 set) or the range wraps; `result` = the VA.
    NonCanonical = 3,
    /// A malformed page-table entry was met; `result` = the VA being translated.
    BadPte = 4,
    /// A DMA access hit an unmapped IOVA or one without permission; `result` = the IOVA.
    IommuFault = 5,
    /// The ASID is out of range or its root register is not valid; `result` = the ASID.
    BadAsid = 6,
    /// A translation fault occurred while the fault buffer was disabled; `result` = the VA.
    PageFault = 7,
}

impl Status {
    /// Decode.
    pub fn from_u32(v: u32) -> Result<Self, AbiError> {
        Ok(match v {
            0 => Self::Ok,
            1 => Self::Cancelled,
            2 => Self::BadCommand,
            3 => Self::NonCanonical,
            4 => Self::BadPte,
            5 => Self::IommuFault,
            6 => Self::BadAsid,
            7 => Self::PageFault,
            _ => return Err(AbiError::UnknownStatus(v)),
        })
    }
}

/// A completion record, 16 bytes: 0 `result` u64; 8 `status` u32; 12 `done` u32 (1 when
/// written). The device writes bytes 0..12 first and `done` last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Result value.
    pub result: u64,
    /// Status.
    pub status: Status,
}

impl Completion {
    /// Size in bytes.
    pub const SIZE: usize = 16;
    /// Offset of the `done` word (written last).
    pub const DONE_OFFSET: usize = 12;

    /// Encode the 12-byte body.
    pub fn encode_body(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        wr_u64(&mut b, 0, self.result);
        wr_u32(&mut b, 8, self.status as u32);
        b
    }

    /// Decode. `Ok(None)` if `done` is 0.
    pub fn decode(b: &[u8; 16]) -> Result<Option<Self>, AbiError> {
        match rd_u32(b, 12) {
            0 => Ok(None),
            1 => Ok(Some(Completion {
                result: rd_u64(b, 0),
                status: Status::from_u32(rd_u32(b, 8))?,
            })),
            _ => Err(AbiError::ReservedNotZero { offset: 12 }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn command_round_trip() {
        for cmd in [
            Command::copy(1, 0x1000, 0x2000, 77).with_irq(),
            Command::fill(2, 0x1000, 5, 0xff),
            Command::atomic_add(3, 0x1008, 9).with_completion(0x40),
            Command::checksum(4, 0x5000, 4096),
            Command::fence(17).with_irq(),
            Command::prefetch(5, 0x7000, 1),
        ] {
            assert_eq!(Command::decode(&cmd.encode()).unwrap(), cmd);
        }
    }

    #[test]
    fn command_rejects() {
        let mut b = Command::copy(1, 0x1000, 0x2000, 77).encode();
        b[0] = 0x7f;
        assert_eq!(Command::decode(&b), Err(AbiError::UnknownOpcode(0x7f)));
        let mut b = Command::copy(1, 0x1000, 0x2000, 77).encode();
        b[60] = 1;
        assert!(matches!(
            Command::decode(&b),
            Err(AbiError::ReservedNotZero { .. })
        ));
        assert!(Command::decode(&Command::copy(1, 1, 2, 0).encode()).is_err());
        assert!(Command::decode(&Command::atomic_add(1, 4, 1).encode()).is_err());
        assert!(Command::decode(&Command::fence(1).with_completion(8).encode()).is_err());
    }

    #[test]
    fn fault_record_round_trip() {
        let r = FaultRecord {
            va: 0x7fff_0000_1234,
            work_id: 99,
            asid: 7,
            access: AccessKind::Atomic,
            reason: FaultReason::Permission,
            timestamp_ns: 123456,
            lookahead: false,
        };
        assert_eq!(FaultRecord::decode(&r.encode()).unwrap(), Some(r));
        let ahead = FaultRecord {
            lookahead: true,
            ..r
        };
        assert_eq!(FaultRecord::decode(&ahead.encode()).unwrap(), Some(ahead));
        let mut empty = r.encode();
        empty[28] = 0;
        assert_eq!(FaultRecord::decode(&empty).unwrap(), None);
        // LOOKAHEAD without VALID is a slot not yet written; unknown flag bits are refused.
        let mut half = ahead.encode();
        half[28] = 2;
        assert_eq!(FaultRecord::decode(&half).unwrap(), None);
        let mut unknown = r.encode();
        unknown[28] |= 4;
        assert!(FaultRecord::decode(&unknown).is_err());
    }

    #[test]
    fn completion_round_trip() {
        let c = Completion {
            result: 42,
            status: Status::Cancelled,
        };
        let mut b = [0u8; 16];
        b[..12].copy_from_slice(&c.encode_body());
        assert_eq!(Completion::decode(&b).unwrap(), None);
        b[12] = 1;
        assert_eq!(Completion::decode(&b).unwrap(), Some(c));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 64)) {
            let mut c = [0u8; 64];
            c.copy_from_slice(&bytes);
            if let Ok(cmd) = Command::decode(&c) {
                prop_assert_eq!(Command::decode(&cmd.encode()).unwrap(), cmd);
            }
            let mut f = [0u8; 32];
            f.copy_from_slice(&bytes[..32]);
            let _ = FaultRecord::decode(&f);
            let mut k = [0u8; 16];
            k.copy_from_slice(&bytes[..16]);
            let _ = Completion::decode(&k);
        }
    }
}

/// An invalidation-queue descriptor (revision 3, [`crate::regs::features::TLBI_QUEUE`]), 32
/// bytes in the queue the driver set up with `TLBIQ_BASE`/`TLBIQ_ENTRIES`.
///
/// Layout: 0 `asid` u16; 2 `scope` u16 (the [`crate::regs::TLBI_SCOPE`] encoding: bits 1..0 a
/// [`crate::regs::TlbiScope`], bit 8 `LEAF_ONLY`, other bits reserved); 4 reserved u32;
/// 8 `va` u64; 16 `size` u64 (both used by the `Range` scope only, 4 KiB aligned, size
/// non-zero; must be 0 otherwise); 24 reserved u64. Reserved fields must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbiDescriptor {
    /// Address space (ignored by the `All` scope, which must carry 0).
    pub asid: u16,
    /// Scope and `LEAF_ONLY`, as in `TLBI_SCOPE`.
    pub scope: u16,
    /// First VA (`Range` scope).
    pub va: u64,
    /// Length in bytes (`Range` scope).
    pub size: u64,
}

impl TlbiDescriptor {
    /// Size in bytes.
    pub const SIZE: usize = 32;

    /// Encode.
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        wr_u16(&mut b, 0, self.asid);
        wr_u16(&mut b, 2, self.scope);
        wr_u64(&mut b, 8, self.va);
        wr_u64(&mut b, 16, self.size);
        b
    }

    /// Decode the fields; reserved fields that are not zero are an error. The scope and the
    /// range are checked by the device against its geometry, not here.
    pub fn decode(b: &[u8; 32]) -> Result<Self, AbiError> {
        if rd_u32(b, 4) != 0 {
            return Err(AbiError::ReservedNotZero { offset: 4 });
        }
        if rd_u64(b, 24) != 0 {
            return Err(AbiError::ReservedNotZero { offset: 24 });
        }
        Ok(TlbiDescriptor {
            asid: rd_u16(b, 0),
            scope: rd_u16(b, 2),
            va: rd_u64(b, 8),
            size: rd_u64(b, 16),
        })
    }
}

#[cfg(test)]
mod tlbi_descriptor_tests {
    use super::*;

    #[test]
    fn a_descriptor_round_trips_and_reserved_fields_are_refused() {
        let d = TlbiDescriptor {
            asid: 63,
            scope: 0x101,
            va: 0x7f00_0000_0000,
            size: 0x20_0000,
        };
        let mut b = d.encode();
        assert_eq!(TlbiDescriptor::decode(&b), Ok(d));
        b[4] = 1;
        assert_eq!(
            TlbiDescriptor::decode(&b),
            Err(AbiError::ReservedNotZero { offset: 4 })
        );
        b[4] = 0;
        b[31] = 1;
        assert_eq!(
            TlbiDescriptor::decode(&b),
            Err(AbiError::ReservedNotZero { offset: 24 })
        );
    }
}
