//! The raw VFIO ioctls that `vfio-ioctls` does not wrap, or wraps without reporting errors:
//! IOMMU info (IOVA ranges), device info (the reset flag), DMA map with explicit permissions,
//! DMA unmap, device reset, per-index IRQ eventfds, and exact region reads/writes. Every call's
//! error is returned.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use vfio_bindings::bindings::vfio as b;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls carry no size in their number.
const fn vfio_io(n: u32) -> libc::c_ulong {
    sys_util::ioctl::io(b::VFIO_TYPE, (b::VFIO_BASE + n) as u8)
}
const VFIO_DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
const VFIO_DEVICE_RESET: libc::c_ulong = vfio_io(11);
const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio_io(12);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

/// Borrow the fd of a vfio-ioctls object, which exposes only `AsRawFd`.
pub fn borrow_fd<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: the fd belongs to `owner` and stays open for as long as `owner` is borrowed.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// What `VFIO_IOMMU_GET_INFO` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported IOMMU page sizes (bit n = 2^n bytes).
    pub page_sizes: u64,
    /// Usable IOVA ranges, `[start, end)`.
    pub iova_ranges: Vec<std::ops::Range<u64>>,
    /// DMA mappings still available (TYPE1's dma_entry_limit), if reported.
    pub dma_avail: Option<u32>,
}

fn rd_u16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn rd_u32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn rd_u64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Parse a `vfio_iommu_type1_info` with its capability chain. Bytes come from the kernel, but
/// are bounds-checked anyway: a malformed chain yields what could be parsed.
pub fn parse_iommu_info(buf: &[u8]) -> IommuInfo {
    // struct vfio_iommu_type1_info { u32 argsz, flags; u64 iova_pgsizes; u32 cap_offset, pad; }
    let mut info = IommuInfo {
        page_sizes: rd_u64(buf, 8).unwrap_or(0),
        ..Default::default()
    };
    let flags = rd_u32(buf, 4).unwrap_or(0);
    if flags & b::VFIO_IOMMU_INFO_CAPS == 0 {
        return info;
    }
    let mut offset = rd_u32(buf, 16).unwrap_or(0) as usize;
    let mut hops = 0;
    while offset != 0 && hops < 64 {
        hops += 1;
        let (Some(id), Some(next)) = (rd_u16(buf, offset), rd_u32(buf, offset + 4)) else {
            break;
        };
        match u32::from(id) {
            b::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                let n = rd_u32(buf, offset + 8).unwrap_or(0) as usize;
                for i in 0..n.min(4096) {
                    let at = offset + 16 + i * 16;
                    match (rd_u64(buf, at), rd_u64(buf, at + 8)) {
                        // The kernel's ranges are inclusive; ours are half-open.
                        (Some(s), Some(e)) if e >= s => {
                            info.iova_ranges.push(s..e.saturating_add(1))
                        }
                        _ => break,
                    }
                }
            }
            b::VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => info.dma_avail = rd_u32(buf, offset + 8),
            _ => {}
        }
        if next as usize <= offset {
            break;
        }
        offset = next as usize;
    }
    info
}

/// `VFIO_IOMMU_GET_INFO` on a container with an IOMMU set.
pub fn iommu_info(container: BorrowedFd<'_>) -> io::Result<IommuInfo> {
    let mut len = 4096usize;
    loop {
        let mut buf = vec![0u64; len / 8];
        buf[0] = len as u64; // argsz in the low 32 bits (little endian), flags 0
                             // SAFETY: the buffer is `len` bytes, as argsz tells the kernel; it only writes within.
        let rc =
            unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let needed = rd_u32(&bytes, 0).unwrap_or(0) as usize;
        if needed > len && len < (1 << 20) {
            len = needed.div_ceil(8) * 8;
            continue;
        }
        return Ok(parse_iommu_info(&bytes));
    }
}

/// `VFIO_IOMMU_MAP_DMA` with explicit permissions.
///
/// # Safety
/// The device may read (and, with `write`, write) `[vaddr, vaddr + size)` at any time until it
/// is unmapped: no Rust reference to that memory may assume it is not modified concurrently.
pub unsafe fn map_dma(
    container: BorrowedFd<'_>,
    iova: u64,
    vaddr: u64,
    size: u64,
    read: bool,
    write: bool,
) -> io::Result<()> {
    let mut flags = 0;
    if read {
        flags |= b::VFIO_DMA_MAP_FLAG_READ;
    }
    if write {
        flags |= b::VFIO_DMA_MAP_FLAG_WRITE;
    }
    let map = b::vfio_iommu_type1_dma_map {
        argsz: std::mem::size_of::<b::vfio_iommu_type1_dma_map>() as u32,
        flags,
        vaddr,
        iova,
        size,
    };
    // SAFETY: `map` is a valid vfio_iommu_type1_dma_map the kernel only reads; the memory
    // contract is the caller's (see above).
    let rc = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &map) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA`; returns the bytes the kernel unmapped.
pub fn unmap_dma(container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<u64> {
    let mut unmap = b::vfio_iommu_type1_dma_unmap {
        argsz: std::mem::size_of::<b::vfio_iommu_type1_dma_unmap>() as u32,
        flags: 0,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: `unmap` is a valid vfio_iommu_type1_dma_unmap; the kernel writes back `size`.
    let rc = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA, &mut unmap) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unmap.size)
}

/// `VFIO_DEVICE_RESET`.
pub fn reset_device(device: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the ioctl takes no argument.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_RESET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `VFIO_DEVICE_GET_INFO`: the device's flags (`VFIO_DEVICE_FLAGS_RESET`, `_PCI`, ...).
pub fn device_flags(device: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = b::vfio_device_info {
        argsz: std::mem::size_of::<b::vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a vfio_device_info of `argsz` bytes; the kernel writes only within.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_GET_INFO, &mut info) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.flags)
}

/// `VFIO_DEVICE_SET_IRQS` routing vectors `0..fds.len()` of IRQ `index` to eventfds (`-1`
/// disconnects a vector); an empty slice disables the index.
///
/// Returns the ioctl's value: 0 on success. vfio-pci returns a *positive* count when enabling
/// MSI/MSI-X got fewer vectors from the kernel than asked (`pci_alloc_irq_vectors`): then
/// nothing was enabled, and the value is how many vectors the kernel could give.
pub fn set_irq_eventfds(device: BorrowedFd<'_>, index: u32, fds: &[RawFd]) -> io::Result<u32> {
    // struct vfio_irq_set { u32 argsz, flags, index, start, count; u8 data[]; }
    let header = 20usize;
    let mut buf = vec![0u32; (header + 4 * fds.len()).div_ceil(4)];
    let argsz = (header + 4 * fds.len()) as u32;
    let flags = if fds.is_empty() {
        b::VFIO_IRQ_SET_DATA_NONE | b::VFIO_IRQ_SET_ACTION_TRIGGER
    } else {
        b::VFIO_IRQ_SET_DATA_EVENTFD | b::VFIO_IRQ_SET_ACTION_TRIGGER
    };
    buf[0] = argsz;
    buf[1] = flags;
    buf[2] = index;
    buf[3] = 0;
    buf[4] = fds.len() as u32;
    for (i, fd) in fds.iter().enumerate() {
        buf[5 + i] = *fd as u32;
    }
    // SAFETY: `buf` holds a vfio_irq_set of `argsz` bytes followed by its fd array.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_SET_IRQS, buf.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u32)
}

/// Read exactly `data.len()` bytes of a device region at file offset `offset`.
pub fn region_read(device: BorrowedFd<'_>, offset: u64, data: &mut [u8]) -> io::Result<()> {
    let n = nix::sys::uio::pread(device, data, offset as libc::off_t)?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "short region read: {n} of {} bytes at {offset:#x}",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// Write exactly `data.len()` bytes of a device region at file offset `offset`.
pub fn region_write(device: BorrowedFd<'_>, offset: u64, data: &[u8]) -> io::Result<()> {
    let n = nix::sys::uio::pwrite(device, data, offset as libc::off_t)?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "short region write: {n} of {} bytes at {offset:#x}",
                data.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push32(v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    fn push64(v: &mut Vec<u8>, x: u64) {
        v.extend_from_slice(&x.to_ne_bytes());
    }

    /// The request numbers as `<linux/vfio.h>` defines them (printed by a C program on x86-64).
    #[test]
    fn request_numbers_match_the_kernel_header() {
        assert_eq!(
            [
                VFIO_DEVICE_GET_INFO,
                VFIO_DEVICE_SET_IRQS,
                VFIO_DEVICE_RESET,
                VFIO_IOMMU_GET_INFO,
                VFIO_IOMMU_MAP_DMA,
                VFIO_IOMMU_UNMAP_DMA
            ],
            [0x3b6b, 0x3b6e, 0x3b6f, 0x3b70, 0x3b71, 0x3b72]
        );
    }

    #[test]
    fn parses_iova_ranges_and_dma_avail() {
        let mut v = Vec::new();
        push32(&mut v, 0); // argsz
        push32(&mut v, b::VFIO_IOMMU_INFO_CAPS);
        push64(&mut v, (1 << 12) | (1 << 21));
        push32(&mut v, 24); // cap_offset
        push32(&mut v, 0);
        // IOVA range cap at 24: header {id 1, version 1, next 64}, nr 2, reserved, ranges
        v.extend_from_slice(&1u16.to_ne_bytes());
        v.extend_from_slice(&1u16.to_ne_bytes());
        push32(&mut v, 72);
        push32(&mut v, 2);
        push32(&mut v, 0);
        push64(&mut v, 0);
        push64(&mut v, 0xfedf_ffff);
        push64(&mut v, 0xfef0_0000);
        push64(&mut v, (1 << 48) - 1);
        // DMA avail cap at 72
        v.extend_from_slice(&(b::VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL as u16).to_ne_bytes());
        v.extend_from_slice(&1u16.to_ne_bytes());
        push32(&mut v, 0);
        push32(&mut v, 65000);
        let info = parse_iommu_info(&v);
        assert_eq!(info.page_sizes, (1 << 12) | (1 << 21));
        assert_eq!(
            info.iova_ranges,
            vec![0..0xfee0_0000, 0xfef0_0000..(1 << 48)]
        );
        assert_eq!(info.dma_avail, Some(65000));
    }

    #[test]
    fn malformed_chain_does_not_loop_or_panic() {
        let mut v = Vec::new();
        push32(&mut v, 0);
        push32(&mut v, b::VFIO_IOMMU_INFO_CAPS);
        push64(&mut v, 4096);
        push32(&mut v, 24);
        push32(&mut v, 0);
        v.extend_from_slice(&1u16.to_ne_bytes());
        v.extend_from_slice(&1u16.to_ne_bytes());
        push32(&mut v, 24); // next points at itself
        push32(&mut v, 1000); // claims 1000 ranges, has none
        let info = parse_iommu_info(&v);
        assert!(info.iova_ranges.is_empty());
        assert_eq!(parse_iommu_info(&[1, 2, 3]).page_sizes, 0);
    }
}
