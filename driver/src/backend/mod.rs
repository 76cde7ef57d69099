//! The backend seam: the only place that knows how the device is reached.
//!
//! Everything above this trait (device bring-up, page tables, fault service, invalidation) is
//! written once and runs unchanged on every implementation:
//! - `emulated::EmulatedBackend`: the MXA-1 emulator from `firmware-stubs`, in this process
//!   (feature `emulator`);
//! - `vfio::KernelVfioBackend`: a device bound to the kernel's vfio-pci, through `vfio-ioctls`
//!   (feature `vfio`);
//! - [`vfio_user::VfioUserBackend`]: a vfio-user server over a Unix socket (always built).
//!
//! DMA goes through the backend, never around it: memory that is not shared by fd (ordinary
//! process memory) is handed over as [`DmaSource::ProcessVa`], and each backend decides how the
//! device reaches it (a long-term pin, process_vm_readv, or vfio-user DMA_READ/DMA_WRITE).

use std::ops::Range;
use std::os::fd::{BorrowedFd, OwnedFd};

use crate::sys::dmabuf::DmaBuffer;

#[cfg(feature = "emulator")]
pub mod emulated;
#[cfg(feature = "vfio")]
pub mod vfio;
pub mod vfio_user;

/// An error from a backend operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A register, config-space or DMA operation failed in the transport.
    #[error("{backend} backend: {op} failed: {detail}")]
    Transport {
        /// Backend name.
        backend: &'static str,
        /// Operation.
        op: &'static str,
        /// What went wrong.
        detail: String,
        /// The OS error behind the failure, as a value, where there is one: the errno of a
        /// failed ioctl or socket call, or the errno a vfio-user server's error reply carries
        /// (match it as `Transport { errno: Some(libc::EBUSY), .. }`). `detail` already names
        /// it, so the message does not repeat it. [`BackendError::raw_os_error`] finds it
        /// through [`BackendError::Interrupts`] too.
        errno: Option<i32>,
    },
    /// The backend does not implement this operation.
    #[error("{backend} backend: {op} is not supported")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// Operation.
        op: &'static str,
    },
    /// The device has no reset method the kernel can use: vfio-pci reports no
    /// `VFIO_DEVICE_FLAGS_RESET`, or `VFIO_DEVICE_RESET` failed EINVAL. Match it as
    /// `driver::Error::Backend(BackendError::NoResetMethod { .. })`.
    #[error(
        "VFIO_DEVICE_RESET on {device}: the device has no reset method (no FLR, no PM reset, no \
         bus reset: it is on a root bus, or shares its bus with another device; {detail}); put it \
         alone behind a PCIe root port or bridge (QEMU: -device pcie-root-port,id=rp1 and bus=rp1 \
         on the device) so that the kernel can reset its secondary bus"
    )]
    NoResetMethod {
        /// PCI address.
        device: String,
        /// What showed it (the GET_INFO flags, or the ioctl's errno).
        detail: String,
    },
    /// Connecting the device's MSI vectors to eventfds failed at bring-up: no interrupt could
    /// arrive, so the device is not brought up (the fault service would otherwise degrade to
    /// timeout polling without anyone noticing).
    #[error("connecting {vectors} MSI vectors ({names}) to eventfds failed, so no interrupt could arrive: {source}")]
    Interrupts {
        /// Vectors asked for.
        vectors: u32,
        /// What they signal.
        names: &'static str,
        /// The backend's error.
        source: Box<BackendError>,
    },
}

impl BackendError {
    /// A transport failure of `op` on `backend`. When `detail` is itself an OS error (a
    /// `std::io::Error` with an OS code, or a `nix::errno::Errno`), its errno is kept as the
    /// value [`BackendError::Transport::errno`]; otherwise there is none (add one with
    /// [`BackendError::with_errno`]).
    pub(crate) fn transport(
        backend: &'static str,
        op: &'static str,
        detail: impl std::fmt::Display + 'static,
    ) -> BackendError {
        let any: &dyn std::any::Any = &detail;
        let errno = any
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .or_else(|| any.downcast_ref::<nix::errno::Errno>().map(|e| *e as i32));
        BackendError::Transport {
            backend,
            op,
            detail: detail.to_string(),
            errno,
        }
    }

    /// The same error carrying OS error `errno` (a transport failure; other kinds are returned
    /// unchanged).
    pub(crate) fn with_errno(mut self, errno: Option<i32>) -> BackendError {
        if let BackendError::Transport { errno: e, .. } = &mut self {
            *e = errno.or(*e);
        }
        self
    }

    /// The OS error behind this failure, if there is one: the errno of a transport failure,
    /// also when it is the cause of an [`BackendError::Interrupts`].
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            BackendError::Transport { errno, .. } => *errno,
            BackendError::Interrupts { source, .. } => source.raw_os_error(),
            BackendError::Unsupported { .. } | BackendError::NoResetMethod { .. } => None,
        }
    }
}

/// The IOVA space of a backend that has no IOMMU to ask: every page below 2^48 (the device's
/// [`accel_abi::VA_BITS`]) but page 0, which stays unmapped so that a zero IOVA is always a
/// fault.
pub(crate) fn device_iova_ranges() -> Vec<Range<u64>> {
    vec![Range {
        start: accel_abi::PAGE_SIZE,
        end: 1u64 << accel_abi::VA_BITS,
    }]
}

/// [`Backend::dma_unmap`] must unmap exactly what it was asked: `unmapped` bytes of `len` at
/// `iova` is an error of `op` on `backend` naming both unless they are equal.
#[cfg(any(feature = "emulator", feature = "vfio"))]
pub(crate) fn check_unmapped(
    backend: &'static str,
    op: &'static str,
    iova: u64,
    len: u64,
    unmapped: u64,
) -> Result<(), BackendError> {
    if unmapped == len {
        return Ok(());
    }
    Err(BackendError::transport(
        backend,
        op,
        format!("unmapped {unmapped:#x} of {len:#x} bytes at {iova:#x}"),
    ))
}

/// What one [`Backend::set_irqs`] call does to vfio-pci's MSI state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsiSet {
    /// Every vector unset and MSI already off: nothing to send.
    Nothing,
    /// Disable MSI (DATA_NONE | ACTION_TRIGGER, count 0).
    Disable,
    /// Route vectors `0..count` (enabling MSI with `count` vectors if it is off).
    Route {
        /// Vectors in the call.
        count: u32,
    },
}

/// vfio-pci's MSI rule, shared by every backend so that they all behave alike: the kernel
/// allocates the vectors when it enables MSI (the first SET_IRQS with eventfds), and while MSI
/// is enabled with N vectors it refuses (EINVAL) a SET_IRQS reaching past vector N - 1; the
/// count changes only through a disable (DATA_NONE | ACTION_TRIGGER, count 0) and a new enable.
/// A call for N or fewer vectors routes those and leaves the others as they were.
#[derive(Debug, Default)]
pub(crate) struct MsiState {
    /// Vectors MSI is enabled with (0: disabled).
    enabled: u32,
}

impl MsiState {
    /// Decide what `eventfds` asks for, given the `offered` vectors (IRQ info of the MSI
    /// index). The error is the detail of the refusal.
    pub(crate) fn plan(
        &self,
        offered: u32,
        eventfds: &[Option<OwnedFd>],
    ) -> Result<MsiSet, String> {
        if eventfds.iter().all(Option::is_none) {
            return Ok(if self.enabled == 0 {
                MsiSet::Nothing
            } else {
                MsiSet::Disable
            });
        }
        let count = u32::try_from(eventfds.len()).unwrap_or(u32::MAX);
        if count > offered {
            return Err(format!(
                "{count} MSI vectors asked, the device offers {offered} (IRQ info of the MSI index)"
            ));
        }
        if self.enabled != 0 && count > self.enabled {
            return Err(format!(
                "EINVAL: MSI is enabled with {} vector(s) and vfio-pci allocated exactly those; \
                 a SET_IRQS for {count} vectors needs a disable (DATA_NONE|ACTION_TRIGGER, count \
                 0) first: connect every vector in one call",
                self.enabled
            ));
        }
        Ok(MsiSet::Route { count })
    }

    /// Record that `set` was carried out.
    pub(crate) fn done(&mut self, set: MsiSet) {
        match set {
            MsiSet::Nothing => {}
            MsiSet::Disable => self.enabled = 0,
            MsiSet::Route { count } => {
                if self.enabled == 0 {
                    self.enabled = count;
                }
            }
        }
    }

    /// Vectors MSI is enabled with (0: disabled).
    #[cfg(feature = "vfio")]
    pub(crate) fn enabled(&self) -> u32 {
        self.enabled
    }
}

/// How the device reaches the memory behind a DMA mapping.
#[derive(Debug, Clone, Copy)]
pub enum DmaSource<'a> {
    /// `len` bytes of a driver-owned buffer starting at `offset`.
    Buffer {
        /// The buffer.
        buffer: &'a DmaBuffer,
        /// Byte offset into it (page aligned).
        offset: usize,
    },
    /// Ordinary memory of this process starting at `va` (malloc, mmap, stack, file mappings).
    ProcessVa {
        /// Process virtual address (page aligned).
        va: u64,
    },
    /// Memory of this process at `va` that is also reachable through `fd` at `offset` (a memfd
    /// arena), so a device in another process can map it itself.
    SharedFd {
        /// Process virtual address (page aligned).
        va: u64,
        /// The file behind it.
        fd: BorrowedFd<'a>,
        /// Offset of `va` in the file.
        offset: u64,
    },
}

/// Access the device gets to a DMA mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DmaAccess {
    /// Device may read.
    pub read: bool,
    /// Device may write.
    pub write: bool,
}

impl DmaAccess {
    /// Read and write.
    pub const READ_WRITE: DmaAccess = DmaAccess {
        read: true,
        write: true,
    };
    /// Read only.
    pub const READ_ONLY: DmaAccess = DmaAccess {
        read: true,
        write: false,
    };
}

/// What a backend is, for logs and statistics only: the driver must not branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The emulator in this process.
    Emulated,
    /// Kernel VFIO.
    KernelVfio,
    /// A vfio-user server.
    VfioUser,
}

impl BackendKind {
    /// The name errors use for this backend.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Emulated => "emulated",
            BackendKind::KernelVfio => "kernel-vfio",
            BackendKind::VfioUser => "vfio-user",
        }
    }
}

/// VFIO's PCI region indices (the same in the kernel interface and in vfio-user).
pub mod region_index {
    /// BAR0; BAR1-5 follow (1-5).
    pub const BAR0: u32 = 0;
    /// The last BAR.
    pub const BAR5: u32 = 5;
    /// Expansion ROM.
    pub const ROM: u32 = 6;
    /// Configuration space.
    pub const CONFIG: u32 = 7;
    /// VGA.
    pub const VGA: u32 = 8;
    /// The standard PCI regions (BAR0-5, ROM, config, VGA); device-specific ones follow.
    pub const PCI_COUNT: u32 = 9;

    /// A name for messages: "BAR2", "config space".
    pub fn name(index: u32) -> String {
        match index {
            BAR0..=BAR5 => format!("BAR{index}"),
            ROM => "the expansion ROM".into(),
            CONFIG => "config space".into(),
            VGA => "the VGA region".into(),
            n => format!("region {n}"),
        }
    }
}

/// VFIO's PCI interrupt indices.
pub mod irq_index {
    /// Legacy INTx (one line).
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Error reporting.
    pub const ERR: u32 = 3;
    /// Device request.
    pub const REQ: u32 = 4;

    /// A name for messages.
    pub fn name(index: u32) -> String {
        match index {
            INTX => "INTx".into(),
            MSI => "MSI".into(),
            MSIX => "MSI-X".into(),
            ERR => "the error IRQ".into(),
            REQ => "the request IRQ".into(),
            n => format!("IRQ index {n}"),
        }
    }
}

/// A device region as the backend found it (VFIO's region info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDesc {
    /// VFIO region index ([`region_index`]).
    pub index: u32,
    /// Size in bytes (0: the device does not have it).
    pub size: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Parts `(offset, len)` mapped into this process: accesses of 4 or 8 bytes there are
    /// single loads and stores, not messages or system calls.
    pub mapped: Vec<(u64, u64)>,
}

impl RegionDesc {
    /// Whether the device has this region and lets it be read or written at all.
    pub fn present(&self) -> bool {
        self.size > 0 && (self.read || self.write)
    }
}

/// An interrupt index as the backend found it (VFIO's IRQ info).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqDesc {
    /// VFIO interrupt index ([`irq_index`]).
    pub index: u32,
    /// Vectors (0: the device has no interrupt of this kind).
    pub count: u32,
    /// It can signal an eventfd.
    pub eventfd: bool,
}

/// A PCI device reached somehow.
pub trait Backend: Send + Sync {
    /// What this backend is (logs and statistics).
    fn kind(&self) -> BackendKind;

    /// Read PCI configuration space.
    fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<(), BackendError>;

    /// Write PCI configuration space.
    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError>;

    /// Read `data.len()` bytes of BAR `bar` (0-5) at `offset`. The widths a register takes
    /// are the device's business (the MXA-1 takes 4 and 8): a backend passes the access on as
    /// it is, one access, never widened or split into other widths (vfio-user: one REGION_READ
    /// up to the negotiated transfer size, or one aligned 4/8-byte load from a mapped window).
    fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError>;

    /// Write `data` to BAR `bar` (0-5) at `offset`, as [`Backend::bar_read`] reads.
    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError>;

    /// IOVA ranges the IOMMU accepts, `[start, end)`, sorted.
    fn iova_ranges(&self) -> Vec<Range<u64>>;

    /// Map `len` bytes at `iova` to `source`. Page aligned. A later unmap must cover whole
    /// mappings (kernel VFIO TYPE1 cannot split one).
    ///
    /// The driver's safe API for this is [`crate::dma::DmaSpace`] (`map_buffer` for
    /// driver-owned buffers) and, for process memory, the runtime's fault path.
    ///
    /// ```compile_fail,E0133
    /// use driver::backend::{emulated::EmulatedBackend, Backend, DmaAccess, DmaSource};
    /// let backend = EmulatedBackend::new(Default::default()).unwrap();
    /// let page = vec![0u8; 8192];
    /// let va = (page.as_ptr() as u64 + 4095) & !4095;
    /// // Refused without `unsafe`: the device could write `page` after it is freed.
    /// backend.dma_map(0x10_0000, 4096, DmaSource::ProcessVa { va }, DmaAccess::READ_WRITE);
    /// ```
    ///
    /// # Safety
    /// For [`DmaSource::ProcessVa`] and [`DmaSource::SharedFd`], the device may read (and, with
    /// `access.write`, write) the process memory at `[va, va + len)` from this call until
    /// [`Backend::dma_unmap`] of the mapping has returned, and whatever the backend reaches there
    /// (the pinned pages on kernel VFIO, the pages at that address *now* on the emulator and
    /// for a vfio-user device's DMA_READ/DMA_WRITE): the caller must keep that memory mapped and
    /// hold no Rust reference to bytes the device may write, or unmap first (after fencing any
    /// device translation to the IOVA) before the memory is freed or reused. A
    /// [`DmaSource::Buffer`] is reached through its file, never through memory another Rust
    /// object owns, so it asks nothing more of the caller.
    unsafe fn dma_map(
        &self,
        iova: u64,
        len: u64,
        source: DmaSource<'_>,
        access: DmaAccess,
    ) -> Result<(), BackendError>;

    /// Unmap the mappings exactly covering `[iova, iova + len)`.
    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), BackendError>;

    /// Connect MSI vectors `0..eventfds.len()` in one VFIO_DEVICE_SET_IRQS (`None`: that
    /// vector is not signalled, -1 in the ioctl). An empty vec, or all `None`, disables MSI
    /// (nothing is sent if it is off). vfio-pci allocates the vectors when it enables MSI:
    /// while MSI is enabled with N vectors, a call for more than N fails (EINVAL) until MSI is
    /// disabled, so connect every vector a device uses in one call. A call for N or fewer
    /// routes those vectors and leaves the rest as they were.
    fn set_irqs(&self, eventfds: Vec<Option<OwnedFd>>) -> Result<(), BackendError>;

    /// Reset the device (kernel VFIO: `VFIO_DEVICE_RESET`, whichever method the kernel has:
    /// FLR, PM, bus reset). [`BackendError::NoResetMethod`] if it has none.
    fn reset(&self) -> Result<(), BackendError>;

    /// True if `dma_map` pins memory that counts against RLIMIT_MEMLOCK.
    fn pins_memory(&self) -> bool;

    /// The device's regions, by index (the standard PCI ones, BAR0-5, ROM, config, VGA, as far
    /// as the device reports them), or `None` if this backend does not describe them (then an
    /// access is the only way to find out).
    fn regions(&self) -> Option<Vec<RegionDesc>> {
        None
    }

    /// The device's interrupt indices ([`irq_index`]), as far as the device reports them, or
    /// `None` if this backend does not describe them.
    fn irqs(&self) -> Option<Vec<IrqDesc>> {
        None
    }

    /// Connect the INTx line to `eventfd` (SET_IRQS, index INTx, `DATA_EVENTFD |
    /// ACTION_TRIGGER`, one eventfd); `None` disconnects it. Backends without INTx support
    /// answer [`BackendError::Unsupported`].
    fn set_intx(&self, eventfd: Option<OwnedFd>) -> Result<(), BackendError> {
        drop(eventfd);
        Err(BackendError::Unsupported {
            backend: self.kind().name(),
            op: "set_intx",
        })
    }

    /// Why the device is gone for good (its server process died, the connection to it broke),
    /// or `None` while it is reachable. Once `Some`, it stays `Some`, and every later operation
    /// fails; nothing the device was doing will complete.
    fn lost(&self) -> Option<DeviceLost> {
        None
    }

    /// A descriptor that becomes readable (`POLLIN`, and stays so) when the device is lost, so
    /// that a thread blocked in `poll` on the interrupt eventfds learns it at once. `None` if
    /// this backend cannot lose its device that way (then [`Backend::lost`] stays `None`).
    fn lost_event(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// A device that went away for good, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLost {
    /// Which backend lost it.
    pub backend: &'static str,
    /// The device (a socket path, a PCI address).
    pub device: String,
    /// What happened (for example "server closed the connection").
    pub reason: String,
}

impl std::fmt::Display for DeviceLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} device {} lost: {}",
            self.backend, self.device, self.reason
        )
    }
}

/// Typed register access over a backend's BAR0.
#[derive(Clone, Copy)]
pub struct Bar0<'a>(pub &'a dyn Backend);

impl Bar0<'_> {
    /// Read a 32-bit register.
    pub fn read32(&self, offset: u64) -> Result<u32, BackendError> {
        let mut b = [0u8; 4];
        self.0.bar_read(0, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Read a 64-bit register.
    pub fn read64(&self, offset: u64) -> Result<u64, BackendError> {
        let mut b = [0u8; 8];
        self.0.bar_read(0, offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write a 32-bit register.
    pub fn write32(&self, offset: u64, value: u32) -> Result<(), BackendError> {
        self.0.bar_write(0, offset, &value.to_le_bytes())
    }

    /// Write a 64-bit register.
    pub fn write64(&self, offset: u64, value: u64) -> Result<(), BackendError> {
        self.0.bar_write(0, offset, &value.to_le_bytes())
    }
}

/// Typed access to configuration space.
#[derive(Clone, Copy)]
pub struct Config<'a>(pub &'a dyn Backend);

impl Config<'_> {
    /// Read a 16-bit field.
    pub fn read16(&self, offset: usize) -> Result<u16, BackendError> {
        let mut b = [0u8; 2];
        self.0.config_read(offset as u64, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Write a 16-bit field.
    pub fn write16(&self, offset: usize, value: u16) -> Result<(), BackendError> {
        self.0.config_write(offset as u64, &value.to_le_bytes())
    }

    /// Read a 32-bit field.
    pub fn read32(&self, offset: usize) -> Result<u32, BackendError> {
        let mut b = [0u8; 4];
        self.0.config_read(offset as u64, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}
