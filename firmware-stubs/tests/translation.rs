//! The MMU: page walks (4 KiB, 2 MiB), permissions, malformed entries, the TLB's staleness
//! until invalidation, and isolation between address spaces.

mod common;

use accel_abi::pt::{Perms, Pte, LEAF, READ, VALID, WRITE};
use accel_abi::regs::{self, ErrorCode};
use accel_abi::{
    fill_byte, fnv1a_update, AccessKind, Command, FaultReason, Status, FNV_OFFSET, PAGE_SIZE,
};
use common::*;
use firmware_stubs::AcceleratorConfig;

#[test]
fn fill_through_4k_leaves_lands_at_the_mapped_iovas() {
    let mut d = TestDriver::new();
    // Two VA pages mapped to non-adjacent data pages, out of order.
    d.map_4k(0, VA, DATA_IOVA + 5 * PAGE_SIZE, Perms::RW);
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + 2 * PAGE_SIZE, Perms::RW);
    let c = d.run(Command::fill(
        0,
        VA + 100,
        2 * PAGE_SIZE - 200,
        0x0807_0605_0403_0201,
    ));
    assert_eq!(c.status, Status::Ok);
    let first = d.data_read(5 * PAGE_SIZE, PAGE_SIZE as usize);
    assert_eq!(first[99], 0, "byte before the range untouched");
    assert_eq!(&first[100..108], &[1, 2, 3, 4, 5, 6, 7, 8]);
    let second = d.data_read(2 * PAGE_SIZE, PAGE_SIZE as usize);
    // The pattern continues across the page boundary (byte 3996 of the fill), and the last
    // byte written is byte 7991.
    let p = 0x0807_0605_0403_0201;
    assert_eq!(second[0], fill_byte(p, 3996));
    assert_eq!(second[3995], fill_byte(p, 7991));
    assert_eq!(second[3996], 0, "byte after the range untouched");
}

#[test]
fn large_leaf_translates_a_whole_2m_page() {
    let mut d = TestDriver::new();
    let va = 0x5555_4000_0000; // 2 MiB aligned
    d.map_2m(0, va, DATA_IOVA, Perms::RW);
    let off = 0x1f_f000 + 8; // near the end of the large page
    d.data_write(off, &0x1234u64.to_le_bytes());
    let c = d.run(Command::atomic_add(0, va + off, 1));
    assert_eq!((c.status, c.result), (Status::Ok, 0x1234));
    assert_eq!(d.data_u64(off), 0x1235);
    // One walk filled the TLB for the whole 2 MiB: a second access elsewhere in it hits.
    let misses = d.r64(regs::TLB_MISSES);
    let c = d.run(Command::atomic_add(0, va + 0x10_0000, 5));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(d.r64(regs::TLB_MISSES), misses, "second access should hit");
    assert!(d.r64(regs::TLB_HITS) >= 1);
}

#[test]
fn write_to_read_only_leaf_faults_with_permission() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::R);
    let id = d.submit(Command::fill(0, VA, 8, 1));
    let f = d.wait_fault();
    assert_eq!((f.work_id, f.va), (id, VA));
    assert_eq!(f.access, AccessKind::Write);
    assert_eq!(f.reason, FaultReason::Permission);
    // Reads are fine through the same leaf.
    let c = d.run(Command::checksum(0, VA, 8));
    assert_eq!(c.status, Status::Ok);
    // Upgrading the permission needs no invalidation: the replay re-walks.
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.replay();
    assert_eq!(d.wait_completion(id).status, Status::Ok);
    assert_eq!(d.data_read(0, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn atomic_needs_read_and_write() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::R);
    let id = d.submit(Command::atomic_add(0, VA, 1));
    let f = d.wait_fault();
    assert_eq!(
        (f.work_id, f.access, f.reason),
        (id, AccessKind::Atomic, FaultReason::Permission)
    );
    d.cancel(id, 9);
    assert_eq!(d.wait_completion(id).status, Status::Cancelled);
}

#[test]
fn malformed_entries_fail_the_item_with_bad_pte() {
    let cases: &[(&str, u32, u64)] = &[
        (
            "reserved bit",
            1,
            Pte::leaf(DATA_IOVA, Perms::RW) | (1 << 60),
        ),
        ("write without read", 1, VALID | LEAF | WRITE | DATA_IOVA),
        ("table at level 1", 1, Pte::table(DATA_IOVA)),
        (
            "misaligned large leaf",
            2,
            Pte::leaf(DATA_IOVA + PAGE_SIZE, Perms::RW),
        ),
        ("table with permissions", 2, Pte::table(DATA_IOVA) | READ),
        ("leaf at level 3", 3, Pte::leaf(DATA_IOVA, Perms::RW)),
    ];
    for &(what, level, raw) in cases {
        let mut d = TestDriver::new();
        let entry = d.entry_iova(0, VA, level);
        d.write_ctrl_u64(entry, raw);
        let c = d.run(Command::fill(0, VA + 16, 8, 1));
        assert_eq!((c.status, c.result), (Status::BadPte, VA + 16), "{what}");
        assert_eq!(d.take_error(), (ErrorCode::BadPte as u32, entry), "{what}");
        // Nothing was written, and the device keeps working.
        assert_eq!(d.data_read(0, 64), vec![0; 64], "{what}");
        d.write_ctrl_u64(entry, 0);
        d.map_4k(0, VA, DATA_IOVA, Perms::RW);
        assert_eq!(
            d.run(Command::fill(0, VA, 8, 2)).status,
            Status::Ok,
            "{what}"
        );
    }
}

#[test]
fn non_canonical_and_wrapping_ranges_are_rejected() {
    let mut d = TestDriver::new();
    let c = d.run(Command::fill(0, 1 << 48, 8, 1));
    assert_eq!((c.status, c.result), (Status::NonCanonical, 1 << 48));
    let c = d.run(Command::checksum(0, (1 << 48) - 8, 16));
    assert_eq!(c.status, Status::NonCanonical);
    let c = d.run(Command::copy(0, VA, u64::MAX - 3, 8));
    assert_eq!((c.status, c.result), (Status::NonCanonical, u64::MAX - 3));
    // Per-item statuses only: no register-level error.
    assert_eq!(d.r32(regs::ERROR_CODE), 0);
}

#[test]
fn bad_asid_out_of_range_or_without_root() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            asids: 4,
            ..Default::default()
        },
        32,
    );
    let c = d.run(Command::fill(4, VA, 8, 1));
    assert_eq!((c.status, c.result), (Status::BadAsid, 4));
    let c = d.run(Command::fill(3, VA, 8, 1));
    assert_eq!((c.status, c.result), (Status::BadAsid, 3), "root not valid");
}

#[test]
fn tlb_keeps_a_stale_translation_until_invalidated() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    assert_eq!(d.run(Command::fill(0, VA, 8, 0x11)).status, Status::Ok);
    // Retarget the PTE without invalidating: the device still writes the old page.
    d.map_4k(0, VA, DATA_IOVA + PAGE_SIZE, Perms::RW);
    assert_eq!(d.run(Command::fill(0, VA, 8, 0x22)).status, Status::Ok);
    assert_eq!(d.data_read(0, 1), vec![0x22], "stale TLB entry used");
    assert_eq!(d.data_read(PAGE_SIZE, 1), vec![0], "new page not yet used");
    // A range invalidation of another page does not help...
    d.tlbi_range(0, VA + PAGE_SIZE, PAGE_SIZE);
    assert_eq!(d.run(Command::fill(0, VA, 8, 0x33)).status, Status::Ok);
    assert_eq!(d.data_read(0, 1), vec![0x33]);
    // ...the right one does.
    d.tlbi_range(0, VA, PAGE_SIZE);
    assert_eq!(d.run(Command::fill(0, VA, 8, 0x44)).status, Status::Ok);
    assert_eq!(d.data_read(0, 1), vec![0x33]);
    assert_eq!(d.data_read(PAGE_SIZE, 1), vec![0x44]);
    assert!(d.r32(regs::TLBI_COUNT) >= 2);
}

#[test]
fn removed_pte_keeps_working_until_asid_or_global_invalidation() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.map_4k(1, VA, DATA_IOVA + PAGE_SIZE, Perms::RW);
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
    assert_eq!(d.run(Command::fill(1, VA, 8, 1)).status, Status::Ok);
    d.set_entry(0, VA, 1, 0);
    d.set_entry(1, VA, 1, 0);
    // Both still translate from the TLB.
    assert_eq!(d.run(Command::fill(0, VA, 8, 2)).status, Status::Ok);
    assert_eq!(d.run(Command::fill(1, VA, 8, 2)).status, Status::Ok);
    // Invalidating ASID 1 only: ASID 0 still hits, ASID 1 faults.
    d.tlbi_asid(1);
    assert_eq!(d.run(Command::fill(0, VA, 8, 3)).status, Status::Ok);
    let id = d.submit(Command::fill(1, VA, 8, 3));
    let f = d.wait_fault();
    assert_eq!(
        (f.work_id, f.asid, f.reason),
        (id, 1, FaultReason::NotPresent)
    );
    d.cancel(id, 0);
    d.wait_completion(id);
    d.tlbi_all();
    let id = d.submit(Command::fill(0, VA, 8, 4));
    assert_eq!(d.wait_fault().work_id, id);
    assert_eq!(d.data_read(0, 1), vec![3]);
}

#[test]
fn address_spaces_are_isolated() {
    let mut d = TestDriver::new();
    // Same VA, different pages; ASID 2 has nothing mapped at all.
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.map_4k(1, VA, DATA_IOVA + PAGE_SIZE, Perms::RW);
    assert_eq!(d.run(Command::fill(0, VA, 8, 0xaa)).status, Status::Ok);
    assert_eq!(d.run(Command::fill(1, VA, 8, 0xbb)).status, Status::Ok);
    assert_eq!(d.data_read(0, 1), vec![0xaa]);
    assert_eq!(d.data_read(PAGE_SIZE, 1), vec![0xbb]);
    d.root(2);
    let id = d.submit(Command::fill(2, VA, 8, 0xcc));
    let f = d.wait_fault();
    assert_eq!(
        (f.work_id, f.asid, f.reason),
        (id, 2, FaultReason::NotPresent)
    );
    // ASID 2's fault did not leak a translation from the others' TLB entries.
    assert_eq!(d.data_read(0, 1), vec![0xaa]);
    assert_eq!(d.data_read(PAGE_SIZE, 1), vec![0xbb]);
    // And a checksum in ASID 1 sees ASID 1's data.
    let c = d.run(Command::checksum(1, VA, 8));
    let expect = [0xbb, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(c.result, fnv1a_update(FNV_OFFSET, &expect));
}

#[test]
fn tlb_capacity_is_bounded() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            tlb_entries: 4,
            ..Default::default()
        },
        32,
    );
    d.map_data(0, VA, 0, 8 * PAGE_SIZE, Perms::RW);
    // Touch 8 pages (the last 4 stay cached), then retarget every PTE without invalidating.
    assert_eq!(
        d.run(Command::prefetch(0, VA, 8 * PAGE_SIZE)).status,
        Status::Ok
    );
    for i in 0..8 {
        d.map_4k(
            0,
            VA + i * PAGE_SIZE,
            DATA_IOVA + (16 + i) * PAGE_SIZE,
            Perms::RW,
        );
    }
    // Newest first, so the hits do not disturb the FIFO before they are checked.
    for i in (0..8).rev() {
        assert_eq!(
            d.run(Command::fill(0, VA + i * PAGE_SIZE, 1, 0xee)).status,
            Status::Ok
        );
    }
    let stale: Vec<bool> = (0..8)
        .map(|i| d.data_read(i * PAGE_SIZE, 1)[0] == 0xee)
        .collect();
    assert_eq!(
        stale,
        [false, false, false, false, true, true, true, true],
        "only the 4 most recent translations stay cached"
    );
}

#[test]
fn after_tlbi_returns_no_access_uses_the_dropped_translation() {
    let mut d = TestDriver::new();
    let (old, new) = (0u64, PAGE_SIZE);
    d.map_4k(0, VA, DATA_IOVA + old, Perms::RW);
    let ids: Vec<u32> = (0..60)
        .map(|_| d.submit(Command::atomic_add(0, VA, 1)))
        .collect();
    // Retarget while the adds are (probably) in flight, then invalidate.
    d.map_4k(0, VA, DATA_IOVA + new, Perms::RW);
    d.tlbi_range(0, VA, PAGE_SIZE);
    let frozen = d.data_u64(old);
    for id in ids {
        assert_eq!(d.wait_completion(id).status, Status::Ok);
    }
    assert_eq!(
        d.data_u64(old),
        frozen,
        "the old page changed after TLBI_DONE"
    );
    assert_eq!(d.data_u64(old) + d.data_u64(new), 60, "no add was lost");
}

#[test]
fn dropping_the_device_with_work_in_flight_returns() {
    let mut d = TestDriver::new();
    d.map_2m(0, VA & !(LARGE - 1), DATA_IOVA, Perms::RW);
    d.map_2m(0, (VA & !(LARGE - 1)) + LARGE, DATA_IOVA + LARGE, Perms::RW);
    d.submit(Command::fill(0, VA, 4 << 20, 1));
    d.submit(Command::fill(0, VA + (8 << 20), 8, 1)); // stalls
    drop(d);
}

#[test]
fn permission_downgrade_and_root_change_need_an_invalidation() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
    // Downgrade to read-only without invalidating: the cached RW entry still allows writes.
    d.map_4k(0, VA, DATA_IOVA, Perms::R);
    assert_eq!(d.run(Command::fill(0, VA, 8, 2)).status, Status::Ok);
    d.tlbi_range(0, VA, PAGE_SIZE);
    let id = d.submit(Command::fill(0, VA, 8, 3));
    let f = d.wait_fault();
    assert_eq!((f.work_id, f.reason), (id, FaultReason::Permission));
    d.cancel(id, 0);
    assert_eq!(d.data_read(0, 1), vec![2]);

    // Clearing the root register does not flush the TLB either (a read caches the R leaf).
    assert_eq!(d.run(Command::checksum(0, VA, 8)).status, Status::Ok);
    d.w64(regs::asid_root(0), 0);
    assert_eq!(d.run(Command::checksum(0, VA, 8)).status, Status::Ok);
    d.tlbi_asid(0);
    let c = d.run(Command::checksum(0, VA, 8));
    assert_eq!((c.status, c.result), (Status::BadAsid, 0));
}
