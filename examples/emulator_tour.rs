//! A tour of the emulated MXA-1 accelerator (docs/device.md), playing the driver by hand:
//!
//! 1. power the device on and identify it;
//! 2. give it memory: one region for page tables, rings and records, one for data, both
//!    DMA-mapped (the IOMMU);
//! 3. build a page table for address space 1 that maps only the first page of a 3-page buffer;
//! 4. run a FILL over the whole buffer: it stalls at the second page and posts a fault record;
//! 5. service the faults by installing PTEs, replay, and read the completion.
//!
//! Run it with `cargo run -p examples --example emulator_tour`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use accel_abi::pt::{self, Perms, Pte};
use accel_abi::regs;
use accel_abi::{config, Command, Completion, FaultRecord, PAGE_SIZE};
use firmware_stubs::{Accelerator, AcceleratorConfig, DmaPerms, SharedRegion};

type Error = Box<dyn std::error::Error>;

// Where things live in the control region, and where the regions sit in IOVA space.
const CTRL_IOVA: u64 = 0x10_0000;
const CMDQ: u64 = 0x0000; // 16 commands
const FAULTS: u64 = 0x1000; // 16 fault records
const COMPLETION: u64 = 0x2000; // one completion record
const TABLES: u64 = 0x3000; // four page-table pages, one per level
const DATA_IOVA: u64 = 0x4000_0000;

/// The device VA of the buffer (the address a CPU process would use).
const BUF_VA: u64 = 0x7f12_3450_0000;
const ASID: u16 = 1;

struct Tour {
    dev: Accelerator,
    ctrl: Arc<SharedRegion>,
    data: Arc<SharedRegion>,
    fault_get: u32,
}

impl Tour {
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b);
        u64::from_le_bytes(b)
    }
    fn w32(&self, off: u64, v: u32) {
        self.dev.bar_write(0, off, &v.to_le_bytes());
    }
    fn w64(&self, off: u64, v: u64) {
        self.dev.bar_write(0, off, &v.to_le_bytes());
    }

    /// Install a 4 KiB leaf for `va` (the table path was built once, below).
    fn map_page(&self, va: u64, data_page: u64) -> Result<(), Error> {
        let level1 = TABLES + 3 * PAGE_SIZE;
        let entry = level1 + 8 * pt::index(va, 1) as u64;
        let leaf = Pte::leaf(DATA_IOVA + data_page * PAGE_SIZE, Perms::RW);
        self.ctrl.store_u64(entry, leaf)?;
        println!(
            "   PTE  va {va:#x} -> iova {:#x} (read/write)",
            DATA_IOVA + data_page * PAGE_SIZE
        );
        Ok(())
    }

    /// The next fault record, if the device posted one.
    fn next_fault(&mut self) -> Result<Option<FaultRecord>, Error> {
        let slot = FAULTS + u64::from(self.fault_get % 16) * FaultRecord::SIZE as u64;
        let flags = self
            .ctrl
            .load_u32_acquire(slot + FaultRecord::FLAGS_OFFSET as u64)?;
        if flags & FaultRecord::FLAG_VALID == 0 {
            return Ok(None);
        }
        let mut raw = [0u8; FaultRecord::SIZE];
        self.ctrl.read_bytes(slot, &mut raw)?;
        // Hand the slot back: clear VALID, then advance GET.
        self.ctrl
            .store_u32(slot + FaultRecord::FLAGS_OFFSET as u64, 0)?;
        self.fault_get = self.fault_get.wrapping_add(1);
        self.w32(regs::FAULT_BUF_GET, self.fault_get);
        Ok(FaultRecord::decode(&raw)?)
    }

    fn completion(&self) -> Result<Option<Completion>, Error> {
        let mut raw = [0u8; Completion::SIZE];
        if self
            .ctrl
            .load_u32_acquire(COMPLETION + Completion::DONE_OFFSET as u64)?
            == 0
        {
            return Ok(None);
        }
        self.ctrl.read_bytes(COMPLETION, &mut raw)?;
        Ok(Completion::decode(&raw)?)
    }
}

/// Poll `f` until it yields something, for at most 10 seconds.
fn poll<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>, Error>) -> Result<T, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::yield_now();
    }
}

fn main() -> Result<(), Error> {
    println!("1. Power on and identify");
    let dev = Accelerator::new(AcceleratorConfig::default())?;
    let command = config::command::MEMORY | config::command::BUS_MASTER;
    dev.config_write(config::off::COMMAND as u64, &command.to_le_bytes());
    let ctrl = SharedRegion::anonymous(0x8000)?;
    let data = SharedRegion::anonymous(3 * PAGE_SIZE as usize)?;
    let mut t = Tour {
        dev,
        ctrl,
        data,
        fault_get: 0,
    };
    let id = t.r32(regs::ID).to_le_bytes();
    println!(
        "   ID {:?}, {} address spaces, up to {} fault records",
        String::from_utf8_lossy(&id),
        t.r32(regs::CAP_ASIDS),
        t.r32(regs::CAP_FAULT_ENTRIES)
    );

    println!("2. DMA-map a control region at {CTRL_IOVA:#x} and a 3-page buffer at {DATA_IOVA:#x}");
    t.dev
        .dma_map(CTRL_IOVA, t.ctrl.len() as u64, t.ctrl.clone(), DmaPerms::RW)?;
    t.dev
        .dma_map(DATA_IOVA, t.data.len() as u64, t.data.clone(), DmaPerms::RW)?;
    t.w64(regs::CMDQ_BASE, CTRL_IOVA + CMDQ);
    t.w32(regs::CMDQ_ENTRIES, 16);
    t.w32(regs::CMDQ_CTRL, regs::cmdq_ctrl::ENABLE);
    t.w64(regs::FAULT_BUF_BASE, CTRL_IOVA + FAULTS);
    t.w32(regs::FAULT_BUF_ENTRIES, 16);
    t.w32(regs::FAULT_BUF_CTRL, regs::fault_ctrl::ENABLE);
    t.w32(regs::CONTROL, regs::control::ENABLE);

    println!("3. Page table for ASID {ASID}: levels 4..2 point down, level 1 maps page 0 only");
    for level in (2..=4u32).rev() {
        let table = TABLES + u64::from(4 - level) * PAGE_SIZE;
        let next = TABLES + u64::from(5 - level) * PAGE_SIZE;
        let entry = table + 8 * pt::index(BUF_VA, level) as u64;
        t.ctrl.store_u64(entry, Pte::table(CTRL_IOVA + next))?;
    }
    t.w64(
        regs::asid_root(ASID),
        (CTRL_IOVA + TABLES) | regs::ASID_ROOT_VALID,
    );
    t.map_page(BUF_VA, 0)?;

    println!("4. FILL 3 pages at {BUF_VA:#x} with 0xab");
    let fill = Command::fill(ASID, BUF_VA, 3 * PAGE_SIZE, 0xabab_abab_abab_abab)
        .with_completion(CTRL_IOVA + COMPLETION);
    t.ctrl.write_bytes(CMDQ, &fill.encode())?;
    t.w32(regs::CMDQ_TAIL, 1); // the doorbell: the command above is now visible to the device

    println!("5. Service faults until the command completes");
    let done = poll("the FILL to complete", || {
        if let Some(c) = t.completion()? {
            return Ok(Some(c));
        }
        if let Some(f) = t.next_fault()? {
            println!(
                "   fault: work {} asid {} va {:#x} {:?} {:?} at t={} ns",
                f.work_id, f.asid, f.va, f.access, f.reason, f.timestamp_ns
            );
            let page = (f.va - BUF_VA) / PAGE_SIZE;
            t.map_page(f.va, page)?;
            t.w32(regs::FAULT_REPLAY, 1);
            println!("   replay");
        }
        Ok(None)
    })?;
    println!(
        "   completion: status {:?}, result {}",
        done.status, done.result
    );

    let mut bytes = vec![0u8; t.data.len()];
    t.data.read_bytes(0, &mut bytes)?;
    let filled = bytes.iter().filter(|b| **b == 0xab).count();
    println!(
        "   {filled} of {} buffer bytes hold 0xab; TLB hits {} misses {}",
        bytes.len(),
        t.r64(regs::TLB_HITS),
        t.r64(regs::TLB_MISSES)
    );
    if t.r32(regs::ERROR_CODE) != 0 {
        return Err(format!("device error {:#x}", t.r32(regs::ERROR_CODE)).into());
    }
    Ok(())
}
