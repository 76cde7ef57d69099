//! Kernel VFIO backend: a PCI device bound to vfio-pci, reached through `vfio-ioctls`
//! (container + TYPE1v2, the group viability check) and the raw ioctls in the driver's private `sys::vfio` module
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

use super::{
    region_index, Backend, BackendError, BackendKind, DmaAccess, DmaSource, IrqDesc, MsiSet,
    MsiState, RegionDesc,
};
use crate::memlock::PinAccount;
use crate::sys::mapped_bar::MappedBar;
use crate::sys::vfio as raw;
use sys_util::sync::lock;

const NAME: &str = "kernel-vfio";

fn err(op: &'static str, detail: impl std::fmt::Display + 'static) -> BackendError {
    BackendError::transport(NAME, op, detail)
}

/// The errno behind a vfio-ioctls error: its source, an `io::Error` (opening a file) or the
/// failed ioctl's errno.
fn vfio_errno(e: &vfio_ioctls::VfioError) -> Option<i32> {
    let source = std::error::Error::source(e)?;
    source
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::raw_os_error)
        .or_else(|| {
            source
                .downcast_ref::<vmm_sys_util::errno::Error>()
                .map(|e| e.errno())
        })
}

/// The VFIO device and the mapping of its BAR0, torn down in the order the kernel needs.
///
/// An mmap of a BAR holds the device file open just as a descriptor does, and the kernel
/// refuses `VFIO_GROUP_UNSET_CONTAINER` (EBUSY) while any device file of the group is open.
/// `VfioDevice`'s drop closes its descriptor and then unsets the container, so the mapping must
/// be gone before it runs. (It was not: the mapping was a later field of the backend, so every
/// close of a device with a mapped BAR0 logged "VFIO_GROUP_UNSET_CONTAINER ioctl failed: Device
/// or resource busy" and left the group attached until the container itself closed; `mirrorctl
/// serve` on kernel VFIO showed it at each shutdown.)
struct DeviceFile<D> {
    device: D,
    /// BAR0 mapped into the process when VFIO allows it (registers without a syscall each).
    bar0: Option<MappedBar>,
}

impl<D> Drop for DeviceFile<D> {
    fn drop(&mut self) {
        // Unmapped here; `device` is dropped after this body, as a field.
        drop(self.bar0.take());
    }
}

/// A PCI device bound to vfio-pci.
pub struct KernelVfioBackend {
    address: String,
    container: Arc<VfioContainer>,
    device: DeviceFile<VfioDevice>,
    config_offset: u64,
    bars: Vec<(u64, u64)>,
    iova_ranges: Vec<Range<u64>>,
    dma_avail: Option<u32>,
    /// `VFIO_DEVICE_GET_INFO` flags (`VFIO_DEVICE_FLAGS_RESET`: the kernel has a reset method).
    device_flags: u32,
    /// The eventfds routed, and vfio-pci's MSI state (the count MSI was enabled with).
    irq: Mutex<(Vec<Option<OwnedFd>>, MsiState)>,
    irq_count: u32,
    /// Region info of the standard PCI regions, as vfio-pci reported it at open.
    regions: Vec<RegionDesc>,
    /// IRQ info of each index vfio-pci reported at open.
    irqs: Vec<IrqDesc>,
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
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| err("open container", format!("{e}")).with_errno(vfio_errno(&e)))?,
        );
        // Adding the group checks viability (every device in the IOMMU group bound to
        // vfio-pci or no driver) and sets the TYPE1v2 IOMMU.
        let device = VfioDevice::new(&path, container.clone(), true).map_err(|e| {
            err(
                "open device",
                format!("{e}: every device in the IOMMU group must be bound to vfio-pci (see {}/iommu_group/devices)", path.display()),
            )
            .with_errno(vfio_errno(&e))
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
            match MappedBar::map(fd, offset, size) {
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
        let device_flags = raw::device_flags(raw::borrow_fd(&device)).map_err(|e| {
            err("VFIO_DEVICE_GET_INFO", format!("{address}: {e}")).with_errno(e.raw_os_error())
        })?;
        let regions = (0..region_index::PCI_COUNT)
            .map(|index| {
                let flags = device.get_region_flags(index);
                let size = device.get_region_size(index);
                let mapped = match (&bar0, index) {
                    (Some(_), region_index::BAR0) => vec![(0, size)],
                    _ => Vec::new(),
                };
                RegionDesc {
                    index,
                    size,
                    read: flags & b::VFIO_REGION_INFO_FLAG_READ != 0,
                    write: flags & b::VFIO_REGION_INFO_FLAG_WRITE != 0,
                    mapped,
                }
            })
            .collect();
        let irqs = (0..b::VFIO_PCI_NUM_IRQS)
            .map(|index| {
                let info = device.get_irq_info(index);
                IrqDesc {
                    index,
                    count: info.map_or(0, |i| i.count),
                    eventfd: info.is_some_and(|i| i.flags & b::VFIO_IRQ_INFO_EVENTFD != 0),
                }
            })
            .collect();
        Ok(KernelVfioBackend {
            address: address.to_owned(),
            container,
            device: DeviceFile { device, bar0 },
            config_offset,
            bars,
            iova_ranges,
            dma_avail: info.dma_avail,
            device_flags,
            irq: Mutex::new((Vec::new(), MsiState::default())),
            irq_count,
            regions,
            irqs,
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
        raw::borrow_fd(&self.device.device)
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
        if let (0, Some(m)) = (bar, &self.device.bar0) {
            return m.read(offset, data).map_err(|e| err("BAR read", e));
        }
        let at = self.bar_offset(bar, offset, data.len())?;
        raw::region_read(self.device_fd(), at, data).map_err(|e| err("BAR read", e))
    }

    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if let (0, Some(m)) = (bar, &self.device.bar0) {
            return m.write(offset, data).map_err(|e| err("BAR write", e));
        }
        let at = self.bar_offset(bar, offset, data.len())?;
        raw::region_write(self.device_fd(), at, data).map_err(|e| err("BAR write", e))
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        self.iova_ranges.clone()
    }

    unsafe fn dma_map(
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
        // SAFETY: our caller keeps `[vaddr, vaddr + len)` available to the device until the
        // mapping is unmapped (this function's safety section); the kernel pins it.
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
                lock(&self.mappings).insert(iova, len);
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
        let mut mappings = lock(&self.mappings);
        let charged: u64 = {
            let starts: Vec<u64> = mappings
                .keys()
                .copied()
                .filter(|s| *s >= iova && *s < iova + len)
                .collect();
            starts.iter().filter_map(|s| mappings.remove(s)).sum()
        };
        self.pins.uncharge(charged);
        super::check_unmapped(NAME, "VFIO_IOMMU_UNMAP_DMA", iova, len, unmapped)
    }

    fn set_irqs(&self, eventfds: Vec<Option<OwnedFd>>) -> Result<(), BackendError> {
        let mut irq = lock(&self.irq);
        let (routed, msi) = &mut *irq;
        let set = msi
            .plan(self.irq_count, &eventfds)
            .map_err(|d| err("VFIO_DEVICE_SET_IRQS", format!("{}: {d}", self.address)))?;
        let raw_fds: Vec<RawFd> = match set {
            MsiSet::Nothing => return Ok(()),
            MsiSet::Disable => Vec::new(),
            MsiSet::Route { .. } => eventfds
                .iter()
                .map(|f| f.as_ref().map_or(-1, |f| f.as_fd().as_raw_fd()))
                .collect(),
        };
        let got = raw::set_irq_eventfds(self.device_fd(), b::VFIO_PCI_MSI_IRQ_INDEX, &raw_fds)
            .map_err(|e| set_irqs_error(&self.address, raw_fds.len(), msi.enabled(), &e))?;
        if got != 0 {
            return Err(err(
                "VFIO_DEVICE_SET_IRQS",
                partial_msi(&self.address, raw_fds.len(), got),
            ));
        }
        msi.done(set);
        match set {
            MsiSet::Route { .. } => {
                if routed.len() < eventfds.len() {
                    routed.resize_with(eventfds.len(), || None);
                }
                for (slot, fd) in routed.iter_mut().zip(eventfds) {
                    *slot = fd;
                }
            }
            _ => routed.clear(),
        }
        Ok(())
    }

    fn reset(&self) -> Result<(), BackendError> {
        check_reset_flag(&self.address, self.device_flags)?;
        raw::reset_device(self.device_fd()).map_err(|e| reset_error(&self.address, &e))
    }

    fn pins_memory(&self) -> bool {
        true
    }

    fn regions(&self) -> Option<Vec<RegionDesc>> {
        Some(self.regions.clone())
    }

    fn irqs(&self) -> Option<Vec<IrqDesc>> {
        Some(self.irqs.clone())
    }

    // `set_intx` stays unsupported here: vfio-pci masks INTx after each interrupt and the
    // user must unmask it (ACTION_UNMASK) to get the next, which the trait does not offer yet;
    // connecting the eventfd alone would deliver one interrupt and then silence.
}

/// The reset `VFIO_DEVICE_RESET` would do is there only if vfio-pci found a reset method
/// (FLR, PM reset, a slot or bus reset) and said so in `VFIO_DEVICE_GET_INFO`'s flags.
fn check_reset_flag(address: &str, flags: u32) -> Result<(), BackendError> {
    if flags & b::VFIO_DEVICE_FLAGS_RESET != 0 {
        return Ok(());
    }
    Err(BackendError::NoResetMethod {
        device: address.to_owned(),
        detail: format!("VFIO_DEVICE_GET_INFO flags {flags:#x} lack VFIO_DEVICE_FLAGS_RESET"),
    })
}

/// vfio-pci fails `VFIO_DEVICE_RESET` with EINVAL exactly when it has no reset method.
fn reset_error(address: &str, e: &std::io::Error) -> BackendError {
    if e.raw_os_error() == Some(libc::EINVAL) {
        return BackendError::NoResetMethod {
            device: address.to_owned(),
            detail: format!("the ioctl failed: {e}"),
        };
    }
    err("VFIO_DEVICE_RESET", format!("{address}: {e}")).with_errno(e.raw_os_error())
}

fn set_irqs_error(address: &str, count: usize, enabled: u32, e: &std::io::Error) -> BackendError {
    let hint = match e.raw_os_error() {
        Some(libc::EINVAL) if enabled != 0 => format!(
            " (MSI is enabled with {enabled} vector(s): vfio-pci refuses a count above that \
             without a disable in between)"
        ),
        Some(libc::EINVAL) => " (vfio-pci refused the vector range or an eventfd)".to_owned(),
        Some(libc::ENOSPC) | Some(libc::ENOMEM) => {
            " (the kernel could not allocate the MSI vectors)".to_owned()
        }
        _ => String::new(),
    };
    let what = if count == 0 {
        "disabling MSI".to_owned()
    } else {
        format!("connecting {count} MSI vectors")
    };
    err(
        "VFIO_DEVICE_SET_IRQS",
        format!("{address}: {what}: {e}{hint}"),
    )
    .with_errno(e.raw_os_error())
}

/// vfio-pci answers a SET_IRQS whose MSI enable got fewer vectors than asked with that number
/// (not an errno), and enables nothing.
fn partial_msi(address: &str, asked: usize, got: u32) -> String {
    format!(
        "{address}: the kernel could allocate only {got} of the {asked} MSI vectors asked, so \
         vfio-pci enabled none (on x86 a device gets more than one MSI vector only with \
         interrupt remapping: in a QEMU guest, -device intel-iommu,intremap=on, with KVM also \
         -machine kernel-irqchip=split)"
    )
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

    /// Stands in for the `VfioDevice`: when it is dropped (when the real one unsets the
    /// container), it looks whether the BAR mapping is still in this process.
    struct DeviceProbe {
        name: &'static str,
        mapped_at_drop: Arc<Mutex<Option<bool>>>,
    }

    impl Drop for DeviceProbe {
        fn drop(&mut self) {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let mapped = maps.lines().any(|l| l.contains(self.name));
            *self.mapped_at_drop.lock().unwrap() = Some(mapped);
        }
    }

    #[test]
    fn the_bar_mapping_is_gone_before_the_device_closes() {
        let name = "mxa-bar0-teardown-order";
        let fd = nix::sys::memfd::memfd_create(
            c"mxa-bar0-teardown-order",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4096).unwrap();
        let bar0 = MappedBar::map(file.as_fd(), 0, 4096).unwrap();
        drop(file);
        let mapped_at_drop = Arc::new(Mutex::new(None));
        let probe = DeviceProbe {
            name,
            mapped_at_drop: mapped_at_drop.clone(),
        };
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains(name), "the stand-in BAR is not mapped");
        drop(DeviceFile {
            device: probe,
            bar0: Some(bar0),
        });
        assert_eq!(
            *mapped_at_drop.lock().unwrap(),
            Some(false),
            "BAR0 was still mapped (holding the device file open) when the device closed"
        );
    }

    #[test]
    fn no_reset_flag_is_a_matchable_error_naming_device_cause_and_fix() {
        assert!(check_reset_flag("0000:00:04.0", b::VFIO_DEVICE_FLAGS_RESET).is_ok());
        let e = check_reset_flag("0000:00:04.0", b::VFIO_DEVICE_FLAGS_PCI).unwrap_err();
        assert!(
            matches!(&e, BackendError::NoResetMethod { device, .. } if device == "0000:00:04.0"),
            "{e:?}"
        );
        let text = e.to_string();
        for part in [
            "VFIO_DEVICE_RESET on 0000:00:04.0",
            "no reset method",
            "root bus",
            "flags 0x2 lack VFIO_DEVICE_FLAGS_RESET",
            "behind a PCIe root port or bridge",
        ] {
            assert!(text.contains(part), "{part:?} missing: {text}");
        }
        // The same for an EINVAL from the ioctl itself; other errnos stay transport errors.
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        assert!(matches!(
            reset_error("0000:00:04.0", &einval),
            BackendError::NoResetMethod { .. }
        ));
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        let e = reset_error("0000:00:04.0", &eio);
        assert!(matches!(e, BackendError::Transport { .. }), "{e:?}");
        // Through the driver's error type, as a caller of Runtime::open sees it.
        let e = crate::Error::from(check_reset_flag("0000:00:04.0", 0).unwrap_err());
        assert!(matches!(
            e,
            crate::Error::Backend(BackendError::NoResetMethod { .. })
        ));
    }

    /// A failed ioctl's errno is a value of the error, not only words in its message.
    #[test]
    fn ioctl_errors_carry_their_errno() {
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        let e = reset_error("0000:00:04.0", &eio);
        assert!(
            matches!(
                e,
                BackendError::Transport {
                    errno: Some(libc::EIO),
                    ..
                }
            ),
            "{e:?}"
        );
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        let e = set_irqs_error("0000:00:04.0", 2, 1, &einval);
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // Through the bring-up error that wraps it.
        let wrapped = BackendError::Interrupts {
            vectors: 2,
            names: "fault, completion",
            source: Box::new(e),
        };
        assert_eq!(wrapped.raw_os_error(), Some(libc::EINVAL));
        // An io::Error detail is enough: an unmap refused EINVAL.
        let e = err(
            "VFIO_IOMMU_UNMAP_DMA",
            std::io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert!(
            e.to_string()
                .contains("VFIO_IOMMU_UNMAP_DMA failed: Invalid argument"),
            "{e}"
        );
        // Where no OS error is behind the failure there is none.
        assert_eq!(err("bar access", "no BAR 7").raw_os_error(), None);
        // A vfio-ioctls error keeps the errno of the file it could not open.
        let opened =
            vfio_ioctls::VfioError::OpenContainer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(vfio_errno(&opened), Some(libc::ENOENT));
    }

    #[test]
    fn a_partial_msi_allocation_is_an_error_naming_the_counts() {
        let m = partial_msi("0000:00:04.0", 3, 1);
        assert!(m.contains("only 1 of the 3 MSI vectors"), "{m}");
        assert!(m.contains("enabled none"), "{m}");
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        let e = set_irqs_error("0000:00:04.0", 2, 1, &einval).to_string();
        assert!(e.contains("enabled with 1 vector"), "{e}");
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let e = KernelVfioBackend::open("0000:ff:1f.7")
            .err()
            .expect("no such device here");
        assert!(e.to_string().contains("no PCI device 0000:ff:1f.7"), "{e}");
    }
}
