//! The runtime API: what a compute runtime links. Open a device, create a context that mirrors
//! the current process, submit commands whose addresses are ordinary CPU pointers, wait,
//! read statistics.
//!
//! ```no_run
//! use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
//! let rt = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default())?;
//! let ctx = rt.create_context()?;
//! let mut buf = vec![0u8; 1 << 20];          // plain malloc'd memory
//! ctx.fill(&mut buf, 0x5a5a_5a5a_5a5a_5a5a)?; // the device faults it in and writes it
//! assert!(buf.iter().all(|b| *b == 0x5a));
//! # Ok::<(), driver::Error>(())
//! ```
//!
//! [`Runtime::open`] opens an MXA-1. Other devices open through the same path with a
//! [`Personality`]: `Runtime::<Edu>::open_with(spec, options)` for QEMU's edu
//! ([`crate::edu::Edu`]).

use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use accel_abi::{Command, Completion, Status};
use mirror::AddressSpace;

#[cfg(feature = "emulator")]
use crate::backend::emulated::EmulatedBackend;
#[cfg(feature = "vfio")]
use crate::backend::vfio::KernelVfioBackend;
use crate::backend::vfio_user::VfioUserBackend;
use crate::backend::{Backend, DeviceLost};
use crate::context::{ContextCore, ContextOptions};
use crate::device::{Device, DeviceOptions, Ticket};
use crate::dma::DmaSpace;
pub use crate::fault::InterruptStats;
use crate::fault::{CancelReason, FaultHandler, FaultService, ServiceMode};
use crate::pagetable::Translation;
use crate::view::{DeviceView, MxaView};
use crate::Error;
use sys_util::sync::lock;

#[cfg(feature = "emulator")]
pub use firmware_stubs::AcceleratorConfig;

/// Which device to open.
#[derive(Debug, Clone)]
pub enum DeviceSpec {
    /// The MXA-1 emulator, in this process (feature `emulator`, on by default).
    #[cfg(feature = "emulator")]
    Emulated(AcceleratorConfig),
    /// A device bound to vfio-pci, by PCI address (`0000:00:03.0`; feature `vfio`, on by
    /// default).
    #[cfg(feature = "vfio")]
    KernelVfio(String),
    /// A vfio-user server's socket (for example `mirrorctl emulate --socket PATH`).
    VfioUser(std::path::PathBuf),
}

impl DeviceSpec {
    /// The embedded emulator with its default configuration.
    #[cfg(feature = "emulator")]
    pub fn emulated() -> DeviceSpec {
        DeviceSpec::Emulated(AcceleratorConfig::default())
    }
}

/// Runtime tunables.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Interrupt or polling fault service.
    pub mode: ServiceMode,
    /// Most stalls serviced per batch: fault records of work items that reached the page,
    /// each with the lookahead records the device posted behind it.
    pub batch: usize,
    /// Ring sizes.
    pub device: DeviceOptions,
    /// Per-context tunables.
    pub context: ContextOptions,
    /// How long `wait` and back-pressured `submit` may block.
    pub timeout: Duration,
    /// Mirror configuration for the current process's address space.
    pub mirror: mirror::Config,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            mode: ServiceMode::Interrupt,
            batch: 256,
            device: DeviceOptions::default(),
            context: ContextOptions::default(),
            timeout: Duration::from_secs(30),
            mirror: mirror::Config::default(),
        }
    }
}

/// What differs between the devices a [`Runtime`] opens: how the device is identified and
/// brought up, where its page faults come from, and what view of a mirrored address space a
/// context gets. Everything else is shared by every personality and lives in the runtime: the
/// backend a [`DeviceSpec`] names, the one mirror of the current process, the bookkeeping of
/// device address spaces (free, in use, quarantined), a context's DMA mappings with their
/// invalidation ordering, and the order of a context's release (stop its faults, tear its view
/// down and fence, unmap, free its address space).
///
/// Why a trait with associated types rather than an enum of devices: each personality's
/// device has an API of its own that `Runtime::<P>::device()` hands out typed (MXA-1's command
/// queue and TLB fences in [`Device`], edu's registers in [`crate::edu::EduDevice`]), and so do
/// its contexts (`Context<Mxa>` submits commands, `Context<Edu>` runs edu transfers); an enum
/// would make every caller match on a device it already knows.
///
/// Implemented by [`Mxa`] (the default: `Runtime` is `Runtime<Mxa>`) and [`crate::edu::Edu`].
/// A device outside this crate can implement it too: the two command-queue hooks have defaults
/// for a device without one.
pub trait Personality: Sized + Send + Sync + 'static {
    /// The device once brought up, shared by the runtime and its contexts.
    type Device: Send + Sync + 'static;
    /// Where the device's page faults come from: a fault-service thread for a device that
    /// stalls on a missing translation, [`NoFaults`] for one that only reaches what was mapped
    /// for it beforehand.
    type Faults: FaultSource;

    /// Check that `backend` reaches this kind of device and bring it up. Errors name what was
    /// found instead (the PCI ID, a missing region or interrupt).
    fn bring_up(backend: Box<dyn Backend>, options: &RuntimeOptions)
        -> Result<Self::Device, Error>;

    /// The device's DMA space: contexts map the mirrored memory there.
    fn dma(device: &Self::Device) -> &Arc<DmaSpace>;

    /// How many contexts may exist at once (the device's address spaces; each context owns
    /// one, numbered from 0).
    fn address_spaces(device: &Self::Device) -> usize;

    /// Start the fault source, once per runtime, after the bring-up.
    fn fault_source(
        device: &Arc<Self::Device>,
        options: &RuntimeOptions,
    ) -> Result<Self::Faults, Error>;

    /// The device's view of address space `space` for a new context: what an installed DMA
    /// mapping becomes on the device (page-table entries, or nothing but the IOMMU mapping).
    fn view(
        device: &Arc<Self::Device>,
        space: u16,
        options: &ContextOptions,
    ) -> Result<Box<dyn DeviceView>, Error>;

    /// The completion of `ticket` if the device has posted it. Only a device with a command
    /// queue hands out tickets; the default (no queue) never sees one.
    fn try_complete(device: &Self::Device, ticket: Ticket) -> Option<Completion> {
        let _ = (device, ticket);
        None
    }

    /// After a context's view was torn down: let work stalled on it fault again, so that it
    /// ends now (cancelled, no handler) instead of waiting for a fault nobody will service.
    /// Nothing to do for a device that never stalls (the default).
    fn replay(device: &Self::Device) -> Result<(), Error> {
        let _ = device;
        Ok(())
    }
}

/// Where a device's page faults come from: faults of address space `space` go to the handler
/// registered for it.
pub trait FaultSource: Send + Sync + 'static {
    /// Route the faults of `space` to `handler` (held weakly: a dropped context stops
    /// receiving).
    fn register(&self, space: u16, handler: Weak<dyn FaultHandler>);
    /// Stop routing the faults of `space` (the first step of a context's release).
    fn unregister(&self, space: u16);
}

/// MXA-1 faults come from its fault buffer, drained and serviced by the fault-service thread.
impl FaultSource for FaultService {
    fn register(&self, space: u16, handler: Weak<dyn FaultHandler>) {
        FaultService::register(self, space, handler)
    }

    fn unregister(&self, space: u16) {
        FaultService::unregister(self, space)
    }
}

/// The fault source of a device without page faults (edu): it reaches only what a submit
/// mapped for it beforehand, so nothing ever needs servicing and no thread runs.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFaults;

impl FaultSource for NoFaults {
    fn register(&self, _space: u16, _handler: Weak<dyn FaultHandler>) {}

    fn unregister(&self, _space: u16) {}
}

/// The MXA-1: its bring-up checks the PCI ID and version, programs the rings and routes MSI
/// ([`Device::bring_up`]); its faults come from a [`FaultService`] thread; a context gets its
/// own device page table and ASID ([`MxaView`]).
#[derive(Debug, Clone, Copy)]
pub struct Mxa;

impl Personality for Mxa {
    type Device = Device;
    type Faults = FaultService;

    fn bring_up(backend: Box<dyn Backend>, options: &RuntimeOptions) -> Result<Device, Error> {
        Device::bring_up(backend, options.device)
    }

    fn dma(device: &Device) -> &Arc<DmaSpace> {
        device.dma()
    }

    fn address_spaces(device: &Device) -> usize {
        device.caps().asids as usize
    }

    fn fault_source(device: &Arc<Device>, options: &RuntimeOptions) -> Result<FaultService, Error> {
        FaultService::start(device.clone(), options.mode, options.batch)
    }

    fn view(
        device: &Arc<Device>,
        space: u16,
        options: &ContextOptions,
    ) -> Result<Box<dyn DeviceView>, Error> {
        Ok(Box::new(MxaView::new(
            device.clone(),
            space,
            options.fence_timeout,
        )?))
    }

    fn try_complete(device: &Device, ticket: Ticket) -> Option<Completion> {
        device.try_complete(ticket)
    }

    fn replay(device: &Device) -> Result<(), Error> {
        device.replay()
    }
}

/// An open device with its fault source; an MXA-1 unless another [`Personality`] is named.
pub struct Runtime<P: Personality = Mxa> {
    device: Arc<P::Device>,
    service: P::Faults,
    asids: Mutex<Vec<bool>>,
    options: RuntimeOptions,
    commands: AtomicU64,
    quarantined: AtomicU64,
    released_on_lost_device: AtomicU64,
    /// Leftover work of dropped contexts, by address space.
    orphans: Mutex<Vec<(u16, Ticket)>>,
    has_orphans: std::sync::atomic::AtomicBool,
    personality: PhantomData<fn() -> P>,
}

/// The current process's address space, shared by every context of every runtime: a second
/// userfaultfd could not register the same ranges (EBUSY).
fn current_address_space(config: &mirror::Config) -> Result<Arc<AddressSpace>, Error> {
    static CURRENT: Mutex<Weak<AddressSpace>> = Mutex::new(Weak::new());
    let mut slot = lock(&CURRENT);
    if let Some(mm) = slot.upgrade() {
        return Ok(mm);
    }
    let mm = Arc::new(AddressSpace::current(config.clone()).map_err(Error::Mirror)?);
    *slot = Arc::downgrade(&mm);
    Ok(mm)
}

impl Runtime {
    /// Open an MXA-1 and start its fault service.
    pub fn open(spec: DeviceSpec, options: RuntimeOptions) -> Result<Arc<Runtime>, Error> {
        Self::open_with(spec, options)
    }

    /// Bring up the MXA-1 behind `backend` (one the caller built, e.g. an emulator it also
    /// holds to drive its test knobs) and start its fault service.
    pub fn open_backend(
        backend: Box<dyn Backend>,
        options: RuntimeOptions,
    ) -> Result<Arc<Runtime>, Error> {
        Self::open_backend_with(backend, options)
    }

    /// Interrupts this device's service received per vector (fault, completion, error), and
    /// the faults and completions it found only through its timeouts because no interrupt
    /// came (MSI not working: the service then runs at timeout-polling speed). Interrupt mode;
    /// every field stays 0 in polling mode. See [`InterruptStats`].
    pub fn interrupt_stats(&self) -> InterruptStats {
        self.service.interrupt_stats()
    }
}

impl<P: Personality> Runtime<P> {
    /// Open the device `spec` names as personality `P`, and start its fault source.
    pub fn open_with(spec: DeviceSpec, options: RuntimeOptions) -> Result<Arc<Runtime<P>>, Error> {
        let backend: Box<dyn Backend> = match &spec {
            #[cfg(feature = "emulator")]
            DeviceSpec::Emulated(cfg) => Box::new(EmulatedBackend::new(cfg.clone())?),
            #[cfg(feature = "vfio")]
            DeviceSpec::KernelVfio(address) => Box::new(KernelVfioBackend::open(address)?),
            DeviceSpec::VfioUser(path) => Box::new(VfioUserBackend::connect(path)?),
        };
        Self::open_backend_with(backend, options)
    }

    /// Bring up the device behind `backend` as personality `P` and start its fault source.
    pub fn open_backend_with(
        backend: Box<dyn Backend>,
        options: RuntimeOptions,
    ) -> Result<Arc<Runtime<P>>, Error> {
        let device = Arc::new(P::bring_up(backend, &options)?);
        let service = P::fault_source(&device, &options)?;
        let asids = vec![false; P::address_spaces(&device)];
        Ok(Arc::new(Runtime {
            device,
            service,
            asids: Mutex::new(asids),
            options,
            commands: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            released_on_lost_device: AtomicU64::new(0),
            orphans: Mutex::new(Vec::new()),
            has_orphans: std::sync::atomic::AtomicBool::new(false),
            personality: PhantomData,
        }))
    }

    /// The device.
    pub fn device(&self) -> &Arc<P::Device> {
        &self.device
    }

    /// The fault source (for MXA-1 the fault service: statistics, mode).
    pub fn service(&self) -> &P::Faults {
        &self.service
    }

    /// The backend the device is reached through.
    fn backend(&self) -> &dyn Backend {
        P::dma(&self.device).backend()
    }

    /// Fails with [`Error::DeviceLost`] once the device is lost.
    fn check_lost(&self) -> Result<(), Error> {
        self.device_lost()
            .map_or(Ok(()), |lost| Err(Error::DeviceLost(lost)))
    }

    /// Why the device is gone for good (its vfio-user server died, ...), or `None` while it is
    /// reachable. Once lost, every wait and submit fails with [`Error::DeviceLost`] at once
    /// (see [`crate::fault::ServiceStats::lost_waits`]); open the device again to go on.
    pub fn device_lost(&self) -> Option<DeviceLost> {
        self.backend().lost()
    }

    /// Contexts dropped after the device was lost: released on the host side at once (DMA
    /// mappings, arenas, the mirror subscription), with no fence, no wait for their work and
    /// no quarantine, since nothing on a lost device can run.
    pub fn contexts_released_on_lost_device(&self) -> u64 {
        self.released_on_lost_device.load(Ordering::Relaxed)
    }

    /// Create a context mirroring the current process into a fresh device address space.
    pub fn create_context(self: &Arc<Self>) -> Result<Context<P>, Error> {
        self.create_context_with(self.options.context.clone())
    }

    /// Like [`Runtime::create_context`] with explicit tunables.
    pub fn create_context_with(
        self: &Arc<Self>,
        options: ContextOptions,
    ) -> Result<Context<P>, Error> {
        let mm = current_address_space(&self.options.mirror)?;
        self.create_context_in(mm, options)
    }

    /// A context mirroring `mm` (another process's address space, in a daemon: pair it with
    /// [`crate::context::Reach::Arenas`], since the device cannot reach that process's memory by
    /// address).
    pub fn create_context_in(
        self: &Arc<Self>,
        mm: Arc<AddressSpace>,
        options: ContextOptions,
    ) -> Result<Context<P>, Error> {
        self.check_lost()?;
        self.reap_orphans();
        let asid = {
            let mut asids = lock(&self.asids);
            let free = asids
                .iter()
                .position(|used| !used)
                .ok_or(Error::NoFreeAddressSpace { asids: asids.len() })?;
            asids[free] = true;
            free as u16
        };
        let made = P::view(&self.device, asid, &options).and_then(|view| {
            ContextCore::new(P::dma(&self.device).clone(), asid, mm, view, options)
        });
        let core = match made {
            Ok(c) => Arc::new(c),
            Err(e) => {
                lock(&self.asids)[asid as usize] = false;
                return Err(e);
            }
        };
        let handler: Arc<dyn FaultHandler> = core.clone();
        self.service.register(asid, Arc::downgrade(&handler));
        Ok(Context {
            core,
            runtime: self.clone(),
            outstanding: Mutex::new(HashMap::new()),
            revocations: AtomicU64::new(0),
            revoked_pending: AtomicU64::new(0),
            alive: Arc::new(()),
        })
    }

    /// Commands submitted through this runtime so far.
    pub fn commands_submitted(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    /// Device address spaces held back because a context was dropped while its work did not
    /// finish: reusing one could let that work reach the next owner's memory. Each returns to
    /// use once its leftover work has completed (collected on later submits).
    pub fn quarantined_address_spaces(&self) -> usize {
        self.quarantined.load(Ordering::Relaxed) as usize
    }

    fn quarantine(&self, asid: u16, tickets: Vec<Ticket>) {
        let mut orphans = lock(&self.orphans);
        orphans.extend(tickets.into_iter().map(|t| (asid, t)));
        self.quarantined.fetch_add(1, Ordering::Relaxed);
        self.has_orphans.store(true, Ordering::Release);
    }

    /// Collect the completions of dropped contexts' leftover work (their queue slots are busy
    /// until someone does), and give an address space back once all of its work is done.
    fn reap_orphans(&self) {
        if !self.has_orphans.load(Ordering::Acquire) {
            return;
        }
        let mut orphans = lock(&self.orphans);
        let before: HashSet<u16> = orphans.iter().map(|(asid, _)| *asid).collect();
        orphans.retain(|(_, t)| P::try_complete(&self.device, *t).is_none());
        let after: HashSet<u16> = orphans.iter().map(|(asid, _)| *asid).collect();
        let mut asids = lock(&self.asids);
        for &asid in before.difference(&after) {
            asids[asid as usize] = false;
            self.quarantined.fetch_sub(1, Ordering::Relaxed);
            tracing::info!(
                asid,
                "quarantined address space back in use: its work ended"
            );
        }
        self.has_orphans
            .store(!orphans.is_empty(), Ordering::Release);
    }

    /// The options the runtime was opened with.
    pub fn options(&self) -> &RuntimeOptions {
        &self.options
    }
}

/// A device operation on process virtual addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Copy `len` bytes from `src` to `dst`.
    Copy {
        /// Destination VA.
        dst: u64,
        /// Source VA.
        src: u64,
        /// Bytes.
        len: u64,
    },
    /// Fill `len` bytes at `dst` with an 8-byte pattern.
    Fill {
        /// Destination VA.
        dst: u64,
        /// Bytes.
        len: u64,
        /// Pattern.
        pattern: u64,
    },
    /// Atomically add to the u64 at `dst`; the result is the old value.
    AtomicAdd {
        /// Target VA (8-byte aligned).
        dst: u64,
        /// Addend.
        value: u64,
    },
    /// FNV-1a 64 of `len` bytes at `src`.
    Checksum {
        /// Source VA.
        src: u64,
        /// Bytes.
        len: u64,
    },
    /// Warm the device TLB for `len` bytes at `src`.
    Prefetch {
        /// Source VA.
        src: u64,
        /// Bytes.
        len: u64,
    },
}

/// A process address space mirrored into one device address space of a [`Runtime`]'s device.
/// What it can run is its personality's: a `Context` (of an MXA-1) submits [`Op`]s; see
/// [`Personality`] for the others.
pub struct Context<P: Personality = Mxa> {
    core: Arc<ContextCore>,
    runtime: Arc<Runtime<P>>,
    /// Commands submitted and not yet collected, by work id.
    outstanding: Mutex<HashMap<u32, Outstanding>>,
    revocations: AtomicU64,
    /// Revoked commands not collected yet (lets a submit skip looking for them when none).
    revoked_pending: AtomicU64,
    /// Dropped only after the release in `Drop` has finished (fields drop after `drop` runs):
    /// what [`ReleaseWatch`] watches.
    alive: Arc<()>,
}

/// Watches a [`Context`]'s release (see [`Context::release_watch`]).
pub struct ReleaseWatch(Weak<()>);

impl ReleaseWatch {
    /// Returns once the context has been dropped and its release has finished (device view
    /// torn down and fenced, DMA unmapped, work ended or the address space quarantined),
    /// whichever thread ran it.
    pub fn wait(self) {
        let mut spins = 0u32;
        while self.0.strong_count() > 0 {
            crate::device::backoff(&mut spins);
        }
    }
}

/// A command in flight: what it may touch, and whether that was revoked from the device.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    op: Op,
    revoked: bool,
}

impl Op {
    /// The memory the command reads or writes.
    fn ranges(&self) -> Vec<std::ops::Range<u64>> {
        let span = |va: u64, len: u64| va..va.saturating_add(len);
        match *self {
            Op::Copy { dst, src, len } => vec![span(dst, len), span(src, len)],
            Op::Fill { dst, len, .. } => vec![span(dst, len)],
            Op::AtomicAdd { dst, .. } => vec![span(dst, 8)],
            Op::Checksum { src, len } | Op::Prefetch { src, len } => vec![span(src, len)],
        }
    }
}

/// Statistics of a context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextStats {
    /// Distinct faulting pages handed to this context.
    pub faults: u64,
    /// Fault batches serviced: one per device stall round trip, however many pages (lookahead
    /// included) it carried. test_hmm's dmirror counts the same thing as `faults`.
    pub fault_batches: u64,
    /// Runs mapped although their memory could not be registered for CPU change events (see
    /// `ContextOptions::require_events`).
    pub untracked_runs: u64,
    /// Runs whose memory the context had registered for CPU events already, with no event
    /// since, so no registration was asked of the kernel.
    pub track_skipped: u64,
    /// Runs whose pages were not all present for the access, so the fault service populated
    /// them; a run on pages the CPU populated already skips that call.
    pub populate_calls: u64,
    /// Runs serviced (one DMA mapping each).
    pub runs: u64,
    /// 4 KiB pages made device-accessible.
    pub pages_mapped: u64,
    /// 2 MiB device leaves written.
    pub large_mappings: u64,
    /// Faulting pages a work item was stalled on that could not be serviced (the items were
    /// cancelled). Lookahead pages and records that a replay had already overtaken are hints:
    /// failing to map them is not counted here.
    pub failures: u64,
    /// Invalidation callbacks run.
    pub invalidations: u64,
    /// TLB fences issued.
    pub tlb_fences: u64,
    /// TLB fences that failed.
    pub fence_failures: u64,
    /// Live DMA mappings.
    pub mappings: usize,
    /// Bytes currently DMA-mapped.
    pub mapped_bytes: u64,
    /// Bytes currently pinned (equal to mapped bytes on backends that pin, 0 otherwise).
    pub pinned_bytes: u64,
    /// Device 4 KiB leaves.
    pub small_leaves: u64,
    /// Device 2 MiB leaves.
    pub large_leaves: u64,
    /// Device page-table pages.
    pub table_pages: usize,
    /// Walks retried because an invalidation collided (whole address space).
    pub retries: u64,
    /// DMA mappings released on the host side only because the device was lost.
    pub dropped_on_lost_device: u64,
    /// Waits that ended without the command's completion (a timeout): each took the command's
    /// memory away from the device (entries torn down and fenced, faults there refused with
    /// `CancelReason::Revoked`) before it returned, so the caller could reuse that memory.
    pub revocations: u64,
    /// Of those, commands not collected yet: their pages stay unreachable for the device (the
    /// context's later commands on them are cancelled `Revoked`) until they end. Collected on
    /// later submits, waits and `stats()`.
    pub revoked_in_flight: usize,
    /// The pin budget ([`crate::context::ContextOptions::pin_budget`]), if any.
    pub pin_budget: Option<u64>,
    /// Mappings evicted to stay under the pin budget, and the bytes they held.
    pub evictions: u64,
    /// Bytes evicted.
    pub evicted_bytes: u64,
    /// Mappings installed over a range evicted within the thrashing window.
    pub refaults: u64,
    /// Faults that had to make room (one CLOCK pass each).
    pub eviction_passes: u64,
    /// Aging queries asked of the address space (`clear_young`, one per batch of mappings).
    pub aging_queries: u64,
    /// Mappings those queries covered.
    pub aging_mappings: u64,
    /// Mappings the CLOCK spared because they had been used.
    pub second_chances: u64,
    /// Eviction passes without use information (no ACCESSED bits on the device, or an aging
    /// query failed): victims went in address order. 0 on MXA-1 revision 2.
    pub aging_unavailable: u64,
    /// Mappings protected from eviction as thrashing.
    pub thrash_protections: u64,
    /// Faults refused because the run did not fit under the pin budget.
    pub budget_refusals: u64,
    /// Device page-table pages freed back to the pool (after their walk-cache fence).
    pub table_pages_freed: u64,
}

impl<P: Personality> Context<P> {
    /// The device address space (ASID) this context owns.
    pub fn asid(&self) -> u16 {
        self.core.asid
    }

    /// The mirrored address space (for explicit invalidate/protect and the munmap wrappers).
    pub fn address_space(&self) -> &Arc<AddressSpace> {
        &self.core.mm
    }

    /// The runtime.
    pub fn runtime(&self) -> &Arc<Runtime<P>> {
        &self.runtime
    }

    /// The mirror underneath: translations, footprint, counters, and
    /// [`ContextCore::map_for_device`] for a device that maps on submit.
    pub fn core(&self) -> &ContextCore {
        &self.core
    }

    /// A handle that waits for this context's release once it is dropped, by whichever thread
    /// drops the last reference (a daemon closes a client's session only after it).
    pub fn release_watch(&self) -> ReleaseWatch {
        ReleaseWatch(Arc::downgrade(&self.alive))
    }
}

/// Commands: the MXA-1's command queue.
impl Context {
    /// Submit `op` for the device to run on this address space.
    ///
    /// Fails with the mirror's error (`SettleTimeout`) and submits nothing if the CPU mapping
    /// changes the monitor has read are not all handled within the mirror's settle timeout
    /// (`mirror::Config::settle_timeout`, 10 s by default): a command must never see a mapping
    /// changed before this call (docs/semantics.md section 5).
    ///
    /// # Safety
    /// The device reads and writes the addresses in `op` like a DMA engine, concurrently with
    /// this thread, until [`Context::wait`] returns for the ticket: no Rust reference to
    /// memory it writes may be used (or exist as `&`) in that time.
    pub unsafe fn submit(&self, op: Op) -> Result<Ticket, Error> {
        self.runtime.device.check_lost()?;
        // Every CPU mapping change that returned before this call must be visible to the
        // device before the command runs: the kernel lets a munmap return once its userfaultfd
        // event is read, not handled. Submitting anyway would let the command use a
        // translation of memory that is gone or belongs to someone else now.
        if let Err(e) = self.core.mm.catch_up() {
            tracing::error!(error = %e, asid = self.core.asid, "CPU events not caught up: command refused");
            return Err(Error::Mirror(e));
        }
        let len = match op {
            Op::Copy { len, .. }
            | Op::Fill { len, .. }
            | Op::Checksum { len, .. }
            | Op::Prefetch { len, .. } => len,
            Op::AtomicAdd { .. } => 8,
        };
        let max = u64::from(self.runtime.device.caps().max_transfer);
        if len > max {
            return Err(Error::CommandTooLong { len, max });
        }
        self.runtime.reap_orphans();
        self.reap_revoked();
        let asid = self.core.asid;
        let cmd = match op {
            Op::Copy { dst, src, len } => Command::copy(asid, dst, src, len),
            Op::Fill { dst, len, pattern } => Command::fill(asid, dst, len, pattern),
            Op::AtomicAdd { dst, value } => Command::atomic_add(asid, dst, value),
            Op::Checksum { src, len } => Command::checksum(asid, src, len),
            Op::Prefetch { src, len } => Command::prefetch(asid, src, len),
        };
        let cmd = match self.runtime.service.mode() {
            ServiceMode::Interrupt => cmd.with_irq(),
            ServiceMode::Polling => cmd,
        };
        let ticket = self
            .runtime
            .device
            .submit(cmd, self.runtime.options.timeout)?;
        self.runtime.commands.fetch_add(1, Ordering::Relaxed);
        self.outstanding()
            .insert(ticket.work_id, Outstanding { op, revoked: false });
        Ok(ticket)
    }
}

impl<P: Personality> Context<P> {
    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Outstanding>> {
        lock(&self.outstanding)
    }

    /// The completion of `ticket` if the device has posted it (it is then collected: do not
    /// wait for the ticket again).
    pub fn try_complete(&self, ticket: Ticket) -> Option<Completion> {
        let mut outstanding = self.outstanding();
        let pending = *outstanding.get(&ticket.work_id)?;
        let completion = P::try_complete(&self.runtime.device, ticket)?;
        outstanding.remove(&ticket.work_id);
        drop(outstanding);
        if pending.revoked {
            self.lift_revoked(ticket.work_id);
        }
        Some(completion)
    }

    /// A revoked command was collected: its pages may be mapped again.
    fn lift_revoked(&self, work_id: u32) {
        self.core.lift_revoked(work_id);
        self.revoked_pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Collect the revoked commands that have ended, and give their pages back to the device.
    fn reap_revoked(&self) {
        if self.revoked_pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let revoked: Vec<u32> = self
            .outstanding()
            .iter()
            .filter(|(_, o)| o.revoked)
            .map(|(id, _)| *id)
            .collect();
        for work_id in revoked {
            if let Some(c) = self.try_complete(Ticket { work_id }) {
                tracing::info!(asid = self.core.asid, work_id, status = ?c.status, "a revoked command ended: its pages are mappable again");
            }
        }
    }

    /// Commands submitted and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.outstanding().len()
    }
}

impl Context {
    /// Wait for `ticket`; the command's result value.
    ///
    /// When this returns, with a result or an error, the device can no longer touch the
    /// memory the command names: if the completion did not come (the runtime's timeout), the
    /// command's pages are taken away from the device first ([`ContextStats::revocations`]:
    /// entries torn down and fenced, faults there refused) and stay so until it ends; the
    /// command is then cancelled when it next touches them. A ticket not in flight (collected
    /// already) is an `InvalidArgument` error.
    pub fn wait(&self, ticket: Ticket) -> Result<u64, Error> {
        if !self.outstanding().contains_key(&ticket.work_id) {
            return Err(Error::InvalidArgument(
                "wait: the ticket is not in flight on this context (collected already?)",
            ));
        }
        let waited = self
            .runtime
            .service
            .wait(ticket, self.runtime.options.timeout);
        match waited {
            Ok(completion) => {
                self.collected(ticket);
                completion_result(completion).map_err(|e| self.explained(e))
            }
            Err(e @ Error::DeviceLost(_)) => {
                // Over for good: the device will never post its completion, nor run anything.
                self.collected(ticket);
                Err(e)
            }
            Err(e) => {
                // The command may still run: the caller gets its memory back, so the device
                // must lose it before we return.
                self.revoke(ticket);
                Err(e)
            }
        }
    }

    /// A command's failure as the caller should read it: a fault cancelled for the context's
    /// mapped-bytes quota names the quota, its value and what raises it.
    fn explained(&self, e: Error) -> Error {
        match (e, self.core.last_limit()) {
            (
                Error::Cancelled {
                    reason: CancelReason::Quota,
                },
                Some(limit),
            ) => limit.error(),
            (e, _) => e,
        }
    }

    /// `ticket`'s command is over (completion collected, or the device lost): forget it, and
    /// give its pages back to the device if they were revoked.
    fn collected(&self, ticket: Ticket) {
        let removed = self.outstanding().remove(&ticket.work_id);
        if removed.is_some_and(|o| o.revoked) {
            self.lift_revoked(ticket.work_id);
        }
    }

    /// Take the memory of a command still in flight away from the device (see
    /// [`ContextCore::revoke`]). Returns only once the device cannot reach it: if the tear-down
    /// cannot be confirmed (a DMA unmap failed), it waits for the command to end instead, for
    /// as long as that takes, since returning earlier could let the device write memory the
    /// caller has reused.
    fn revoke(&self, ticket: Ticket) {
        let asid = self.core.asid;
        let work_id = ticket.work_id;
        let unreachable = {
            // Held across the revocation, so a collection of the command on another thread
            // either comes first (nothing to revoke) or sees it revoked and lifts it after.
            let mut outstanding = self.outstanding();
            let Some(pending) = outstanding.get_mut(&work_id) else {
                return;
            };
            if pending.revoked {
                true
            } else {
                pending.revoked = true;
                self.revocations.fetch_add(1, Ordering::Relaxed);
                self.revoked_pending.fetch_add(1, Ordering::AcqRel);
                let ranges = pending.op.ranges();
                let unreachable = self.core.revoke(work_id, &ranges);
                if unreachable {
                    tracing::warn!(
                        asid,
                        work_id,
                        ?ranges,
                        timeout = ?self.runtime.options.timeout,
                        "a command outlived its wait (RuntimeOptions::timeout): its memory was taken away from the device, fenced; those pages stay unreachable for this context until it ends"
                    );
                }
                unreachable
            }
        };
        if !unreachable {
            tracing::error!(
                asid,
                work_id,
                "a command outlived its wait and its memory could not be taken away from the device (DMA unmap failed): waiting for it to end"
            );
            let mut spins = 0u32;
            let mut next_report = Instant::now() + self.runtime.options.timeout;
            while self.outstanding().contains_key(&work_id) && self.try_complete(ticket).is_none() {
                if self.runtime.device.lost().is_some() {
                    self.collected(ticket);
                    break;
                }
                if Instant::now() >= next_report {
                    tracing::error!(
                        asid,
                        work_id,
                        "still waiting for a command whose memory the device may reach"
                    );
                    next_report = Instant::now() + self.runtime.options.timeout;
                }
                crate::device::backoff(&mut spins);
            }
            return;
        }
        // A command stalled on a page it can no longer get faults again on the replay and is
        // cancelled at once; collect it if it ended already.
        let _ = self.runtime.device.replay();
        self.reap_revoked();
    }

    /// Fill `dst` with the 8-byte `pattern` on the device.
    pub fn fill(&self, dst: &mut [u8], pattern: u64) -> Result<(), Error> {
        DeviceOps::fill(self, dst, pattern)
    }

    /// Copy `src` into `dst` (equal lengths) on the device.
    pub fn copy(&self, dst: &mut [u8], src: &[u8]) -> Result<(), Error> {
        DeviceOps::copy(self, dst, src)
    }

    /// The device's FNV-1a 64 checksum of `src`.
    pub fn checksum(&self, src: &[u8]) -> Result<u64, Error> {
        DeviceOps::checksum(self, src)
    }

    /// Atomically add `value` to `target` on the device; returns the old value.
    pub fn atomic_add(&self, target: &AtomicU64, value: u64) -> Result<u64, Error> {
        DeviceOps::atomic_add(self, target, value)
    }
}

impl<P: Personality> Context<P> {
    /// Make `[addr, addr + len)` device-accessible now instead of on first device access.
    pub fn prefault(&self, addr: u64, len: u64, write: bool) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        self.runtime.check_lost()?;
        self.core.prefault(addr, addr.saturating_add(len), write)
    }

    /// The device page table's current translation of `va` (introspection).
    pub fn device_translation(&self, va: u64) -> Option<Translation> {
        self.core.translate(va)
    }

    /// Counters and footprint.
    pub fn stats(&self) -> ContextStats {
        self.reap_revoked();
        let revoked_in_flight = self.outstanding().values().filter(|o| o.revoked).count();
        let c = self.core.counters();
        let (mappings, mapped_bytes, small_leaves, large_leaves, table_pages) =
            self.core.footprint();
        let pins = self.runtime.backend().pins_memory();
        ContextStats {
            faults: c.faults.load(Ordering::Relaxed),
            fault_batches: c.fault_batches.load(Ordering::Relaxed),
            untracked_runs: c.untracked_runs.load(Ordering::Relaxed),
            track_skipped: c.track_skipped.load(Ordering::Relaxed),
            populate_calls: c.populate_calls.load(Ordering::Relaxed),
            runs: c.runs.load(Ordering::Relaxed),
            pages_mapped: c.pages_mapped.load(Ordering::Relaxed),
            large_mappings: c.large_mappings.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            tlb_fences: c.tlb_fences.load(Ordering::Relaxed),
            fence_failures: c.fence_failures.load(Ordering::Relaxed),
            mappings,
            mapped_bytes,
            pinned_bytes: if pins { mapped_bytes } else { 0 },
            small_leaves,
            large_leaves,
            table_pages,
            retries: self.core.mm.stats().retries,
            dropped_on_lost_device: c.dropped_on_lost_device.load(Ordering::Relaxed),
            revocations: self.revocations.load(Ordering::Relaxed),
            revoked_in_flight,
            pin_budget: self.core.options.pin_budget,
            evictions: c.evictions.load(Ordering::Relaxed),
            evicted_bytes: c.evicted_bytes.load(Ordering::Relaxed),
            refaults: c.refaults.load(Ordering::Relaxed),
            eviction_passes: c.eviction_passes.load(Ordering::Relaxed),
            aging_queries: c.aging_queries.load(Ordering::Relaxed),
            aging_mappings: c.aging_mappings.load(Ordering::Relaxed),
            second_chances: c.second_chances.load(Ordering::Relaxed),
            aging_unavailable: c.aging_unavailable.load(Ordering::Relaxed),
            thrash_protections: c.thrash_protections.load(Ordering::Relaxed),
            budget_refusals: c.budget_refusals.load(Ordering::Relaxed),
            table_pages_freed: self.core.table_stats().freed,
        }
    }

    /// Pages of `[addr, addr + len)` the device wrote since the last `take_dirty` over them:
    /// from its DIRTY bits, including those of entries evicted since (a CPU change of a range
    /// forgets it). Clears the record. Coalesced page ranges, ascending.
    /// [`Error::Unsupported`] on a device without DIRTY bits (MXA-1 revision 1, edu).
    pub fn take_dirty(&self, addr: u64, len: u64) -> Result<Vec<std::ops::Range<u64>>, Error> {
        let end = addr
            .checked_add(len)
            .ok_or(Error::InvalidArgument("take_dirty: range wraps"))?;
        self.core.dirty(addr..end, true)
    }

    /// [`Self::take_dirty`] without clearing the record.
    pub fn dirty_pages(&self, addr: u64, len: u64) -> Result<Vec<std::ops::Range<u64>>, Error> {
        let end = addr
            .checked_add(len)
            .ok_or(Error::InvalidArgument("dirty_pages: range wraps"))?;
        self.core.dirty(addr..end, false)
    }
}

/// Device operations on ordinary memory for anything that submits and waits: a [`Context`]
/// in-process, a `mirrord_client::DaemonClient` through the daemon. The provided methods hold
/// the borrows of every byte they name from submit until [`DeviceOps::wait_op`] returns.
///
/// # Safety
/// An implementation's [`DeviceOps::wait_op`] must return, whatever it returns (a result, a
/// timeout, a broken connection), only once the device can no longer access the memory the
/// ticket's command names: the command completed, or was cancelled, or its memory was taken
/// away from the device (translations torn down and fenced) for as long as it may run. The
/// safe methods rest on that: the caller's borrow ends when they return.
pub unsafe trait DeviceOps {
    /// What a submit returns and a wait takes.
    type Ticket;

    /// Submit `op`.
    ///
    /// # Safety
    /// The device reads and writes the addresses in `op` concurrently with the caller until
    /// [`DeviceOps::wait_op`] returns for the ticket: no Rust reference to memory it writes may
    /// be used (or exist as `&`) in that time.
    unsafe fn submit_op(&self, op: Op) -> Result<Self::Ticket, Error>;

    /// Wait for a ticket; the command's result value. Returns only once the device can no
    /// longer access the command's memory (see the trait's safety section).
    fn wait_op(&self, ticket: Self::Ticket) -> Result<u64, Error>;

    /// Submit and wait. When it returns, with a result or an error, the device can no longer
    /// access the memory `op` names (see [`DeviceOps::wait_op`]).
    ///
    /// # Safety
    /// As [`DeviceOps::submit_op`], for the whole call.
    unsafe fn run(&self, op: Op) -> Result<u64, Error> {
        // SAFETY: forwarded to our caller.
        let ticket = unsafe { self.submit_op(op)? };
        self.wait_op(ticket)
    }

    /// Fill `dst` with the 8-byte `pattern` on the device.
    fn fill(&self, dst: &mut [u8], pattern: u64) -> Result<(), Error> {
        if dst.is_empty() {
            return Ok(());
        }
        let op = Op::Fill {
            dst: dst.as_mut_ptr() as u64,
            len: dst.len() as u64,
            pattern,
        };
        // SAFETY: `dst` is borrowed mutably for the whole submit-to-wait window.
        unsafe { self.run(op) }.map(drop)
    }

    /// Copy `src` into `dst` (equal lengths) on the device.
    fn copy(&self, dst: &mut [u8], src: &[u8]) -> Result<(), Error> {
        if dst.len() != src.len() {
            return Err(Error::InvalidArgument(
                "copy: source and destination lengths differ",
            ));
        }
        if dst.is_empty() {
            return Ok(());
        }
        let op = Op::Copy {
            dst: dst.as_mut_ptr() as u64,
            src: src.as_ptr() as u64,
            len: dst.len() as u64,
        };
        // SAFETY: `dst` is borrowed mutably and `src` shared for the whole window.
        unsafe { self.run(op) }.map(drop)
    }

    /// The device's FNV-1a 64 checksum of `src`.
    fn checksum(&self, src: &[u8]) -> Result<u64, Error> {
        if src.is_empty() {
            return Ok(accel_abi::FNV_OFFSET);
        }
        let op = Op::Checksum {
            src: src.as_ptr() as u64,
            len: src.len() as u64,
        };
        // SAFETY: the device only reads `src`, borrowed for the whole window.
        unsafe { self.run(op) }
    }

    /// Atomically add `value` to `target` on the device; returns the old value.
    fn atomic_add(&self, target: &AtomicU64, value: u64) -> Result<u64, Error> {
        let op = Op::AtomicAdd {
            dst: target.as_ptr() as u64,
            value,
        };
        // SAFETY: an AtomicU64 may be written behind a shared reference.
        unsafe { self.run(op) }
    }
}

// SAFETY: `Context::wait` returns with the completion, on a lost device (nothing runs any
// more), or after `Context::revoke` took the command's pages away from the device (fenced), or
// waited for the command to end where that could not be confirmed.
unsafe impl DeviceOps for Context {
    type Ticket = Ticket;

    unsafe fn submit_op(&self, op: Op) -> Result<Ticket, Error> {
        // SAFETY: forwarded to our caller.
        unsafe { self.submit(op) }
    }

    fn wait_op(&self, ticket: Ticket) -> Result<u64, Error> {
        self.wait(ticket)
    }
}

/// A completion as the submitter sees it: the result value, or why the command failed.
pub fn completion_result(c: Completion) -> Result<u64, Error> {
    match c.status {
        Status::Ok => Ok(c.result),
        Status::Cancelled => Err(Error::Cancelled {
            reason: CancelReason::from_code(c.result),
        }),
        status => Err(Error::CommandFailed {
            status,
            detail: c.result,
        }),
    }
}

impl<P: Personality> Drop for Context<P> {
    fn drop(&mut self) {
        // Release ordering: stop servicing this ASID, take the device's view away (clear the
        // page table, fence, unmap, unpin), then replay: work still running faults on the empty
        // table and, with no handler, is cancelled `NoContext`, so it ends quickly instead of
        // running on for seconds against memory nobody is waiting for.
        let asid = self.core.asid;
        self.runtime.service.unregister(asid);
        if self.runtime.device_lost().is_some() {
            self.release_on_lost_device();
            return;
        }
        let confirmed = self.core.shut_down();
        // A fault batch the service was already running for us may still hold a DMA mapping
        // it made before the tear-down (dropped when its install finds the context released):
        // wait for it, so every mapping is gone when the drop returns.
        self.core.wait_for_service();
        let _ = P::replay(&self.runtime.device);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut spins = 0u32;
        loop {
            let pending: Vec<u32> = self.outstanding().keys().copied().collect();
            let mut left = Vec::new();
            for work_id in pending {
                let ticket = Ticket { work_id };
                if P::try_complete(&self.runtime.device, ticket).is_some() {
                    lock(&self.outstanding).remove(&work_id);
                } else {
                    left.push(ticket);
                }
            }
            if left.is_empty() {
                break;
            }
            if self.runtime.device_lost().is_some() {
                // Lost while we waited: that work will never end, and quarantine protects
                // nobody on a device that runs nothing more.
                self.release_on_lost_device();
                return;
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    asid,
                    left = left.len(),
                    "context dropped with work that did not finish: its address space stays out \
                     of use until that work completes"
                );
                self.runtime.quarantine(asid, left);
                return;
            }
            crate::device::backoff(&mut spins);
        }
        if !confirmed && self.runtime.device_lost().is_some() {
            self.release_on_lost_device();
            return;
        }
        if !confirmed {
            // The device may still cache this address space's translations: never reuse it.
            tracing::error!(
                asid,
                "the device did not confirm the tear-down: address space retired"
            );
            self.runtime.quarantine(asid, Vec::new());
            return;
        }
        lock(&self.runtime.asids)[asid as usize] = false;
    }
}

impl<P: Personality> Context<P> {
    /// Release on a lost device: the host side (DMA mappings, arenas, pins) goes at once, with
    /// no fence, no wait for the work in flight and no quarantine: nothing on the device can
    /// run any more, and a vfio-user server that died cannot answer. The mirror subscription
    /// goes with the context.
    fn release_on_lost_device(&self) {
        let asid = self.core.asid;
        // Idempotent: a tear-down already done finds nothing left to release.
        self.core.shut_down();
        self.core.wait_for_service();
        let abandoned = {
            let mut outstanding = lock(&self.outstanding);
            let n = outstanding.len();
            outstanding.clear();
            n
        };
        self.runtime
            .released_on_lost_device
            .fetch_add(1, Ordering::Relaxed);
        let lost = self.runtime.device_lost();
        tracing::warn!(
            asid,
            abandoned,
            lost = lost.as_ref().map(|l| l.to_string()).unwrap_or_default(),
            "context released on a lost device: host side freed at once, no fence, no quarantine"
        );
        lock(&self.runtime.asids)[asid as usize] = false;
    }
}
