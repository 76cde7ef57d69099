//! The device model: register file, command engine, fault buffer, translation and DMA.
//!
//! Locks, in the only order they may be taken:
//! 1. `iommu` (RwLock). Every device memory access holds it for read for the whole
//!    translate-and-touch of one chunk (at most one 4 KiB page of each operand), or for one
//!    record write or command fetch. Writers (dma_unmap, TLB invalidation, reset) therefore wait
//!    until no access that could use an old mapping or translation is in flight.
//! 2. `state` (Mutex): registers and the work bookkeeping. Never held while waiting for
//!    `iommu` for write, so a writer can always drain the readers.
//! 3. `tlb`, `iommu_log`, `irqs`, `config` (leaf mutexes, held briefly). `tlb` also holds the
//!    page-walk cache and the revision-2 counters (see `tlb.rs`), so a TLB miss consults the
//!    walk cache without another lock and a hit never touches it. No DMA access is made while
//!    `tlb` is held: a walk reads (and A/D-updates) entries between two `tlb` sections.
//!
//! `tlbi_serial` serializes TLB invalidations (TLBI_TRIGGER and invalidation-queue doorbells). It
//! is taken with no other lock held, before any of the above, and held across the invalidation's
//! fence (`iommu` for write).
//!
//! Generations: a reset bumps `generation` under `state`, then drains `iommu`. A work item
//! remembers the generation it was fetched in; every chunk checks it after taking the `iommu`
//! read guard, and every bookkeeping update checks it under `state`, so after a reset returns no
//! pre-reset work touches memory or registers again.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use accel_abi::pt::{self, Perms};
use accel_abi::regs::{self, Access, ErrorCode, TlbiScope};
use accel_abi::{
    fnv1a_update, AccessKind, Command, CommandFlags, Completion, FaultReason, FaultRecord, Opcode,
    Status, FNV_OFFSET, PAGE_SIZE, VA_BITS,
};

use crate::config_space::ConfigSpace;
use crate::iommu::{FaultLog, Iommu, IommuFaultEntry, IommuFaultReason, Mapping};
use crate::mmu::{from_root, walk, Walk};
use crate::tlb::{Tlb, TlbiTarget};
use crate::tlbi_queue::{descriptor_target, TlbiQueue};
use crate::walk_cache::TableStep;
use crate::AcceleratorConfig;
use sys_util::sync::{ignore_poison, lock, read, write};

/// Host-side IOMMU log capacity.
pub(crate) const IOMMU_LOG_CAP: usize = 256;
/// Idle workers re-check their conditions this often even without a wake-up, so a lost
/// notification can delay work but never stall it forever.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Looks with `spin_loop` before an idle worker starts yielding the CPU between looks.
const SPIN_HINTS: u32 = 16;
/// Walks one translation may make when its ACCESSED/DIRTY compare-and-swap keeps finding the
/// leaf changed (the driver rewriting it meanwhile). After that many the access stalls as if
/// the page were not present: the fault handler sees it mapped and replays, instead of a
/// worker spinning against a driver that never stops writing the entry.
const AD_WALK_ATTEMPTS: u32 = 16;

/// Register file values (everything the driver can see that is not derived).
#[derive(Default)]
struct Regs {
    control: u32,
    error_code: u32,
    error_info: u64,
    intr_status: u32,
    intr_mask: u32,
    fault_base: u64,
    fault_entries: u32,
    fault_ctrl: u32,
    fault_get: u32,
    fault_put: u32,
    cmdq_base: u64,
    cmdq_entries: u32,
    cmdq_ctrl: u32,
    cmdq_tail: u32,
    work_completed: u32,
    fence_done: u64,
    tlbi_asid: u32,
    tlbi_scope: u32,
    tlbi_va: u64,
    tlbi_size: u64,
    tlbi_done: u32,
    tlbi_count: u32,
    pt_ctrl: u32,
    /// FAULT_LOOKAHEAD_DEPTH (revision 3).
    lookahead_depth: u32,
    /// The invalidation queue's registers (revision 3).
    tlbiq: TlbiQueue,
}

/// A fetched command with its progress (so a stall resumes where it stopped).
struct WorkItem {
    /// Free-running fetch index; the work id is its low 32 bits.
    seq: u64,
    cmd: Command,
    /// Bytes done.
    progress: u64,
    /// CHECKSUM state.
    acc: u64,
    generation: u64,
}

#[derive(Default)]
struct Engine {
    /// Commands fetched since reset (CMDQ_HEAD is the low 32 bits).
    fetched: u64,
    /// A worker is reading a command from the ring.
    fetching: bool,
    /// Replayed items waiting for a worker.
    ready: VecDeque<WorkItem>,
    /// Stalled items by seq.
    stalled: BTreeMap<u64, WorkItem>,
    /// Fetched, non-FENCE items not yet completed.
    outstanding: BTreeSet<u64>,
    /// FENCE commands waiting for earlier work, in order.
    fences: VecDeque<(u64, Command)>,
}

struct State {
    regs: Regs,
    engine: Engine,
    generation: u64,
    reset_at: Instant,
    shutdown: bool,
    /// Workers parked on `work_cv` (only they need a notification).
    parked: u32,
}

impl State {
    /// Power-on state; `lookahead_depth` is CAP_FAULT_LOOKAHEAD.
    fn new(generation: u64, lookahead_depth: u32) -> Self {
        State {
            regs: Regs {
                lookahead_depth,
                ..Regs::default()
            },
            engine: Engine::default(),
            generation,
            reset_at: Instant::now(),
            shutdown: false,
            parked: 0,
        }
    }

    fn head(&self) -> u32 {
        self.engine.fetched as u32
    }

    fn status(&self) -> u32 {
        use regs::status::*;
        let mut s = 0;
        if self.regs.control & regs::control::ENABLE != 0 {
            s |= ENABLED;
        }
        if self.regs.fault_ctrl & regs::fault_ctrl::OVERFLOW != 0 {
            s |= FAULT_OVERFLOW;
        }
        if self.regs.error_code != 0 {
            s |= ERROR;
        }
        let e = &self.engine;
        if !e.outstanding.is_empty() || !e.fences.is_empty() || e.fetching {
            s |= BUSY;
        }
        if !e.stalled.is_empty() || !e.ready.is_empty() {
            s |= STALLED;
        }
        s
    }

    fn can_fetch(&self, bus_master: bool) -> bool {
        bus_master
            && self.regs.control & regs::control::ENABLE != 0
            && self.regs.cmdq_ctrl & regs::cmdq_ctrl::ENABLE != 0
            && self.regs.cmdq_entries != 0
            && !self.engine.fetching
            && self.regs.cmdq_tail != self.head()
    }
}

/// A failed DMA access. `reason` is `None` when bus mastering was off (the request never
/// reached the IOMMU, so it is not in the host log).
#[derive(Debug, Clone, Copy)]
struct DmaFault {
    iova: u64,
    reason: Option<IommuFaultReason>,
}

/// Why a work item cannot continue right now.
enum Stop {
    /// Translation fault: stall (or PAGE_FAULT when the fault buffer is disabled).
    Stall {
        va: u64,
        access: AccessKind,
        reason: FaultReason,
    },
    /// Fatal for the item.
    Fail(Status, u64),
}

enum Step {
    More,
    Done(u64),
    Stop(Stop),
}

/// Things a register write asks for that must run without the state lock.
enum Action {
    None,
    Reset,
    Tlbi {
        target: TlbiTarget,
        leaf_only: bool,
        seq: u32,
    },
    Cancel(WorkItem, u32),
    /// An invalidation-queue doorbell was accepted.
    TlbiQueue,
}

pub(crate) struct Inner {
    cfg: AcceleratorConfig,
    config: Mutex<ConfigSpace>,
    memory_enabled: AtomicBool,
    bus_master: AtomicBool,
    state: Mutex<State>,
    work_cv: Condvar,
    /// Bumped (under `state`) whenever work may have appeared; the spinning worker watches it.
    work_epoch: AtomicU64,
    /// A worker is watching `work_epoch` instead of parking (at most one at a time).
    spinning: AtomicBool,
    iommu: RwLock<Iommu>,
    iommu_log: Mutex<FaultLog>,
    tlb: Mutex<Tlb>,
    /// PT_CTRL.AD_ENABLE, mirrored out of `state` so that translation reads it without a lock.
    ad_enable: AtomicBool,
    tlbi_serial: Mutex<()>,
    roots: Vec<AtomicU64>,
    generation: AtomicU64,
    shutdown: AtomicBool,
    irqs: Mutex<Vec<Option<OwnedFd>>>,
    /// Test knob ([`crate::Accelerator::hold_work`]): while set, every work item pauses before
    /// its next step, as a device whose engine is stuck would.
    held: AtomicBool,
}

/// Device-side view of the IOMMU for one access, borrowing the table from a read guard the
/// caller holds for the whole access.
struct Dma<'a> {
    dev: &'a Inner,
    iommu: &'a Iommu,
    /// The mapping the last successful resolve found, with its first IOVA. A chunk's accesses
    /// mostly land in one mapping (the page tables of a walk, its A/D update), so this skips
    /// the table lookup for them. It cannot go stale: the table does not change while the read
    /// guard `iommu` borrows from is held, and this lives no longer than that borrow.
    last: Cell<Option<(u64, &'a Mapping)>>,
}

impl<'a> Dma<'a> {
    /// Bus mastering gates every DMA request before it reaches the IOMMU.
    fn check(&self, iova: u64) -> Result<(), DmaFault> {
        if !self.dev.bus_master.load(Ordering::Acquire) {
            return Err(DmaFault { iova, reason: None });
        }
        Ok(())
    }

    fn fault(&self, iova: u64, write: bool, reason: IommuFaultReason) -> DmaFault {
        lock(&self.dev.iommu_log).push(IommuFaultEntry {
            iova,
            write,
            time: Instant::now(),
            reason,
        });
        tracing::debug!(iova, write, ?reason, "IOMMU fault");
        DmaFault {
            iova,
            reason: Some(reason),
        }
    }

    /// `Iommu::resolve` through the last-hit mapping: the same mapping, offset and
    /// permission check, since mappings never overlap.
    fn resolve(
        &self,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(&'a Mapping, u64), IommuFaultReason> {
        if let Some((start, m)) = self.last.get() {
            if let Some(offset) = iova.checked_sub(start) {
                if offset.checked_add(len).is_some_and(|end| end <= m.len) {
                    let allowed = if write { m.perms.write } else { m.perms.read };
                    if !allowed {
                        return Err(IommuFaultReason::Permission);
                    }
                    return Ok((m, offset));
                }
            }
        }
        let (m, offset) = self.iommu.resolve(iova, len, write)?;
        self.last.set(Some((iova - offset, m)));
        Ok((m, offset))
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.check(iova)?;
        let (m, off) = self
            .resolve(iova, buf.len() as u64, false)
            .map_err(|r| self.fault(iova, false, r))?;
        m.mem
            .read(off, buf)
            .map_err(|e| self.fault(iova, false, IommuFaultReason::Backing(e)))
    }

    fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaFault> {
        self.check(iova)?;
        let (m, off) = self
            .resolve(iova, buf.len() as u64, true)
            .map_err(|r| self.fault(iova, true, r))?;
        m.mem
            .write(off, buf)
            .map_err(|e| self.fault(iova, true, IommuFaultReason::Backing(e)))
    }

    fn store_u32_release(&self, iova: u64, value: u32) -> Result<(), DmaFault> {
        self.check(iova)?;
        let (m, off) = self
            .resolve(iova, 4, true)
            .map_err(|r| self.fault(iova, true, r))?;
        m.mem
            .store_u32_release(off, value)
            .map_err(|e| self.fault(iova, true, IommuFaultReason::Backing(e)))
    }

    fn atomic_add(&self, iova: u64, value: u64) -> Result<u64, DmaFault> {
        self.check(iova)?;
        // An atomic needs both directions from the IOMMU.
        self.resolve(iova, 8, false)
            .map_err(|r| self.fault(iova, true, r))?;
        let (m, off) = self
            .resolve(iova, 8, true)
            .map_err(|r| self.fault(iova, true, r))?;
        m.mem
            .atomic_add_u64(off, value)
            .map_err(|e| self.fault(iova, true, IommuFaultReason::Backing(e)))
    }

    /// Compare-and-swap the u64 at `iova` (the walker's ACCESSED/DIRTY update). Like an
    /// atomic, it needs both directions from the IOMMU.
    fn compare_exchange(
        &self,
        iova: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, DmaFault> {
        self.check(iova)?;
        self.resolve(iova, 8, false)
            .map_err(|r| self.fault(iova, true, r))?;
        let (m, off) = self
            .resolve(iova, 8, true)
            .map_err(|r| self.fault(iova, true, r))?;
        m.mem
            .compare_exchange_u64(off, current, new)
            .map_err(|e| self.fault(iova, true, IommuFaultReason::Backing(e)))
    }

    fn read_u64(&self, iova: u64) -> Result<u64, DmaFault> {
        let mut b = [0u8; 8];
        self.read(iova, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

fn perms_allow(perms: Perms, access: AccessKind) -> bool {
    match access {
        AccessKind::Read | AccessKind::Prefetch => perms.read,
        AccessKind::Write => perms.write,
        AccessKind::Atomic => perms.read && perms.write,
    }
}

/// Writes the FILL pattern into `chunk`, whose first byte is byte `index` of the destination:
/// byte `i` of the chunk is `fill_byte(pattern, index + i)`. The pattern repeats every 8 bytes,
/// so the chunk is filled with whole copies of it rotated to start at `index % 8` (a copy per
/// 8 bytes instead of a computation per byte).
fn fill_pattern(chunk: &mut [u8], pattern: u64, index: u64) {
    let rotated = pattern.rotate_right(8 * (index % 8) as u32).to_le_bytes();
    let mut words = chunk.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&rotated);
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&rotated[..n]);
}

fn page_remaining(va: u64) -> u64 {
    PAGE_SIZE - (va % PAGE_SIZE)
}

/// True if `[va, va + len)` lies in the translatable VA range.
pub(crate) fn range_canonical(va: u64, len: u64) -> bool {
    va.checked_add(len)
        .is_some_and(|end| end <= 1u64 << VA_BITS)
}

impl Inner {
    pub(crate) fn new(cfg: AcceleratorConfig) -> Self {
        let roots = (0..cfg.asids).map(|_| AtomicU64::new(0)).collect();
        let lookahead_depth = cfg.fault_lookahead;
        Inner {
            tlb: Mutex::new(Tlb::new(cfg.tlb_entries, cfg.walk_cache_entries)),
            ad_enable: AtomicBool::new(false),
            cfg,
            config: Mutex::new(ConfigSpace::new()),
            memory_enabled: AtomicBool::new(false),
            bus_master: AtomicBool::new(false),
            state: Mutex::new(State::new(0, lookahead_depth)),
            work_cv: Condvar::new(),
            work_epoch: AtomicU64::new(0),
            spinning: AtomicBool::new(false),
            iommu: RwLock::new(Iommu::default()),
            iommu_log: Mutex::new(FaultLog::new(IOMMU_LOG_CAP)),
            tlbi_serial: Mutex::new(()),
            roots,
            generation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            irqs: Mutex::new((0..accel_abi::vector::COUNT).map(|_| None).collect()),
            held: AtomicBool::new(false),
        }
    }

    fn dma<'a>(&'a self, iommu: &'a RwLockReadGuard<'a, Iommu>) -> Dma<'a> {
        Dma {
            dev: self,
            iommu,
            last: Cell::new(None),
        }
    }

    pub(crate) fn iommu(&self) -> &RwLock<Iommu> {
        &self.iommu
    }

    pub(crate) fn iommu_log(&self) -> &Mutex<FaultLog> {
        &self.iommu_log
    }

    // ---------------------------------------------------------------- interrupts and errors

    /// Set INTR_STATUS bits; signal every vector whose bit went 0 -> 1 while unmasked.
    fn raise(&self, st: &mut State, bits: u32) {
        let newly = bits & !st.regs.intr_status;
        st.regs.intr_status |= bits;
        self.signal(newly & !st.regs.intr_mask);
    }

    fn signal(&self, vectors: u32) {
        if vectors == 0 || !self.cfg.deliver_msi {
            // With `deliver_msi` off the messages go nowhere (MSI not enabled on the platform).
            return;
        }
        let irqs = lock(&self.irqs);
        for (v, fd) in irqs.iter().enumerate() {
            if vectors & (1 << v) != 0 {
                if let Some(fd) = fd {
                    crate::irq::signal_eventfd(fd);
                }
            }
        }
    }

    pub(crate) fn set_irq(&self, vector: u32, fd: Option<OwnedFd>) {
        if let Some(slot) = lock(&self.irqs).get_mut(vector as usize) {
            *slot = fd;
        }
    }

    /// Record an error: ERROR_CODE keeps the first one; the error vector is raised.
    fn set_error(&self, st: &mut State, code: ErrorCode, info: u64) {
        tracing::debug!(?code, info, "device error");
        if st.regs.error_code == 0 {
            st.regs.error_code = code as u32;
            st.regs.error_info = info;
        }
        self.raise(st, regs::intr::ERROR);
    }

    fn note_dma_fault(&self, st: &mut State, f: DmaFault) {
        if f.reason.is_none() {
            tracing::debug!(iova = f.iova, "DMA attempted with bus mastering off");
        }
        self.set_error(st, ErrorCode::IommuFault, f.iova);
    }

    fn bad_access(&self, offset: u64) {
        let mut st = lock(&self.state);
        self.set_error(&mut st, ErrorCode::BadRegisterAccess, offset);
    }

    // ---------------------------------------------------------------- config space

    pub(crate) fn config_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.config).read(offset, data);
    }

    pub(crate) fn config_write(&self, offset: u64, data: &[u8]) {
        let command = {
            let mut c = lock(&self.config);
            c.write(offset, data);
            c.command()
        };
        use accel_abi::config::command;
        self.memory_enabled
            .store(command & command::MEMORY != 0, Ordering::Release);
        let bm = command & command::BUS_MASTER != 0;
        if !self.bus_master.swap(bm, Ordering::AcqRel) && bm {
            // Fetching may have been waiting for bus mastering.
            let st = lock(&self.state);
            self.kick(&st);
        }
    }

    // ---------------------------------------------------------------- BAR0

    pub(crate) fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if !self.memory_enabled.load(Ordering::Acquire) {
            return;
        }
        let Some(info) = self.check_access(bar, offset, data.len()) else {
            self.bad_access(offset);
            return;
        };
        if info.access == Access::WriteOnly {
            self.bad_access(offset);
            return;
        }
        let value = self.read_register(offset);
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn check_access(&self, bar: u32, offset: u64, len: usize) -> Option<regs::RegInfo> {
        if bar != 0 || offset >= regs::BAR0_SIZE {
            return None;
        }
        let info = regs::describe(offset, self.cfg.asids)?;
        (info.width.bytes() == len).then_some(info)
    }

    fn read_register(&self, offset: u64) -> u64 {
        use regs::*;
        if offset >= ASID_ROOT_BASE {
            let idx = ((offset - ASID_ROOT_BASE) / 8) as usize;
            return self.roots.get(idx).map_or(0, |r| r.load(Ordering::Acquire));
        }
        let (hits, misses, walk_cache_hits, ad_updates) = {
            let t = lock(&self.tlb);
            (t.hits, t.misses, t.walk_cache.hits, t.ad_updates)
        };
        let st = lock(&self.state);
        let r = &st.regs;
        let v: u64 = match offset {
            ID => ID_VALUE.into(),
            VERSION => VERSION_VALUE.into(),
            CAP_ASIDS => self.cfg.asids.into(),
            CAP_PT => cap_pt::encode(accel_abi::PT_LEVELS, VA_BITS).into(),
            CAP_PAGE_SIZES => ((1u32 << 12) | (1u32 << 21)).into(),
            CAP_FAULT_ENTRIES => self.cfg.fault_entries_max.into(),
            CAP_CMDQ_ENTRIES => self.cfg.cmdq_entries_max.into(),
            CAP_VECTORS => accel_abi::vector::COUNT.into(),
            CAP_MAX_TRANSFER => self.cfg.max_transfer.into(),
            CAP_FAULT_LOOKAHEAD => self.cfg.fault_lookahead.into(),
            CAP_FEATURES => self.cfg.features().into(),
            PT_CTRL => r.pt_ctrl.into(),
            CONTROL => r.control.into(),
            STATUS => st.status().into(),
            ERROR_CODE => r.error_code.into(),
            ERROR_INFO => r.error_info,
            INTR_STATUS => r.intr_status.into(),
            INTR_MASK => r.intr_mask.into(),
            FAULT_BUF_BASE => r.fault_base,
            FAULT_BUF_ENTRIES => r.fault_entries.into(),
            FAULT_BUF_CTRL => r.fault_ctrl.into(),
            FAULT_BUF_GET => r.fault_get.into(),
            FAULT_BUF_PUT => r.fault_put.into(),
            CMDQ_BASE => r.cmdq_base,
            CMDQ_ENTRIES => r.cmdq_entries.into(),
            CMDQ_CTRL => r.cmdq_ctrl.into(),
            CMDQ_TAIL => r.cmdq_tail.into(),
            CMDQ_HEAD => st.head().into(),
            WORK_COMPLETED => r.work_completed.into(),
            FENCE_DONE => r.fence_done,
            TLBI_ASID => r.tlbi_asid.into(),
            TLBI_SCOPE => r.tlbi_scope.into(),
            TLBI_VA => r.tlbi_va,
            TLBI_SIZE => r.tlbi_size,
            TLBI_DONE => r.tlbi_done.into(),
            TLB_HITS => hits,
            TLB_MISSES => misses,
            TLBI_COUNT => r.tlbi_count.into(),
            WALK_CACHE_HITS => walk_cache_hits,
            AD_UPDATES => ad_updates,
            // Without their features these read 0 (the registers are never written then).
            FAULT_LOOKAHEAD_DEPTH if self.cfg.lookahead_depth_writable => r.lookahead_depth.into(),
            FAULT_LOOKAHEAD_DEPTH => 0,
            CAP_TLBIQ_ENTRIES => self.cfg.tlbi_queue_entries.into(),
            TLBIQ_BASE => r.tlbiq.base,
            TLBIQ_ENTRIES => r.tlbiq.entries.into(),
            TLBIQ_CTRL => r.tlbiq.ctrl.into(),
            TLBIQ_TAIL => r.tlbiq.tail.into(),
            TLBIQ_HEAD => r.tlbiq.head.into(),
            TLBIQ_PERFORMED => r.tlbiq.performed,
            TLBIQ_FENCES => r.tlbiq.fences,
            _ => u64::MAX,
        };
        v
    }

    pub(crate) fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) {
        if !self.memory_enabled.load(Ordering::Acquire) {
            return;
        }
        let Some(info) = self.check_access(bar, offset, data.len()) else {
            self.bad_access(offset);
            return;
        };
        if info.access == Access::ReadOnly {
            self.bad_access(offset);
            return;
        }
        let mut raw = [0u8; 8];
        raw[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(raw);
        let action = {
            let mut st = lock(&self.state);
            self.write_register(&mut st, offset, value)
        };
        match action {
            Action::None => {}
            Action::Reset => self.reset(),
            Action::Tlbi {
                target,
                leaf_only,
                seq,
            } => self.invalidate_tlb(target, leaf_only, seq),
            Action::TlbiQueue => self.run_tlbi_queue(),
            Action::Cancel(item, code) => {
                let iommu = read(&self.iommu);
                let dma = self.dma(&iommu);
                let mut st = lock(&self.state);
                if st.generation == item.generation {
                    self.complete_locked(&dma, &mut st, &item, Status::Cancelled, code.into());
                }
            }
        }
    }

    fn write_register(&self, st: &mut State, offset: u64, value: u64) -> Action {
        use regs::*;
        let v32 = value as u32;
        let bad_value = |dev: &Self, st: &mut State| {
            dev.set_error(st, ErrorCode::BadRegisterValue, offset);
            Action::None
        };
        if offset >= ASID_ROOT_BASE {
            if value & !(pt::ADDR_MASK | ASID_ROOT_VALID) != 0 {
                return bad_value(self, st);
            }
            let idx = ((offset - ASID_ROOT_BASE) / 8) as usize;
            if let Some(r) = self.roots.get(idx) {
                // The walk cache holds pointers found under the old root; the TLB keeps its
                // leaves (a root write never invalidated the TLB: the driver does that). The
                // drop and the store happen under the TLB lock, where a walk looks the cache up,
                // so no walk pairs the new root with the old root's cached pointers.
                let mut tlb = lock(&self.tlb);
                if let Ok(asid) = u16::try_from(idx) {
                    tlb.walk_cache.invalidate(TlbiTarget::Asid(asid));
                }
                r.store(value, Ordering::Release);
            }
            return Action::None;
        }
        let r = &mut st.regs;
        match offset {
            PT_CTRL => {
                let supported = if self.cfg.accessed_dirty {
                    pt_ctrl::AD_ENABLE
                } else {
                    0
                };
                if v32 & !supported != 0 {
                    return bad_value(self, st);
                }
                st.regs.pt_ctrl = v32;
                self.ad_enable
                    .store(v32 & pt_ctrl::AD_ENABLE != 0, Ordering::Release);
            }
            CONTROL => {
                if v32 & !control::ALL != 0 {
                    return bad_value(self, st);
                }
                r.control = v32;
                self.kick(st);
            }
            RESET => {
                if v32 != RESET_MAGIC {
                    return bad_value(self, st);
                }
                return Action::Reset;
            }
            ERROR_CODE => {
                r.error_code = 0;
                r.error_info = 0;
            }
            INTR_STATUS => {
                if v32 & !intr::ALL != 0 {
                    return bad_value(self, st);
                }
                r.intr_status &= !v32;
            }
            INTR_MASK => {
                if v32 & !intr::ALL != 0 {
                    return bad_value(self, st);
                }
                let unmasked = r.intr_mask & !v32;
                r.intr_mask = v32;
                // A pending status bit that gets unmasked is delivered now.
                let fire = unmasked & r.intr_status;
                self.signal(fire);
            }
            FAULT_BUF_BASE => {
                if !ring_base_ok(r.fault_ctrl & fault_ctrl::ENABLE != 0, value) {
                    return bad_value(self, st);
                }
                r.fault_base = value;
            }
            FAULT_BUF_ENTRIES => {
                let enabled = r.fault_ctrl & fault_ctrl::ENABLE != 0;
                if !ring_entries_ok(enabled, v32, self.cfg.fault_entries_max) {
                    return bad_value(self, st);
                }
                r.fault_entries = v32;
            }
            FAULT_BUF_CTRL => {
                if v32 & !(fault_ctrl::ENABLE | fault_ctrl::OVERFLOW | fault_ctrl::LOOKAHEAD) != 0 {
                    return bad_value(self, st);
                }
                let enabling = v32 & fault_ctrl::ENABLE != 0;
                if enabling && !ring_fits(r.fault_base, r.fault_entries, FaultRecord::SIZE as u64) {
                    return bad_value(self, st);
                }
                let overflow = r.fault_ctrl & fault_ctrl::OVERFLOW & !(v32 & fault_ctrl::OVERFLOW);
                r.fault_ctrl = (v32 & (fault_ctrl::ENABLE | fault_ctrl::LOOKAHEAD)) | overflow;
            }
            FAULT_BUF_GET => {
                // GET may only move forward, up to PUT.
                if v32.wrapping_sub(r.fault_get) > r.fault_put.wrapping_sub(r.fault_get) {
                    return bad_value(self, st);
                }
                r.fault_get = v32;
            }
            FAULT_REPLAY => {
                let stalled = std::mem::take(&mut st.engine.stalled);
                if self.cfg.scoped_replay && v32 & replay::ASID_SCOPED != 0 {
                    let asid = v32 & replay::ASID_MASK;
                    if v32 & !(replay::ASID_SCOPED | replay::ASID_MASK) != 0
                        || asid >= self.cfg.asids
                    {
                        st.engine.stalled = stalled;
                        return bad_value(self, st);
                    }
                    let (retry, keep): (BTreeMap<_, _>, BTreeMap<_, _>) = stalled
                        .into_iter()
                        .partition(|(_, item)| u32::from(item.cmd.asid) == asid);
                    st.engine.stalled = keep;
                    st.engine.ready.extend(retry.into_values());
                } else {
                    st.engine.ready.extend(stalled.into_values());
                }
                self.kick(st);
            }
            FAULT_LOOKAHEAD_DEPTH => {
                if !self.cfg.lookahead_depth_writable {
                    self.set_error(st, ErrorCode::BadRegisterAccess, offset);
                    return Action::None;
                }
                if v32 > self.cfg.fault_lookahead {
                    return bad_value(self, st);
                }
                r.lookahead_depth = v32;
            }
            TLBIQ_BASE | TLBIQ_ENTRIES | TLBIQ_CTRL | TLBIQ_TAIL
                if self.cfg.tlbi_queue_entries == 0 =>
            {
                self.set_error(st, ErrorCode::BadRegisterAccess, offset);
            }
            TLBIQ_BASE => {
                if !ring_base_ok(r.tlbiq.enabled(), value) {
                    return bad_value(self, st);
                }
                r.tlbiq.base = value;
            }
            TLBIQ_ENTRIES => {
                if !ring_entries_ok(r.tlbiq.enabled(), v32, self.cfg.tlbi_queue_entries) {
                    return bad_value(self, st);
                }
                r.tlbiq.entries = v32;
            }
            TLBIQ_CTRL => {
                if v32 & !tlbiq_ctrl::ALL != 0 {
                    return bad_value(self, st);
                }
                let size = accel_abi::TlbiDescriptor::SIZE as u64;
                if v32 & tlbiq_ctrl::ENABLE != 0 && !ring_fits(r.tlbiq.base, r.tlbiq.entries, size)
                {
                    return bad_value(self, st);
                }
                r.tlbiq.set_ctrl(v32);
            }
            TLBIQ_TAIL => {
                if !r.tlbiq.doorbell(v32) {
                    self.set_error(st, ErrorCode::BadDoorbell, value);
                    return Action::None;
                }
                return Action::TlbiQueue;
            }
            FAULT_CANCEL => {
                let work_id = value as u32;
                let code = (value >> 32) as u32;
                let e = &mut st.engine;
                let in_stalled = e.stalled.keys().find(|s| **s as u32 == work_id).copied();
                let item = match in_stalled {
                    Some(seq) => e.stalled.remove(&seq),
                    None => e
                        .ready
                        .iter()
                        .position(|i| i.seq as u32 == work_id)
                        .and_then(|p| e.ready.remove(p)),
                };
                return match item {
                    Some(item) => Action::Cancel(item, code),
                    None => bad_value(self, st),
                };
            }
            CMDQ_BASE => {
                if !ring_base_ok(r.cmdq_ctrl & cmdq_ctrl::ENABLE != 0, value) {
                    return bad_value(self, st);
                }
                r.cmdq_base = value;
            }
            CMDQ_ENTRIES => {
                let enabled = r.cmdq_ctrl & cmdq_ctrl::ENABLE != 0;
                if !ring_entries_ok(enabled, v32, self.cfg.cmdq_entries_max) {
                    return bad_value(self, st);
                }
                r.cmdq_entries = v32;
            }
            CMDQ_CTRL => {
                if v32 & !cmdq_ctrl::ENABLE != 0 {
                    return bad_value(self, st);
                }
                if v32 != 0 && !ring_fits(r.cmdq_base, r.cmdq_entries, Command::SIZE as u64) {
                    return bad_value(self, st);
                }
                r.cmdq_ctrl = v32;
                self.kick(st);
            }
            CMDQ_TAIL => {
                let head = st.engine.fetched as u32;
                let r = &mut st.regs;
                let pending = v32.wrapping_sub(head);
                let old_pending = r.cmdq_tail.wrapping_sub(head);
                if pending > r.cmdq_entries || pending < old_pending {
                    self.set_error(st, ErrorCode::BadDoorbell, value);
                    return Action::None;
                }
                r.cmdq_tail = v32;
                self.kick(st);
            }
            TLBI_ASID => r.tlbi_asid = v32,
            TLBI_SCOPE => {
                if TlbiScope::decode(v32).is_none() {
                    return bad_value(self, st);
                }
                r.tlbi_scope = v32;
            }
            TLBI_VA => r.tlbi_va = value,
            TLBI_SIZE => r.tlbi_size = value,
            TLBI_TRIGGER => {
                let (target, leaf_only) = match self.tlbi_target(&st.regs) {
                    Ok(t) => t,
                    Err(bad_reg) => {
                        self.set_error(st, ErrorCode::BadRegisterValue, bad_reg);
                        return Action::None;
                    }
                };
                return Action::Tlbi {
                    target,
                    leaf_only,
                    seq: v32,
                };
            }
            _ => {
                // Every writable register is handled above; anything else was filtered by
                // `check_access`. Treat a gap here as a bad access rather than trusting it.
                self.set_error(st, ErrorCode::BadRegisterAccess, offset);
            }
        }
        Action::None
    }

    /// Validate the TLBI_* registers: the target and whether LEAF_ONLY is set; on error, the
    /// offset of the offending register.
    fn tlbi_target(&self, r: &Regs) -> Result<(TlbiTarget, bool), u64> {
        let (scope, leaf_only) = TlbiScope::decode(r.tlbi_scope).ok_or(regs::TLBI_SCOPE)?;
        self.tlbi_scope_target(r, scope).map(|t| (t, leaf_only))
    }

    fn tlbi_scope_target(&self, r: &Regs, scope: TlbiScope) -> Result<TlbiTarget, u64> {
        let asid = u16::try_from(r.tlbi_asid)
            .ok()
            .filter(|a| u32::from(*a) < self.cfg.asids);
        match scope {
            TlbiScope::All => Ok(TlbiTarget::All),
            TlbiScope::Asid => asid.map(TlbiTarget::Asid).ok_or(regs::TLBI_ASID),
            TlbiScope::Range => {
                let asid = asid.ok_or(regs::TLBI_ASID)?;
                if r.tlbi_va % PAGE_SIZE != 0 || !range_canonical(r.tlbi_va, 0) {
                    return Err(regs::TLBI_VA);
                }
                if r.tlbi_size == 0
                    || r.tlbi_size % PAGE_SIZE != 0
                    || !range_canonical(r.tlbi_va, r.tlbi_size)
                {
                    return Err(regs::TLBI_SIZE);
                }
                Ok(TlbiTarget::Range {
                    asid,
                    va: r.tlbi_va,
                    size: r.tlbi_size,
                })
            }
        }
    }

    /// Drop the matching TLB entries (and walk-cache entries unless `leaf_only`), wait for
    /// every in-flight access (any of which may be using a dropped translation), then publish
    /// TLBI_DONE.
    fn invalidate_tlb(&self, target: TlbiTarget, leaf_only: bool, seq: u32) {
        let _serial = lock(&self.tlbi_serial);
        let generation = self.generation.load(Ordering::Acquire);
        lock(&self.tlb).invalidate(target, leaf_only);
        drop(write(&self.iommu));
        let mut st = lock(&self.state);
        if st.generation == generation {
            st.regs.tlbi_done = seq;
            st.regs.tlbi_count = st.regs.tlbi_count.wrapping_add(1);
        }
    }

    /// Perform the invalidation queue's pending descriptors (an accepted doorbell): read them
    /// all (a refused read is an IOMMU fault and leaves HEAD where it is), drop what each names
    /// (a malformed one drops everything and is reported), wait once for every in-flight
    /// access, then move HEAD to the TAIL the batch ran to and count it.
    fn run_tlbi_queue(&self) {
        let _serial = lock(&self.tlbi_serial);
        let (batch, generation) = {
            let st = lock(&self.state);
            match st.regs.tlbiq.batch() {
                Some(b) => (b, st.generation),
                // An earlier doorbell's run performed these already.
                None => return,
            }
        };
        let mut raws = Vec::with_capacity(batch.len() as usize);
        let read = {
            let iommu = read(&self.iommu);
            let dma = self.dma(&iommu);
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            (0..batch.len()).try_for_each(|k| {
                let mut raw = [0u8; accel_abi::TlbiDescriptor::SIZE];
                dma.read(batch.slot_iova(batch.head.wrapping_add(k)), &mut raw)?;
                raws.push(raw);
                Ok(())
            })
        };
        if let Err(f) = read {
            let mut st = lock(&self.state);
            if st.generation == generation {
                self.note_dma_fault(&mut st, f);
            }
            return;
        }
        let mut malformed = None;
        {
            let mut tlb = lock(&self.tlb);
            for (k, raw) in raws.iter().enumerate() {
                match descriptor_target(raw, self.cfg.asids) {
                    Some((target, leaf_only)) => {
                        tlb.invalidate(target, leaf_only);
                    }
                    None => {
                        let index = batch.head.wrapping_add(k as u32);
                        tracing::debug!(index, "malformed invalidation-queue descriptor");
                        malformed.get_or_insert(index);
                        tlb.invalidate(TlbiTarget::All, false);
                    }
                }
            }
        }
        // The one fence for the whole batch.
        drop(write(&self.iommu));
        let mut st = lock(&self.state);
        if st.generation != generation {
            return;
        }
        if let Some(index) = malformed {
            self.set_error(&mut st, ErrorCode::BadTlbiDescriptor, index.into());
        }
        st.regs.tlbiq.complete(&batch);
    }

    /// Return to the power-on state (DMA mappings and interrupt routing are host state and
    /// stay).
    pub(crate) fn reset(&self) {
        {
            let mut st = lock(&self.state);
            let generation = st.generation + 1;
            let (shutdown, parked) = (st.shutdown, st.parked);
            *st = State::new(generation, self.cfg.fault_lookahead);
            st.shutdown = shutdown;
            st.parked = parked;
            self.generation.store(generation, Ordering::Release);
            self.ad_enable.store(false, Ordering::Release);
            for r in &self.roots {
                r.store(0, Ordering::Release);
            }
        }
        lock(&self.tlb).reset();
        // Wait out accesses of pre-reset work that are in flight right now; later ones see the
        // new generation and stop.
        drop(write(&self.iommu));
        let _st = lock(&self.state);
        self.kick_all();
    }

    pub(crate) fn stop(&self) {
        self.shutdown.store(true, Ordering::Release);
        let mut st = lock(&self.state);
        st.shutdown = true;
        self.kick_all();
    }

    // ---------------------------------------------------------------- command engine

    /// Work may have appeared (the caller holds `state` and has changed it): the spinning
    /// worker sees the epoch move; a parked one is woken only if nobody is spinning. A spinner
    /// always re-checks under `state` before it parks, so skipping the notification cannot lose
    /// the work; a spinner takes one job and kicks again if more is left.
    fn kick(&self, st: &State) {
        self.work_epoch.fetch_add(1, Ordering::SeqCst);
        if st.parked > 0 && !self.spinning.load(Ordering::SeqCst) && self.has_work(st) {
            self.work_cv.notify_one();
        }
    }

    /// An idle worker would find a job.
    fn has_work(&self, st: &State) -> bool {
        !st.engine.ready.is_empty() || st.can_fetch(self.bus_master.load(Ordering::Acquire))
    }

    /// Every worker must look (shutdown, reset).
    fn kick_all(&self) {
        self.work_epoch.fetch_add(1, Ordering::SeqCst);
        self.work_cv.notify_all();
    }

    /// The next job for an idle worker, if any: a replayed item (`Some`) or the right to fetch
    /// (`None`). The outer `None` means shut down.
    fn next_job<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> Option<(MutexGuard<'a, State>, Option<WorkItem>)> {
        let spin = Duration::from_micros(self.cfg.idle_spin_us.into());
        let mut spin_deadline: Option<Instant> = None;
        loop {
            if st.shutdown {
                return None;
            }
            if let Some(item) = st.engine.ready.pop_front() {
                // More left: another worker may take it.
                self.kick(&st);
                return Some((st, Some(item)));
            }
            if st.can_fetch(self.bus_master.load(Ordering::Acquire)) {
                return Some((st, None));
            }
            let deadline = *spin_deadline.get_or_insert_with(|| Instant::now() + spin);
            if !spin.is_zero()
                && Instant::now() < deadline
                && self
                    .spinning
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                // Read under `state`: any change made after this bumps the epoch.
                let epoch = self.work_epoch.load(Ordering::SeqCst);
                drop(st);
                self.watch(epoch, deadline);
                self.spinning.store(false, Ordering::SeqCst);
                st = lock(&self.state);
                continue;
            }
            st.parked += 1;
            st = ignore_poison(self.work_cv.wait_timeout(st, IDLE_POLL)).0;
            st.parked -= 1;
        }
    }

    /// Watch `work_epoch` until it moves, shutdown, or `deadline`: `spin_loop` first, then
    /// yield the CPU between looks (on a shared core the thread that will produce the work
    /// needs it).
    fn watch(&self, epoch: u64, deadline: Instant) {
        let mut looks = 0u32;
        while self.work_epoch.load(Ordering::SeqCst) == epoch
            && !self.shutdown.load(Ordering::Acquire)
        {
            looks = looks.wrapping_add(1);
            if looks < SPIN_HINTS {
                std::hint::spin_loop();
                continue;
            }
            if Instant::now() >= deadline {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Body of a worker thread.
    pub(crate) fn worker_loop(&self) {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        loop {
            let Some((mut st, job)) = self.next_job(lock(&self.state)) else {
                return;
            };
            match job {
                Some(item) => {
                    drop(st);
                    self.run_item(item, &mut buf);
                }
                None => {
                    st.engine.fetching = true;
                    let fetch = (
                        st.engine.fetched,
                        st.regs.cmdq_base,
                        st.regs.cmdq_entries,
                        st.generation,
                    );
                    drop(st);
                    if let Some(item) = self.fetch(fetch.0, fetch.1, fetch.2, fetch.3) {
                        self.run_item(item, &mut buf);
                    }
                }
            }
        }
    }

    /// Read and decode command `seq`; returns a work item to run, after handling commands that
    /// complete at once (decode errors, FENCE).
    fn fetch(&self, seq: u64, base: u64, entries: u32, generation: u64) -> Option<WorkItem> {
        let slot = seq % u64::from(entries.max(1));
        let iova = base.wrapping_add(slot * Command::SIZE as u64);
        let iommu = read(&self.iommu);
        let dma = self.dma(&iommu);
        let mut raw = [0u8; Command::SIZE];
        let fetched = if self.generation.load(Ordering::Acquire) == generation {
            dma.read(iova, &mut raw)
        } else {
            Err(DmaFault { iova, reason: None })
        };
        let mut st = lock(&self.state);
        if st.generation != generation {
            return None;
        }
        st.engine.fetching = false;
        st.engine.fetched += 1;
        // Another worker may fetch the next command now.
        self.kick(&st);
        if let Err(f) = fetched {
            // Nothing to complete: the command itself could not be read.
            self.note_dma_fault(&mut st, f);
            st.regs.work_completed = st.regs.work_completed.wrapping_add(1);
            return None;
        }
        let work_id = seq as u32;
        let cmd = match Command::decode(&raw) {
            Ok(cmd) => cmd,
            Err(e) => {
                tracing::debug!(work_id, %e, "bad command");
                self.set_error(&mut st, ErrorCode::BadCommand, work_id.into());
                // Honour the completion address and IRQ flag if they are usable at all.
                let completion = u64::from_le_bytes(raw[40..48].try_into().unwrap_or([0; 8]));
                let completion = if completion % 16 == 0 { completion } else { 0 };
                let irq = raw[1] & CommandFlags::IRQ != 0;
                self.finish_locked(&dma, &mut st, seq, completion, irq, Status::BadCommand, 0);
                return None;
            }
        };
        let item = WorkItem {
            seq,
            cmd,
            progress: 0,
            acc: FNV_OFFSET,
            generation,
        };
        if cmd.opcode == Opcode::Fence {
            st.engine.fences.push_back((seq, cmd));
            self.retire_fences(&dma, &mut st);
            return None;
        }
        st.engine.outstanding.insert(seq);
        if let Err((status, result)) = self.validate(&cmd) {
            if status == Status::BadCommand {
                self.set_error(&mut st, ErrorCode::BadCommand, work_id.into());
            }
            self.complete_locked(&dma, &mut st, &item, status, result);
            return None;
        }
        Some(item)
    }

    /// Device-limit checks that decoding cannot do.
    fn validate(&self, cmd: &Command) -> Result<(), (Status, u64)> {
        let uses_len = !matches!(cmd.opcode, Opcode::AtomicAdd | Opcode::Fence);
        if uses_len && cmd.len > u64::from(self.cfg.max_transfer) {
            return Err((Status::BadCommand, 0));
        }
        if u32::from(cmd.asid) >= self.cfg.asids {
            return Err((Status::BadAsid, cmd.asid.into()));
        }
        let operands: &[(u64, u64)] = match cmd.opcode {
            Opcode::Copy => &[(cmd.src, cmd.len), (cmd.dst, cmd.len)],
            Opcode::Fill => &[(cmd.dst, cmd.len)],
            Opcode::AtomicAdd => &[(cmd.dst, 8)],
            Opcode::Checksum | Opcode::Prefetch => &[(cmd.src, cmd.len)],
            Opcode::Fence => &[],
        };
        for &(va, len) in operands {
            if !range_canonical(va, len) {
                return Err((Status::NonCanonical, va));
            }
        }
        Ok(())
    }

    /// Hold (or let go of) every work item before its next step (the test knob).
    pub(crate) fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::Release);
    }

    /// Waits while work is held. Called between steps with no lock or IOMMU guard held, so TLB
    /// invalidations, DMA unmaps and cancels go on meanwhile, as they do beside a slow engine.
    fn pause_while_held(&self) {
        while self.held.load(Ordering::Acquire) && !self.shutdown.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn run_item(&self, mut item: WorkItem, buf: &mut [u8]) {
        loop {
            self.pause_while_held();
            let iommu = read(&self.iommu);
            let dma = self.dma(&iommu);
            if self.generation.load(Ordering::Acquire) != item.generation
                || self.shutdown.load(Ordering::Acquire)
            {
                return;
            }
            match self.step(&dma, &mut item, buf) {
                Step::More => continue,
                Step::Done(result) => {
                    self.complete(&dma, &item, Status::Ok, result);
                    return;
                }
                Step::Stop(Stop::Fail(status, result)) => {
                    self.complete(&dma, &item, status, result);
                    return;
                }
                Step::Stop(Stop::Stall { va, access, reason }) => {
                    let ahead = self.lookahead(&dma, &item, va);
                    self.stall(&dma, item, va, access, reason, &ahead);
                    return;
                }
            }
        }
    }

    /// One chunk of work: at most one page of each operand.
    fn step(&self, dma: &Dma<'_>, item: &mut WorkItem, buf: &mut [u8]) -> Step {
        let cmd = item.cmd;
        let asid = cmd.asid;
        let remaining = cmd.len.saturating_sub(item.progress);
        let result = match cmd.opcode {
            Opcode::Fill => {
                let va = cmd.dst + item.progress;
                let n = remaining.min(page_remaining(va));
                let chunk = &mut buf[..n as usize];
                fill_pattern(chunk, cmd.value, item.progress);
                self.translate(dma, asid, va, AccessKind::Write)
                    .and_then(|iova| self.data(dma.write(iova, chunk)))
                    .map(|()| n)
            }
            Opcode::Copy => {
                let src = cmd.src + item.progress;
                let dst = cmd.dst + item.progress;
                let n = remaining.min(page_remaining(src)).min(page_remaining(dst));
                let chunk = &mut buf[..n as usize];
                self.translate(dma, asid, src, AccessKind::Read)
                    .and_then(|s| {
                        let d = self.translate(dma, asid, dst, AccessKind::Write)?;
                        self.data(dma.read(s, chunk))?;
                        self.data(dma.write(d, chunk))
                    })
                    .map(|()| n)
            }
            Opcode::Checksum => {
                let va = cmd.src + item.progress;
                let n = remaining.min(page_remaining(va));
                let chunk = &mut buf[..n as usize];
                self.translate(dma, asid, va, AccessKind::Read)
                    .and_then(|iova| self.data(dma.read(iova, chunk)))
                    .map(|()| {
                        item.acc = fnv1a_update(item.acc, chunk);
                        n
                    })
            }
            Opcode::Prefetch => {
                let va = cmd.src + item.progress;
                let n = remaining.min(page_remaining(va));
                self.translate(dma, asid, va, AccessKind::Prefetch)
                    .map(|_| n)
            }
            Opcode::AtomicAdd => {
                return match self
                    .translate(dma, asid, cmd.dst, AccessKind::Atomic)
                    .and_then(|iova| self.data(dma.atomic_add(iova, cmd.value)))
                {
                    Ok(old) => Step::Done(old),
                    Err(stop) => Step::Stop(stop),
                };
            }
            // Fences never reach a worker.
            Opcode::Fence => return Step::Done(0),
        };
        match result {
            Ok(n) => {
                item.progress += n;
                if item.progress >= cmd.len {
                    let res = if cmd.opcode == Opcode::Checksum {
                        item.acc
                    } else {
                        0
                    };
                    Step::Done(res)
                } else {
                    Step::More
                }
            }
            Err(stop) => Step::Stop(stop),
        }
    }

    /// Turn a failed data access into the item's IOMMU_FAULT (and ERROR_CODE).
    fn data<T>(&self, r: Result<T, DmaFault>) -> Result<T, Stop> {
        r.map_err(|f| {
            let mut st = lock(&self.state);
            self.note_dma_fault(&mut st, f);
            Stop::Fail(Status::IommuFault, f.iova)
        })
    }

    /// The root register of `asid`, if valid; else the item fails with `BAD_ASID`.
    fn valid_root(&self, asid: u16) -> Result<u64, Stop> {
        let root = self
            .roots
            .get(usize::from(asid))
            .map_or(0, |r| r.load(Ordering::Acquire));
        if root & regs::ASID_ROOT_VALID == 0 {
            return Err(Stop::Fail(Status::BadAsid, asid.into()));
        }
        Ok(root)
    }

    /// Translate `va` of `asid` for `access`: TLB first, then a page walk (from the deepest
    /// walk-cache entry covering `va`, else the root), with the ACCESSED/DIRTY update when
    /// PT_CTRL.AD_ENABLE is set.
    fn translate(
        &self,
        dma: &Dma<'_>,
        asid: u16,
        va: u64,
        access: AccessKind,
    ) -> Result<u64, Stop> {
        let writes = matches!(access, AccessKind::Write | AccessKind::Atomic);
        let (walk_seq, cache_seq, cached) = {
            let mut tlb = lock(&self.tlb);
            if let Some(e) = tlb.lookup(asid, va) {
                // A write through a translation cached without DIRTY re-walks to set it (only
                // A/D maintenance needs that, so AD_ENABLE is read on that path alone).
                if perms_allow(e.perms, access)
                    && (e.dirty || !writes || !self.ad_enable.load(Ordering::Acquire))
                {
                    tlb.hits += 1;
                    return Ok(e.iova_of(va));
                }
                // Permission upgrades need no invalidation: a hit without the permission
                // re-walks.
                tlb.remove(asid, &e);
            }
            tlb.misses += 1;
            let cached = tlb.walk_cache.lookup(asid, va);
            (tlb.seq(), tlb.walk_cache.seq(), cached)
        };
        let root = self.valid_root(asid)?;
        let mut start = cached.unwrap_or_else(|| from_root(root & pt::ADDR_MASK));
        let ad = self.ad_enable.load(Ordering::Acquire);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let mut read_fault = None;
            let mut steps = [TableStep {
                level: 0,
                next_table: 0,
            }; 3];
            let mut n_steps = 0usize;
            let outcome = walk(
                start,
                va,
                |iova| match dma.read_u64(iova) {
                    Ok(v) => Some(v),
                    Err(f) => {
                        read_fault = Some(f);
                        None
                    }
                },
                |step| {
                    if let Some(slot) = steps.get_mut(n_steps) {
                        *slot = step;
                        n_steps += 1;
                    }
                },
            );
            let steps = &steps[..n_steps];
            let stall = |reason| Stop::Stall { va, access, reason };
            return match outcome {
                Walk::Leaf {
                    mut entry,
                    pte_iova,
                    raw,
                } if perms_allow(entry.perms, access) => {
                    let mut updated = false;
                    let want = raw | pt::ACCESSED | if writes { pt::DIRTY } else { 0 };
                    if ad && want != raw {
                        // Against the value the walk read: a leaf the driver cleared or
                        // replaced meanwhile never gets bits ORed into it; walk again instead.
                        match self.data(dma.compare_exchange(pte_iova, raw, want))? {
                            Ok(_) => {
                                updated = true;
                                entry.dirty = pt::dirty(want);
                            }
                            Err(actual) if attempts < AD_WALK_ATTEMPTS => {
                                tracing::trace!(pte_iova, raw, actual, "leaf changed, re-walk");
                                // From the top: the root as it is now, not the walk-cache entry
                                // this walk started from (the driver may have repointed tables).
                                start = from_root(self.valid_root(asid)? & pt::ADDR_MASK);
                                continue;
                            }
                            Err(actual) => {
                                tracing::debug!(
                                    va,
                                    pte_iova,
                                    actual,
                                    attempts,
                                    "leaf kept changing under the A/D update \
                                     (AD_WALK_ATTEMPTS): stalling as not present"
                                );
                                return Err(stall(FaultReason::NotPresent));
                            }
                        }
                    }
                    let mut tlb = lock(&self.tlb);
                    tlb.insert(asid, entry, walk_seq);
                    tlb.walk_cache.insert(asid, va, steps, cache_seq);
                    if updated {
                        tlb.ad_updates += 1;
                    }
                    Ok(entry.iova_of(va))
                }
                Walk::Leaf { .. } => {
                    lock(&self.tlb)
                        .walk_cache
                        .insert(asid, va, steps, cache_seq);
                    Err(stall(FaultReason::Permission))
                }
                Walk::NotPresent => {
                    lock(&self.tlb)
                        .walk_cache
                        .insert(asid, va, steps, cache_seq);
                    Err(stall(FaultReason::NotPresent))
                }
                Walk::BadPte { entry_iova } => {
                    let mut st = lock(&self.state);
                    self.set_error(&mut st, ErrorCode::BadPte, entry_iova);
                    Err(Stop::Fail(Status::BadPte, va))
                }
                Walk::ReadFailed { entry_iova } => {
                    let mut st = lock(&self.state);
                    let f = read_fault.unwrap_or(DmaFault {
                        iova: entry_iova,
                        reason: None,
                    });
                    self.note_dma_fault(&mut st, f);
                    Err(Stop::Fail(Status::IommuFault, entry_iova))
                }
                Walk::NonCanonical => Err(Stop::Fail(Status::NonCanonical, va)),
            };
        }
    }

    /// The pages after `stalled_va` in the operand it belongs to (up to FAULT_LOOKAHEAD_DEPTH,
    /// or CAP_FAULT_LOOKAHEAD without that register,
    /// within the command's length) that would fault too, if the driver enabled lookahead.
    /// Stops at the first page that translates or whose walk goes wrong: a lookahead never
    /// latches an error or touches data for a page the item has not reached.
    fn lookahead(
        &self,
        dma: &Dma<'_>,
        item: &WorkItem,
        stalled_va: u64,
    ) -> Vec<(u64, AccessKind, FaultReason)> {
        let (depth, enabled) = {
            let st = lock(&self.state);
            let depth = if self.cfg.lookahead_depth_writable {
                st.regs.lookahead_depth
            } else {
                self.cfg.fault_lookahead
            };
            (
                u64::from(depth),
                st.regs.fault_ctrl & regs::fault_ctrl::LOOKAHEAD != 0,
            )
        };
        if depth == 0 || !enabled {
            return Vec::new();
        }
        let cmd = item.cmd;
        let operands: &[(u64, AccessKind)] = match cmd.opcode {
            Opcode::Fill => &[(cmd.dst, AccessKind::Write)],
            Opcode::Checksum => &[(cmd.src, AccessKind::Read)],
            Opcode::Prefetch => &[(cmd.src, AccessKind::Prefetch)],
            Opcode::Copy => &[(cmd.src, AccessKind::Read), (cmd.dst, AccessKind::Write)],
            Opcode::AtomicAdd | Opcode::Fence => &[],
        };
        let Some(&(start, access)) = operands
            .iter()
            .find(|(start, _)| (*start..start.saturating_add(cmd.len)).contains(&stalled_va))
        else {
            return Vec::new();
        };
        let end = start.saturating_add(cmd.len);
        let first = (stalled_va & !(PAGE_SIZE - 1)) + PAGE_SIZE;
        // The pages ahead up to the first one the TLB already translates (one TLB lock for all
        // of them: the other workers use it too), then a walk each, up to the first that
        // translates.
        let candidates: Vec<u64> = {
            let tlb = lock(&self.tlb);
            (0..depth)
                .map(|k| first + k * PAGE_SIZE)
                .take_while(|&va| va < end)
                .take_while(|&va| {
                    !tlb.lookup(cmd.asid, va)
                        .is_some_and(|e| perms_allow(e.perms, access))
                })
                .collect()
        };
        let root = self
            .roots
            .get(usize::from(cmd.asid))
            .map_or(0, |r| r.load(Ordering::Acquire));
        if root & regs::ASID_ROOT_VALID == 0 {
            return Vec::new();
        }
        candidates
            .into_iter()
            .map_while(|va| {
                // From the root, through neither cache, and never setting ACCESSED/DIRTY: no
                // access is made through a lookahead translation.
                let outcome = walk(
                    from_root(root & pt::ADDR_MASK),
                    va,
                    |iova| dma.read_u64(iova).ok(),
                    |_| {},
                );
                let reason = match outcome {
                    Walk::Leaf { entry, .. } if perms_allow(entry.perms, access) => None,
                    Walk::Leaf { .. } => Some(FaultReason::Permission),
                    Walk::NotPresent => Some(FaultReason::NotPresent),
                    // Only the access that reaches such a page may report it.
                    Walk::BadPte { .. } | Walk::ReadFailed { .. } | Walk::NonCanonical => None,
                };
                reason.map(|r| (va, access, r))
            })
            .collect()
    }

    /// Post a fault record (and the lookahead records that fit) and park the item, or fail it
    /// if faults cannot be posted.
    fn stall(
        &self,
        dma: &Dma<'_>,
        item: WorkItem,
        va: u64,
        access: AccessKind,
        reason: FaultReason,
        ahead: &[(u64, AccessKind, FaultReason)],
    ) {
        let mut st = lock(&self.state);
        if st.generation != item.generation {
            return;
        }
        let r = &st.regs;
        if r.fault_ctrl & regs::fault_ctrl::ENABLE == 0 {
            self.complete_locked(dma, &mut st, &item, Status::PageFault, va);
            return;
        }
        if r.fault_put.wrapping_sub(r.fault_get) >= r.fault_entries {
            // Full: drop the record, keep the item stalled; the next replay re-faults it.
            st.regs.fault_ctrl |= regs::fault_ctrl::OVERFLOW;
            st.engine.stalled.insert(item.seq, item);
            self.raise(&mut st, regs::intr::FAULT);
            return;
        }
        let timestamp_ns = u64::try_from(st.reset_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let record = |va, access, reason, lookahead| FaultRecord {
            va,
            work_id: item.seq as u32,
            asid: item.cmd.asid,
            access,
            reason,
            timestamp_ns,
            lookahead,
        };
        // Lookahead records are hints: they take free slots only and never overflow.
        let free = st.regs.fault_entries - st.regs.fault_put.wrapping_sub(st.regs.fault_get);
        let records: Vec<FaultRecord> = std::iter::once(record(va, access, reason, false))
            .chain(ahead.iter().map(|&(va, a, r)| record(va, a, r, true)))
            .take(free as usize)
            .collect();
        match Self::post_records(dma, &mut st, &records) {
            Ok(()) => {
                st.engine.stalled.insert(item.seq, item);
                self.raise(&mut st, regs::intr::FAULT);
            }
            Err(f) => {
                self.note_dma_fault(&mut st, f);
                self.complete_locked(dma, &mut st, &item, Status::IommuFault, f.iova);
            }
        }
    }

    /// Write `records` into the fault buffer from PUT on and advance PUT; the caller checked
    /// that the slots are free. Every body goes first, then the flags words from the last
    /// record to the first: a driver consuming in order sees all of one stall's records at
    /// once (the first becomes valid last), so they land in one batch.
    fn post_records(
        dma: &Dma<'_>,
        st: &mut State,
        records: &[FaultRecord],
    ) -> Result<(), DmaFault> {
        let r = &st.regs;
        let slot_iova = |k: usize| {
            let slot = u64::from(r.fault_put.wrapping_add(k as u32) % r.fault_entries);
            r.fault_base + slot * FaultRecord::SIZE as u64
        };
        for (k, record) in records.iter().enumerate() {
            dma.write(slot_iova(k), &record.encode_body())?;
        }
        for (k, record) in records.iter().enumerate().rev() {
            dma.store_u32_release(
                slot_iova(k) + FaultRecord::FLAGS_OFFSET as u64,
                record.flags(),
            )?;
        }
        st.regs.fault_put = st.regs.fault_put.wrapping_add(records.len() as u32);
        Ok(())
    }

    fn complete(&self, dma: &Dma<'_>, item: &WorkItem, status: Status, result: u64) {
        let mut st = lock(&self.state);
        if st.generation == item.generation {
            self.complete_locked(dma, &mut st, item, status, result);
        }
    }

    fn complete_locked(
        &self,
        dma: &Dma<'_>,
        st: &mut State,
        item: &WorkItem,
        status: Status,
        result: u64,
    ) {
        let irq = item.cmd.flags.0 & CommandFlags::IRQ != 0;
        self.finish_locked(dma, st, item.seq, item.cmd.completion, irq, status, result);
        self.retire_fences(dma, st);
    }

    /// Write the completion record (body, then `done` with release), count the command and
    /// raise the completion vector if asked. Callers retire fences afterwards.
    #[allow(clippy::too_many_arguments)]
    fn finish_locked(
        &self,
        dma: &Dma<'_>,
        st: &mut State,
        seq: u64,
        completion: u64,
        irq: bool,
        status: Status,
        result: u64,
    ) {
        if completion != 0 {
            let body = Completion { result, status }.encode_body();
            let written = dma.write(completion, &body).and_then(|()| {
                dma.store_u32_release(completion + Completion::DONE_OFFSET as u64, 1)
            });
            if let Err(f) = written {
                self.note_dma_fault(st, f);
            }
        }
        st.engine.outstanding.remove(&seq);
        st.regs.work_completed = st.regs.work_completed.wrapping_add(1);
        if irq {
            self.raise(st, regs::intr::COMPLETION);
        }
    }

    fn retire_fences(&self, dma: &Dma<'_>, st: &mut State) {
        while let Some(&(seq, cmd)) = st.engine.fences.front() {
            if st.engine.outstanding.range(..seq).next().is_some() {
                return;
            }
            st.engine.fences.pop_front();
            st.regs.fence_done = cmd.value;
            let irq = cmd.flags.0 & CommandFlags::IRQ != 0;
            // FENCE_DONE is set before the fence's own completion record, so a driver that sees
            // the record also sees FENCE_DONE.
            self.finish_locked(dma, st, seq, cmd.completion, irq, Status::Ok, 0);
        }
    }
}

/// Ring geometry may change only while the ring is disabled; bases are page aligned.
fn ring_base_ok(enabled: bool, base: u64) -> bool {
    !enabled && base % PAGE_SIZE == 0
}

fn ring_entries_ok(enabled: bool, entries: u32, max: u32) -> bool {
    !enabled && entries.is_power_of_two() && (2..=max).contains(&entries)
}

fn ring_fits(base: u64, entries: u32, size: u64) -> bool {
    entries != 0 && base % PAGE_SIZE == 0 && base.checked_add(u64::from(entries) * size).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use accel_abi::fill_byte;

    #[test]
    fn fill_pattern_matches_fill_byte_at_every_phase() {
        let pattern = 0x0102_0304_a5b6_c7d8u64;
        for index in [0u64, 1, 5, 7, 8, 4093, 4096 + 3] {
            for len in [0usize, 1, 7, 8, 9, 15, 64, 4095] {
                let mut chunk = vec![0u8; len];
                fill_pattern(&mut chunk, pattern, index);
                let want: Vec<u8> = (0..len as u64)
                    .map(|i| fill_byte(pattern, index + i))
                    .collect();
                assert_eq!(chunk, want, "index {index} len {len}");
            }
        }
    }
}
