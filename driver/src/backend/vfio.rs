//! Kernel VFIO backend: a PCI device bound to vfio-pci, reached through `vfio-ioctls`
//! (container + TYPE1v2, the group viability check) and the raw ioctls in [`crate::sys::vfio`]
//! for everything the crate does not report errors for.
//!
//! DMA mappings are real long-term pins (`VFIO_IOMMU_MAP_DMA`), charged against
//! RLIMIT_MEMLOCK; the IOMMU blocks any device access outside them.

use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio as b;
use vfio_ioctls::{VfioContainer, VfioDevice};

use super::{Backend, BackendError, BackendKind, DmaAccess, DmaSource};
use crate::memlock::PinAccount;
use crate::sys::vfio as raw;

const NAME: &str = "kernel-vfio";

fn err(op: &'static str, detail: impl std::fmt::Display) -> BackendError {
    BackendError::Transport {
        backend: NAME,
        op,
        detail: detail.to_string(),
    }
}

/// A PCI device bound to vfio-pci.
pub struct KernelVfioBackend {
    address: String,
    container: Arc<VfioContainer>,
    device: VfioDevice,
    config_offset: u64,
    bars: Vec<(u64, u64)>,
    /// BAR0 mapped into the process when VFIO allows it (registers without a syscall each).
    bar0: Option<raw::MappedBar>,
    iova_ranges: Vec<Range<u64>>,
    dma_avail: Option<u32>,
    irq_fds: Mutex<Vec<Option<OwnedFd>>>,
    irq_count: u32,
    pins: PinAccount,
    /// Sizes of live mappings by IOVA, so unmap un-charges exactly what map charged.
    mappings: Mutex<std::collections::HashMap<u64, u64>>,
}

/// Where a PCI device lives in sysfs.
pub fn sysfs_path(address: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(address)
}

/// Check that `address` exists and is bound to vfio-pci, with an actionable error otherwise.
pub fn check_binding(address: &str) -> Result<PathBuf, BackendError> {
    let path = sysfs_path(address);
    if !path.exists() {
        return Err(err(
            "open",
            format!(
                "no PCI device {address} (expected {}); list devices with `mirrorctl devices`",
                path.display()
            ),
        ));
    }
    let driver = std::fs::read_link(path.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match driver.as_deref() {
        Some("vfio-pci") => {}
        other => {
            return Err(err(
                "open",
                format!(
                    "{address} is bound to {}, not vfio-pci: `echo vfio-pci > {p}/driver_override; \
                     echo {address} > {p}/driver/unbind; echo {address} > /sys/bus/pci/drivers_probe`",
                    other.unwrap_or("no driver"),
                    p = path.display()
                ),
            ))
        }
    }
    if !Path::new("/dev/vfio/vfio").exists() {
        return Err(err(
            "open",
            "/dev/vfio/vfio is missing: load vfio_iommu_type1 and vfio-pci",
        ));
    }
    Ok(path)
}

impl KernelVfioBackend {
    /// Open the device at PCI `address` (e.g. `0000:00:03.0`), which must be bound to vfio-pci.
    pub fn open(address: &str) -> Result<KernelVfioBackend, BackendError> {
        let path = check_binding(address)?;
        let container = Arc::new(VfioContainer::new(None).map_err(|e| err("open container", e))?);
        // Adding the group checks viability (every device in the IOMMU group bound to
        // vfio-pci or no driver) and sets the TYPE1v2 IOMMU.
        let device = VfioDevice::new(&path, container.clone(), true).map_err(|e| {
            err(
                "open device",
                format!("{e}: every device in the IOMMU group must be bound to vfio-pci (see {}/iommu_group/devices)", path.display()),
            )
        })?;
        let info =
            raw::iommu_info(container.as_fd_compat()).map_err(|e| err("VFIO_IOMMU_GET_INFO", e))?;
        let iova_ranges = if info.iova_ranges.is_empty() {
            // Kernels before 5.4 report no ranges: assume the 39 bits every VT-d offers.
            vec![Range {
                start: 0x1000,
                end: 1 << 39,
            }]
        } else {
            info.iova_ranges
        };
        let config_offset = device.get_region_offset(b::VFIO_PCI_CONFIG_REGION_INDEX);
        let bars: Vec<(u64, u64)> = (0..6)
            .map(|i| (device.get_region_offset(i), device.get_region_size(i)))
            .collect();
        let bar0_flags = device.get_region_flags(b::VFIO_PCI_BAR0_REGION_INDEX);
        let bar0 = if bar0_flags & b::VFIO_REGION_INFO_FLAG_MMAP != 0
            && bar0_flags & b::VFIO_REGION_INFO_FLAG_CAPS == 0
        {
            let (offset, size) = bars[0];
            let fd = raw::borrow_fd(&device);
            match raw::MappedBar::map(fd, offset, size) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::info!(error = %e, "BAR0 mmap refused; using pread/pwrite");
                    None
                }
            }
        } else {
            None
        };
        let irq_count = device
            .get_irq_info(b::VFIO_PCI_MSI_IRQ_INDEX)
            .map_or(0, |irq| irq.count);
        Ok(KernelVfioBackend {
            address: address.to_owned(),
            container,
            device,
            config_offset,
            bars,
            bar0,
            iova_ranges,
            dma_avail: info.dma_avail,
            irq_fds: Mutex::new(Vec::new()),
            irq_count,
            pins: PinAccount::new(crate::memlock::effective_limit()),
            mappings: Mutex::new(Default::default()),
        })
    }

    /// The PCI address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// DMA mappings the IOMMU still accepts, as reported at open.
    pub fn dma_avail(&self) -> Option<u32> {
        self.dma_avail
    }

    /// Bytes pinned through this backend.
    pub fn pinned_bytes(&self) -> u64 {
        self.pins.pinned()
    }

    fn device_fd(&self) -> BorrowedFd<'_> {
        raw::borrow_fd(&self.device)
    }

    fn bar_offset(&self, bar: u32, offset: u64, len: usize) -> Result<u64, BackendError> {
        let &(base, size) = self
            .bars
            .get(bar as usize)
            .ok_or_else(|| err("bar access", format!("no BAR {bar}")))?;
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(err(
                "bar access",
                format!("BAR{bar} offset {offset:#x}+{len} outside {size:#x} bytes"),
            ));
        }
        Ok(base + offset)
    }
}

/// `VfioContainer` exposes only `AsRawFd`.
trait AsFdCompat {
    fn as_fd_compat(&self) -> BorrowedFd<'_>;
}

impl AsFdCompat for VfioContainer {
    fn as_fd_compat(&self) -> BorrowedFd<'_> {
        raw::borrow_fd(self)
    }
}

impl Backend for KernelVfioBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::KernelVfio
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        raw::region_read(self.device_fd(), self.config_offset + offset, data)
            .map_err(|e| err("config read", e))
    }

    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        raw::region_write(self.device_fd(), self.config_offset + offset, data)
            .map_err(|e| err("config write", e))
    }

    fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        if let (0, Some(m)) = (bar, &self.bar0) {
            return m.read(offset, data).map_err(|e| err("BAR read", e));
        }
        let at = self.bar_offset(bar, offset, data.len())?;
        raw::region_read(self.device_fd(), at, data).map_err(|e| err("BAR read", e))
    }

    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if let (0, Some(m)) = (bar, &self.bar0) {
            return m.write(offset, data).map_err(|e| err("BAR write", e));
        }
        let at = self.bar_offset(bar, offset, data.len())?;
        raw::region_write(self.device_fd(), at, data).map_err(|e| err("BAR write", e))
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        self.iova_ranges.clone()
    }

    fn dma_map(
        &self,
        iova: u64,
        len: u64,
        source: DmaSource<'_>,
        access: DmaAccess,
    ) -> Result<(), BackendError> {
        let vaddr = match source {
            DmaSource::Buffer { buffer, offset } => buffer.va() + offset as u64,
            DmaSource::ProcessVa { va } | DmaSource::SharedFd { va, .. } => va,
        };
        self.pins.charge(len).map_err(|e| err("dma_map", e))?;
        // SAFETY: the driver maps process memory only on behalf of a runtime call whose
        // contract gives the device access to it until the mapping is torn down.
        let mapped = unsafe {
            raw::map_dma(
                self.container.as_fd_compat(),
                iova,
                vaddr,
                len,
                access.read,
                access.write,
            )
        };
        match mapped {
            Ok(()) => {
                self.mappings
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(iova, len);
                Ok(())
            }
            Err(e) => {
                self.pins.uncharge(len);
                let hint = match e.raw_os_error() {
                    Some(libc::ENOMEM) => " (the kernel refused to pin: RLIMIT_MEMLOCK, or TYPE1's dma_entry_limit of mappings)",
                    Some(libc::EFAULT) => " (the address range is not fully mapped, or is read-only and write access was asked)",
                    Some(libc::EEXIST) => " (the IOVA range overlaps an existing mapping)",
                    _ => "",
                };
                Err(err(
                    "VFIO_IOMMU_MAP_DMA",
                    format!("{len:#x} bytes at iova {iova:#x} vaddr {vaddr:#x}: {e}{hint}"),
                ))
            }
        }
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), BackendError> {
        let unmapped = raw::unmap_dma(self.container.as_fd_compat(), iova, len)
            .map_err(|e| err("VFIO_IOMMU_UNMAP_DMA", e))?;
        let mut mappings = self.mappings.lock().unwrap_or_else(|p| p.into_inner());
        let charged: u64 = {
            let starts: Vec<u64> = mappings
                .keys()
                .copied()
                .filter(|s| *s >= iova && *s < iova + len)
                .collect();
            starts.iter().filter_map(|s| mappings.remove(s)).sum()
        };
        self.pins.uncharge(charged);
        if unmapped != len {
            return Err(err(
                "VFIO_IOMMU_UNMAP_DMA",
                format!("unmapped {unmapped:#x} of {len:#x} bytes at {iova:#x}"),
            ));
        }
        Ok(())
    }

    fn set_irq(&self, vector: u32, eventfd: Option<OwnedFd>) -> Result<(), BackendError> {
        if vector >= self.irq_count {
            return Err(err(
                "set_irq",
                format!("MSI vector {vector} of {}", self.irq_count),
            ));
        }
        let mut fds = self.irq_fds.lock().unwrap_or_else(|p| p.into_inner());
        if fds.len() <= vector as usize {
            fds.resize_with(vector as usize + 1, || None);
        }
        fds[vector as usize] = eventfd;
        let raw_fds: Vec<RawFd> = fds
            .iter()
            .map(|f| f.as_ref().map_or(-1, |f| f.as_fd().as_raw_fd()))
            .collect();
        let all_off = raw_fds.iter().all(|fd| *fd < 0);
        let set = if all_off { &[][..] } else { &raw_fds[..] };
        raw::set_irq_eventfds(self.device_fd(), b::VFIO_PCI_MSI_IRQ_INDEX, set)
            .map_err(|e| err("VFIO_DEVICE_SET_IRQS", e))
    }

    fn reset(&self) -> Result<(), BackendError> {
        raw::reset_device(self.device_fd()).map_err(|e| err("VFIO_DEVICE_RESET", e))
    }

    fn pins_memory(&self) -> bool {
        true
    }
}

/// A device bound to vfio-pci, as `mirrorctl devices` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioPciDevice {
    /// PCI address.
    pub address: String,
    /// Vendor and device ID.
    pub id: (u16, u16),
    /// IOMMU group number, if any.
    pub iommu_group: Option<u32>,
}

/// Devices bound to vfio-pci, from sysfs.
pub fn list_vfio_devices() -> std::io::Result<Vec<VfioPciDevice>> {
    let dir = Path::new("/sys/bus/pci/drivers/vfio-pci");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.contains(':') {
            continue;
        }
        let path = sysfs_path(&name);
        let hex = |f: &str| {
            std::fs::read_to_string(path.join(f))
                .ok()
                .and_then(|s| u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
                .unwrap_or(0)
        };
        let iommu_group = std::fs::read_link(path.join("iommu_group"))
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.parse().ok());
        out.push(VfioPciDevice {
            address: name,
            id: (hex("vendor"), hex("device")),
            iommu_group,
        });
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_a_clear_error() {
        let e = KernelVfioBackend::open("0000:ff:1f.7")
            .err()
            .expect("no such device here");
        assert!(e.to_string().contains("no PCI device 0000:ff:1f.7"), "{e}");
    }
}
