//! QEMU's `edu` device (PCI 1234:11e8) as a device without page faults: identity and liveness
//! registers, MSI through an eventfd, and the DMA engine over ordinary process memory.
//!
//! It opens through the runtime like an MXA-1, as the [`Edu`] personality:
//!
//! ```no_run
//! use driver::edu::Edu;
//! use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
//! let rt = Runtime::<Edu>::open_with(
//!     DeviceSpec::KernelVfio("0000:00:04.0".into()),
//!     RuntimeOptions::default(),
//! )?;
//! rt.device().liveness_check()?;
//! let ctx = rt.create_context()?;
//! let buf = vec![7u8; 4095];
//! ctx.dma_to_device(buf.as_ptr() as u64, buf.len() as u64)?;
//! # Ok::<(), driver::Error>(())
//! ```
//!
//! edu addresses memory by IOVA only, so a context mirrors through an [`IommuView`]: each
//! transfer maps the user range on submit at IOVA == VA
//! ([`ContextCore::map_for_device`](crate::context::ContextCore::map_for_device)) and
//! the mirror tears the IOMMU mapping down (unpins) when the CPU mapping changes (munmap,
//! MADV_DONTNEED, mremap). IOVA == VA needs an IOMMU with a 48-bit address width
//! (`-device intel-iommu,aw-bits=48` on QEMU 7.2) and edu's DMA mask set to all ones
//! (`-device edu,dma_mask=0xffffffffffffffff`); otherwise the map or the transfer fails.
//!
//! CPU changes made through the mirror's wrappers (`AddressSpace::munmap`/`madvise`/`mremap`)
//! are seen at once. Plain syscalls (or `free`) are seen only through userfaultfd events, which
//! the mirror gets from kernels with UFFD_FEATURE_WP_ASYNC (6.7+); [`Context::map`] (on an edu
//! context) settles them before each submit. On older kernels (the 6.1 guest) a plain munmap
//! leaves the device mapping (and its pin) in place until the wrappers or the context's drop
//! remove it.
//!
//! Register map (QEMU `docs/specs/edu.rst`): ID at 0x00, liveness at 0x04 (reads back the
//! complement of what was written), interrupt status 0x24, raise 0x60, ack 0x64, DMA source
//! 0x80, destination 0x88, count 0x90, command 0x98. The device's DMA buffer is 4096 bytes at
//! device address 0x40000; QEMU 7.2 aborts (kills the VM) on a transfer that ends exactly at
//! its end, so a transfer is at most [`MAX_DMA`] bytes.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::backend::{Backend, Bar0, Config};
use crate::context::ContextOptions;
use crate::dma::DmaSpace;
use crate::runtime::{Context, NoFaults, Personality, RuntimeOptions};
use crate::view::{DeviceView, IommuView};
use crate::Error;

/// PCI vendor ID of edu.
pub const VENDOR: u16 = 0x1234;
/// PCI device ID of edu.
pub const DEVICE: u16 = 0x11e8;
/// Largest transfer: QEMU 7.2's range check rejects (and aborts on) a full 4096 bytes.
pub const MAX_DMA: u64 = 4095;
/// Device address of edu's internal DMA buffer.
pub const BUFFER: u64 = 0x40000;

const REG_ID: u64 = 0x00;
const REG_LIVENESS: u64 = 0x04;
const REG_IRQ_STATUS: u64 = 0x24;
const REG_IRQ_RAISE: u64 = 0x60;
const REG_IRQ_ACK: u64 = 0x64;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;
const CMD_START: u64 = 0x1;
const CMD_TO_RAM: u64 = 0x2;
const CMD_IRQ: u64 = 0x4;
/// Interrupt status bit edu raises when a DMA started with "raise an interrupt" completes.
pub const IRQ_DMA_DONE: u32 = 0x100;

const PCI_COMMAND: usize = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// The edu personality: `Runtime::<Edu>::open_with(spec, options)`.
///
/// - Bring-up ([`EduDevice`]): the PCI ID must be 1234:11e8; memory decoding and bus mastering
///   on, MSI vector 0 to an eventfd, stale interrupt status cleared.
/// - Faults: none ([`NoFaults`]). edu stalls on nothing: it reaches only what a transfer mapped
///   for it on submit, so no service thread runs.
/// - View: [`IommuView`], identity mappings (IOVA == VA) in the IOMMU alone; no page table.
#[derive(Debug, Clone, Copy)]
pub struct Edu;

impl Personality for Edu {
    type Device = EduDevice;
    type Faults = NoFaults;

    fn bring_up(backend: Box<dyn Backend>, _options: &RuntimeOptions) -> Result<EduDevice, Error> {
        EduDevice::bring_up(backend)
    }

    fn dma(device: &EduDevice) -> &Arc<DmaSpace> {
        &device.dma
    }

    /// One: edu has no address-space IDs, only the one IOMMU domain, and its mappings are
    /// identity ones, so a second mirror of this process would collide with the first on every
    /// page ([`Error::IdentityUnavailable`]). One context at a time, as one edu was one mirror.
    fn address_spaces(_device: &EduDevice) -> usize {
        1
    }

    fn fault_source(
        _device: &Arc<EduDevice>,
        _options: &RuntimeOptions,
    ) -> Result<NoFaults, Error> {
        Ok(NoFaults)
    }

    fn view(
        _device: &Arc<EduDevice>,
        _space: u16,
        _options: &ContextOptions,
    ) -> Result<Box<dyn DeviceView>, Error> {
        Ok(Box::new(IommuView::new()))
    }
}

/// An edu device brought up, with its MSI eventfd.
pub struct EduDevice {
    dma: Arc<DmaSpace>,
    irq: EventFd,
    /// How long a wait for the MSI may take, in nanoseconds (settable through a shared
    /// reference: the runtime and its contexts share the device).
    timeout_ns: AtomicU64,
}

impl EduDevice {
    /// Bring up edu over any backend: checks the PCI ID, enables memory decoding and bus
    /// mastering, routes MSI vector 0 to an eventfd and clears stale interrupt status.
    fn bring_up(backend: Box<dyn Backend>) -> Result<EduDevice, Error> {
        let config = Config(&*backend);
        let (vendor, device) = (config.read16(0)?, config.read16(2)?);
        if (vendor, device) != (VENDOR, DEVICE) {
            return Err(Error::Unsupported(format!(
                "not a QEMU edu device: PCI ID {vendor:04x}:{device:04x}, expected {VENDOR:04x}:{DEVICE:04x}"
            )));
        }
        let command = config.read16(PCI_COMMAND)?;
        config.write16(
            PCI_COMMAND,
            command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
        )?;
        let irq = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| os("eventfd", e))?;
        let for_kernel: OwnedFd = irq.as_fd().try_clone_to_owned().map_err(|e| Error::Os {
            what: "dup",
            source: e,
        })?;
        backend.set_irqs(vec![Some(for_kernel)])?;
        let edu = EduDevice {
            dma: Arc::new(DmaSpace::new(backend)),
            irq,
            timeout_ns: AtomicU64::new(Duration::from_secs(5).as_nanos() as u64),
        };
        let stale = edu.bar().read32(REG_IRQ_STATUS)?;
        if stale != 0 {
            edu.bar().write32(REG_IRQ_ACK, stale)?;
        }
        edu.drain_irq()?;
        Ok(edu)
    }

    fn bar(&self) -> Bar0<'_> {
        Bar0(self.dma.backend())
    }

    /// How long [`EduDevice::wait_irq`] waits for an MSI (default 5 s; a DMA takes ~100 ms of
    /// guest time).
    pub fn set_timeout(&self, timeout: Duration) {
        let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        self.timeout_ns.store(ns, Ordering::Relaxed);
    }

    fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_ns.load(Ordering::Relaxed))
    }

    /// The ID register (`0x010000ed` for edu 1.0).
    pub fn id(&self) -> Result<u32, Error> {
        let id = self.bar().read32(REG_ID)?;
        if id & 0xff != 0xed {
            return Err(Error::Unsupported(format!(
                "edu ID register reads {id:#010x}: the low byte must be 0xed"
            )));
        }
        Ok(id)
    }

    /// Write a few patterns to the liveness register and check it returns their complement.
    pub fn liveness_check(&self) -> Result<(), Error> {
        for pattern in [0x1234_5678u32, 0xdead_beef, 0, u32::MAX] {
            self.bar().write32(REG_LIVENESS, pattern)?;
            let read = self.bar().read32(REG_LIVENESS)?;
            if read != !pattern {
                return Err(Error::Unsupported(format!(
                    "edu liveness register: wrote {pattern:#010x}, read {read:#010x}, expected {:#010x}",
                    !pattern
                )));
            }
        }
        Ok(())
    }

    /// Raise interrupt status `bits` through register 0x60 and wait for the MSI; returns the
    /// status seen (acked).
    pub fn raise_irq(&self, bits: u32) -> Result<u32, Error> {
        if bits == 0 {
            return Err(Error::InvalidArgument("edu raise_irq: no status bits"));
        }
        self.bar().write32(REG_IRQ_RAISE, bits)?;
        self.wait_irq(bits)
    }

    fn drain_irq(&self) -> Result<u64, Error> {
        match self.irq.read() {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(e) => Err(os("eventfd read", e)),
        }
    }

    /// Wait for an MSI whose interrupt status includes `bits`, then ack the whole status (edu
    /// keeps its status latched until acked, even with MSI). Returns the status.
    pub fn wait_irq(&self, bits: u32) -> Result<u32, Error> {
        let deadline = Instant::now() + self.timeout();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout("the edu MSI"));
            }
            let mut fds = [PollFd::new(self.irq.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(os("poll", e)),
            }
            if self.drain_irq()? == 0 {
                continue;
            }
            let status = self.bar().read32(REG_IRQ_STATUS)?;
            if status != 0 {
                self.bar().write32(REG_IRQ_ACK, status)?;
            }
            if status & bits == bits {
                return Ok(status);
            }
        }
    }

    fn run_dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> Result<(), Error> {
        let bar = self.bar();
        bar.write64(REG_DMA_SRC, src)?;
        bar.write64(REG_DMA_DST, dst)?;
        bar.write64(REG_DMA_COUNT, len)?;
        let cmd = CMD_START | CMD_IRQ | if to_ram { CMD_TO_RAM } else { 0 };
        bar.write64(REG_DMA_CMD, cmd)?;
        self.wait_irq(IRQ_DMA_DONE)?;
        if bar.read64(REG_DMA_CMD)? & CMD_START != 0 {
            return Err(Error::Unsupported(
                "edu raised the DMA completion interrupt with the transfer still running".into(),
            ));
        }
        Ok(())
    }

    /// The DMA space (backend and IOVA allocations).
    pub fn dma(&self) -> &DmaSpace {
        &self.dma
    }
}

impl Drop for EduDevice {
    /// Runs after every context is gone (each holds the runtime, which holds the device), so
    /// every mapping is unmapped by then.
    fn drop(&mut self) {
        if let Err(e) = self.dma.backend().set_irqs(Vec::new()) {
            tracing::warn!(error = %e, "disconnecting the edu MSI failed");
        }
    }
}

fn check_len(len: u64) -> Result<(), Error> {
    if len == 0 {
        return Err(Error::InvalidArgument("edu DMA of 0 bytes"));
    }
    if len > MAX_DMA {
        return Err(Error::InvalidArgument(
            "edu DMA longer than 4095 bytes (QEMU 7.2's edu aborts the VM on a full 4096-byte transfer)",
        ));
    }
    Ok(())
}

/// Transfers: edu's DMA engine between this process's memory and its buffer.
impl Context<Edu> {
    /// Mirror `[va, va + len)` for edu (IOVA == VA) unless it is mapped already with the access
    /// needed; every transfer does this on submit, after settling the CPU events queued so far
    /// (munmap, MADV_DONTNEED, mremap done without the mirror's wrappers). Returns the IOVA. Past
    /// RLIMIT_MEMLOCK this fails with the memlock error that names the limit and the fix.
    pub fn map(&self, va: u64, len: u64, write: bool) -> Result<u64, Error> {
        if len == 0 {
            return Err(Error::InvalidArgument("edu map of 0 bytes"));
        }
        // Changes the CPU made behind our back (a plain munmap, a free()) arrive as userfaultfd
        // events: handle every one queued so far, so no stale mapping of a reused VA is taken
        // for a live one.
        self.address_space().settle().map_err(Error::Mirror)?;
        self.core().map_for_device(va, len, write)
    }

    /// Copy `len` bytes of this process's memory at `src_va` into edu's buffer (at offset 0),
    /// mapping the range on submit. Waits for the completion MSI.
    pub fn dma_to_device(&self, src_va: u64, len: u64) -> Result<(), Error> {
        check_len(len)?;
        let iova = self.map(src_va, len, false)?;
        self.runtime().device().run_dma(iova, BUFFER, len, false)
    }

    /// Copy `len` bytes of edu's buffer into this process's memory at `dst_va`, mapping the
    /// range (writable) on submit. Waits for the completion MSI.
    pub fn dma_from_device(&self, dst_va: u64, len: u64) -> Result<(), Error> {
        check_len(len)?;
        let iova = self.map(dst_va, len, true)?;
        self.runtime().device().run_dma(BUFFER, iova, len, true)
    }

    /// Make edu write `len` bytes of its buffer to `iova` **without** mapping anything: the
    /// IOMMU alone decides. For tests of the IOMMU's protection (edu still raises its
    /// completion interrupt when the IOMMU blocked the write; the kernel logs a DMAR fault).
    pub fn dma_from_device_unmapped(&self, iova: u64, len: u64) -> Result<(), Error> {
        check_len(len)?;
        self.runtime().device().run_dma(BUFFER, iova, len, true)
    }
}

fn os(what: &'static str, e: nix::errno::Errno) -> Error {
    Error::Os {
        what,
        source: e.into(),
    }
}

/// Bytes of this process's memory the kernel counts as locked (`VmLck` in /proc/self/status;
/// VFIO TYPE1 charges its pins there).
pub fn locked_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_outside_one_to_4095_are_clear_errors() {
        let e = check_len(0).unwrap_err();
        assert!(e.to_string().contains("0 bytes"), "{e}");
        let e = check_len(4096).unwrap_err();
        assert!(e.to_string().contains("4095"), "{e}");
        check_len(1).unwrap();
        check_len(4095).unwrap();
    }

    #[test]
    fn locked_bytes_reads_this_process() {
        assert!(locked_bytes().is_some());
    }

    #[test]
    #[cfg(feature = "vfio")]
    fn open_of_a_missing_device_is_a_clear_error() {
        use crate::runtime::{DeviceSpec, Runtime};
        let spec = DeviceSpec::KernelVfio("0000:ff:1f.7".into());
        let e = Runtime::<Edu>::open_with(spec, RuntimeOptions::default())
            .err()
            .expect("no such device");
        assert!(e.to_string().contains("no PCI device"), "{e}");
    }
}
