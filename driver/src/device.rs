//! The MXA-1 device as the driver sees it: bring-up, the command queue, completion records,
//! TLB invalidation and the fault buffer. Nothing here knows how the device is reached (see
//! [`crate::backend`]) or what a process address space is (see [`crate::context`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use accel_abi::config as pci;
use accel_abi::regs;
use accel_abi::{Command, Completion, FaultRecord, Status, TlbiDescriptor};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::backend::{
    irq_index, region_index, Backend, BackendError, Bar0, Config, DeviceLost, DmaAccess, DmaSource,
    IrqDesc, RegionDesc,
};
use crate::dma::DmaSpace;
use crate::pagetable::TablePool;
use crate::sys::dmabuf::DmaBuffer;
use crate::Error;
use std::sync::Arc;
use sys_util::sync::{ignore_poison, lock};

/// Capabilities read from the device at bring-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Address spaces.
    pub asids: u32,
    /// Page-table levels.
    pub pt_levels: u32,
    /// Translated VA bits.
    pub va_bits: u32,
    /// Page-size bitmap.
    pub page_sizes: u32,
    /// Maximum fault-buffer entries.
    pub fault_entries: u32,
    /// Maximum command-queue entries.
    pub cmdq_entries: u32,
    /// Largest transfer per command.
    pub max_transfer: u32,
    /// Pages past a stalled access the device can report ahead (0: no lookahead).
    pub fault_lookahead: u32,
    /// The walker can maintain ACCESSED/DIRTY in leaves (`CAP_FEATURES`; revision 2).
    pub accessed_dirty: bool,
    /// The device caches non-leaf entries: freeing a table page needs a walk-inclusive
    /// invalidation (`CAP_FEATURES`; revision 2).
    pub walk_cache: bool,
    /// A replay can name one address space (`CAP_FEATURES.SCOPED_REPLAY`; revision 3): the
    /// fault service then retries only the address spaces whose faults it serviced.
    pub scoped_replay: bool,
    /// The lookahead depth in use is writable (`CAP_FEATURES.LOOKAHEAD_DEPTH`; revision 3): the
    /// fault service adapts it ([`Device::set_lookahead_depth`]).
    pub lookahead_depth: bool,
    /// Invalidation-queue capacity in descriptors (`CAP_TLBIQ_ENTRIES` with
    /// `CAP_FEATURES.TLBI_QUEUE`; revision 3); 0 without one. With a queue, the invalidations
    /// of several address spaces are posted and fenced once ([`Device::tlb_invalidate_start`]).
    pub tlbi_queue: u32,
}

/// Ring sizes and similar choices made at bring-up.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Command-queue entries (clamped to the device's maximum, rounded to a power of two).
    pub cmdq_entries: u32,
    /// Fault-buffer entries (clamped likewise).
    pub fault_entries: u32,
    /// Ask the device for lookahead fault records (if it has them): a work item stalling on a
    /// page also reports the next pages of its operand that would fault, so the service maps
    /// them in the same batch instead of one replay round trip per page.
    pub fault_lookahead: bool,
    /// Have the device maintain ACCESSED/DIRTY in leaves (if it can): aging and dirty
    /// tracking then work, and the table pages are mapped device-writable for it.
    pub accessed_dirty: bool,
    /// Invalidation-queue descriptors to use if the device has a queue (clamped to its
    /// capacity, rounded to a power of two); 0 = issue every invalidation through the TLBI
    /// registers, one fence each (counted in [`Device::tlbi_queue_counts`]).
    pub tlbi_queue_entries: u32,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            cmdq_entries: 256,
            fault_entries: 4096,
            fault_lookahead: true,
            accessed_dirty: true,
            tlbi_queue_entries: 256,
        }
    }
}

/// One driver-owned ring in DMA memory.
struct Ring {
    buffer: DmaBuffer,
    iova: u64,
}

struct CommandQueue {
    ring: Ring,
    completions: Ring,
    entries: u32,
    tail: u32,
    /// Per slot (work_id % entries): a submitted command whose result nobody has taken yet.
    busy: Vec<bool>,
    /// Per slot: the command asked for a completion interrupt (CommandFlags::IRQ).
    irq: Vec<bool>,
    in_flight: u32,
}

/// The revision-3 invalidation queue: descriptors posted at `tail`; the device's `TLBIQ_HEAD`
/// says how far it has performed and fenced.
struct TlbiQueue {
    ring: Ring,
    entries: u32,
    /// Descriptors posted (free-running).
    tail: u32,
    /// The last `TLBIQ_HEAD` read.
    head: u32,
}

/// A TLB invalidation that was started ([`Device::tlb_invalidate_start`]): wait for it with
/// [`Device::tlb_invalidate_wait`] before anything the dropped translations reached is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a started invalidation must be waited for before its memory is reused"]
pub enum TlbiTicket {
    /// Already complete (issued through the registers, or nothing to do).
    Done,
    /// Posted to the invalidation queue: complete once `TLBIQ_HEAD` has passed `index`.
    Queued {
        /// Free-running queue index just past the descriptor.
        index: u32,
    },
}

struct FaultBuffer {
    ring: Ring,
    entries: u32,
    get: u32,
}

/// The three MSI vectors, each routed to an eventfd.
pub(crate) struct Interrupts {
    pub(crate) fault: EventFd,
    pub(crate) completion: EventFd,
    pub(crate) error: EventFd,
}

/// A command that was submitted: wait for it with [`crate::Context::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a submitted command must be waited for, or its queue slot is never reused"]
pub struct Ticket {
    /// The command's work id (its free-running queue index).
    pub work_id: u32,
}

/// A drained fault record, or why a slot could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainedFault {
    /// A well-formed record.
    Fault {
        /// The record.
        record: FaultRecord,
        /// Posted before the device's last replay: the replay has retried its work item since,
        /// so the record may describe a stall that is over (the item ran on, or even
        /// completed). If the item still cannot get past the page, it has faulted again and
        /// posted a new record. Such a record proves nothing about the item's state now.
        replayed: bool,
    },
    /// A slot marked valid whose contents do not decode; the slot was consumed.
    Malformed {
        /// Slot index.
        slot: u32,
    },
}

/// What [`Device::drain_faults`] found besides the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// The fault buffer had overflowed (now cleared).
    pub overflow: bool,
    /// Replays issued before the drain: hand it to [`Device::cancel_stalled`], which cancels
    /// only if no replay came since.
    pub replays: u64,
}

/// What [`Device::cancel_stalled`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The item was cancelled.
    Cancelled,
    /// Not written: a replay since the drain retried the item.
    Replayed,
    /// Written, and refused by the device: the item was not stalled (it was running).
    Refused,
}

/// The replays issued, and where the fault buffer's producer index stood when the last one
/// was issued.
#[derive(Debug)]
struct Replays {
    /// Replays of any kind issued since bring-up.
    count: u64,
    /// `count` after the last replay of every address space.
    full_at: u64,
    /// `FAULT_BUF_PUT` read just before the last replay of every address space: the items of
    /// records below it had posted them, stalled, before that replay retried them. `None` if
    /// that read failed: every record counts as replayed until the next replay.
    put: Option<u32>,
    /// Per address space, `count` after the last replay naming it alone and the producer
    /// index read just before it (revision 3, scoped replay).
    scoped: HashMap<u16, (u64, Option<u32>)>,
}

impl Replays {
    /// Whether the record of `asid` at ring index `index` was posted before the last replay
    /// that retried `asid`'s items (of every address space, or of `asid` alone).
    fn covers(&self, asid: u16, index: u32) -> bool {
        let put = match self.scoped.get(&asid) {
            // Producer indices only grow, so the later replay has the later index.
            Some(&(at, put)) if at > self.full_at => put,
            _ => self.put,
        };
        // Free-running indices, at most a ring apart: compare by wrapping distance.
        put.is_none_or(|put| (put.wrapping_sub(index) as i32) > 0)
    }

    /// Whether a replay that retried `asid`'s items came after the drain that saw `count`.
    fn retried_since(&self, asid: u16, count: u64) -> bool {
        let scoped = self.scoped.get(&asid).map_or(0, |&(at, _)| at);
        self.full_at.max(scoped) > count
    }
}

/// A device brought up and owned by the driver.
pub struct Device {
    dma: Arc<DmaSpace>,
    caps: Caps,
    /// Table pages shared by the page tables of every address space.
    pub(crate) tables: Mutex<TablePool>,
    cmdq: Mutex<CommandQueue>,
    slot_freed: Condvar,
    faults: Mutex<FaultBuffer>,
    /// Serializes replays and cancels: a cancel is written only if no replay came since the
    /// drain that showed its item stalled.
    replays: Mutex<Replays>,
    tlbi: Mutex<u32>,
    /// The invalidation queue, if the device has one and the options asked for it.
    tlbiq: Option<Mutex<TlbiQueue>>,
    /// Descriptors posted to the queue, doorbells rung, started invalidations that were issued
    /// through the registers instead (no queue), waits that found their fence already done.
    tlbiq_posted: AtomicU64,
    tlbiq_doorbells: AtomicU64,
    tlbi_unqueued: AtomicU64,
    tlbiq_shared_fences: AtomicU64,
    /// Invalidations issued that also dropped walk-cache entries.
    tlbi_walk_inclusive: AtomicU64,
    /// Invalidations issued with `LEAF_ONLY` (on a device with a walk cache; elsewhere a
    /// leaf-only request is counted here but issued plain).
    tlbi_leaf_only: AtomicU64,
    /// PT_CTRL.AD_ENABLE was set at bring-up.
    accessed_dirty: bool,
    pub(crate) irq: Interrupts,
}

fn ring(dma: &DmaSpace, bytes: usize, name: &str) -> Result<Ring, Error> {
    let len = bytes.div_ceil(4096) * 4096;
    let buffer = DmaBuffer::new(len, name)?;
    let source = DmaSource::Buffer {
        buffer: &buffer,
        offset: 0,
    };
    let iova = dma.map_buffer(
        Some(buffer.va()),
        false,
        len as u64,
        4096,
        source,
        DmaAccess::READ_WRITE,
    )?;
    Ok(Ring { buffer, iova })
}

fn eventfd() -> Result<EventFd, Error> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| {
        Error::Os {
            what: "eventfd",
            source: e.into(),
        }
    })
}

fn dup(fd: &EventFd) -> Result<OwnedFd, Error> {
    fd.as_fd().try_clone_to_owned().map_err(|e| Error::Os {
        what: "dup(eventfd)",
        source: e,
    })
}

/// The optional features of a device of `version`: revision 1 (minor 0) has no CAP_FEATURES
/// register, so it is not read there. A value with undefined bits set (all ones is what an
/// undecoded register reads as) is taken as no features.
/// True if the free-running index `head` has reached `index` (within half the index space).
fn passed(head: u32, index: u32) -> bool {
    head.wrapping_sub(index) < 1 << 31
}

/// The invalidation queue's use (see [`Device::tlbi_queue_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlbiQueueCounts {
    /// Descriptors in the queue (0: no queue in use).
    pub entries: u32,
    /// Invalidations posted to the queue.
    pub posted: u64,
    /// Doorbells rung: each performs everything posted before it with one fence.
    pub doorbells: u64,
    /// Waits that found their invalidation fenced by a doorbell another caller rang.
    pub shared_fences: u64,
    /// Started invalidations issued through the TLBI registers, one fence each, because no
    /// queue is in use.
    pub unqueued: u64,
}

fn read_features(bar: &Bar0<'_>, version: u32) -> Result<u32, Error> {
    if version & 0xffff == 0 {
        return Ok(0);
    }
    let features = bar.read32(regs::CAP_FEATURES)?;
    if features & !regs::features::ALL != 0 {
        tracing::warn!(
            features = format_args!("{features:#x}"),
            version = format_args!("{version:#x}"),
            "CAP_FEATURES has undefined bits set; using no optional features"
        );
        return Ok(0);
    }
    Ok(features)
}

/// Set PT_CTRL.AD_ENABLE and check the device took it: an error latched for the write, or a
/// read-back without the bit, fails bring-up naming the option that avoids it.
fn enable_accessed_dirty(bar: &Bar0<'_>) -> Result<(), Error> {
    bar.write32(regs::PT_CTRL, regs::pt_ctrl::AD_ENABLE)?;
    let error = bar.read32(regs::ERROR_CODE)?;
    if error != 0 {
        let info = bar.read64(regs::ERROR_INFO)?;
        if info == regs::PT_CTRL {
            tracing::error!(
                code = error,
                "the device refused PT_CTRL.AD_ENABLE although CAP_FEATURES offers \
                 ACCESSED_DIRTY (DeviceOptions::accessed_dirty = false runs without)"
            );
        }
        return Err(Error::DeviceError { code: error, info });
    }
    let ctrl = bar.read32(regs::PT_CTRL)?;
    if ctrl & regs::pt_ctrl::AD_ENABLE == 0 {
        return Err(Error::Unsupported(format!(
            "PT_CTRL reads {ctrl:#x} after setting AD_ENABLE although CAP_FEATURES offers \
             ACCESSED_DIRTY (DeviceOptions::accessed_dirty = false runs without)"
        )));
    }
    Ok(())
}

/// The MXA-1 needs region `index` of at least `size` bytes, readable and writable; checked
/// when the backend describes the device's regions (a generic transport opens any device).
fn need_region(regions: &[RegionDesc], index: u32, size: u64) -> Result<(), Error> {
    let fits = |r: &&RegionDesc| r.index == index && r.present() && r.read && r.write;
    if regions.iter().find(fits).is_some_and(|r| r.size >= size) {
        return Ok(());
    }
    let has: Vec<String> = regions
        .iter()
        .filter(|r| r.present())
        .map(|r| {
            let access = match (r.read, r.write) {
                (true, true) => "",
                (true, false) => ", read-only",
                _ => ", write-only",
            };
            format!(
                "{} ({:#x} bytes{access})",
                region_index::name(r.index),
                r.size
            )
        })
        .collect();
    let name = region_index::name(index);
    Err(Error::Unsupported(format!(
        "the MXA-1 driver needs {name} of {size:#x} bytes, readable and writable; the device \
         has {}",
        if has.is_empty() {
            "no accessible region".to_owned()
        } else {
            has.join(", ")
        }
    )))
}

/// The MXA-1 needs MSI with its vectors (fault, completion, error), signalled by eventfd.
fn need_msi(irqs: &[IrqDesc]) -> Result<(), Error> {
    let msi = irqs.iter().find(|i| i.index == irq_index::MSI);
    if msi.is_some_and(|m| m.count >= accel_abi::vector::COUNT && m.eventfd) {
        return Ok(());
    }
    let has: Vec<String> = irqs
        .iter()
        .filter(|i| i.count > 0)
        .map(|i| {
            format!(
                "{} ({} vector(s){})",
                irq_index::name(i.index),
                i.count,
                if i.eventfd { "" } else { ", no eventfd" }
            )
        })
        .collect();
    Err(Error::Unsupported(format!(
        "the MXA-1 driver needs MSI with {} vectors signalled by eventfd (fault, completion, \
         error); the device has {}",
        accel_abi::vector::COUNT,
        if has.is_empty() {
            "no interrupts".to_owned()
        } else {
            has.join(", ")
        }
    )))
}

impl Device {
    /// Bring the device up: check identity, reset, enable memory decoding and bus mastering,
    /// allocate and program the command queue and fault buffer, route interrupts, enable.
    pub fn bring_up(backend: Box<dyn Backend>, options: DeviceOptions) -> Result<Device, Error> {
        let dma = Arc::new(DmaSpace::new(backend));
        let b: &dyn Backend = dma.backend();
        let regions = b.regions();
        if let Some(regions) = &regions {
            need_region(regions, region_index::CONFIG, pci::CONFIG_SIZE as u64)?;
        }
        let cfg = Config(b);
        let vendor = cfg.read16(pci::off::VENDOR_ID)?;
        let device = cfg.read16(pci::off::DEVICE_ID)?;
        if (vendor, device) != (pci::VENDOR_ID, pci::DEVICE_ID) {
            return Err(Error::WrongDevice { vendor, device });
        }
        if let Some(regions) = &regions {
            need_region(regions, region_index::BAR0, regs::BAR0_SIZE)?;
        }
        if let Some(irqs) = b.irqs() {
            need_msi(&irqs)?;
        }
        b.reset()?;
        let command = cfg.read16(pci::off::COMMAND)?;
        cfg.write16(
            pci::off::COMMAND,
            command | pci::command::MEMORY | pci::command::BUS_MASTER | pci::command::INTX_DISABLE,
        )?;
        let bar = Bar0(b);
        let id = bar.read32(regs::ID)?;
        let version = bar.read32(regs::VERSION)?;
        if id != regs::ID_VALUE || version >> 16 != regs::VERSION_VALUE >> 16 {
            return Err(Error::WrongDevice { vendor, device });
        }
        let pt = bar.read32(regs::CAP_PT)?;
        let features = read_features(&bar, version)?;
        let caps = Caps {
            asids: bar.read32(regs::CAP_ASIDS)?,
            pt_levels: regs::cap_pt::levels(pt),
            va_bits: regs::cap_pt::va_bits(pt),
            page_sizes: bar.read32(regs::CAP_PAGE_SIZES)?,
            fault_entries: bar.read32(regs::CAP_FAULT_ENTRIES)?,
            cmdq_entries: bar.read32(regs::CAP_CMDQ_ENTRIES)?,
            max_transfer: bar.read32(regs::CAP_MAX_TRANSFER)?,
            fault_lookahead: bar.read32(regs::CAP_FAULT_LOOKAHEAD)?,
            accessed_dirty: features & regs::features::ACCESSED_DIRTY != 0,
            walk_cache: features & regs::features::WALK_CACHE != 0,
            scoped_replay: features & regs::features::SCOPED_REPLAY != 0,
            lookahead_depth: features & regs::features::LOOKAHEAD_DEPTH != 0,
            tlbi_queue: if features & regs::features::TLBI_QUEUE != 0 {
                bar.read32(regs::CAP_TLBIQ_ENTRIES)?
            } else {
                0
            },
        };
        if caps.pt_levels != accel_abi::PT_LEVELS
            || caps.va_bits != accel_abi::VA_BITS
            || caps.asids == 0
        {
            return Err(Error::Unsupported(format!("device geometry {caps:?}")));
        }
        let clamp = |want: u32, max: u32| want.clamp(2, max.max(2)).next_power_of_two().min(max);
        let cmdq_entries = clamp(options.cmdq_entries, caps.cmdq_entries);
        let fault_entries = clamp(options.fault_entries, caps.fault_entries);

        let cq = ring(&dma, cmdq_entries as usize * Command::SIZE, "cmdq")?;
        let cc = ring(
            &dma,
            cmdq_entries as usize * Completion::SIZE,
            "completions",
        )?;
        let fb = ring(&dma, fault_entries as usize * FaultRecord::SIZE, "faults")?;
        let tlbiq_entries = if options.tlbi_queue_entries > 0 && caps.tlbi_queue >= 2 {
            clamp(options.tlbi_queue_entries, caps.tlbi_queue)
        } else {
            0
        };
        let tq = if tlbiq_entries > 0 {
            Some(ring(
                &dma,
                tlbiq_entries as usize * TlbiDescriptor::SIZE,
                "tlbi queue",
            )?)
        } else {
            None
        };

        let irq = Interrupts {
            fault: eventfd()?,
            completion: eventfd()?,
            error: eventfd()?,
        };
        // Every vector in one SET_IRQS: vfio-pci fixes the MSI vector count when it enables
        // MSI, and refuses a later, larger one (EINVAL).
        let mut fds: Vec<Option<OwnedFd>> = (0..accel_abi::vector::COUNT).map(|_| None).collect();
        fds[accel_abi::vector::FAULT as usize] = Some(dup(&irq.fault)?);
        fds[accel_abi::vector::COMPLETION as usize] = Some(dup(&irq.completion)?);
        fds[accel_abi::vector::ERROR as usize] = Some(dup(&irq.error)?);
        b.set_irqs(fds).map_err(|e| BackendError::Interrupts {
            vectors: accel_abi::vector::COUNT,
            names: "fault, completion, error",
            source: Box::new(e),
        })?;

        bar.write32(regs::INTR_MASK, 0)?;
        bar.write64(regs::FAULT_BUF_BASE, fb.iova)?;
        bar.write32(regs::FAULT_BUF_ENTRIES, fault_entries)?;
        bar.write32(regs::FAULT_BUF_GET, 0)?;
        let lookahead = if options.fault_lookahead && caps.fault_lookahead > 0 {
            regs::fault_ctrl::LOOKAHEAD
        } else {
            0
        };
        bar.write32(regs::FAULT_BUF_CTRL, regs::fault_ctrl::ENABLE | lookahead)?;
        bar.write64(regs::CMDQ_BASE, cq.iova)?;
        bar.write32(regs::CMDQ_ENTRIES, cmdq_entries)?;
        bar.write32(regs::CMDQ_TAIL, 0)?;
        bar.write32(regs::CMDQ_CTRL, regs::cmdq_ctrl::ENABLE)?;
        if let Some(tq) = &tq {
            bar.write64(regs::TLBIQ_BASE, tq.iova)?;
            bar.write32(regs::TLBIQ_ENTRIES, tlbiq_entries)?;
            bar.write32(regs::TLBIQ_CTRL, regs::tlbiq_ctrl::ENABLE)?;
        } else if caps.tlbi_queue > 0 {
            tracing::info!("the device's invalidation queue is not used (DeviceOptions::tlbi_queue_entries = 0): one fence per address space");
        }
        let accessed_dirty = options.accessed_dirty && caps.accessed_dirty;
        if accessed_dirty {
            enable_accessed_dirty(&bar)?;
        }
        bar.write32(regs::CONTROL, regs::control::ENABLE)?;
        let error = bar.read32(regs::ERROR_CODE)?;
        if error != 0 {
            let info = bar.read64(regs::ERROR_INFO)?;
            return Err(Error::DeviceError { code: error, info });
        }

        Ok(Device {
            dma: dma.clone(),
            caps,
            // The walker writes ACCESSED/DIRTY into the table pages only with AD enabled; the
            // pages are mapped writable for the device then and only then.
            tables: Mutex::new(TablePool::with_device_writes(accessed_dirty)),
            cmdq: Mutex::new(CommandQueue {
                ring: cq,
                completions: cc,
                entries: cmdq_entries,
                tail: 0,
                busy: vec![false; cmdq_entries as usize],
                irq: vec![false; cmdq_entries as usize],
                in_flight: 0,
            }),
            slot_freed: Condvar::new(),
            faults: Mutex::new(FaultBuffer {
                ring: fb,
                entries: fault_entries,
                get: 0,
            }),
            // After the reset: no replay yet, and every record from index 0 on is new.
            replays: Mutex::new(Replays {
                count: 0,
                full_at: 0,
                put: Some(0),
                scoped: HashMap::new(),
            }),
            tlbi: Mutex::new(0),
            tlbiq: tq.map(|ring| {
                Mutex::new(TlbiQueue {
                    ring,
                    entries: tlbiq_entries,
                    tail: 0,
                    head: 0,
                })
            }),
            tlbiq_posted: AtomicU64::new(0),
            tlbiq_doorbells: AtomicU64::new(0),
            tlbi_unqueued: AtomicU64::new(0),
            tlbiq_shared_fences: AtomicU64::new(0),
            tlbi_walk_inclusive: AtomicU64::new(0),
            tlbi_leaf_only: AtomicU64::new(0),
            accessed_dirty,
            irq,
        })
    }

    /// The device's capabilities.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// True if the device maintains ACCESSED/DIRTY in leaves (PT_CTRL.AD_ENABLE was set at
    /// bring-up: the device has the feature and [`DeviceOptions::accessed_dirty`] asked).
    pub fn accessed_dirty(&self) -> bool {
        self.accessed_dirty
    }

    /// TLB invalidations issued since bring-up: (walk-inclusive, leaf-only). A leaf-only
    /// request on a device without a walk cache is counted as leaf-only (it is issued without
    /// the bit, which changes nothing there).
    pub fn tlbi_counts(&self) -> (u64, u64) {
        (
            self.tlbi_walk_inclusive.load(Ordering::Relaxed),
            self.tlbi_leaf_only.load(Ordering::Relaxed),
        )
    }

    /// The invalidation queue's use since bring-up.
    pub fn tlbi_queue_counts(&self) -> TlbiQueueCounts {
        TlbiQueueCounts {
            entries: self.tlbiq.as_ref().map_or(0, |q| lock(q).entries),
            posted: self.tlbiq_posted.load(Ordering::Relaxed),
            doorbells: self.tlbiq_doorbells.load(Ordering::Relaxed),
            shared_fences: self.tlbiq_shared_fences.load(Ordering::Relaxed),
            unqueued: self.tlbi_unqueued.load(Ordering::Relaxed),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.dma.backend()
    }

    /// The DMA space (backend and IOVA allocation) shared with the contexts.
    pub fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    /// Page-table memory: (bytes the table pool holds, table pages in use by some address
    /// space's page table).
    pub fn table_pool_usage(&self) -> (u64, u64) {
        let pool = lock(&self.tables);
        (pool.bytes(), pool.in_use() as u64)
    }

    pub(crate) fn bar(&self) -> Bar0<'_> {
        Bar0(self.dma.backend())
    }

    /// Why the device is gone for good, or `None` while it is reachable ([`Backend::lost`]).
    pub fn lost(&self) -> Option<DeviceLost> {
        self.backend().lost()
    }

    /// Fails with [`Error::DeviceLost`] once the device is lost.
    pub fn check_lost(&self) -> Result<(), Error> {
        self.lost()
            .map_or(Ok(()), |lost| Err(Error::DeviceLost(lost)))
    }

    /// `e`, or [`Error::DeviceLost`] if the device is lost (then that is why `e` happened).
    fn unless_lost(&self, e: impl Into<Error>) -> Error {
        self.lost().map_or_else(|| e.into(), Error::DeviceLost)
    }

    /// Submit `cmd` (its `completion` field is set by the driver). Waits up to `timeout` for a
    /// free queue slot (back-pressure), then fails with [`Error::QueueFull`].
    pub fn submit(&self, mut cmd: Command, timeout: Duration) -> Result<Ticket, Error> {
        self.check_lost()?;
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.cmdq);
        loop {
            let slot = (q.tail % q.entries) as usize;
            if !q.busy[slot] {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::QueueFull { entries: q.entries });
            }
            // Bounded: a lost device frees no slot, and nobody signals it here.
            self.check_lost()?;
            q = ignore_poison(
                self.slot_freed
                    .wait_timeout(q, (deadline - now).min(Duration::from_millis(100))),
            )
            .0;
        }
        let work_id = q.tail;
        let slot = (work_id % q.entries) as usize;
        q.completions.buffer.store_u32(
            slot * Completion::SIZE + Completion::DONE_OFFSET,
            0,
            Ordering::Relaxed,
        );
        cmd.completion = q.completions.iova + (slot * Completion::SIZE) as u64;
        q.ring.buffer.write(slot * Command::SIZE, &cmd.encode());
        q.busy[slot] = true;
        q.irq[slot] = cmd.flags.0 & accel_abi::CommandFlags::IRQ != 0;
        q.in_flight += 1;
        q.tail = q.tail.wrapping_add(1);
        // The doorbell write orders the ring stores before it (docs/device.md, ordering).
        std::sync::atomic::fence(Ordering::Release);
        if let Err(e) = self.bar().write32(regs::CMDQ_TAIL, q.tail) {
            // The device never saw it: give the slot back.
            q.tail = q.tail.wrapping_sub(1);
            q.busy[slot] = false;
            q.in_flight -= 1;
            return Err(self.unless_lost(e));
        }
        Ok(Ticket { work_id })
    }

    /// The completion of `ticket` if the device has written it; frees the slot when it has.
    pub fn try_complete(&self, ticket: Ticket) -> Option<Completion> {
        let mut q = lock(&self.cmdq);
        let slot = (ticket.work_id % q.entries) as usize;
        if !q.busy[slot] {
            return None;
        }
        let base = slot * Completion::SIZE;
        if q.completions
            .buffer
            .load_u32(base + Completion::DONE_OFFSET, Ordering::Acquire)
            == 0
        {
            return None;
        }
        let mut raw = [0u8; 16];
        q.completions.buffer.read(base, &mut raw);
        let completion = Completion::decode(&raw)
            .ok()
            .flatten()
            .unwrap_or(Completion {
                // A record the device garbled: report it rather than trusting it.
                result: 0,
                status: Status::BadCommand,
            });
        q.busy[slot] = false;
        q.in_flight -= 1;
        drop(q);
        self.slot_freed.notify_all();
        Some(completion)
    }

    /// True if `ticket`'s command asked for a completion interrupt and is not collected yet.
    pub fn completion_interrupt_requested(&self, ticket: Ticket) -> bool {
        let q = lock(&self.cmdq);
        let slot = (ticket.work_id % q.entries) as usize;
        q.busy[slot] && q.irq[slot]
    }

    /// Commands submitted and not yet collected.
    pub fn in_flight(&self) -> u32 {
        lock(&self.cmdq).in_flight
    }

    /// Invalidate the device TLB for `[va, va+len)` of `asid` (or the whole ASID if `len` is
    /// `None`) and wait for its fence: when this returns, no device access uses a dropped
    /// translation. Walk-inclusive: walk-cache entries of the range go too, so this is the
    /// fence to use after clearing or repointing a table entry (before a freed table page is
    /// reused).
    pub fn tlb_invalidate(
        &self,
        asid: u16,
        range: Option<std::ops::Range<u64>>,
        timeout: Duration,
    ) -> Result<(), Error> {
        self.invalidate(asid, range, timeout, false)
    }

    /// [`Device::tlb_invalidate`] for leaves alone: the device keeps its walk-cache entries
    /// (`LEAF_ONLY`, set only on a device with a walk cache; elsewhere the invalidation is the
    /// same as the walk-inclusive one). Enough when only leaf entries changed (cleared,
    /// replaced, or ACCESSED/DIRTY cleared); not after a table entry was cleared or repointed.
    pub fn tlb_invalidate_leaves(
        &self,
        asid: u16,
        range: Option<std::ops::Range<u64>>,
        timeout: Duration,
    ) -> Result<(), Error> {
        self.invalidate(asid, range, timeout, true)
    }

    fn invalidate(
        &self,
        asid: u16,
        range: Option<std::ops::Range<u64>>,
        timeout: Duration,
        leaf_only: bool,
    ) -> Result<(), Error> {
        // A lost device never confirms a fence (and a BAR mapped into this process would let
        // the wait below spin for the whole timeout on a register nobody updates).
        self.check_lost()?;
        let mut seq = lock(&self.tlbi);
        let bar = self.bar();
        bar.write32(regs::TLBI_ASID, u32::from(asid))
            .map_err(|e| self.unless_lost(e))?;
        let limit = 1u64 << accel_abi::VA_BITS;
        // A range reaching past the translated VA bits is the whole address space.
        let range = range.filter(|r| r.end <= limit);
        // A device without a walk cache has nothing to keep, and a revision-1 device refuses
        // the bit as a reserved one.
        let keep_walks = leaf_only && self.caps.walk_cache;
        match range {
            Some(r) if r.start >= r.end => return Ok(()),
            Some(r) => {
                let start = r.start & !(accel_abi::PAGE_SIZE - 1);
                let end = r.end.div_ceil(accel_abi::PAGE_SIZE) * accel_abi::PAGE_SIZE;
                bar.write32(regs::TLBI_SCOPE, regs::TlbiScope::Range.encode(keep_walks))?;
                bar.write64(regs::TLBI_VA, start)?;
                bar.write64(regs::TLBI_SIZE, end - start)?;
            }
            None => bar.write32(regs::TLBI_SCOPE, regs::TlbiScope::Asid.encode(keep_walks))?,
        }
        *seq = seq.wrapping_add(1);
        bar.write32(regs::TLBI_TRIGGER, *seq)?;
        let counter = if leaf_only {
            &self.tlbi_leaf_only
        } else {
            &self.tlbi_walk_inclusive
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if bar
                .read32(regs::TLBI_DONE)
                .map_err(|e| self.unless_lost(e))?
                == *seq
            {
                return Ok(());
            }
            self.check_lost()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout("TLB invalidation fence"));
            }
            backoff(&mut spins);
        }
    }

    /// Start a TLB invalidation of `[va, va+len)` of `asid` (the whole ASID if `range` is
    /// `None`), walk-inclusive unless `leaf_only`, without waiting for its fence: with an
    /// invalidation queue the descriptor is posted and the doorbell left for
    /// [`Device::tlb_invalidate_wait`], so the invalidations of many address spaces share one
    /// doorbell and one fence. Without a queue this is the whole invalidation, fence included
    /// (counted as `unqueued` in [`Device::tlbi_queue_counts`]).
    pub fn tlb_invalidate_start(
        &self,
        asid: u16,
        range: Option<std::ops::Range<u64>>,
        leaf_only: bool,
        timeout: Duration,
    ) -> Result<TlbiTicket, Error> {
        let Some(queue) = &self.tlbiq else {
            self.tlbi_unqueued.fetch_add(1, Ordering::Relaxed);
            self.invalidate(asid, range, timeout, leaf_only)?;
            return Ok(TlbiTicket::Done);
        };
        self.check_lost()?;
        let limit = 1u64 << accel_abi::VA_BITS;
        let keep_walks = leaf_only && self.caps.walk_cache;
        let (scope, va, size) = match range.filter(|r| r.end <= limit) {
            Some(r) if r.start >= r.end => return Ok(TlbiTicket::Done),
            Some(r) => {
                let start = r.start & !(accel_abi::PAGE_SIZE - 1);
                let end = r.end.div_ceil(accel_abi::PAGE_SIZE) * accel_abi::PAGE_SIZE;
                (regs::TlbiScope::Range, start, end - start)
            }
            None => (regs::TlbiScope::Asid, 0, 0),
        };
        let descriptor = TlbiDescriptor {
            asid,
            scope: scope.encode(keep_walks) as u16,
            va,
            size,
        };
        let mut q = lock(queue);
        if q.tail.wrapping_sub(q.head) >= q.entries {
            // Full: have the device perform (and fence) what is posted, then reuse the slots.
            let tail = q.tail;
            self.ring_and_wait(&mut q, tail, timeout)?;
        }
        let slot = (q.tail % q.entries) as usize;
        q.ring
            .buffer
            .write(slot * TlbiDescriptor::SIZE, &descriptor.encode());
        q.tail = q.tail.wrapping_add(1);
        self.tlbiq_posted.fetch_add(1, Ordering::Relaxed);
        let counter = if leaf_only {
            &self.tlbi_leaf_only
        } else {
            &self.tlbi_walk_inclusive
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(TlbiTicket::Queued { index: q.tail })
    }

    /// Wait for a started invalidation's fence: when this returns, no device access uses a
    /// translation it dropped. The first waiter rings the doorbell for everything posted so
    /// far; a waiter whose descriptor an earlier doorbell covered finds it done.
    pub fn tlb_invalidate_wait(&self, ticket: TlbiTicket, timeout: Duration) -> Result<(), Error> {
        let TlbiTicket::Queued { index } = ticket else {
            return Ok(());
        };
        let Some(queue) = &self.tlbiq else {
            return Ok(());
        };
        let mut q = lock(queue);
        if passed(q.head, index) {
            self.tlbiq_shared_fences.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let tail = q.tail;
        self.ring_and_wait(&mut q, tail, timeout)?;
        if !passed(q.head, index) {
            return Err(Error::Timeout("invalidation-queue fence"));
        }
        Ok(())
    }

    /// Ring the doorbell up to `tail` and wait until `TLBIQ_HEAD` reaches it. The doorbell is
    /// written again even if it was rung up to `tail` before: a waiter after a timed-out wait
    /// then retries instead of waiting for a doorbell that never took effect (the same value is
    /// a valid doorbell; a device that performed it already has nothing left to do).
    fn ring_and_wait(&self, q: &mut TlbiQueue, tail: u32, timeout: Duration) -> Result<(), Error> {
        self.check_lost()?;
        let bar = self.bar();
        if !passed(q.head, tail) {
            // The descriptors were written with plain stores: they must be visible to the
            // device before the doorbell is.
            std::sync::atomic::fence(Ordering::Release);
            bar.write32(regs::TLBIQ_TAIL, tail)
                .map_err(|e| self.unless_lost(e))?;
            self.tlbiq_doorbells.fetch_add(1, Ordering::Relaxed);
        }
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            q.head = bar
                .read32(regs::TLBIQ_HEAD)
                .map_err(|e| self.unless_lost(e))?;
            if passed(q.head, tail) {
                return Ok(());
            }
            self.check_lost()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout("invalidation-queue fence"));
            }
            backoff(&mut spins);
        }
    }

    /// Program the page-table root of `asid` (`None` clears it).
    pub fn set_asid_root(&self, asid: u16, root: Option<u64>) -> Result<(), Error> {
        let value = root.map_or(0, |iova| iova | regs::ASID_ROOT_VALID);
        self.bar().write64(regs::asid_root(asid), value)?;
        Ok(())
    }

    /// Move posted fault records out of the fault buffer, clearing each slot and publishing the
    /// new GET index: up to `max` stalls, each with the lookahead records that follow its own
    /// record (a ring's worth at most). Each record says whether a replay has retried its item
    /// since it was posted. Also reports (and clears) an overflow.
    pub fn drain_faults(&self, max: usize, out: &mut Vec<DrainedFault>) -> Result<Drain, Error> {
        let mut fb = lock(&self.faults);
        // Held for the whole drain (lock order: faults, then replays; a replay takes only the
        // replays lock): no replay can come between two records, and the count handed to the
        // cancel step is the one every record was judged by (`cancel_stalled`).
        let replays = lock(&self.replays);
        let mut taken = 0;
        let mut stalls = 0;
        while taken < fb.entries as usize {
            let slot = fb.get % fb.entries;
            let base = slot as usize * FaultRecord::SIZE;
            let flags = fb
                .ring
                .buffer
                .load_u32(base + FaultRecord::FLAGS_OFFSET, Ordering::Acquire);
            if flags == 0 {
                break;
            }
            // Lookahead records ride with the stall before them; anything else is a new stall.
            let lookahead = flags == FaultRecord::FLAG_VALID | FaultRecord::FLAG_LOOKAHEAD;
            if !lookahead {
                if stalls == max {
                    break;
                }
                stalls += 1;
            }
            let mut raw = [0u8; 32];
            fb.ring.buffer.read(base, &mut raw);
            fb.ring
                .buffer
                .store_u32(base + FaultRecord::FLAGS_OFFSET, 0, Ordering::Relaxed);
            out.push(match FaultRecord::decode(&raw) {
                Ok(Some(record)) => DrainedFault::Fault {
                    record,
                    replayed: replays.covers(record.asid, fb.get),
                },
                _ => DrainedFault::Malformed { slot },
            });
            fb.get = fb.get.wrapping_add(1);
            taken += 1;
        }
        if taken > 0 {
            self.bar().write32(regs::FAULT_BUF_GET, fb.get)?;
        }
        let ctrl = self.bar().read32(regs::FAULT_BUF_CTRL)?;
        let overflow = ctrl & regs::fault_ctrl::OVERFLOW != 0;
        if overflow {
            // Write the bits back: OVERFLOW is write-1-to-clear, ENABLE and LOOKAHEAD stay.
            self.bar().write32(regs::FAULT_BUF_CTRL, ctrl)?;
        }
        Ok(Drain {
            overflow,
            replays: replays.count,
        })
    }

    /// True if a fault record is waiting (a memory read: cheap enough to busy-poll).
    pub fn fault_pending(&self) -> bool {
        let fb = lock(&self.faults);
        let base = (fb.get % fb.entries) as usize * FaultRecord::SIZE;
        fb.ring
            .buffer
            .load_u32(base + FaultRecord::FLAGS_OFFSET, Ordering::Acquire)
            != 0
    }

    /// Retry every stalled work item. Where the fault buffer stood just before is noted:
    /// records posted before the replay are marked `replayed` when drained.
    pub fn replay(&self) -> Result<(), Error> {
        let mut replays = lock(&self.replays);
        // Read before the write, not after: the items this replay retries fault again at
        // once, and a read after it finds many of their new records already posted and takes
        // them for old ones (tried first: in a QEMU guest, where a register read is a round
        // trip to the device process, 73% of all records came out replayed, so an item that
        // cannot be serviced could go uncancelled round after round). What a read before it
        // misses is a record posted between the read and the write, by an item that was
        // running meanwhile: retried at once, it faults again on the same page (the service
        // maps nothing in between), so it is normally stalled there again when the cancel
        // comes; if not, `cancel_stalled` reads the refusal back.
        let put = self.bar().read32(regs::FAULT_BUF_PUT);
        let written = self.bar().write32(regs::FAULT_REPLAY, 1);
        // Counted even if the write failed (it may have reached the device): a cancel decided
        // on records drained before it is then not written.
        replays.count += 1;
        replays.full_at = replays.count;
        replays.put = put.as_ref().ok().copied();
        written?;
        put?;
        Ok(())
    }

    /// The lookahead depth the device uses now (`FAULT_LOOKAHEAD_DEPTH`), on a device where it
    /// is writable.
    pub fn lookahead_depth(&self) -> Result<u32, Error> {
        if !self.caps.lookahead_depth {
            return Err(Error::Unsupported(
                "the device's fault lookahead depth is fixed (CAP_FEATURES.LOOKAHEAD_DEPTH clear)"
                    .into(),
            ));
        }
        Ok(self.bar().read32(regs::FAULT_LOOKAHEAD_DEPTH)?)
    }

    /// Set how many pages past a stalled access the device reports ahead, `1..=`
    /// [`Caps::fault_lookahead`] (revision 3, [`Caps::lookahead_depth`]). Without the feature
    /// the depth stays the device's own and this fails with [`Error::Unsupported`].
    pub fn set_lookahead_depth(&self, depth: u32) -> Result<(), Error> {
        if !self.caps.lookahead_depth {
            return Err(Error::Unsupported(
                "the device's fault lookahead depth is fixed (CAP_FEATURES.LOOKAHEAD_DEPTH clear)"
                    .into(),
            ));
        }
        if depth == 0 || depth > self.caps.fault_lookahead {
            return Err(Error::Unsupported(format!(
                "lookahead depth {depth}: the device takes 1..={} (CAP_FAULT_LOOKAHEAD)",
                self.caps.fault_lookahead
            )));
        }
        self.bar().write32(regs::FAULT_LOOKAHEAD_DEPTH, depth)?;
        Ok(())
    }

    /// Retry the stalled work items of `asid` alone (revision 3, [`Caps::scoped_replay`]); the
    /// items of other address spaces stay stalled, and their records posted before this replay
    /// are not taken for replayed ones. Without the feature (or for an ASID the device does not
    /// have) this is [`Device::replay`]: every stalled item retries, nothing is left stalled.
    pub fn replay_scoped(&self, asid: u16) -> Result<(), Error> {
        if !self.caps.scoped_replay || u32::from(asid) >= self.caps.asids {
            return self.replay();
        }
        let mut replays = lock(&self.replays);
        // Read before the write, for the reason given in `replay`.
        let put = self.bar().read32(regs::FAULT_BUF_PUT);
        let written = self.bar().write32(
            regs::FAULT_REPLAY,
            regs::replay::ASID_SCOPED | u32::from(asid),
        );
        replays.count += 1;
        let at = replays.count;
        replays
            .scoped
            .insert(asid, (at, put.as_ref().ok().copied()));
        written?;
        put?;
        Ok(())
    }

    /// Replays issued since bring-up (the count [`Drain::replays`] reports).
    pub fn replays(&self) -> u64 {
        lock(&self.replays).count
    }

    /// Fail work item `work_id` with `code`, if no replay has come since the drain that showed
    /// it stalled (`replays`, from [`Drain::replays`]), with a record not marked `replayed`:
    /// such an item is still stalled, so the device accepts the cancel. Writes nothing if a
    /// replay came since: the item has been retried and, if it still cannot go on, has faulted
    /// again with a new record.
    ///
    /// The device says a driver racing its own replays must expect a refusal anyway (§8): a
    /// record posted in the moment between the replay's look at the ring and the replay itself
    /// is not marked, and if its item is running at the cancel the device refuses it and
    /// latches `BAD_REGISTER_VALUE` at `FAULT_CANCEL`. That refusal is read back here, cleared
    /// and reported as [`CancelOutcome::Refused`] instead of surfacing as a device error (the
    /// item faults again if it still cannot go on). Another error already latched is left.
    pub fn cancel_stalled(
        &self,
        work_id: u32,
        asid: u16,
        code: u32,
        replays: u64,
    ) -> Result<CancelOutcome, Error> {
        let current = lock(&self.replays);
        if current.retried_since(asid, replays) {
            return Ok(CancelOutcome::Replayed);
        }
        self.cancel(work_id, code)?;
        let bar = self.bar();
        if bar.read32(regs::ERROR_CODE)? == regs::ErrorCode::BadRegisterValue as u32
            && bar.read64(regs::ERROR_INFO)? == regs::FAULT_CANCEL
        {
            bar.write32(regs::ERROR_CODE, 0)?;
            return Ok(CancelOutcome::Refused);
        }
        Ok(CancelOutcome::Cancelled)
    }

    /// Fail the stalled work item `work_id` with `code`. The device refuses (and latches
    /// `BAD_REGISTER_VALUE`) if the item is not stalled: prefer [`Device::cancel_stalled`].
    pub fn cancel(&self, work_id: u32, code: u32) -> Result<(), Error> {
        self.bar().write64(
            regs::FAULT_CANCEL,
            (u64::from(code) << 32) | u64::from(work_id),
        )?;
        Ok(())
    }

    /// Acknowledge interrupt status bits (write 1 to clear) so the vectors can fire again.
    pub fn ack_interrupts(&self, bits: u32) -> Result<(), Error> {
        self.bar().write32(regs::INTR_STATUS, bits)?;
        Ok(())
    }

    /// Read and clear the device's error register: `(code, info)` if one was latched.
    pub fn take_error(&self) -> Result<Option<(u32, u64)>, Error> {
        let bar = self.bar();
        let code = bar.read32(regs::ERROR_CODE)?;
        if code == 0 {
            return Ok(None);
        }
        let info = bar.read64(regs::ERROR_INFO)?;
        bar.write32(regs::ERROR_CODE, 0)?;
        Ok(Some((code, info)))
    }

    /// Stop the engine and disconnect interrupts; used on drop.
    fn shut_down(&self) -> Result<(), BackendError> {
        let bar = self.bar();
        bar.write32(regs::CONTROL, 0)?;
        self.backend().reset()?;
        self.backend().set_irqs(Vec::new())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(lost) = self.lost() {
            // Nothing to stop or unmap on a device that is gone (every call would fail): the
            // rings and page-table memory are freed with this struct.
            tracing::info!(%lost, "device lost: its rings and page-table memory freed on the host side only");
            return;
        }
        // Reset first so nothing the device does can touch the rings we are about to free.
        if let Err(e) = self.shut_down() {
            tracing::warn!(error = %e, "device shutdown failed");
        }
        if let Err(e) = lock(&self.tables).destroy(&self.dma) {
            tracing::warn!(error = %e, "unmapping page-table memory failed");
        }
        let rings = {
            let q = lock(&self.cmdq);
            let f = lock(&self.faults);
            [
                (q.ring.iova, q.ring.buffer.len()),
                (q.completions.iova, q.completions.buffer.len()),
                (f.ring.iova, f.ring.buffer.len()),
            ]
        };
        for (base, len) in rings {
            if let Err(e) = self.dma.unmap(base, len as u64) {
                tracing::warn!(error = %e, "unmapping a ring failed");
            }
        }
    }
}

/// Busy-poll backoff, for a caller polling device state (a completion, a fence) as the driver
/// itself does: spin briefly, then yield, then sleep in growing steps up to 1 ms. `spins` counts
/// the calls of one wait; start it at 0.
pub fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    match *spins {
        0..=64 => std::hint::spin_loop(),
        65..=256 => std::thread::yield_now(),
        n => std::thread::sleep(Duration::from_micros(u64::from((n - 256).min(1000)))),
    }
}

/// A test backend: the emulated device with knobs for what revision-2 tests need before (or
/// besides) the emulator offering it, and a record of what the driver did.
#[cfg(all(test, feature = "emulator"))]
pub(crate) mod testing {
    use super::*;
    use crate::backend::emulated::EmulatedBackend;
    use firmware_stubs::AcceleratorConfig;

    /// What the test sets and what the backend saw.
    #[derive(Debug, Default)]
    pub(crate) struct Knobs {
        /// CAP_FEATURES to report instead of the device's. While set, PT_CTRL is served here
        /// and LEAF_ONLY is stripped from TLBI_SCOPE before it reaches the device (so a device
        /// without the features runs what a driver asks of one with them).
        pub(crate) features: Option<u32>,
        /// VERSION to report instead of the device's.
        pub(crate) version: Option<u32>,
        /// PT_CTRL as the driver wrote it (while `features` is set).
        pub(crate) pt_ctrl: u32,
        /// Every TLBI_SCOPE value the driver wrote, as written.
        pub(crate) scopes: Vec<u32>,
        /// Drop TLBI_TRIGGER and TLBIQ_TAIL writes: the device never confirms an invalidation.
        pub(crate) swallow_tlbi: bool,
        /// Every DMA mapping made: (length, access).
        pub(crate) maps: Vec<(u64, DmaAccess)>,
    }

    pub(crate) struct Interposed {
        inner: EmulatedBackend,
        knobs: Arc<Mutex<Knobs>>,
    }

    impl Interposed {
        /// The emulated device (one worker) behind knobs preset with `features`.
        pub(crate) fn backend(features: Option<u32>) -> (Box<dyn Backend>, Arc<Mutex<Knobs>>) {
            let inner = EmulatedBackend::new(AcceleratorConfig {
                workers: 1,
                ..Default::default()
            })
            .expect("emulator");
            let knobs = Arc::new(Mutex::new(Knobs {
                features,
                ..Default::default()
            }));
            let b = Interposed {
                inner,
                knobs: knobs.clone(),
            };
            (Box::new(b), knobs)
        }
    }

    impl Backend for Interposed {
        fn kind(&self) -> crate::backend::BackendKind {
            self.inner.kind()
        }
        fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
            self.inner.config_read(offset, data)
        }
        fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
            self.inner.config_write(offset, data)
        }
        fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
            let k = lock(&self.knobs);
            if let (0, regs::VERSION, Some(version)) = (bar, offset, k.version) {
                data.copy_from_slice(&version.to_le_bytes());
                return Ok(());
            }
            if let (0, Some(features)) = (bar, k.features) {
                match offset {
                    regs::CAP_FEATURES => {
                        data.copy_from_slice(&features.to_le_bytes());
                        return Ok(());
                    }
                    regs::PT_CTRL => {
                        data.copy_from_slice(&k.pt_ctrl.to_le_bytes());
                        return Ok(());
                    }
                    _ => {}
                }
            }
            drop(k);
            self.inner.bar_read(bar, offset, data)
        }
        fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
            let mut k = lock(&self.knobs);
            if bar == 0 && offset == regs::TLBI_SCOPE {
                let value = u32::from_le_bytes(data.try_into().expect("32-bit register"));
                k.scopes.push(value);
                if k.features.is_some() {
                    let plain = value & !regs::tlbi_scope::LEAF_ONLY;
                    drop(k);
                    return self.inner.bar_write(bar, offset, &plain.to_le_bytes());
                }
            }
            if bar == 0
                && (offset == regs::TLBI_TRIGGER || offset == regs::TLBIQ_TAIL)
                && k.swallow_tlbi
            {
                return Ok(());
            }
            if bar == 0 && offset == regs::PT_CTRL && k.features.is_some() {
                k.pt_ctrl = u32::from_le_bytes(data.try_into().expect("32-bit register"));
                return Ok(());
            }
            drop(k);
            self.inner.bar_write(bar, offset, data)
        }
        fn iova_ranges(&self) -> Vec<std::ops::Range<u64>> {
            self.inner.iova_ranges()
        }
        unsafe fn dma_map(
            &self,
            iova: u64,
            len: u64,
            source: DmaSource<'_>,
            access: DmaAccess,
        ) -> Result<(), BackendError> {
            lock(&self.knobs).maps.push((len, access));
            // SAFETY: forwarded to our caller.
            unsafe { self.inner.dma_map(iova, len, source, access) }
        }
        fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), BackendError> {
            self.inner.dma_unmap(iova, len)
        }
        fn set_irqs(&self, eventfds: Vec<Option<OwnedFd>>) -> Result<(), BackendError> {
            self.inner.set_irqs(eventfds)
        }
        fn reset(&self) -> Result<(), BackendError> {
            self.inner.reset()
        }
        fn pins_memory(&self) -> bool {
            false
        }
        fn regions(&self) -> Option<Vec<RegionDesc>> {
            self.inner.regions()
        }
        fn irqs(&self) -> Option<Vec<IrqDesc>> {
            self.inner.irqs()
        }
    }
}

#[cfg(all(test, feature = "emulator"))]
mod tests {
    use super::*;
    use crate::backend::emulated::EmulatedBackend;
    use crate::backend::DmaAccess;
    use firmware_stubs::AcceleratorConfig;

    /// Each `set_irqs` call as (vectors in the call, vectors with an eventfd).
    type Calls = Arc<Mutex<Vec<(usize, usize)>>>;

    /// The emulated backend (vfio-pci's MSI rule included), recording each `set_irqs`.
    struct Recording {
        inner: EmulatedBackend,
        calls: Calls,
        refuse_irqs: bool,
        /// Regions and IRQs to report instead of the emulator's.
        layout: Option<(Vec<RegionDesc>, Vec<IrqDesc>)>,
    }

    impl Backend for Recording {
        fn kind(&self) -> crate::backend::BackendKind {
            self.inner.kind()
        }
        fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
            self.inner.config_read(offset, data)
        }
        fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
            self.inner.config_write(offset, data)
        }
        fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
            self.inner.bar_read(bar, offset, data)
        }
        fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
            self.inner.bar_write(bar, offset, data)
        }
        fn iova_ranges(&self) -> Vec<std::ops::Range<u64>> {
            self.inner.iova_ranges()
        }
        unsafe fn dma_map(
            &self,
            iova: u64,
            len: u64,
            source: DmaSource<'_>,
            access: DmaAccess,
        ) -> Result<(), BackendError> {
            // SAFETY: forwarded to our caller.
            unsafe { self.inner.dma_map(iova, len, source, access) }
        }
        fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), BackendError> {
            self.inner.dma_unmap(iova, len)
        }
        fn set_irqs(&self, eventfds: Vec<Option<OwnedFd>>) -> Result<(), BackendError> {
            let set = eventfds.iter().flatten().count();
            lock(&self.calls).push((eventfds.len(), set));
            if self.refuse_irqs && set > 0 {
                return Err(BackendError::Transport {
                    backend: "test",
                    op: "VFIO_DEVICE_SET_IRQS",
                    detail: "the kernel could allocate only 1 of the 3 MSI vectors asked".into(),
                    errno: None,
                });
            }
            self.inner.set_irqs(eventfds)
        }
        fn reset(&self) -> Result<(), BackendError> {
            self.inner.reset()
        }
        fn pins_memory(&self) -> bool {
            false
        }
        fn regions(&self) -> Option<Vec<RegionDesc>> {
            match &self.layout {
                Some((regions, _)) => Some(regions.clone()),
                None => self.inner.regions(),
            }
        }
        fn irqs(&self) -> Option<Vec<IrqDesc>> {
            match &self.layout {
                Some((_, irqs)) => Some(irqs.clone()),
                None => self.inner.irqs(),
            }
        }
    }

    fn recording(refuse_irqs: bool) -> (Box<dyn Backend>, Calls) {
        recording_with(refuse_irqs, None)
    }

    fn recording_with(
        refuse_irqs: bool,
        layout: Option<(Vec<RegionDesc>, Vec<IrqDesc>)>,
    ) -> (Box<dyn Backend>, Calls) {
        let inner = EmulatedBackend::new(AcceleratorConfig {
            workers: 1,
            ..Default::default()
        })
        .unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let b = Recording {
            inner,
            calls: calls.clone(),
            refuse_irqs,
            layout,
        };
        (Box::new(b), calls)
    }

    #[test]
    fn bring_up_connects_every_vector_in_one_set_irqs_and_drop_disables_them() {
        let (b, calls) = recording(false);
        let device = Device::bring_up(b, DeviceOptions::default()).expect("bring-up");
        assert_eq!(
            *lock(&calls),
            vec![(3, 3)],
            "one SET_IRQS with all three vectors"
        );
        drop(device);
        assert_eq!(*lock(&calls), vec![(3, 3), (0, 0)], "then one disable");
    }

    #[test]
    fn an_interrupt_connection_failure_fails_bring_up_with_the_cause() {
        let (b, _) = recording(true);
        let e = Device::bring_up(b, DeviceOptions::default())
            .err()
            .expect("bring-up must fail when the interrupts cannot be connected");
        assert!(
            matches!(
                &e,
                Error::Backend(BackendError::Interrupts { vectors: 3, .. })
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("connecting 3 MSI vectors (fault, completion, error)")
                && text.contains("only 1 of the 3"),
            "{text}"
        );
    }

    fn region(index: u32, size: u64) -> RegionDesc {
        RegionDesc {
            index,
            size,
            read: true,
            write: true,
            mapped: Vec::new(),
        }
    }

    #[test]
    fn a_device_without_bar0_or_msi_is_refused_by_the_driver_naming_what_it_lacks() {
        let config = region(region_index::CONFIG, 0x100);
        let bar0 = region(region_index::BAR0, regs::BAR0_SIZE);
        let intx = IrqDesc {
            index: irq_index::INTX,
            count: 1,
            eventfd: true,
        };
        let msi = IrqDesc {
            index: irq_index::MSI,
            count: 4,
            eventfd: true,
        };
        // The MXA-1's IDs (the emulator's config space), but BAR2 where BAR0 should be.
        let regions = vec![region(2, 0x100), config.clone()];
        let (b, calls) = recording_with(false, Some((regions, vec![intx, msi])));
        let e = Device::bring_up(b, DeviceOptions::default())
            .err()
            .expect("no BAR0");
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "unsupported device: the MXA-1 driver needs BAR0 of 0x4000 bytes, readable and \
             writable; the device has BAR2 (0x100 bytes), config space (0x100 bytes)"
        );
        // A read-only BAR0 is not enough either.
        let read_only = RegionDesc {
            write: false,
            ..bar0.clone()
        };
        let (b, _) = recording_with(false, Some((vec![read_only, config.clone()], vec![msi])));
        let e = Device::bring_up(b, DeviceOptions::default()).err().unwrap();
        assert!(
            e.to_string().contains("BAR0 (0x4000 bytes, read-only)"),
            "{e}"
        );
        // INTx only.
        let (b, _) = recording_with(false, Some((vec![bar0, config], vec![intx])));
        let e = Device::bring_up(b, DeviceOptions::default())
            .err()
            .expect("no MSI");
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("needs MSI with 3 vectors signalled by eventfd")
                && e.to_string().contains("the device has INTx (1 vector(s))"),
            "{e}"
        );
        // Refused before anything was asked of the interrupts.
        assert!(lock(&calls).is_empty());
    }

    use super::testing::Interposed;
    use crate::pagetable::{PageTable, TableMemory};
    use regs::features::{ACCESSED_DIRTY, WALK_CACHE};

    fn interposed(
        features: Option<u32>,
        version: Option<u32>,
        options: DeviceOptions,
    ) -> (Device, Arc<Mutex<super::testing::Knobs>>) {
        let (b, knobs) = Interposed::backend(features);
        lock(&knobs).version = version;
        let device = Device::bring_up(b, options).expect("bring-up");
        (device, knobs)
    }

    /// The access the first table-pool chunk was mapped with (a page table allocates one).
    fn table_pool_access(device: &Device, knobs: &Mutex<super::testing::Knobs>) -> DmaAccess {
        let before = lock(knobs).maps.len();
        let pt = PageTable::new(&mut TableMemory {
            pool: &mut lock(&device.tables),
            dma: device.dma(),
        })
        .expect("page table");
        pt.destroy(&mut lock(&device.tables));
        let maps = &lock(knobs).maps;
        assert_eq!(maps.len(), before + 1, "one chunk mapped");
        assert_eq!(maps[before].0, 64 * 4096);
        maps[before].1
    }

    #[test]
    fn accessed_dirty_is_enabled_when_offered_and_then_the_table_pages_are_device_writable() {
        let (device, knobs) = interposed(
            Some(ACCESSED_DIRTY | WALK_CACHE),
            None,
            DeviceOptions::default(),
        );
        assert!(device.caps().accessed_dirty && device.caps().walk_cache);
        assert!(device.accessed_dirty());
        assert_eq!(lock(&knobs).pt_ctrl, regs::pt_ctrl::AD_ENABLE);
        assert_eq!(table_pool_access(&device, &knobs), DmaAccess::READ_WRITE);

        // Declined by the options: not enabled, tables read-only.
        let (device, knobs) = interposed(
            Some(ACCESSED_DIRTY),
            None,
            DeviceOptions {
                accessed_dirty: false,
                ..Default::default()
            },
        );
        assert!(device.caps().accessed_dirty && !device.accessed_dirty());
        assert_eq!(lock(&knobs).pt_ctrl, 0);
        assert_eq!(table_pool_access(&device, &knobs), DmaAccess::READ_ONLY);

        // Not offered.
        let (device, knobs) = interposed(Some(WALK_CACHE), None, DeviceOptions::default());
        assert!(!device.caps().accessed_dirty && device.caps().walk_cache);
        assert!(!device.accessed_dirty());
        assert_eq!(lock(&knobs).pt_ctrl, 0);
        assert_eq!(table_pool_access(&device, &knobs), DmaAccess::READ_ONLY);
    }

    #[test]
    fn features_are_not_read_on_revision_1_and_undefined_bits_mean_none() {
        // A revision-1 device (VERSION 1.0) has no CAP_FEATURES: whatever the offset reads is
        // not taken for features.
        let (device, knobs) = interposed(
            Some(ACCESSED_DIRTY | WALK_CACHE),
            Some(1 << 16),
            DeviceOptions::default(),
        );
        assert!(!device.caps().accessed_dirty && !device.caps().walk_cache);
        assert_eq!(lock(&knobs).pt_ctrl, 0);
        // All ones (an undecoded register) has undefined bits: no features.
        let (device, _) = interposed(Some(u32::MAX), None, DeviceOptions::default());
        assert!(!device.caps().accessed_dirty && !device.caps().walk_cache);
        assert!(!device.accessed_dirty());
        // The emulator as it is: bring-up works, and aging is on exactly when it offers it.
        let (device, _) = interposed(None, None, DeviceOptions::default());
        assert_eq!(device.accessed_dirty(), device.caps().accessed_dirty);
        assert_eq!(
            device.take_error().unwrap(),
            None,
            "bring-up latched no error"
        );
    }

    #[test]
    fn leaf_only_invalidations_carry_the_bit_only_on_a_device_with_a_walk_cache() {
        let timeout = Duration::from_secs(5);
        let range = Some(0x4000_0000..0x4000_2000);
        let (device, knobs) = interposed(Some(WALK_CACHE), None, DeviceOptions::default());
        device
            .tlb_invalidate_leaves(3, range.clone(), timeout)
            .unwrap();
        device.tlb_invalidate(3, range.clone(), timeout).unwrap();
        device.tlb_invalidate_leaves(3, None, timeout).unwrap();
        device.tlb_invalidate(3, None, timeout).unwrap();
        use regs::TlbiScope::{Asid, Range};
        assert_eq!(
            lock(&knobs).scopes,
            vec![
                Range.encode(true),
                Range.encode(false),
                Asid.encode(true),
                Asid.encode(false)
            ]
        );
        assert_eq!(device.tlbi_counts(), (2, 2));

        let (device, knobs) = interposed(Some(0), None, DeviceOptions::default());
        device
            .tlb_invalidate_leaves(3, range.clone(), timeout)
            .unwrap();
        device.tlb_invalidate_leaves(3, None, timeout).unwrap();
        assert_eq!(
            lock(&knobs).scopes,
            vec![Range.encode(false), Asid.encode(false)]
        );
        assert_eq!(device.tlbi_counts(), (0, 2));

        // The emulator as it is: LEAF_ONLY reaches it only if it has a walk cache, and it
        // accepts what it gets (after the revision-2 emulator, with the bit).
        let (device, knobs) = interposed(None, None, DeviceOptions::default());
        device.tlb_invalidate_leaves(3, range, timeout).unwrap();
        let scope = *lock(&knobs).scopes.last().unwrap();
        assert_eq!(
            scope & regs::tlbi_scope::LEAF_ONLY != 0,
            device.caps().walk_cache
        );
        assert_eq!(device.take_error().unwrap(), None);
    }

    #[test]
    fn the_emulated_backend_describes_what_the_driver_needs() {
        let (b, _) = recording(false);
        let regions = b.regions().unwrap();
        assert!(need_region(&regions, region_index::BAR0, regs::BAR0_SIZE).is_ok());
        assert!(need_msi(&b.irqs().unwrap()).is_ok());
    }
}
