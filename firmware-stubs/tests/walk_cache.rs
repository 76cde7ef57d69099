//! Revision 2 page-walk cache: walks start below the root, LEAF_ONLY invalidations keep the
//! cached table pointers (and so a driver that reuses a freed table page after one gets wrong
//! translations), walk-inclusive invalidations and root writes drop them.

mod common;

use accel_abi::pt::{self, Perms, Pte};
use accel_abi::regs::{self, features, TlbiScope};
use accel_abi::{FaultReason, Status, PAGE_SIZE};
use common::*;
use firmware_stubs::AcceleratorConfig;

/// Region A (the old VA) and region B: 2 MiB regions under the same level-2 table, at the same
/// offset, so the old VA's level-1 index names B's leaf in a reused page.
const VA_A: u64 = VA;
const VA_B: u64 = VA + 4 * LARGE;

/// What the device does with the old VA after the driver unmapped region A (clearing its
/// level-2 entry), invalidated with or without LEAF_ONLY, and reused A's level-1 table page as
/// B's. Returns the outcome of a checksum of the old VA: `Ok(result)` or the fault reason.
fn reuse_freed_table_page(d: &mut TestDriver, leaf_only: bool) -> Result<u64, FaultReason> {
    d.data_write(0, &[0xaa; PAGE_SIZE as usize]);
    d.data_write(PAGE_SIZE, &[0xbb; PAGE_SIZE as usize]);
    d.map_4k(0, VA_A, DATA_IOVA, Perms::RW);
    assert_eq!(d.checksum_ok(0, VA_A, PAGE_SIZE), fnv(&[0xaa; 4096]));
    // Unmap region A: clear its level-2 entry; its level-1 table page is free now.
    let l2_a = d.entry_iova(0, VA_A, 2);
    let page = d.read_ctrl_u64(l2_a) & pt::ADDR_MASK;
    d.write_ctrl_u64(l2_a, 0);
    d.tlbi_scoped(TlbiScope::Range, leaf_only, 0, VA_A, LARGE);
    // Reuse the page as region B's level-1 table.
    d.zero_table(page);
    d.write_ctrl_u64(
        page + 8 * pt::index(VA_B, 1) as u64,
        Pte::leaf(DATA_IOVA + PAGE_SIZE, Perms::RW),
    );
    let l2_b = d.entry_iova(0, VA_B, 2);
    d.write_ctrl_u64(l2_b, Pte::table(page));
    assert_eq!(d.checksum_ok(0, VA_B, PAGE_SIZE), fnv(&[0xbb; 4096]));
    // The old VA.
    let id = d.submit(accel_abi::Command::checksum(0, VA_A, PAGE_SIZE));
    loop {
        if let Some(c) = d.try_completion(id) {
            assert_eq!(c.status, Status::Ok);
            return Ok(c.result);
        }
        if let Some(f) = d.next_fault() {
            assert_eq!((f.work_id, f.va), (id, VA_A));
            d.cancel(id, 0);
            d.wait_completion(id);
            return Err(f.reason);
        }
        std::thread::yield_now();
    }
}

#[test]
fn after_a_leaf_only_invalidation_a_reused_table_page_serves_the_old_va_wrong_data() {
    let mut d = TestDriver::new();
    assert_ne!(d.r32(regs::CAP_FEATURES) & features::WALK_CACHE, 0);
    let got = reuse_freed_table_page(&mut d, true);
    assert_eq!(
        got,
        Ok(fnv(&[0xbb; 4096])),
        "the cached level-2 pointer routes the old VA through region B's leaves"
    );
}

#[test]
fn after_a_walk_inclusive_invalidation_the_old_va_faults_not_present() {
    let mut d = TestDriver::new();
    let got = reuse_freed_table_page(&mut d, false);
    assert_eq!(got, Err(FaultReason::NotPresent));
}

#[test]
fn without_a_walk_cache_leaf_only_is_enough() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            walk_cache_entries: 0,
            ..Default::default()
        },
        32,
    );
    assert_eq!(d.r32(regs::CAP_FEATURES) & features::WALK_CACHE, 0);
    let got = reuse_freed_table_page(&mut d, true);
    assert_eq!(got, Err(FaultReason::NotPresent));
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 0);
}

#[test]
fn walk_cache_hits_count_walks_that_start_below_the_root() {
    let mut d = TestDriver::new();
    for p in 0..4 {
        d.map_4k(0, VA + p * PAGE_SIZE, DATA_IOVA + p * PAGE_SIZE, Perms::RW);
    }
    d.checksum_ok(0, VA, 8);
    assert_eq!(
        d.r64(regs::WALK_CACHE_HITS),
        0,
        "the first walk starts at the root"
    );
    // Another page of the same 2 MiB: a TLB miss whose walk starts at the level-1 table.
    let misses = d.r64(regs::TLB_MISSES);
    d.checksum_ok(0, VA + PAGE_SIZE, 8);
    assert_eq!(d.r64(regs::TLB_MISSES), misses + 1);
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 1);
    // A TLB hit does not consult the walk cache.
    d.checksum_ok(0, VA + PAGE_SIZE, 8);
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 1);
    // LEAF_ONLY keeps the cached pointers: the re-walk starts below the root again.
    d.tlbi_scoped(TlbiScope::Asid, true, 0, 0, 0);
    d.checksum_ok(0, VA, 8);
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 2);
    // A range invalidation elsewhere (another 1 GiB) leaves them too.
    d.tlbi_range(0, VA + (1 << 30), PAGE_SIZE);
    d.checksum_ok(0, VA + 2 * PAGE_SIZE, 8);
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 3);
    // A walk-inclusive invalidation of the ASID drops them: the next walk starts at the root.
    d.tlbi_asid(0);
    d.checksum_ok(0, VA + 3 * PAGE_SIZE, 8);
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 3);
    // ... and refills the cache.
    d.tlbi_range_leaf_only(0, VA, PAGE_SIZE);
    d.checksum_ok(0, VA, 8);
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 4);
    // Reset: counters back to 0.
    d.dev.reset();
    d.enable_pci();
    d.bring_up();
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 0);
}

#[test]
fn a_range_invalidation_overlapping_a_cached_span_drops_that_entry() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::RW);
    d.checksum_ok(0, VA, 8);
    // One page of the same 2 MiB region, walk-inclusive: the level-2 (and level-3/4) pointers
    // covering it go; the next walk of another page in it starts at the root.
    d.tlbi_range(0, VA + 100 * PAGE_SIZE, PAGE_SIZE);
    d.checksum_ok(0, VA + PAGE_SIZE, 8);
    assert_eq!(d.r64(regs::WALK_CACHE_HITS), 0);
}

#[test]
fn a_root_write_drops_the_asids_walk_cache_entries() {
    let mut d = TestDriver::new();
    d.data_write(0, &[0x11; PAGE_SIZE as usize]);
    d.data_write(PAGE_SIZE, &[0x22; PAGE_SIZE as usize]);
    d.map_4k(1, VA, DATA_IOVA, Perms::RW);
    assert_eq!(d.checksum_ok(1, VA, PAGE_SIZE), fnv(&[0x11; 4096]));
    // A second, separate table tree for ASID 1 (built under ASID 2, which keeps its root),
    // mapping the VA to the other page; then point ASID 1's root at it.
    d.map_4k(2, VA, DATA_IOVA + PAGE_SIZE, Perms::RW);
    let new_root = d.r64(regs::asid_root(2));
    d.w64(regs::asid_root(1), new_root);
    // The TLB keeps its leaves across a root write (the driver invalidates them); with
    // LEAF_ONLY that is all that goes, so only the root write can have dropped the pointers.
    d.tlbi_range_leaf_only(1, VA, PAGE_SIZE);
    let hits = d.r64(regs::WALK_CACHE_HITS);
    assert_eq!(d.checksum_ok(1, VA, PAGE_SIZE), fnv(&[0x22; 4096]));
    assert_eq!(
        d.r64(regs::WALK_CACHE_HITS),
        hits,
        "the walk started at the new root"
    );
}

#[test]
fn a_root_write_leaves_the_tlb_alone() {
    let mut d = TestDriver::new();
    d.data_write(0, &[0x11; PAGE_SIZE as usize]);
    d.map_4k(1, VA, DATA_IOVA, Perms::RW);
    assert_eq!(d.checksum_ok(1, VA, PAGE_SIZE), fnv(&[0x11; 4096]));
    // A root with nothing mapped: the cached leaf still translates until invalidated.
    d.map_4k(2, VA + LARGE, DATA_IOVA, Perms::RW);
    let other = d.r64(regs::asid_root(2));
    d.w64(regs::asid_root(1), other);
    assert_eq!(d.checksum_ok(1, VA, PAGE_SIZE), fnv(&[0x11; 4096]));
}
