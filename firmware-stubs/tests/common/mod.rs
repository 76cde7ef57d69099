//! A tiny test-side "driver" for the emulated MXA-1: it owns a control region (command ring,
//! fault ring, completion records, page tables) and a data region, both `SharedRegion`s that it
//! DMA-maps, and speaks to the device only through config space, BAR0 and memory, the way the
//! real driver does. Test code, not the driver.
#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use accel_abi::pt::{self, Perms, Pte};
use accel_abi::regs;
use accel_abi::{config, Command, Completion, FaultRecord, LARGE_PAGE_SIZE, PAGE_SIZE};
use firmware_stubs::{Accelerator, AcceleratorConfig, DmaMemory, DmaPerms, SharedRegion};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// IOVA of the control region.
pub const CTRL_IOVA: u64 = 0x10_0000;
/// Size of the control region.
pub const CTRL_LEN: u64 = 2 << 20;
/// IOVA of the data region (2 MiB aligned, so it can back a large leaf).
pub const DATA_IOVA: u64 = 0x4000_0000;
/// Size of the data region.
pub const DATA_LEN: u64 = 4 << 20;

/// Control-region layout (offsets).
pub const CMDQ_OFF: u64 = 0;
pub const CMDQ_ENTRIES: u32 = 64;
pub const FAULT_OFF: u64 = 0x1000;
pub const COMPL_OFF: u64 = 0x2000;
pub const COMPL_SLOTS: u64 = 256;
pub const TABLES_OFF: u64 = 0x4000;

/// A device VA that tests use as the start of "their" buffer.
pub const VA: u64 = 0x7f00_0000_0000;

/// Generous bound for anything the device does asynchronously.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestDriver {
    pub dev: Accelerator,
    pub ctrl: Arc<SharedRegion>,
    pub data: Arc<SharedRegion>,
    pub fault_entries: u32,
    next_table: u64,
    tail: u32,
    get: u32,
}

/// A non-blocking eventfd for an interrupt vector, and a dup of it to hand to the device.
pub fn irq_eventfd() -> (EventFd, OwnedFd) {
    let ev = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd");
    let dup = ev.as_fd().try_clone_to_owned().expect("dup");
    (ev, dup)
}

/// Read and reset an eventfd counter (0 if it was not signalled).
pub fn drain(e: &EventFd) -> u64 {
    match e.read() {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(err) => panic!("eventfd read: {err}"),
    }
}

/// Poll `cond` until it holds, failing the test with `what` after [`TIMEOUT`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

impl TestDriver {
    pub fn new() -> Self {
        Self::with(AcceleratorConfig::default(), 32)
    }

    pub fn with(cfg: AcceleratorConfig, fault_entries: u32) -> Self {
        let dev = Accelerator::new(cfg).expect("device");
        let ctrl = SharedRegion::anonymous(CTRL_LEN as usize).expect("ctrl region");
        let data = SharedRegion::anonymous(DATA_LEN as usize).expect("data region");
        dev.dma_map(CTRL_IOVA, CTRL_LEN, ctrl.clone(), DmaPerms::RW)
            .expect("map ctrl");
        dev.dma_map(DATA_IOVA, DATA_LEN, data.clone(), DmaPerms::RW)
            .expect("map data");
        let mut d = TestDriver {
            dev,
            ctrl,
            data,
            fault_entries,
            next_table: TABLES_OFF,
            tail: 0,
            get: 0,
        };
        d.enable_pci();
        d.bring_up();
        d
    }

    pub fn enable_pci(&self) {
        let cmd = config::command::MEMORY | config::command::BUS_MASTER;
        self.dev
            .config_write(config::off::COMMAND as u64, &cmd.to_le_bytes());
    }

    /// Program rings and enable the engine (after power-on or reset).
    pub fn bring_up(&mut self) {
        self.tail = 0;
        self.get = 0;
        self.next_table = TABLES_OFF;
        // Fresh control memory: page tables, rings and records from before are garbage now.
        self.ctrl
            .write_bytes(0, &vec![0u8; CTRL_LEN as usize])
            .expect("clear ctrl");
        self.w64(regs::CMDQ_BASE, CTRL_IOVA + CMDQ_OFF);
        self.w32(regs::CMDQ_ENTRIES, CMDQ_ENTRIES);
        self.w32(regs::CMDQ_CTRL, regs::cmdq_ctrl::ENABLE);
        self.w64(regs::FAULT_BUF_BASE, CTRL_IOVA + FAULT_OFF);
        self.w32(regs::FAULT_BUF_ENTRIES, self.fault_entries);
        self.w32(regs::FAULT_BUF_CTRL, regs::fault_ctrl::ENABLE);
        self.w32(regs::CONTROL, regs::control::ENABLE);
        assert_eq!(self.r32(regs::ERROR_CODE), 0, "bring-up raised an error");
    }

    // ------------------------------------------------------------ registers

    pub fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn r64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b);
        u64::from_le_bytes(b)
    }
    pub fn w32(&self, off: u64, v: u32) {
        self.dev.bar_write(0, off, &v.to_le_bytes());
    }
    pub fn w64(&self, off: u64, v: u64) {
        self.dev.bar_write(0, off, &v.to_le_bytes());
    }

    /// Read and clear ERROR_CODE; returns (code, info).
    pub fn take_error(&self) -> (u32, u64) {
        let e = (self.r32(regs::ERROR_CODE), self.r64(regs::ERROR_INFO));
        self.w32(regs::ERROR_CODE, 0);
        e
    }

    // ------------------------------------------------------------ page tables

    fn alloc_table(&mut self) -> u64 {
        let off = self.next_table;
        assert!(
            off + PAGE_SIZE <= CTRL_LEN,
            "test page-table pool exhausted"
        );
        self.next_table += PAGE_SIZE;
        CTRL_IOVA + off
    }

    fn ctrl_off(iova: u64) -> u64 {
        iova - CTRL_IOVA
    }

    pub fn read_ctrl_u64(&self, iova: u64) -> u64 {
        self.ctrl.load_u64(Self::ctrl_off(iova)).expect("ctrl read")
    }

    pub fn write_ctrl_u64(&self, iova: u64, v: u64) {
        self.ctrl
            .store_u64(Self::ctrl_off(iova), v)
            .expect("ctrl write")
    }

    /// The level-4 table of `asid`, created (and the root register set) on first use.
    pub fn root(&mut self, asid: u16) -> u64 {
        let cur = self.r64(regs::asid_root(asid));
        if cur & regs::ASID_ROOT_VALID != 0 {
            return cur & pt::ADDR_MASK;
        }
        let t = self.alloc_table();
        self.w64(regs::asid_root(asid), t | regs::ASID_ROOT_VALID);
        t
    }

    /// IOVA of the entry for `va` at `level`, creating intermediate tables.
    pub fn entry_iova(&mut self, asid: u16, va: u64, level: u32) -> u64 {
        let mut table = self.root(asid);
        for l in ((level + 1)..=4).rev() {
            let e = table + 8 * pt::index(va, l) as u64;
            let raw = self.read_ctrl_u64(e);
            table = match Pte::decode(raw, l) {
                Ok(Pte::Table { iova }) => iova,
                _ => {
                    let t = self.alloc_table();
                    self.write_ctrl_u64(e, Pte::table(t));
                    t
                }
            };
        }
        table + 8 * pt::index(va, level) as u64
    }

    pub fn map_4k(&mut self, asid: u16, va: u64, iova: u64, perms: Perms) {
        let e = self.entry_iova(asid, va, 1);
        self.write_ctrl_u64(e, Pte::leaf(iova, perms));
    }

    pub fn map_2m(&mut self, asid: u16, va: u64, iova: u64, perms: Perms) {
        let e = self.entry_iova(asid, va, 2);
        self.write_ctrl_u64(e, Pte::leaf(iova, perms));
    }

    /// Map `len` bytes at `va` to the data region at `data_off`, 4 KiB leaves.
    pub fn map_data(&mut self, asid: u16, va: u64, data_off: u64, len: u64, perms: Perms) {
        let mut o = 0;
        while o < len {
            self.map_4k(asid, va + o, DATA_IOVA + data_off + o, perms);
            o += PAGE_SIZE;
        }
    }

    /// DMA-map `mem` at `iova` and point the 4 KiB leaf of `va` (ASID 0, read-write) at it.
    pub fn map_extra(
        &mut self,
        iova: u64,
        mem: Arc<dyn DmaMemory>,
        len: u64,
        perms: DmaPerms,
        va: u64,
    ) {
        self.dev.dma_map(iova, len, mem, perms).expect("dma_map");
        self.map_4k(0, va, iova, Perms::RW);
    }

    /// A four-level table chain for `va` of `asid` in `mem` (four pages from offset 0), mapped
    /// for DMA at `iova` with `perms`, ending in the level-1 entry `leaf`; the root register of
    /// `asid` points at it. Returns the IOVA of the leaf entry.
    pub fn private_tables(
        &self,
        asid: u16,
        mem: Arc<SharedRegion>,
        iova: u64,
        perms: DmaPerms,
        va: u64,
        leaf: u64,
    ) -> u64 {
        for level in (2..=4u32).rev() {
            let table = u64::from(4 - level);
            let entry = table * PAGE_SIZE + 8 * pt::index(va, level) as u64;
            mem.store_u64(entry, Pte::table(iova + (table + 1) * PAGE_SIZE))
                .expect("table write");
        }
        let leaf_off = 3 * PAGE_SIZE + 8 * pt::index(va, 1) as u64;
        mem.store_u64(leaf_off, leaf).expect("leaf write");
        self.dev
            .dma_map(iova, 4 * PAGE_SIZE, mem, perms)
            .expect("map tables");
        self.w64(regs::asid_root(asid), iova | regs::ASID_ROOT_VALID);
        iova + leaf_off
    }

    pub fn set_entry(&mut self, asid: u16, va: u64, level: u32, raw: u64) {
        let e = self.entry_iova(asid, va, level);
        self.write_ctrl_u64(e, raw);
    }

    // ------------------------------------------------------------ TLB invalidation

    fn tlbi(&self, scope: regs::TlbiScope, asid: u16, va: u64, size: u64) {
        self.tlbi_scoped(scope, false, asid, va, size);
    }

    /// An invalidation of `scope`, keeping the walk cache if `leaf_only` (revision 2).
    pub fn tlbi_scoped(
        &self,
        scope: regs::TlbiScope,
        leaf_only: bool,
        asid: u16,
        va: u64,
        size: u64,
    ) {
        let seq = self.r32(regs::TLBI_DONE).wrapping_add(1);
        self.w32(regs::TLBI_ASID, asid.into());
        self.w32(regs::TLBI_SCOPE, scope.encode(leaf_only));
        self.w64(regs::TLBI_VA, va);
        self.w64(regs::TLBI_SIZE, size);
        self.w32(regs::TLBI_TRIGGER, seq);
        // The trigger is synchronous in the emulator.
        assert_eq!(self.r32(regs::TLBI_DONE), seq, "TLBI did not complete");
    }

    pub fn tlbi_range(&self, asid: u16, va: u64, size: u64) {
        self.tlbi(regs::TlbiScope::Range, asid, va, size);
    }
    pub fn tlbi_asid(&self, asid: u16) {
        self.tlbi(regs::TlbiScope::Asid, asid, 0, 0);
    }
    pub fn tlbi_all(&self) {
        self.tlbi(regs::TlbiScope::All, 0, 0, 0);
    }
    /// A range invalidation with LEAF_ONLY: drops leaf translations, keeps walk-cache entries.
    pub fn tlbi_range_leaf_only(&self, asid: u16, va: u64, size: u64) {
        self.tlbi_scoped(regs::TlbiScope::Range, true, asid, va, size);
    }

    // ------------------------------------------------------------ revision 2

    /// Set PT_CTRL.AD_ENABLE (the walker maintains ACCESSED/DIRTY from now on).
    pub fn enable_ad(&self) {
        self.w32(regs::PT_CTRL, regs::pt_ctrl::AD_ENABLE);
        assert_eq!(self.r32(regs::ERROR_CODE), 0, "PT_CTRL refused AD_ENABLE");
    }

    /// The raw level-1 entry of `va` (creating the tables above it if missing).
    pub fn leaf_raw(&mut self, asid: u16, va: u64) -> u64 {
        let e = self.entry_iova(asid, va, 1);
        self.read_ctrl_u64(e)
    }

    /// IOVA of the table page at `level` that holds the entry for `va`.
    pub fn table_iova(&mut self, asid: u16, va: u64, level: u32) -> u64 {
        self.entry_iova(asid, va, level) & !(PAGE_SIZE - 1)
    }

    /// Zero the table page at `iova` (a page the test driver reuses).
    pub fn zero_table(&self, iova: u64) {
        self.ctrl
            .write_bytes(Self::ctrl_off(iova), &[0u8; PAGE_SIZE as usize])
            .expect("zero table");
    }

    /// Every table page allocated so far, as bytes (to check the device never wrote them).
    pub fn tables_snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; (self.next_table - TABLES_OFF) as usize];
        self.ctrl
            .read_bytes(TABLES_OFF, &mut v)
            .expect("tables read");
        v
    }

    /// Checksum `len` bytes at `va` (a read access); panics unless the command succeeds.
    pub fn checksum_ok(&mut self, asid: u16, va: u64, len: u64) -> u64 {
        let c = self.run(Command::checksum(asid, va, len));
        assert_eq!(c.status, accel_abi::Status::Ok, "checksum of {va:#x}");
        c.result
    }

    // ------------------------------------------------------------ commands

    fn compl_iova(work_id: u32) -> u64 {
        CTRL_IOVA + COMPL_OFF + (u64::from(work_id) % COMPL_SLOTS) * Completion::SIZE as u64
    }

    /// Queue raw command bytes and ring the doorbell; returns the work id.
    pub fn submit_raw(&mut self, bytes: &[u8; 64]) -> u32 {
        let work_id = self.tail;
        let slot = u64::from(work_id % CMDQ_ENTRIES);
        self.ctrl
            .write_bytes(CMDQ_OFF + slot * 64, bytes)
            .expect("ring write");
        self.tail = self.tail.wrapping_add(1);
        self.w32(regs::CMDQ_TAIL, self.tail);
        work_id
    }

    /// Queue `cmd` with a completion record in the slot of its work id (unless it names its
    /// own); returns the work id.
    pub fn submit(&mut self, cmd: Command) -> u32 {
        let work_id = self.tail;
        let cmd = if cmd.completion == 0 {
            let c = Self::compl_iova(work_id);
            self.ctrl
                .write_bytes(Self::ctrl_off(c), &[0u8; 16])
                .expect("clear completion");
            cmd.with_completion(c)
        } else {
            cmd
        };
        self.submit_raw(&cmd.encode())
    }

    pub fn try_completion(&self, work_id: u32) -> Option<Completion> {
        let off = Self::ctrl_off(Self::compl_iova(work_id));
        // Acquire on `done` makes the body visible.
        if self
            .ctrl
            .load_u32_acquire(off + Completion::DONE_OFFSET as u64)
            .expect("done word")
            == 0
        {
            return None;
        }
        let mut b = [0u8; 16];
        self.ctrl.read_bytes(off, &mut b).expect("completion read");
        Some(
            Completion::decode(&b)
                .expect("device wrote a well-formed completion")
                .expect("done set"),
        )
    }

    pub fn wait_completion(&self, work_id: u32) -> Completion {
        let start = Instant::now();
        loop {
            if let Some(c) = self.try_completion(work_id) {
                return c;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "timed out waiting for completion of work {work_id}; STATUS={:#x} ERROR={:#x}",
                self.r32(regs::STATUS),
                self.r32(regs::ERROR_CODE)
            );
            std::thread::yield_now();
        }
    }

    /// Wait until no fetched work is outstanding (STATUS.BUSY clear). Bookkeeping after the
    /// completion record (WORK_COMPLETED, interrupts) is done by then.
    pub fn wait_idle(&self) {
        wait_until("STATUS.BUSY to clear", || {
            self.r32(regs::STATUS) & regs::status::BUSY == 0
        });
    }

    /// Submit and wait.
    pub fn run(&mut self, cmd: Command) -> Completion {
        let id = self.submit(cmd);
        self.wait_completion(id)
    }

    // ------------------------------------------------------------ faults

    /// Consume the next fault record, if one is posted.
    pub fn next_fault(&mut self) -> Option<FaultRecord> {
        let slot = u64::from(self.get % self.fault_entries);
        let off = FAULT_OFF + slot * FaultRecord::SIZE as u64;
        let flags = self
            .ctrl
            .load_u32_acquire(off + FaultRecord::FLAGS_OFFSET as u64)
            .expect("flags");
        if flags & FaultRecord::FLAG_VALID == 0 {
            return None;
        }
        let mut b = [0u8; 32];
        self.ctrl.read_bytes(off, &mut b).expect("record");
        let rec = FaultRecord::decode(&b)
            .expect("device wrote a well-formed record")
            .expect("valid");
        self.ctrl
            .store_u32(off + FaultRecord::FLAGS_OFFSET as u64, 0)
            .expect("clear flags");
        self.get = self.get.wrapping_add(1);
        self.w32(regs::FAULT_BUF_GET, self.get);
        Some(rec)
    }

    pub fn wait_fault(&mut self) -> FaultRecord {
        let start = Instant::now();
        loop {
            if let Some(r) = self.next_fault() {
                return r;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "timed out waiting for a fault record"
            );
            std::thread::yield_now();
        }
    }

    /// Wait until `n` work items are stalled (STATUS.STALLED alone cannot count them, so this
    /// uses the fault records' producer index).
    pub fn wait_put(&self, put: u32) {
        wait_until("FAULT_BUF_PUT", || self.r32(regs::FAULT_BUF_PUT) == put);
    }

    pub fn replay(&self) {
        self.w32(regs::FAULT_REPLAY, 1);
    }

    pub fn cancel(&self, work_id: u32, code: u32) {
        self.w64(
            regs::FAULT_CANCEL,
            (u64::from(code) << 32) | u64::from(work_id),
        );
    }

    // ------------------------------------------------------------ data region (host view)

    pub fn data_read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.data.read_bytes(off, &mut v).expect("data read");
        v
    }

    pub fn data_write(&self, off: u64, bytes: &[u8]) {
        self.data.write_bytes(off, bytes).expect("data write");
    }

    pub fn data_u64(&self, off: u64) -> u64 {
        self.data.load_u64(off).expect("data u64")
    }
}

impl Default for TestDriver {
    fn default() -> Self {
        Self::new()
    }
}

/// The CHECKSUM result for `bytes`.
pub fn fnv(bytes: &[u8]) -> u64 {
    accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, bytes)
}

/// `LARGE_PAGE_SIZE` re-exported for brevity in tests.
pub const LARGE: u64 = LARGE_PAGE_SIZE;
