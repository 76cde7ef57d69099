//! Payloads of the message types we use. `decode` accepts a payload longer than the fixed
//! structure (a peer may send a larger `argsz`); it never reads past the slice and never panics.

/// A payload that is too short or inconsistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    #[error("payload of {got} bytes, need at least {need}")]
    Short {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A field is out of range or inconsistent with the payload length.
    #[error("invalid field `{0}`")]
    Invalid(&'static str),
}

impl DecodeError {
    /// The errno to answer with.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// Bounds-checked little reader over a payload.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], need: usize) -> Result<Reader<'a>, DecodeError> {
        if b.len() < need {
            return Err(DecodeError::Short { got: b.len(), need });
        }
        Ok(Reader { b, at: 0 })
    }
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        // `new` checked the fixed part; fall back to zeros rather than panic if misused.
        if let Some(s) = self.b.get(self.at..self.at + N) {
            out.copy_from_slice(s);
        }
        self.at += N;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }
    fn rest(&self) -> &'a [u8] {
        self.b.get(self.at..).unwrap_or(&[])
    }
}

fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_ne_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_ne_bytes());
}

/// DMA_MAP flag: the server may read.
pub const DMA_MAP_READ: u32 = 1 << 0;
/// DMA_MAP flag: the server may write.
pub const DMA_MAP_WRITE: u32 = 1 << 1;

/// DMA_MAP request (32 bytes; the fd, if any, travels as SCM_RIGHTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    /// Size of this structure.
    pub argsz: u32,
    /// [`DMA_MAP_READ`] | [`DMA_MAP_WRITE`].
    pub flags: u32,
    /// Offset in the fd (0 without one).
    pub offset: u64,
    /// DMA address (IOVA).
    pub address: u64,
    /// Length.
    pub size: u64,
}

impl DmaMap {
    /// Structure size.
    pub const SIZE: usize = 32;
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        put32(&mut v, self.argsz);
        put32(&mut v, self.flags);
        put64(&mut v, self.offset);
        put64(&mut v, self.address);
        put64(&mut v, self.size);
        v
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<DmaMap, DecodeError> {
        let mut r = Reader::new(b, Self::SIZE)?;
        Ok(DmaMap {
            argsz: r.u32(),
            flags: r.u32(),
            offset: r.u64(),
            address: r.u64(),
            size: r.u64(),
        })
    }
}

/// DMA_UNMAP flag: return a dirty bitmap (not supported).
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: unmap every mapping (address and size must be 0).
pub const DMA_UNMAP_ALL: u32 = 1 << 1;

/// DMA_UNMAP request and reply (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Size of this structure.
    pub argsz: u32,
    /// [`DMA_UNMAP_ALL`] / [`DMA_UNMAP_GET_DIRTY_BITMAP`].
    pub flags: u32,
    /// DMA address.
    pub address: u64,
    /// Length. The reply echoes the request (spec: "the original DMA entry in the request").
    pub size: u64,
}

impl DmaUnmap {
    /// Structure size.
    pub const SIZE: usize = 24;
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        put32(&mut v, self.argsz);
        put32(&mut v, self.flags);
        put64(&mut v, self.address);
        put64(&mut v, self.size);
        v
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<DmaUnmap, DecodeError> {
        let mut r = Reader::new(b, Self::SIZE)?;
        Ok(DmaUnmap {
            argsz: r.u32(),
            flags: r.u32(),
            address: r.u64(),
            size: r.u64(),
        })
    }
}

/// Device flag: the device supports reset.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// Device flag: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// DEVICE_GET_INFO request and reply (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size of this structure.
    pub argsz: u32,
    /// [`DEVICE_FLAGS_RESET`] | [`DEVICE_FLAGS_PCI`].
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indices.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Structure size.
    pub const SIZE: usize = 16;
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        for x in [self.argsz, self.flags, self.num_regions, self.num_irqs] {
            put32(&mut v, x);
        }
        v
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<DeviceInfo, DecodeError> {
        let mut r = Reader::new(b, Self::SIZE)?;
        Ok(DeviceInfo {
            argsz: r.u32(),
            flags: r.u32(),
            num_regions: r.u32(),
            num_irqs: r.u32(),
        })
    }
}

/// PCI region indices.
pub mod region {
    /// BAR0.
    pub const BAR0: u32 = 0;
    /// Configuration space.
    pub const CONFIG: u32 = 7;
    /// Number of PCI regions (BAR0-5, ROM, config, VGA).
    pub const COUNT: u32 = 9;
    /// Region flag: readable.
    pub const FLAG_READ: u32 = 1 << 0;
    /// Region flag: writable.
    pub const FLAG_WRITE: u32 = 1 << 1;
    /// Region flag: mmap-able (with the fd sent in the reply).
    pub const FLAG_MMAP: u32 = 1 << 2;
    /// Region flag: capabilities follow.
    pub const FLAG_CAPS: u32 = 1 << 3;
}

/// DEVICE_GET_REGION_INFO request and reply (32 bytes, capabilities may follow in a reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size of the structure (request: how much the client accepts).
    pub argsz: u32,
    /// `region::FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability (0: none).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// Offset to mmap the fd at.
    pub offset: u64,
}

impl RegionInfo {
    /// Structure size.
    pub const SIZE: usize = 32;
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        for x in [self.argsz, self.flags, self.index, self.cap_offset] {
            put32(&mut v, x);
        }
        put64(&mut v, self.size);
        put64(&mut v, self.offset);
        v
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<RegionInfo, DecodeError> {
        let mut r = Reader::new(b, Self::SIZE)?;
        Ok(RegionInfo {
            argsz: r.u32(),
            flags: r.u32(),
            index: r.u32(),
            cap_offset: r.u32(),
            size: r.u64(),
            offset: r.u64(),
        })
    }
}

/// Region-info capability id of a sparse-mmap list (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`).
pub const CAP_SPARSE_MMAP: u16 = 1;

/// The mmap-able areas `(offset, size)` of a region, from the capability chain of a
/// DEVICE_GET_REGION_INFO reply (`reply` is the whole payload, `RegionInfo` first; capability
/// offsets count from its start). Bounded: at most 16 capabilities, each strictly after the
/// previous (no cycles), at most 1024 areas; every read is bounds-checked.
pub fn sparse_mmap_areas(reply: &[u8]) -> Result<Vec<(u64, u64)>, DecodeError> {
    let info = RegionInfo::decode(reply)?;
    if info.flags & region::FLAG_CAPS == 0 || info.cap_offset == 0 {
        return Ok(Vec::new());
    }
    let mut at = info.cap_offset as usize;
    let mut areas = Vec::new();
    for _ in 0..16 {
        if at < RegionInfo::SIZE {
            return Err(DecodeError::Invalid("cap_offset"));
        }
        let hdr = reply.get(at..).ok_or(DecodeError::Invalid("cap_offset"))?;
        let mut r = Reader::new(hdr, 8)?;
        let id = u16::from_ne_bytes(r.take());
        let _version = u16::from_ne_bytes(r.take());
        let next = r.u32() as usize;
        if id == CAP_SPARSE_MMAP {
            let mut r = Reader::new(hdr, 16)?;
            let _ = r.u64();
            let nr = r.u32() as usize;
            let _reserved = r.u32();
            if nr > 1024 {
                return Err(DecodeError::Invalid("nr_areas"));
            }
            let need = 16 + nr * 16;
            let mut r = Reader::new(hdr, need)?;
            r.at = 16;
            for _ in 0..nr {
                let offset = r.u64();
                let size = r.u64();
                offset
                    .checked_add(size)
                    .filter(|end| *end <= info.size)
                    .ok_or(DecodeError::Invalid("sparse area"))?;
                areas.push((offset, size));
            }
        }
        if next == 0 {
            return Ok(areas);
        }
        if next <= at {
            return Err(DecodeError::Invalid("capability chain"));
        }
        at = next;
    }
    Err(DecodeError::Invalid("capability chain too long"))
}

/// IRQ indices.
pub mod irq {
    /// INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Number of PCI IRQ indices (INTx, MSI, MSI-X, ERR, REQ).
    pub const COUNT: u32 = 5;
    /// IRQ info flag: eventfd-capable.
    pub const INFO_EVENTFD: u32 = 1 << 0;
    /// IRQ info flag: the vector count cannot be resized.
    pub const INFO_NORESIZE: u32 = 1 << 3;
    /// SET_IRQS data: none.
    pub const DATA_NONE: u32 = 1 << 0;
    /// SET_IRQS data: bools.
    pub const DATA_BOOL: u32 = 1 << 1;
    /// SET_IRQS data: eventfds (by SCM_RIGHTS).
    pub const DATA_EVENTFD: u32 = 1 << 2;
    /// SET_IRQS action: mask.
    pub const ACTION_MASK: u32 = 1 << 3;
    /// SET_IRQS action: unmask.
    pub const ACTION_UNMASK: u32 = 1 << 4;
    /// SET_IRQS action: trigger.
    pub const ACTION_TRIGGER: u32 = 1 << 5;
}

/// DEVICE_GET_IRQ_INFO request and reply (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Size of this structure.
    pub argsz: u32,
    /// `irq::INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Vectors at this index.
    pub count: u32,
}

impl IrqInfo {
    /// Structure size.
    pub const SIZE: usize = 16;
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        for x in [self.argsz, self.flags, self.index, self.count] {
            put32(&mut v, x);
        }
        v
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<IrqInfo, DecodeError> {
        let mut r = Reader::new(b, Self::SIZE)?;
        Ok(IrqInfo {
            argsz: r.u32(),
            flags: r.u32(),
            index: r.u32(),
            count: r.u32(),
        })
    }
}

/// DEVICE_SET_IRQS request (20 bytes; eventfds travel as SCM_RIGHTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetIrqs {
    /// Size of this structure (plus data).
    pub argsz: u32,
    /// `irq::DATA_*` | `irq::ACTION_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
}

impl SetIrqs {
    /// Structure size.
    pub const SIZE: usize = 20;
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        for x in [self.argsz, self.flags, self.index, self.start, self.count] {
            put32(&mut v, x);
        }
        v
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<SetIrqs, DecodeError> {
        let mut r = Reader::new(b, Self::SIZE)?;
        Ok(SetIrqs {
            argsz: r.u32(),
            flags: r.u32(),
            index: r.u32(),
            start: r.u32(),
            count: r.u32(),
        })
    }
}

/// REGION_READ / REGION_WRITE request and reply: a 16-byte header, then `count` data bytes
/// (REGION_READ reply and REGION_WRITE request only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
    /// The data (empty where the message has none).
    pub data: Vec<u8>,
}

impl RegionAccess {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;
    /// Encode the fixed part and the data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE + self.data.len());
        put64(&mut v, self.offset);
        put32(&mut v, self.region);
        put32(&mut v, self.count);
        v.extend_from_slice(&self.data);
        v
    }
    /// Decode; with `with_data`, exactly `count` data bytes must follow.
    pub fn decode(b: &[u8], with_data: bool) -> Result<RegionAccess, DecodeError> {
        let mut r = Reader::new(b, Self::SIZE)?;
        let offset = r.u64();
        let region = r.u32();
        let count = r.u32();
        let data = if with_data {
            let rest = r.rest();
            if rest.len() != count as usize {
                return Err(DecodeError::Invalid("count"));
            }
            rest.to_vec()
        } else {
            Vec::new()
        };
        Ok(RegionAccess {
            offset,
            region,
            count,
            data,
        })
    }
}

/// DMA_READ / DMA_WRITE request and reply: address and count (u64 each), then data (DMA_READ
/// reply and DMA_WRITE request only). A DMA_WRITE reply's count is 4 bytes in the spec table;
/// we send 8 and accept either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaAccess {
    /// DMA address.
    pub address: u64,
    /// Bytes.
    pub count: u64,
    /// The data (empty where the message has none).
    pub data: Vec<u8>,
}

impl DmaAccess {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;
    /// Encode the fixed part and the data.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE + self.data.len());
        put64(&mut v, self.address);
        put64(&mut v, self.count);
        v.extend_from_slice(&self.data);
        v
    }
    /// Decode; with `with_data`, exactly `count` data bytes must follow.
    pub fn decode(b: &[u8], with_data: bool) -> Result<DmaAccess, DecodeError> {
        if !with_data && b.len() >= 12 && b.len() < Self::SIZE {
            // The DMA_WRITE reply as tabled in the spec: a 4-byte count.
            let mut r = Reader::new(b, 12)?;
            let address = r.u64();
            let count = u32::from_ne_bytes(r.take());
            return Ok(DmaAccess {
                address,
                count: count.into(),
                data: Vec::new(),
            });
        }
        let mut r = Reader::new(b, Self::SIZE)?;
        let address = r.u64();
        let count = r.u64();
        let data = if with_data {
            let rest = r.rest();
            if rest.len() as u64 != count {
                return Err(DecodeError::Invalid("count"));
            }
            rest.to_vec()
        } else {
            Vec::new()
        };
        Ok(DmaAccess {
            address,
            count,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fixed_structures_round_trip(a: u32, b: u32, c: u64, d: u64, e: u64, i: u32, j: u32) {
            let m = DmaMap { argsz: a, flags: b, offset: c, address: d, size: e };
            prop_assert_eq!(DmaMap::decode(&m.encode()).unwrap(), m);
            let u = DmaUnmap { argsz: a, flags: b, address: c, size: d };
            prop_assert_eq!(DmaUnmap::decode(&u.encode()).unwrap(), u);
            let r = RegionInfo { argsz: a, flags: b, index: i, cap_offset: j, size: c, offset: d };
            prop_assert_eq!(RegionInfo::decode(&r.encode()).unwrap(), r);
            let s = SetIrqs { argsz: a, flags: b, index: i, start: j, count: a ^ j };
            prop_assert_eq!(SetIrqs::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = DmaMap::decode(&bytes);
            let _ = DmaUnmap::decode(&bytes);
            let _ = DeviceInfo::decode(&bytes);
            let _ = RegionInfo::decode(&bytes);
            let _ = IrqInfo::decode(&bytes);
            let _ = SetIrqs::decode(&bytes);
            let _ = RegionAccess::decode(&bytes, true);
            let _ = RegionAccess::decode(&bytes, false);
            let _ = DmaAccess::decode(&bytes, true);
            let _ = DmaAccess::decode(&bytes, false);
        }

        #[test]
        fn data_messages_round_trip(off: u64, region: u32, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let r = RegionAccess { offset: off, region, count: data.len() as u32, data: data.clone() };
            prop_assert_eq!(RegionAccess::decode(&r.encode(), true).unwrap(), r);
            let d = DmaAccess { address: off, count: data.len() as u64, data };
            prop_assert_eq!(DmaAccess::decode(&d.encode(), true).unwrap(), d);
        }
    }

    fn region_with_caps(caps: &[u8], cap_offset: u32) -> Vec<u8> {
        let mut v = RegionInfo {
            argsz: (32 + caps.len()) as u32,
            flags: region::FLAG_READ | region::FLAG_MMAP | region::FLAG_CAPS,
            index: 0,
            cap_offset,
            size: 0x4000,
            offset: 0,
        }
        .encode();
        v.extend_from_slice(caps);
        v
    }

    fn sparse_cap(next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&CAP_SPARSE_MMAP.to_ne_bytes());
        c.extend_from_slice(&1u16.to_ne_bytes());
        put32(&mut c, next);
        put32(&mut c, areas.len() as u32);
        put32(&mut c, 0);
        for (o, s) in areas {
            put64(&mut c, *o);
            put64(&mut c, *s);
        }
        c
    }

    #[test]
    fn sparse_mmap_capability() {
        let areas = [(0, 0x1000), (0x2000, 0x2000)];
        let r = region_with_caps(&sparse_cap(0, &areas), 32);
        assert_eq!(sparse_mmap_areas(&r).unwrap(), areas.to_vec());
        // No capabilities: no areas.
        let plain = RegionInfo {
            argsz: 32,
            flags: 0,
            index: 0,
            cap_offset: 0,
            size: 1,
            offset: 0,
        };
        assert!(sparse_mmap_areas(&plain.encode()).unwrap().is_empty());
        // An area past the region, a cycle, a truncated list: errors.
        assert!(
            sparse_mmap_areas(&region_with_caps(&sparse_cap(0, &[(0x3000, 0x2000)]), 32)).is_err()
        );
        assert!(sparse_mmap_areas(&region_with_caps(&sparse_cap(32, &areas), 32)).is_err());
        let mut cut = region_with_caps(&sparse_cap(0, &areas), 32);
        cut.truncate(cut.len() - 1);
        assert!(sparse_mmap_areas(&cut).is_err());
    }

    proptest! {
        #[test]
        fn capability_chains_never_panic(caps in proptest::collection::vec(any::<u8>(), 0..128), off in 0u32..200) {
            let _ = sparse_mmap_areas(&region_with_caps(&caps, off));
        }
    }

    #[test]
    fn short_and_inconsistent_payloads_are_errors() {
        assert!(matches!(
            DmaMap::decode(&[0; 31]),
            Err(DecodeError::Short { got: 31, need: 32 })
        ));
        let mut r = RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
            data: vec![1, 2, 3, 4],
        }
        .encode();
        r.pop();
        assert_eq!(
            RegionAccess::decode(&r, true),
            Err(DecodeError::Invalid("count"))
        );
        // A longer argsz-style payload is accepted (the fixed part is what we read).
        let mut m = DmaMap {
            argsz: 40,
            flags: 3,
            offset: 0,
            address: 4096,
            size: 4096,
        }
        .encode();
        m.extend_from_slice(&[0; 8]);
        assert_eq!(DmaMap::decode(&m).unwrap().address, 4096);
    }
}
