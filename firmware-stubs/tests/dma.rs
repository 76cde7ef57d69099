//! DMA through the IOMMU: mappings, IOMMU faults, bus mastering, the process-memory backend,
//! and how reset interacts with all of it.

mod common;

use std::sync::Arc;

use accel_abi::pt::Perms;
use accel_abi::regs::{self, ErrorCode};
use accel_abi::{config, Command, Status, PAGE_SIZE};
use common::*;
use firmware_stubs::{
    DmaError, DmaMemory, DmaPerms, IommuFaultReason, ProcessMemory, SharedRegion,
};

const HOLE_IOVA: u64 = 0x8000_0000;

#[test]
fn access_to_unmapped_iova_is_an_iommu_fault() {
    let mut d = TestDriver::new();
    // The PTE is fine, but nothing is DMA-mapped at the IOVA it names.
    d.map_4k(0, VA, HOLE_IOVA, Perms::RW);
    let c = d.run(Command::fill(0, VA + 24, 8, 1));
    assert_eq!((c.status, c.result), (Status::IommuFault, HOLE_IOVA + 24));
    assert_eq!(
        d.take_error(),
        (ErrorCode::IommuFault as u32, HOLE_IOVA + 24)
    );
    let log = d.dev.iommu_faults();
    let last = log.last().expect("logged");
    assert_eq!((last.iova, last.write), (HOLE_IOVA + 24, true));
    assert_eq!(last.reason, IommuFaultReason::Unmapped);
    assert_eq!(d.dev.iommu_fault_count(), 1);
}

#[test]
fn iommu_permissions_are_enforced() {
    let mut d = TestDriver::new();
    let ro = SharedRegion::anonymous(PAGE_SIZE as usize).expect("region");
    d.dev
        .dma_map(HOLE_IOVA, PAGE_SIZE, ro.clone(), DmaPerms::R)
        .expect("map");
    d.map_4k(0, VA, HOLE_IOVA, Perms::RW);
    // The device page table allows the write; the IOMMU does not.
    let c = d.run(Command::fill(0, VA, 8, 1));
    assert_eq!(c.status, Status::IommuFault);
    assert_eq!(
        d.dev.iommu_faults().last().map(|e| e.reason),
        Some(IommuFaultReason::Permission)
    );
    // Reading is allowed.
    assert_eq!(d.run(Command::checksum(0, VA, 8)).status, Status::Ok);
}

#[test]
fn page_table_in_unmapped_memory_fails_the_walk() {
    let mut d = TestDriver::new();
    d.w64(regs::asid_root(5), HOLE_IOVA | regs::ASID_ROOT_VALID);
    let c = d.run(Command::fill(5, VA, 8, 1));
    let entry = HOLE_IOVA + 8 * accel_abi::pt::index(VA, 4) as u64;
    assert_eq!((c.status, c.result), (Status::IommuFault, entry));
    assert_eq!(d.take_error(), (ErrorCode::IommuFault as u32, entry));
    assert!(!d.dev.iommu_faults().last().expect("logged").write);
}

#[test]
fn map_and_unmap_follow_type1v2_rules() {
    let d = TestDriver::new();
    let base = d.dev.dma_stats();
    let r = SharedRegion::anonymous(4 * PAGE_SIZE as usize).expect("region");
    let mem: Arc<dyn DmaMemory> = r.clone();
    let at = 0x9000_0000;
    assert!(matches!(
        d.dev.dma_map(at + 1, PAGE_SIZE, mem.clone(), DmaPerms::RW),
        Err(DmaError::BadRange { .. })
    ));
    assert!(matches!(
        d.dev.dma_map(at, 8 * PAGE_SIZE, mem.clone(), DmaPerms::RW),
        Err(DmaError::TooLarge { .. })
    ));
    d.dev
        .dma_map(at, PAGE_SIZE, mem.clone(), DmaPerms::RW)
        .expect("map a");
    d.dev
        .dma_map(at + 2 * PAGE_SIZE, 2 * PAGE_SIZE, mem.clone(), DmaPerms::RW)
        .expect("map b");
    assert!(matches!(
        d.dev
            .dma_map(at + 3 * PAGE_SIZE, PAGE_SIZE, mem.clone(), DmaPerms::RW),
        Err(DmaError::Overlap { .. })
    ));
    assert!(matches!(
        d.dev.dma_map(
            DATA_IOVA + DATA_LEN - PAGE_SIZE,
            2 * PAGE_SIZE,
            mem.clone(),
            DmaPerms::RW
        ),
        Err(DmaError::Overlap { .. })
    ));
    let stats = d.dev.dma_stats();
    assert_eq!(stats.mappings, base.mappings + 2);
    assert_eq!(stats.mapped_bytes, base.mapped_bytes + 3 * PAGE_SIZE);
    // Splitting b is refused and changes nothing.
    assert!(matches!(
        d.dev.dma_unmap(at, 3 * PAGE_SIZE),
        Err(DmaError::WouldSplit { .. })
    ));
    assert_eq!(d.dev.dma_stats(), stats);
    // A range covering both removes both; an empty range removes nothing.
    assert_eq!(d.dev.dma_unmap(at, 4 * PAGE_SIZE), Ok(3 * PAGE_SIZE));
    assert_eq!(d.dev.dma_unmap(at, 4 * PAGE_SIZE), Ok(0));
    assert_eq!(d.dev.dma_stats(), base);
    // A range reaching the top of the address space (QEMU's unmap of a vIOMMU space's upper
    // half) is accepted; one past it wraps and is refused.
    d.dev
        .dma_map(at, PAGE_SIZE, mem.clone(), DmaPerms::RW)
        .expect("map c");
    assert_eq!(d.dev.dma_unmap(1 << 63, 1 << 63), Ok(0));
    assert_eq!(d.dev.dma_unmap(at, 1 << 63), Ok(PAGE_SIZE));
    assert!(matches!(
        d.dev.dma_unmap(1 << 63, (1 << 63) + PAGE_SIZE),
        Err(DmaError::BadRange { .. })
    ));
    assert_eq!(d.dev.dma_stats(), base);
}

#[test]
fn stale_tlb_entry_after_unmap_hits_the_iommu_not_memory() {
    let mut d = TestDriver::new();
    let victim = SharedRegion::anonymous(PAGE_SIZE as usize).expect("region");
    d.map_extra(HOLE_IOVA, victim.clone(), PAGE_SIZE, DmaPerms::RW, VA);
    assert_eq!(d.run(Command::fill(0, VA, 8, 0x11)).status, Status::Ok);
    // The driver "forgets" the TLB invalidation but does unmap: the IOMMU stops the device.
    assert_eq!(d.dev.dma_unmap(HOLE_IOVA, PAGE_SIZE), Ok(PAGE_SIZE));
    let c = d.run(Command::fill(0, VA, 8, 0x22));
    assert_eq!((c.status, c.result), (Status::IommuFault, HOLE_IOVA));
    let mut b = [0u8; 1];
    victim.read_bytes(0, &mut b).expect("read");
    assert_eq!(b, [0x11], "unmapped memory untouched");
}

#[test]
fn process_memory_backend_turns_efault_into_an_iommu_fault() {
    let mut d = TestDriver::new();
    // Host memory reached through process_vm_readv/writev.
    let host = SharedRegion::anonymous(2 * PAGE_SIZE as usize).expect("region");
    let pm = ProcessMemory::current(host.as_ptr() as u64, host.len() as u64);
    d.dev
        .dma_map(HOLE_IOVA, 2 * PAGE_SIZE, Arc::new(pm), DmaPerms::RW)
        .expect("map");
    d.map_4k(0, VA, HOLE_IOVA, Perms::RW);
    assert_eq!(d.run(Command::fill(0, VA, 16, 0x4242)).status, Status::Ok);
    let mut b = [0u8; 2];
    host.read_bytes(0, &mut b).expect("read");
    assert_eq!(b, [0x42, 0x42]);
    assert_eq!(d.run(Command::atomic_add(0, VA, 1)).result, 0x4242);
    // Page 0 of the address space is never mapped: EFAULT, recorded, no SIGSEGV.
    let null = ProcessMemory::current(0, PAGE_SIZE);
    d.dev
        .dma_map(
            HOLE_IOVA + 0x10_0000,
            PAGE_SIZE,
            Arc::new(null),
            DmaPerms::RW,
        )
        .expect("map");
    d.map_4k(0, VA + PAGE_SIZE, HOLE_IOVA + 0x10_0000, Perms::RW);
    let c = d.run(Command::checksum(0, VA + PAGE_SIZE, 64));
    assert_eq!(c.status, Status::IommuFault);
    assert!(matches!(
        d.dev.iommu_faults().last().map(|e| e.reason),
        Some(IommuFaultReason::Backing(_))
    ));
    // The remote constructor reaches the same memory by pid.
    let me = ProcessMemory::remote(std::process::id() as i32, host.as_ptr() as u64, 16);
    let mut word = [0u8; 8];
    me.read(0, &mut word).expect("remote read");
    assert_eq!(u64::from_le_bytes(word), 0x4243);
}

#[test]
fn bus_mastering_gates_all_dma() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    let mem_only = config::command::MEMORY;
    d.dev
        .config_write(config::off::COMMAND as u64, &mem_only.to_le_bytes());
    // No command fetch without bus mastering.
    let id = d.submit(Command::fill(0, VA, 8, 1));
    assert_eq!(d.r32(regs::CMDQ_HEAD), 0);
    d.enable_pci();
    assert_eq!(d.wait_completion(id).status, Status::Ok);

    // A stalled item replayed while bus mastering is off fails its DMA; even its completion
    // record cannot be written, so only the registers tell.
    let id = d.submit(Command::fill(0, VA + PAGE_SIZE, 8, 1));
    d.wait_fault();
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::RW);
    let done = d.r32(regs::WORK_COMPLETED);
    let logged = d.dev.iommu_fault_count();
    d.dev
        .config_write(config::off::COMMAND as u64, &mem_only.to_le_bytes());
    d.replay();
    wait_until("the replayed item to retire", || {
        d.r32(regs::WORK_COMPLETED) == done + 1
    });
    assert_eq!(d.r32(regs::ERROR_CODE), ErrorCode::IommuFault as u32);
    assert!(d.try_completion(id).is_none());
    assert_eq!(d.data_read(PAGE_SIZE, 1), vec![0]);
    assert_eq!(d.dev.iommu_fault_count(), logged, "never reached the IOMMU");
}

#[test]
fn reset_returns_to_power_on_but_keeps_dma_mappings_and_config() {
    for via_register in [false, true] {
        let mut d = TestDriver::new();
        d.map_4k(0, VA, DATA_IOVA, Perms::RW);
        assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
        let stalled = d.submit(Command::fill(0, VA + PAGE_SIZE, 8, 1));
        d.wait_fault();
        let maps = d.dev.dma_stats();
        if via_register {
            d.w32(regs::RESET, regs::RESET_MAGIC);
        } else {
            d.dev.reset();
        }
        for reg in [
            regs::CONTROL,
            regs::STATUS,
            regs::CMDQ_HEAD,
            regs::CMDQ_TAIL,
            regs::CMDQ_CTRL,
            regs::FAULT_BUF_PUT,
            regs::FAULT_BUF_CTRL,
            regs::WORK_COMPLETED,
            regs::ERROR_CODE,
            regs::INTR_STATUS,
            regs::TLBI_COUNT,
        ] {
            assert_eq!(d.r32(reg), 0, "register {reg:#x} after reset");
        }
        assert_eq!(d.r64(regs::asid_root(0)), 0);
        assert_eq!(d.r64(regs::TLB_HITS), 0);
        assert_eq!(d.r64(regs::CMDQ_BASE), 0);
        assert_eq!(d.r32(regs::CAP_ASIDS), 64, "capabilities are constant");
        assert_eq!(d.dev.dma_stats(), maps, "DMA mappings are host state");
        let mut cmd = [0u8; 2];
        d.dev.config_read(config::off::COMMAND as u64, &mut cmd);
        assert_eq!(
            u16::from_le_bytes(cmd),
            config::command::MEMORY | config::command::BUS_MASTER
        );
        // The stalled item is gone: servicing and replaying after bring-up does nothing to it.
        d.bring_up();
        d.map_4k(0, VA, DATA_IOVA, Perms::RW);
        d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::RW);
        d.replay();
        // The TLB was flushed: a retargeted PTE takes effect without invalidation.
        d.map_4k(0, VA, DATA_IOVA + 2 * PAGE_SIZE, Perms::RW);
        let id = d.submit(Command::fill(0, VA, 8, 7));
        assert_eq!(id, 0, "work ids restart at 0");
        assert_eq!(d.wait_completion(id).status, Status::Ok);
        assert_eq!(d.data_read(2 * PAGE_SIZE, 1), vec![7]);
        assert_eq!(d.data_read(0, 1), vec![1]);
        d.wait_idle();
        assert_eq!(
            d.data_read(PAGE_SIZE, 1),
            vec![0],
            "work {stalled} was discarded"
        );
        assert_eq!(d.r32(regs::WORK_COMPLETED), 1);
    }
}

#[test]
fn memory_space_disabled_bar_reads_all_ones_and_ignores_writes() {
    let d = TestDriver::new();
    d.dev
        .config_write(config::off::COMMAND as u64, &0u16.to_le_bytes());
    let mut b = [0u8; 4];
    d.dev.bar_read(0, regs::ID, &mut b);
    assert_eq!(b, [0xff; 4]);
    d.dev.bar_write(0, regs::CONTROL, &0u32.to_le_bytes());
    d.enable_pci();
    assert_eq!(
        d.r32(regs::CONTROL),
        regs::control::ENABLE,
        "write was dropped"
    );
    assert_eq!(
        d.r32(regs::ERROR_CODE),
        0,
        "no error for a non-decoded access"
    );
}

#[test]
fn after_dma_unmap_returns_the_memory_is_never_touched() {
    let mut d = TestDriver::new();
    let victim = SharedRegion::anonymous(PAGE_SIZE as usize).expect("region");
    d.map_extra(HOLE_IOVA, victim.clone(), PAGE_SIZE, DmaPerms::RW, VA);
    let ids: Vec<u32> = (0..60)
        .map(|_| d.submit(Command::atomic_add(0, VA, 1)))
        .collect();
    assert_eq!(d.dev.dma_unmap(HOLE_IOVA, PAGE_SIZE), Ok(PAGE_SIZE));
    let frozen = victim.load_u64(0).expect("read");
    let mut ok = 0;
    for id in ids {
        match d.wait_completion(id).status {
            Status::Ok => ok += 1,
            Status::IommuFault => {}
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(
        victim.load_u64(0).expect("read"),
        frozen,
        "written after unmap"
    );
    assert_eq!(frozen, ok, "every successful add landed before the unmap");
}

#[test]
fn shared_region_from_fd_shares_pages_and_respects_read_only() {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"mxa1-test", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    nix::unistd::ftruncate(&fd, 2 * PAGE_SIZE as i64).expect("ftruncate");
    let rw = SharedRegion::from_fd(&fd, PAGE_SIZE, PAGE_SIZE as usize, true).expect("rw map");
    let ro = SharedRegion::from_fd(&fd, PAGE_SIZE, PAGE_SIZE as usize, false).expect("ro map");
    rw.store_u64(8, 0xfeed).expect("store");
    assert_eq!(ro.load_u64(8), Ok(0xfeed), "same file pages");
    assert_eq!(
        ro.store_u64(8, 1),
        Err(firmware_stubs::DmaAccessError::ReadOnly)
    );
    assert!(matches!(
        rw.load_u64(PAGE_SIZE),
        Err(firmware_stubs::DmaAccessError::OutOfBounds { .. })
    ));
    assert_eq!(
        rw.load_u64(4),
        Err(firmware_stubs::DmaAccessError::Misaligned(4))
    );
    // Through the device: a FILL into the read-only view is refused by the backing.
    let mut d = TestDriver::new();
    d.map_extra(HOLE_IOVA, ro.clone(), PAGE_SIZE, DmaPerms::RW, VA);
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::IommuFault);
    assert_eq!(ro.load_u64(8), Ok(0xfeed));
}

/// One chunk of a COPY resolves its source, then its destination, in two adjacent DMA mappings
/// with different permissions: each access gets its own mapping's permissions and bytes, never
/// those of the mapping the previous access of the chunk resolved.
#[test]
fn adjacent_mappings_in_one_chunk_keep_their_own_permissions() {
    let mut d = TestDriver::new();
    let rw = SharedRegion::anonymous(PAGE_SIZE as usize).expect("region");
    let ro = SharedRegion::anonymous(PAGE_SIZE as usize).expect("region");
    rw.write_bytes(0, &[0x11; 64]).expect("seed");
    ro.write_bytes(0, &[0x22; 64]).expect("seed");
    d.dev
        .dma_map(HOLE_IOVA, PAGE_SIZE, rw.clone(), DmaPerms::RW)
        .expect("map");
    d.dev
        .dma_map(HOLE_IOVA + PAGE_SIZE, PAGE_SIZE, ro.clone(), DmaPerms::R)
        .expect("map");
    d.map_4k(0, VA, HOLE_IOVA, Perms::RW);
    d.map_4k(0, VA + PAGE_SIZE, HOLE_IOVA + PAGE_SIZE, Perms::RW);

    // Read-write source, read-only destination right after it: the write is refused.
    let before = d.dev.iommu_fault_count();
    let c = d.run(Command::copy(0, VA + PAGE_SIZE, VA, 64));
    assert_eq!(
        (c.status, c.result),
        (Status::IommuFault, HOLE_IOVA + PAGE_SIZE)
    );
    let last = d.dev.iommu_faults().last().copied().expect("logged");
    assert_eq!(
        (last.iova, last.write, last.reason),
        (HOLE_IOVA + PAGE_SIZE, true, IommuFaultReason::Permission)
    );
    assert_eq!(d.dev.iommu_fault_count(), before + 1);
    let mut b = [0u8; 64];
    ro.read_bytes(0, &mut b).expect("read");
    assert_eq!(b, [0x22; 64], "the read-only page is untouched");
    d.take_error();

    // The other way round the bytes come from the read-only mapping and land in the other.
    let c = d.run(Command::copy(0, VA, VA + PAGE_SIZE, 64));
    assert_eq!(c.status, Status::Ok);
    rw.read_bytes(0, &mut b).expect("read");
    assert_eq!(b, [0x22; 64]);
    assert_eq!(d.dev.iommu_fault_count(), before + 1);
}

/// An access just past the end of the mapping the chunk's previous access used is checked
/// against the table, not against that mapping: nothing is mapped there.
#[test]
fn access_just_past_the_mapping_used_in_the_same_chunk_is_unmapped() {
    let mut d = TestDriver::new();
    let small = SharedRegion::anonymous(PAGE_SIZE as usize).expect("region");
    d.dev
        .dma_map(HOLE_IOVA, PAGE_SIZE, small.clone(), DmaPerms::RW)
        .expect("map");
    // The source page is mapped; the destination page is the IOVA page right after it.
    d.map_4k(0, VA, HOLE_IOVA, Perms::RW);
    d.map_4k(0, VA + PAGE_SIZE, HOLE_IOVA + PAGE_SIZE, Perms::RW);
    let c = d.run(Command::copy(0, VA + PAGE_SIZE, VA, 8));
    assert_eq!(
        (c.status, c.result),
        (Status::IommuFault, HOLE_IOVA + PAGE_SIZE)
    );
    assert_eq!(
        d.dev.iommu_faults().last().map(|e| e.reason),
        Some(IommuFaultReason::Unmapped)
    );
}
