//! In-process backend: the MXA-1 emulator from `firmware-stubs` in this process.
//!
//! There is no userspace pin here. Driver-owned buffers are mapped by fd (the emulator maps the
//! memfd itself); ordinary process memory is reached with process_vm_readv/writev, so a page the
//! CPU unmapped becomes a recorded IOMMU-style device fault, never a SIGSEGV.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use firmware_stubs::{
    Accelerator, AcceleratorConfig, DmaMemory, DmaPerms, ProcessMemory, SharedRegion,
};

use super::{Backend, BackendError, BackendKind, DmaAccess, DmaSource};

const NAME: &str = "emulated";

/// The emulator, reached by function calls.
pub struct EmulatedBackend {
    device: Arc<Accelerator>,
}

impl EmulatedBackend {
    /// Power on a new emulated device.
    pub fn new(config: AcceleratorConfig) -> Result<EmulatedBackend, BackendError> {
        let device = Accelerator::new(config).map_err(|e| transport("power-on", e))?;
        Ok(EmulatedBackend {
            device: Arc::new(device),
        })
    }

    /// Reach an emulated device the caller also holds (tests inspect its IOMMU through it).
    pub fn from_device(device: Arc<Accelerator>) -> EmulatedBackend {
        EmulatedBackend { device }
    }

    /// The emulated device itself (host-side views such as its IOMMU fault log).
    pub fn device(&self) -> &Accelerator {
        &self.device
    }
}

fn transport(op: &'static str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Transport {
        backend: NAME,
        op,
        detail: e.to_string(),
    }
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
        // The emulated IOMMU translates the same 48 bits as a VT-d with aw-bits=48; page 0 is
        // kept unmapped so that a zero IOVA is always a fault.
        vec![Range {
            start: accel_abi::PAGE_SIZE,
            end: 1u64 << accel_abi::VA_BITS,
        }]
    }

    fn dma_map(
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
        if unmapped != len {
            return Err(transport(
                "dma_unmap",
                format!("unmapped {unmapped} of {len} bytes at {iova:#x}"),
            ));
        }
        Ok(())
    }

    fn set_irq(&self, vector: u32, eventfd: Option<OwnedFd>) -> Result<(), BackendError> {
        self.device
            .set_irq(vector, eventfd)
            .map_err(|e| transport("set_irq", e))
    }

    fn reset(&self) -> Result<(), BackendError> {
        self.device.reset();
        Ok(())
    }

    fn pins_memory(&self) -> bool {
        false
    }
}
