//! In-process backend: the MXA-1 emulator from `firmware-stubs` in this process.
//!
//! There is no userspace pin here. Driver-owned buffers are mapped by fd (the emulator maps the
//! memfd itself); ordinary process memory is reached with process_vm_readv/writev, so a page the
//! CPU unmapped becomes a recorded IOMMU-style device fault, never a SIGSEGV.
//!
//! Interrupts follow vfio-pci's rules (`MsiState` in the backend module): the MSI vector count is the one
//! the device's MSI capability offers (as vfio-pci's IRQ info reports it), MSI is enabled with
//! the count of the first [`Backend::set_irqs`], and a later call for more vectors fails EINVAL
//! until MSI is disabled, so driver code that would fail on the kernel's vfio-pci fails here.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use firmware_stubs::{
    Accelerator, AcceleratorConfig, DmaMemory, DmaPerms, ProcessMemory, SharedRegion,
};

use super::{
    irq_index, region_index, Backend, BackendError, BackendKind, DmaAccess, DmaSource, IrqDesc,
    MsiSet, MsiState, RegionDesc,
};
use sys_util::sync::lock;

const NAME: &str = "emulated";

/// The emulator, reached by function calls.
pub struct EmulatedBackend {
    device: Arc<Accelerator>,
    /// MSI vectors the device's MSI capability offers (vfio-pci's IRQ info count).
    msi_offered: u32,
    msi: Mutex<MsiState>,
}

/// The vectors an MSI capability offers: 2^(Multiple Message Capable), control bits 3:1.
fn msi_capable(device: &Accelerator) -> u32 {
    let mut control = [0u8; 2];
    device.config_read(accel_abi::config::MSI_CAP as u64 + 2, &mut control);
    1 << ((u16::from_le_bytes(control) >> 1) & 0x7).min(5)
}

impl EmulatedBackend {
    /// Power on a new emulated device.
    pub fn new(config: AcceleratorConfig) -> Result<EmulatedBackend, BackendError> {
        let device = Accelerator::new(config).map_err(|e| transport("power-on", e))?;
        Ok(EmulatedBackend::from_device(Arc::new(device)))
    }

    /// Reach an emulated device the caller also holds (tests inspect its IOMMU through it).
    pub fn from_device(device: Arc<Accelerator>) -> EmulatedBackend {
        EmulatedBackend {
            msi_offered: msi_capable(&device),
            device,
            msi: Mutex::new(MsiState::default()),
        }
    }

    /// MSI vectors the device offers (what vfio-pci's IRQ info would report).
    pub fn msi_vectors(&self) -> u32 {
        self.msi_offered
    }

    /// The emulated device itself (host-side views such as its IOMMU fault log).
    pub fn device(&self) -> &Accelerator {
        &self.device
    }
}

fn transport(op: &'static str, e: impl std::fmt::Display + 'static) -> BackendError {
    BackendError::transport(NAME, op, e)
}

fn byte_len(len: u64) -> Result<usize, BackendError> {
    usize::try_from(len).map_err(|_| transport("dma_map", format!("length {len:#x} too large")))
}

impl Backend for EmulatedBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Emulated
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        self.device.config_read(offset, data);
        Ok(())
    }

    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.device.config_write(offset, data);
        Ok(())
    }

    fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        self.device.bar_read(bar, offset, data);
        Ok(())
    }

    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.device.bar_write(bar, offset, data);
        Ok(())
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        // The emulated IOMMU translates the same 48 bits as a VT-d with aw-bits=48.
        super::device_iova_ranges()
    }

    unsafe fn dma_map(
        &self,
        iova: u64,
        len: u64,
        source: DmaSource<'_>,
        access: DmaAccess,
    ) -> Result<(), BackendError> {
        let memory: Arc<dyn DmaMemory> = match source {
            DmaSource::Buffer { buffer, offset } => {
                SharedRegion::from_fd(buffer.fd(), offset as u64, byte_len(len)?, access.write)
                    .map_err(|e| transport("dma_map (buffer)", e))?
            }
            // In this process the device reaches user memory by address either way; mapping
            // the file a second time buys nothing here (and a second mapping of user memory
            // was seen to disturb the shadow oracle: see the lead's note).
            DmaSource::SharedFd { va, .. } | DmaSource::ProcessVa { va } => {
                Arc::new(ProcessMemory::current(va, len))
            }
        };
        let perms = DmaPerms {
            read: access.read,
            write: access.write,
        };
        self.device
            .dma_map(iova, len, memory, perms)
            .map_err(|e| transport("dma_map", e))
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), BackendError> {
        let unmapped = self
            .device
            .dma_unmap(iova, len)
            .map_err(|e| transport("dma_unmap", e))?;
        super::check_unmapped(NAME, "dma_unmap", iova, len, unmapped)
    }

    fn set_irqs(&self, mut eventfds: Vec<Option<OwnedFd>>) -> Result<(), BackendError> {
        let mut msi = lock(&self.msi);
        let set = msi
            .plan(self.msi_offered, &eventfds)
            .map_err(|detail| transport("set_irqs (VFIO_DEVICE_SET_IRQS)", detail))?;
        let device_vectors = accel_abi::vector::COUNT;
        match set {
            MsiSet::Nothing => {}
            MsiSet::Disable => {
                for v in 0..device_vectors {
                    self.device
                        .set_irq(v, None)
                        .map_err(|e| transport("set_irqs", e))?;
                }
            }
            MsiSet::Route { .. } => {
                for (v, fd) in (0u32..).zip(eventfds.iter_mut()) {
                    // Vectors the capability offers past the device's own are never raised:
                    // their eventfds are accepted and dropped, as vfio-pci would hold them idle.
                    if v < device_vectors {
                        self.device
                            .set_irq(v, fd.take())
                            .map_err(|e| transport("set_irqs", e))?;
                    }
                }
            }
        }
        msi.done(set);
        Ok(())
    }

    fn reset(&self) -> Result<(), BackendError> {
        self.device.reset();
        Ok(())
    }

    fn pins_memory(&self) -> bool {
        false
    }

    fn regions(&self) -> Option<Vec<RegionDesc>> {
        // What vfio-pci would report for the emulated function: BAR0 and config space.
        let size = |index| match index {
            region_index::BAR0 => accel_abi::regs::BAR0_SIZE,
            region_index::CONFIG => accel_abi::config::CONFIG_SIZE as u64,
            _ => 0,
        };
        Some(
            (0..region_index::PCI_COUNT)
                .map(|index| RegionDesc {
                    index,
                    size: size(index),
                    read: size(index) > 0,
                    write: size(index) > 0,
                    mapped: Vec::new(),
                })
                .collect(),
        )
    }

    fn irqs(&self) -> Option<Vec<IrqDesc>> {
        // MSI only: the emulator has no INTx line.
        Some(
            [irq_index::INTX, irq_index::MSI]
                .into_iter()
                .map(|index| IrqDesc {
                    index,
                    count: if index == irq_index::MSI {
                        self.msi_offered
                    } else {
                        0
                    },
                    eventfd: index == irq_index::MSI,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::os::fd::AsFd;

    fn fd() -> Option<OwnedFd> {
        let e = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap();
        Some(e.as_fd().try_clone_to_owned().unwrap())
    }

    #[test]
    fn msi_count_is_fixed_at_enable_as_on_vfio_pci() {
        let b = EmulatedBackend::new(AcceleratorConfig {
            workers: 1,
            ..Default::default()
        })
        .unwrap();
        // The MSI capability offers 4 vectors (the device raises 3).
        assert_eq!(b.msi_vectors(), 4);
        // The old per-vector bring-up: one vector, then two: refused as vfio-pci refuses it.
        b.set_irqs(vec![fd()]).unwrap();
        let e = b.set_irqs(vec![fd(), fd()]).unwrap_err().to_string();
        assert!(
            e.contains("EINVAL") && e.contains("enabled with 1 vector"),
            "{e}"
        );
        assert!(e.contains("disable"), "{e}");
        // Fewer or as many vectors: routed.
        b.set_irqs(vec![fd()]).unwrap();
        // After a disable, any count up to the capability's.
        b.set_irqs(Vec::new()).unwrap();
        let error = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        let routed = Some(error.as_fd().try_clone_to_owned().unwrap());
        b.set_irqs(vec![fd(), fd(), routed, None]).unwrap();
        // The routing reaches the device: a bad register access raises the error vector.
        let command = accel_abi::config::command::MEMORY;
        b.config_write(
            accel_abi::config::off::COMMAND as u64,
            &command.to_le_bytes(),
        )
        .unwrap();
        b.bar_read(0, 0x3, &mut [0u8; 4]).unwrap();
        assert_eq!(error.read().unwrap(), 1);
        assert!(b.set_irqs(vec![fd(), fd(), fd(), fd()]).is_ok());
        b.set_irqs(vec![None, None]).unwrap(); // all unset: a disable
        let e = b.set_irqs((0..5).map(|_| fd()).collect());
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("5 MSI vectors asked, the device offers 4"),
            "{e}"
        );
        // A disable while disabled sends nothing and succeeds.
        b.set_irqs(Vec::new()).unwrap();
    }
}
