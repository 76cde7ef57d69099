//! Revision 2 ACCESSED/DIRTY maintenance: which accesses set which bit, the TLB's memory of
//! DIRTY, aging through a leaf-only invalidation, the compare-and-swap against a driver
//! rewriting the entry, and the IOMMU's say over table writes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use accel_abi::pt::{self, Perms, Pte};
use accel_abi::regs::{self, ErrorCode};
use accel_abi::{Command, Status, PAGE_SIZE};
use common::*;
use firmware_stubs::{
    DmaAccessError, DmaMemory, DmaPerms, IommuFaultReason, ProcessMemory, SharedRegion,
};

const AD: u64 = pt::ACCESSED | pt::DIRTY;

#[test]
fn a_read_sets_accessed_and_not_dirty() {
    let mut d = TestDriver::new();
    d.enable_ad();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.checksum_ok(0, VA, 64);
    let raw = d.leaf_raw(0, VA);
    assert_eq!(raw & AD, pt::ACCESSED, "leaf {raw:#x}");
    assert_eq!(
        raw & !AD,
        Pte::leaf(DATA_IOVA, Perms::RW),
        "other bits kept"
    );
    assert_eq!(d.r64(regs::AD_UPDATES), 1);
    // A prefetch is an access too.
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::R);
    let c = d.run(Command::prefetch(0, VA + PAGE_SIZE, 8));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(d.leaf_raw(0, VA + PAGE_SIZE) & AD, pt::ACCESSED);
}

#[test]
fn writes_and_atomics_set_dirty_and_accessed() {
    let mut d = TestDriver::new();
    d.enable_ad();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::RW);
    assert_eq!(d.run(Command::fill(0, VA, 16, 7)).status, Status::Ok);
    assert_eq!(d.leaf_raw(0, VA) & AD, AD);
    let c = d.run(Command::atomic_add(0, VA + PAGE_SIZE, 1));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(d.leaf_raw(0, VA + PAGE_SIZE) & AD, AD);
    assert_eq!(d.r64(regs::AD_UPDATES), 2);
}

#[test]
fn a_write_through_a_translation_cached_by_a_read_rewalks_and_sets_dirty() {
    let mut d = TestDriver::new();
    d.enable_ad();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.checksum_ok(0, VA, 8);
    let misses = d.r64(regs::TLB_MISSES);
    // The read's translation is cached: a second read hits.
    d.checksum_ok(0, VA, 8);
    assert_eq!(d.r64(regs::TLB_MISSES), misses, "second read hits the TLB");
    assert_eq!(d.leaf_raw(0, VA) & AD, pt::ACCESSED);
    // The write finds the cached entry without DIRTY and walks again.
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
    assert_eq!(d.r64(regs::TLB_MISSES), misses + 1, "the write re-walked");
    assert_eq!(d.leaf_raw(0, VA) & AD, AD);
    assert_eq!(d.r64(regs::AD_UPDATES), 2);
    // Now the cached entry remembers DIRTY: further writes hit and write no table memory.
    assert_eq!(d.run(Command::fill(0, VA, 8, 2)).status, Status::Ok);
    assert_eq!(d.r64(regs::TLB_MISSES), misses + 1);
    assert_eq!(d.r64(regs::AD_UPDATES), 2);
}

#[test]
fn without_ad_enable_a_write_hitting_a_clean_entry_does_not_rewalk() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.checksum_ok(0, VA, 8);
    let misses = d.r64(regs::TLB_MISSES);
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
    assert_eq!(d.r64(regs::TLB_MISSES), misses);
}

#[test]
fn a_cleared_accessed_bit_stays_clear_until_a_leaf_only_invalidation() {
    let mut d = TestDriver::new();
    d.enable_ad();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.checksum_ok(0, VA, 8);
    let e = d.entry_iova(0, VA, 1);
    assert!(pt::accessed(d.read_ctrl_u64(e)));
    // Age the page: clear ACCESSED in memory, no invalidation yet.
    d.write_ctrl_u64(e, d.read_ctrl_u64(e) & !pt::ACCESSED);
    d.checksum_ok(0, VA, 8);
    assert!(
        !pt::accessed(d.read_ctrl_u64(e)),
        "a TLB-cached translation does not set ACCESSED again"
    );
    d.tlbi_range_leaf_only(0, VA, PAGE_SIZE);
    d.checksum_ok(0, VA, 8);
    assert!(pt::accessed(d.read_ctrl_u64(e)), "the new walk set it");
    assert_eq!(d.r64(regs::AD_UPDATES), 2);
}

#[test]
fn a_leaf_installed_with_accessed_and_dirty_is_never_written() {
    let mut d = TestDriver::new();
    d.enable_ad();
    d.set_entry(0, VA, 1, Pte::leaf(DATA_IOVA, Perms::RW) | AD);
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
    assert_eq!(d.r64(regs::AD_UPDATES), 0);
}

#[test]
fn with_ad_disabled_the_device_never_writes_table_memory() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::R);
    d.map_2m(0, VA + 2 * LARGE, DATA_IOVA + LARGE, Perms::RW);
    // A device that supports A/D, left with PT_CTRL at its power-on 0.
    assert_ne!(
        d.r32(regs::CAP_FEATURES) & regs::features::ACCESSED_DIRTY,
        0
    );
    assert_eq!(d.r32(regs::PT_CTRL), 0);
    let before = d.tables_snapshot();
    d.checksum_ok(0, VA + PAGE_SIZE, 64);
    assert_eq!(d.run(Command::fill(0, VA, 64, 1)).status, Status::Ok);
    let c = d.run(Command::atomic_add(0, VA + 2 * LARGE + 8, 1));
    assert_eq!(c.status, Status::Ok);
    let c = d.run(Command::copy(0, VA + 2 * LARGE + 4096, VA + PAGE_SIZE, 64));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(
        d.run(Command::prefetch(0, VA, PAGE_SIZE)).status,
        Status::Ok
    );
    d.tlbi_all();
    assert_eq!(d.run(Command::fill(0, VA, 64, 2)).status, Status::Ok);
    assert!(
        d.tables_snapshot() == before,
        "table memory changed with AD_ENABLE clear"
    );
    assert_eq!(d.r64(regs::AD_UPDATES), 0);
}

#[test]
fn an_ad_update_through_a_read_only_table_mapping_is_an_iommu_fault() {
    let tables_iova = 0x8000_0000u64;
    for ad in [false, true] {
        let d = TestDriver::new();
        let mem = SharedRegion::anonymous(4 * PAGE_SIZE as usize).unwrap();
        let leaf = Pte::leaf(DATA_IOVA, Perms::RW);
        let leaf_iova = d.private_tables(3, mem.clone(), tables_iova, DmaPerms::R, VA, leaf);
        if ad {
            d.enable_ad();
        }
        let mut d = d;
        let c = d.run(Command::checksum(3, VA, 8));
        if !ad {
            // Walking needs reads only.
            assert_eq!(c.status, Status::Ok);
            continue;
        }
        assert_eq!(c.status, Status::IommuFault);
        assert_eq!(c.result, leaf_iova);
        assert_eq!(d.take_error(), (ErrorCode::IommuFault as u32, leaf_iova));
        let f = *d.dev.iommu_faults().last().expect("a host IOMMU fault");
        assert_eq!(
            (f.iova, f.write, f.reason),
            (leaf_iova, true, IommuFaultReason::Permission)
        );
        assert_eq!(mem.load_u64(leaf_iova - tables_iova).unwrap(), leaf);
        assert_eq!(d.r64(regs::AD_UPDATES), 0);
    }
}

#[test]
fn compare_exchange_on_a_shared_region_is_a_real_cas() {
    let r = SharedRegion::anonymous(4096).unwrap();
    r.store_u64(8, 5).unwrap();
    assert_eq!(r.compare_exchange_u64(8, 5, 9), Ok(Ok(5)));
    assert_eq!(r.load_u64(8).unwrap(), 9);
    assert_eq!(r.compare_exchange_u64(8, 5, 11), Ok(Err(9)));
    assert_eq!(r.load_u64(8).unwrap(), 9, "a mismatch stores nothing");
    assert_eq!(
        r.compare_exchange_u64(12, 0, 1),
        Err(DmaAccessError::Misaligned(12))
    );
    assert!(matches!(
        r.compare_exchange_u64(4096, 0, 1),
        Err(DmaAccessError::OutOfBounds { .. })
    ));
}

#[test]
fn compare_exchange_on_process_memory_compares_before_writing() {
    // Host memory reached through process_vm_readv/writev (not atomic against the CPU; only
    // the compare is checked here).
    let host = SharedRegion::anonymous(4096).unwrap();
    host.store_u64(0, 7).unwrap();
    let mem = ProcessMemory::current(host.as_ptr() as u64, host.len() as u64);
    assert_eq!(mem.compare_exchange_u64(0, 7, 8), Ok(Ok(7)));
    assert_eq!(mem.compare_exchange_u64(0, 7, 9), Ok(Err(8)));
    assert_eq!(host.load_u64(0).unwrap(), 8);
    assert_eq!(
        mem.compare_exchange_u64(4, 0, 1),
        Err(DmaAccessError::Misaligned(4))
    );
}

/// A driver thread keeps replacing leaves with leaves to other pages (ACCESSED clear) while the
/// device walks and updates them. The device's compare-and-swap must never land on a value it
/// did not read: every value the driver swaps out is the leaf it last wrote there, with at most
/// ACCESSED/DIRTY added.
#[test]
fn the_ad_update_never_lands_on_a_replaced_entry() {
    const PAGES: u64 = 32;
    let mut d = TestDriver::new();
    d.enable_ad();
    let leaves: Vec<[u64; 2]> = (0..PAGES)
        .map(|p| {
            let page = DATA_IOVA + 2 * p * PAGE_SIZE;
            [
                Pte::leaf(page, Perms::RW),
                Pte::leaf(page + PAGE_SIZE, Perms::RW),
            ]
        })
        .collect();
    let entries: Vec<u64> = (0..PAGES)
        .map(|p| {
            let e = d.entry_iova(0, VA + p * PAGE_SIZE, 1);
            d.write_ctrl_u64(e, leaves[p as usize][0]);
            e
        })
        .collect();
    let ctrl = Arc::clone(&d.ctrl);
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let words: Vec<_> = entries
                .iter()
                .map(|e| ctrl.atomic_u64(e - CTRL_IOVA).expect("entry word"))
                .collect();
            let mut last: Vec<u64> = leaves.iter().map(|l| l[0]).collect();
            let (mut flips, mut bad) = (0u64, Vec::new());
            while !stop.load(Ordering::Acquire) {
                for (p, word) in words.iter().enumerate() {
                    let next = if last[p] == leaves[p][0] {
                        leaves[p][1]
                    } else {
                        leaves[p][0]
                    };
                    let old = word.swap(next, Ordering::AcqRel);
                    if old & !AD != last[p] {
                        bad.push((p, last[p], old));
                    }
                    last[p] = next;
                    flips += 1;
                }
            }
            (flips, bad)
        })
    };
    let mut stalls = 0;
    for i in 0..200u64 {
        let len = PAGES * PAGE_SIZE;
        let cmd = if i % 2 == 0 {
            Command::checksum(0, VA, len)
        } else {
            Command::fill(0, VA, len, i)
        };
        let id = d.submit(cmd);
        // A walk that kept losing the race stalls as not present: replay it.
        let c = loop {
            if let Some(c) = d.try_completion(id) {
                break c;
            }
            if let Some(f) = d.next_fault() {
                assert_eq!(f.reason, accel_abi::FaultReason::NotPresent);
                stalls += 1;
                d.replay();
            }
            std::thread::yield_now();
        };
        assert_eq!(c.status, Status::Ok, "command {i}");
        d.tlbi_range_leaf_only(0, VA, len);
    }
    stop.store(true, Ordering::Release);
    let (flips, bad) = flipper.join().unwrap();
    assert!(
        bad.is_empty(),
        "the device wrote over leaves the driver had replaced: {bad:x?}"
    );
    assert!(flips > 0 && d.r64(regs::AD_UPDATES) > 0);
    println!(
        "{flips} flips, {} A/D updates, {stalls} stalls",
        d.r64(regs::AD_UPDATES)
    );
}
