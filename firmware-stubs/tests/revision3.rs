//! Revision 3 (VERSION 1.2): the invalidation queue, scoped replay and the writable lookahead
//! depth, each with its feature on and off.

mod common;

use std::time::Duration;

use accel_abi::pt::{Perms, Pte};
use accel_abi::regs::{self, features, replay, tlbi_scope, tlbiq_ctrl, ErrorCode, TlbiScope};
use accel_abi::{Command, Status, TlbiDescriptor, PAGE_SIZE};
use common::*;
use firmware_stubs::AcceleratorConfig;

/// Offset of the invalidation queue in the control region (past any page tables the tests
/// allocate).
const TLBIQ_OFF: u64 = 0x1f_0000;

#[test]
fn revision_3_features_follow_the_configuration() {
    let r2 = features::ACCESSED_DIRTY | features::WALK_CACHE;
    let cases = [
        (true, true, 256, features::ALL),
        (
            false,
            true,
            256,
            r2 | features::LOOKAHEAD_DEPTH | features::TLBI_QUEUE,
        ),
        (
            true,
            false,
            256,
            r2 | features::SCOPED_REPLAY | features::TLBI_QUEUE,
        ),
        (
            true,
            true,
            0,
            r2 | features::SCOPED_REPLAY | features::LOOKAHEAD_DEPTH,
        ),
        (false, false, 0, r2),
    ];
    for (scoped_replay, lookahead_depth_writable, tlbi_queue_entries, want) in cases {
        let cfg = AcceleratorConfig {
            scoped_replay,
            lookahead_depth_writable,
            tlbi_queue_entries,
            ..Default::default()
        };
        assert_eq!(cfg.features(), want);
        let d = TestDriver::with(cfg, 32);
        assert_eq!(d.r32(regs::VERSION), 0x0001_0002);
        assert_eq!(d.r32(regs::CAP_FEATURES), want);
        assert_eq!(d.r32(regs::CAP_TLBIQ_ENTRIES), tlbi_queue_entries);
        let depth = if lookahead_depth_writable {
            firmware_stubs::DEFAULT_FAULT_LOOKAHEAD
        } else {
            0
        };
        assert_eq!(d.r32(regs::FAULT_LOOKAHEAD_DEPTH), depth);
        assert_eq!(d.take_error().0, 0);
    }
    for bad in [1, 3, 48, 1 << 17] {
        let cfg = AcceleratorConfig {
            tlbi_queue_entries: bad,
            ..Default::default()
        };
        let err = firmware_stubs::Accelerator::new(cfg).unwrap_err();
        assert_eq!(
            (err.field, err.value),
            ("tlbi_queue_entries", u64::from(bad))
        );
    }
}

/// A FILL of one page in `asid` at `VA`, whose page is not mapped (the root is valid), stalls.
fn stall_one(d: &mut TestDriver, asid: u16) -> u32 {
    d.root(asid);
    d.submit(Command::fill(asid, VA, PAGE_SIZE, 0x4242_4242_4242_4242))
}

#[test]
fn scoped_replay_retries_only_the_named_address_space() {
    let mut d = TestDriver::new();
    let in_2 = stall_one(&mut d, 2);
    let in_1 = stall_one(&mut d, 1);
    d.wait_put(2);
    let asids: Vec<u16> = std::iter::from_fn(|| d.next_fault())
        .map(|f| f.asid)
        .collect();
    assert_eq!(asids.len(), 2);
    d.map_data(1, VA, 0, PAGE_SIZE, Perms::RW);
    d.map_data(2, VA, PAGE_SIZE, PAGE_SIZE, Perms::RW);

    // Bad scoped values replay nothing.
    for bad in [
        replay::ASID_SCOPED | 1 << 16 | 1,
        replay::ASID_SCOPED | 1 << 30 | 2,
        replay::ASID_SCOPED | 64,
        replay::ASID_SCOPED | 0xffff,
    ] {
        d.w32(regs::FAULT_REPLAY, bad);
        assert_eq!(
            d.take_error(),
            (ErrorCode::BadRegisterValue as u32, regs::FAULT_REPLAY),
            "{bad:#x}"
        );
    }

    d.w32(regs::FAULT_REPLAY, replay::ASID_SCOPED | 1);
    assert_eq!(d.take_error().0, 0);
    assert_eq!(d.wait_completion(in_1).status, Status::Ok);
    assert!(d.data_read(0, 8).iter().all(|b| *b == 0x42));
    // ASID 2's item stays stalled, although its page is mapped now.
    std::thread::sleep(Duration::from_millis(50));
    assert!(d.try_completion(in_2).is_none());
    assert_ne!(d.r32(regs::STATUS) & regs::status::STALLED, 0);
    assert!(d.data_read(PAGE_SIZE, 8).iter().all(|b| *b == 0));
    // A replay without bit 31 retries everything, whatever the rest of the value.
    d.w32(regs::FAULT_REPLAY, 7);
    assert_eq!(d.wait_completion(in_2).status, Status::Ok);
    assert!(d.data_read(PAGE_SIZE, 8).iter().all(|b| *b == 0x42));
    assert_eq!(d.r32(regs::STATUS) & regs::status::STALLED, 0);
}

#[test]
fn without_scoped_replay_every_value_replays_everything() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            scoped_replay: false,
            ..Default::default()
        },
        32,
    );
    let in_1 = stall_one(&mut d, 1);
    let in_2 = stall_one(&mut d, 2);
    d.wait_put(2);
    d.map_data(1, VA, 0, PAGE_SIZE, Perms::RW);
    d.map_data(2, VA, PAGE_SIZE, PAGE_SIZE, Perms::RW);
    // Even a value that would be a bad scoped replay on a revision-3 device.
    d.w32(regs::FAULT_REPLAY, replay::ASID_SCOPED | 1 << 20 | 1);
    assert_eq!(d.take_error().0, 0);
    assert_eq!(d.wait_completion(in_1).status, Status::Ok);
    assert_eq!(d.wait_completion(in_2).status, Status::Ok);
}

fn enable_lookahead(d: &TestDriver) {
    d.w32(
        regs::FAULT_BUF_CTRL,
        regs::fault_ctrl::ENABLE | regs::fault_ctrl::LOOKAHEAD,
    );
    assert_eq!(d.take_error().0, 0);
}

/// Submit a FILL of `pages` unmapped pages of ASID 0 and return its work id and the number of
/// records its stall posted (all of one stall's records are posted at once).
fn stall_with_lookahead(d: &mut TestDriver, pages: u64) -> (u32, u32) {
    d.root(0);
    let before = d.r32(regs::FAULT_BUF_PUT);
    let id = d.submit(Command::fill(0, VA, pages * PAGE_SIZE, 1));
    wait_until("the stall's records", || {
        d.r32(regs::FAULT_BUF_PUT) != before
    });
    let n = d.r32(regs::FAULT_BUF_PUT).wrapping_sub(before);
    let records: Vec<(u64, bool)> = std::iter::from_fn(|| d.next_fault())
        .map(|f| (f.va, f.lookahead))
        .collect();
    assert_eq!(records.len() as u32, n);
    assert_eq!(records[0], (VA, false));
    for (k, r) in records.iter().enumerate().skip(1) {
        assert_eq!(*r, (VA + k as u64 * PAGE_SIZE, true));
    }
    (id, n)
}

#[test]
fn the_lookahead_depth_is_writable_up_to_the_capability_and_used() {
    let mut d = TestDriver::new();
    let cap = d.r32(regs::CAP_FAULT_LOOKAHEAD);
    assert_eq!(cap, firmware_stubs::DEFAULT_FAULT_LOOKAHEAD);
    assert_eq!(d.r32(regs::FAULT_LOOKAHEAD_DEPTH), cap, "power-on value");
    enable_lookahead(&d);

    d.w32(regs::FAULT_LOOKAHEAD_DEPTH, cap + 1);
    assert_eq!(
        d.take_error(),
        (
            ErrorCode::BadRegisterValue as u32,
            regs::FAULT_LOOKAHEAD_DEPTH
        )
    );
    assert_eq!(d.r32(regs::FAULT_LOOKAHEAD_DEPTH), cap, "unchanged");

    let (id, n) = stall_with_lookahead(&mut d, 20);
    assert_eq!(n, 1 + cap);
    d.cancel(id, 0);
    d.wait_completion(id);

    d.w32(regs::FAULT_LOOKAHEAD_DEPTH, 3);
    assert_eq!(d.take_error().0, 0);
    assert_eq!(d.r32(regs::FAULT_LOOKAHEAD_DEPTH), 3);
    let (id, n) = stall_with_lookahead(&mut d, 20);
    assert_eq!(n, 1 + 3);
    d.cancel(id, 0);
    d.wait_completion(id);

    d.w32(regs::FAULT_LOOKAHEAD_DEPTH, 0);
    let (id, n) = stall_with_lookahead(&mut d, 20);
    assert_eq!(n, 1, "depth 0: no lookahead records");
    d.cancel(id, 0);
    d.wait_completion(id);

    d.w32(regs::FAULT_LOOKAHEAD_DEPTH, cap);
    assert_eq!(d.r32(regs::FAULT_LOOKAHEAD_DEPTH), cap);
    // A reset brings the power-on value back.
    d.w32(regs::FAULT_LOOKAHEAD_DEPTH, 2);
    d.dev.reset();
    assert_eq!(d.r32(regs::FAULT_LOOKAHEAD_DEPTH), cap);
}

#[test]
fn without_the_feature_the_lookahead_depth_reads_0_and_refuses_writes() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            lookahead_depth_writable: false,
            ..Default::default()
        },
        32,
    );
    assert_eq!(d.r32(regs::FAULT_LOOKAHEAD_DEPTH), 0);
    d.w32(regs::FAULT_LOOKAHEAD_DEPTH, 1);
    assert_eq!(
        d.take_error(),
        (
            ErrorCode::BadRegisterAccess as u32,
            regs::FAULT_LOOKAHEAD_DEPTH
        )
    );
    enable_lookahead(&d);
    let (id, n) = stall_with_lookahead(&mut d, 20);
    assert_eq!(
        n,
        1 + firmware_stubs::DEFAULT_FAULT_LOOKAHEAD,
        "the capability's depth"
    );
    d.cancel(id, 0);
    d.wait_completion(id);
}

// ---------------------------------------------------------------- invalidation queue

/// Configure and enable a queue of `entries` descriptors at `TLBIQ_OFF`.
fn enable_queue(d: &TestDriver, entries: u32) {
    d.w64(regs::TLBIQ_BASE, CTRL_IOVA + TLBIQ_OFF);
    d.w32(regs::TLBIQ_ENTRIES, entries);
    d.w32(regs::TLBIQ_CTRL, tlbiq_ctrl::ENABLE);
    assert_eq!(d.take_error().0, 0);
}

/// Write the descriptor of free-running index `index` into its slot.
fn post(d: &TestDriver, entries: u32, index: u32, raw: [u8; 32]) {
    let slot = u64::from(index % entries);
    d.ctrl
        .write_bytes(TLBIQ_OFF + slot * TlbiDescriptor::SIZE as u64, &raw)
        .expect("queue write");
}

fn range(asid: u16, va: u64, size: u64) -> [u8; 32] {
    TlbiDescriptor {
        asid,
        scope: TlbiScope::Range as u16,
        va,
        size,
    }
    .encode()
}

/// Data-region page `page`, filled with `byte`.
fn fill_page(d: &TestDriver, page: u64, byte: u8) {
    d.data_write(page * PAGE_SIZE, &vec![byte; PAGE_SIZE as usize]);
}

/// Map `VA` of `asid` to data page `old` and cache the translation; then point the leaf at
/// `new` without invalidating. Returns the checksums of the old and the new page.
fn cache_then_repoint(d: &mut TestDriver, asid: u16, old: u64, new: u64) -> (u64, u64) {
    fill_page(d, old, old as u8);
    fill_page(d, new, new as u8);
    d.map_4k(asid, VA, DATA_IOVA + old * PAGE_SIZE, Perms::RW);
    let old_sum = d.checksum_ok(asid, VA, PAGE_SIZE);
    let leaf = d.entry_iova(asid, VA, 1);
    d.write_ctrl_u64(leaf, Pte::leaf(DATA_IOVA + new * PAGE_SIZE, Perms::RW));
    assert_eq!(
        d.checksum_ok(asid, VA, PAGE_SIZE),
        old_sum,
        "the TLB still holds the old translation of ASID {asid}"
    );
    let new_sum = fnv(&vec![new as u8; PAGE_SIZE as usize]);
    assert_ne!(old_sum, new_sum);
    (old_sum, new_sum)
}

#[test]
fn one_doorbell_invalidates_sixteen_address_spaces_with_one_fence() {
    let mut d = TestDriver::new();
    let entries = 32;
    enable_queue(&d, entries);
    let mut sums = Vec::new();
    for asid in 0..16u16 {
        let (_, new) = cache_then_repoint(&mut d, asid, u64::from(asid), 100 + u64::from(asid));
        sums.push(new);
        post(&d, entries, u32::from(asid), range(asid, VA, PAGE_SIZE));
    }
    let tlbi_count = d.r32(regs::TLBI_COUNT);
    d.w32(regs::TLBIQ_TAIL, 16);
    // The doorbell write returns after the work: HEAD has caught up already.
    assert_eq!(d.take_error().0, 0);
    assert_eq!(d.r32(regs::TLBIQ_HEAD), 16);
    assert_eq!(d.r32(regs::TLBIQ_TAIL), 16);
    assert_eq!(d.r64(regs::TLBIQ_PERFORMED), 16);
    assert_eq!(d.r64(regs::TLBIQ_FENCES), 1);
    assert_eq!(
        d.r32(regs::TLBI_COUNT),
        tlbi_count,
        "the queue has its own counters"
    );
    for asid in 0..16u16 {
        assert_eq!(
            d.checksum_ok(asid, VA, PAGE_SIZE),
            sums[usize::from(asid)],
            "ASID {asid} uses the new page"
        );
    }
    // Ringing again with nothing new performs nothing and fences nothing.
    d.w32(regs::TLBIQ_TAIL, 16);
    assert_eq!(d.take_error().0, 0);
    assert_eq!(d.r64(regs::TLBIQ_FENCES), 1);
    // A second batch fills the whole ring, wrapping it (indices 16..48, slots 16..31 then
    // 0..15); one more would be more than ENTRIES ahead of HEAD.
    for index in 16..48u32 {
        post(
            &d,
            entries,
            index,
            range((index % 16) as u16, VA, PAGE_SIZE),
        );
    }
    d.w32(regs::TLBIQ_TAIL, 49);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadDoorbell as u32, 49),
        "more than ENTRIES"
    );
    d.w32(regs::TLBIQ_TAIL, 48);
    assert_eq!(d.take_error().0, 0);
    assert_eq!(
        (
            d.r32(regs::TLBIQ_HEAD),
            d.r64(regs::TLBIQ_PERFORMED),
            d.r64(regs::TLBIQ_FENCES)
        ),
        (48, 48, 2)
    );
}

#[test]
fn leaf_only_descriptors_keep_the_walk_cache_and_others_drop_it() {
    let mut d = TestDriver::new();
    let entries = 4;
    enable_queue(&d, entries);
    d.map_data(0, VA, 0, PAGE_SIZE, Perms::RW);
    d.checksum_ok(0, VA, PAGE_SIZE);
    let leaf_only = TlbiDescriptor {
        asid: 0,
        scope: (TlbiScope::Range as u32 | tlbi_scope::LEAF_ONLY) as u16,
        va: VA,
        size: PAGE_SIZE,
    };
    post(&d, entries, 0, leaf_only.encode());
    d.w32(regs::TLBIQ_TAIL, 1);
    let hits = d.r64(regs::WALK_CACHE_HITS);
    d.checksum_ok(0, VA, PAGE_SIZE);
    assert_eq!(
        d.r64(regs::WALK_CACHE_HITS),
        hits + 1,
        "the walk started below the root"
    );
    post(&d, entries, 1, range(0, VA, PAGE_SIZE));
    d.w32(regs::TLBIQ_TAIL, 2);
    let hits = d.r64(regs::WALK_CACHE_HITS);
    d.checksum_ok(0, VA, PAGE_SIZE);
    assert_eq!(
        d.r64(regs::WALK_CACHE_HITS),
        hits,
        "the walk started at the root"
    );
    assert_eq!(d.take_error().0, 0);
}

#[test]
fn a_malformed_descriptor_invalidates_everything_and_is_reported() {
    let mut d = TestDriver::new();
    let entries = 4;
    enable_queue(&d, entries);
    // First batch: three good descriptors for an ASID nothing uses, so the second batch's
    // indices are 3..6 and the malformed one (index 4) sits in slot 0.
    for index in 0..3 {
        post(&d, entries, index, range(40, VA, PAGE_SIZE));
    }
    d.w32(regs::TLBIQ_TAIL, 3);
    assert_eq!(d.take_error().0, 0);
    let mut sums = Vec::new();
    for asid in [0u16, 1, 2] {
        let (_, new) = cache_then_repoint(&mut d, asid, 10 + u64::from(asid), 20 + u64::from(asid));
        sums.push(new);
    }
    let mut bad = range(41, VA, PAGE_SIZE);
    bad[4] = 1; // reserved
    post(&d, entries, 3, range(41, VA, PAGE_SIZE));
    post(&d, entries, 4, bad);
    post(&d, entries, 5, range(42, VA, PAGE_SIZE));
    d.w32(regs::TLBIQ_TAIL, 6);
    assert_eq!(d.take_error(), (ErrorCode::BadTlbiDescriptor as u32, 4));
    assert_eq!(d.r32(regs::TLBIQ_HEAD), 6, "the batch completed");
    assert_eq!(d.r64(regs::TLBIQ_PERFORMED), 6);
    assert_eq!(d.r64(regs::TLBIQ_FENCES), 2);
    // No descriptor named ASIDs 0..3, yet their translations are gone.
    for (k, asid) in [0u16, 1, 2].into_iter().enumerate() {
        assert_eq!(d.checksum_ok(asid, VA, PAGE_SIZE), sums[k], "ASID {asid}");
    }

    // Every kind of malformed descriptor is reported with its index.
    let malformed = [
        range(64, VA, PAGE_SIZE),
        range(1, VA + 1, PAGE_SIZE),
        range(1, VA, 0),
        range(1, VA, 100),
        range(1, 1 << 48, PAGE_SIZE),
        TlbiDescriptor {
            asid: 1,
            scope: 3,
            va: 0,
            size: 0,
        }
        .encode(),
        TlbiDescriptor {
            asid: 1,
            scope: TlbiScope::All as u16,
            va: 0,
            size: 0,
        }
        .encode(),
        TlbiDescriptor {
            asid: 1,
            scope: TlbiScope::Asid as u16 | 1 << 4,
            va: 0,
            size: 0,
        }
        .encode(),
    ];
    let mut index = 6u32;
    for raw in malformed {
        post(&d, entries, index, raw);
        index += 1;
        d.w32(regs::TLBIQ_TAIL, index);
        assert_eq!(
            d.take_error(),
            (ErrorCode::BadTlbiDescriptor as u32, u64::from(index - 1)),
            "{raw:?}"
        );
    }
}

#[test]
fn queue_geometry_and_doorbells_are_checked() {
    let d = TestDriver::new();
    let cap = d.r32(regs::CAP_TLBIQ_ENTRIES);
    assert_eq!(cap, firmware_stubs::DEFAULT_TLBI_QUEUE_ENTRIES);
    let bad_value = |off| (ErrorCode::BadRegisterValue as u32, off);
    d.w64(regs::TLBIQ_BASE, CTRL_IOVA + 0x800);
    assert_eq!(d.take_error(), bad_value(regs::TLBIQ_BASE));
    for entries in [0, 1, 3, cap * 2] {
        d.w32(regs::TLBIQ_ENTRIES, entries);
        assert_eq!(d.take_error(), bad_value(regs::TLBIQ_ENTRIES), "{entries}");
    }
    d.w32(regs::TLBIQ_CTRL, tlbiq_ctrl::ENABLE);
    assert_eq!(
        d.take_error(),
        bad_value(regs::TLBIQ_CTRL),
        "no ring configured"
    );
    d.w32(regs::TLBIQ_TAIL, 1);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadDoorbell as u32, 1),
        "disabled"
    );
    enable_queue(&d, 8);
    d.w32(regs::TLBIQ_CTRL, tlbiq_ctrl::ENABLE | 1 << 1);
    assert_eq!(d.take_error(), bad_value(regs::TLBIQ_CTRL));
    d.w64(regs::TLBIQ_BASE, CTRL_IOVA);
    assert_eq!(d.take_error(), bad_value(regs::TLBIQ_BASE), "while enabled");
    d.w32(regs::TLBIQ_ENTRIES, 4);
    assert_eq!(
        d.take_error(),
        bad_value(regs::TLBIQ_ENTRIES),
        "while enabled"
    );
    d.w32(regs::TLBIQ_TAIL, 9);
    assert_eq!(d.take_error(), (ErrorCode::BadDoorbell as u32, 9));
    assert_eq!(d.r32(regs::TLBIQ_TAIL), 0, "ignored");
    assert_eq!(d.r32(regs::TLBIQ_HEAD), 0);

    // A queue whose memory the IOMMU refuses: IOMMU fault, HEAD stays, TAIL moved.
    d.w32(regs::TLBIQ_CTRL, 0);
    let unmapped = 0x9000_0000;
    d.w64(regs::TLBIQ_BASE, unmapped);
    d.w32(regs::TLBIQ_CTRL, tlbiq_ctrl::ENABLE);
    assert_eq!(d.take_error().0, 0);
    d.w32(regs::TLBIQ_TAIL, 2);
    assert_eq!(d.take_error(), (ErrorCode::IommuFault as u32, unmapped));
    assert_eq!((d.r32(regs::TLBIQ_HEAD), d.r32(regs::TLBIQ_TAIL)), (0, 2));
    assert_eq!(d.r64(regs::TLBIQ_FENCES), 0);
    d.w32(regs::TLBIQ_TAIL, 1);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadDoorbell as u32, 1),
        "backwards"
    );
    // Disabling resets both indices.
    d.w32(regs::TLBIQ_CTRL, 0);
    assert_eq!((d.r32(regs::TLBIQ_HEAD), d.r32(regs::TLBIQ_TAIL)), (0, 0));

    // Reset: disabled, indices and counters 0.
    enable_queue(&d, 8);
    post(&d, 8, 0, range(0, VA, PAGE_SIZE));
    d.w32(regs::TLBIQ_TAIL, 1);
    assert_eq!(d.r64(regs::TLBIQ_PERFORMED), 1);
    d.dev.reset();
    for off in [
        regs::TLBIQ_CTRL,
        regs::TLBIQ_TAIL,
        regs::TLBIQ_HEAD,
        regs::TLBIQ_ENTRIES,
    ] {
        assert_eq!(d.r32(off), 0, "{off:#x}");
    }
    for off in [regs::TLBIQ_BASE, regs::TLBIQ_PERFORMED, regs::TLBIQ_FENCES] {
        assert_eq!(d.r64(off), 0, "{off:#x}");
    }
}

#[test]
fn without_the_queue_its_registers_read_0_and_refuse_writes() {
    let d = TestDriver::with(
        AcceleratorConfig {
            tlbi_queue_entries: 0,
            ..Default::default()
        },
        32,
    );
    assert_eq!(d.r32(regs::CAP_FEATURES) & features::TLBI_QUEUE, 0);
    for off in [
        regs::CAP_TLBIQ_ENTRIES,
        regs::TLBIQ_ENTRIES,
        regs::TLBIQ_CTRL,
        regs::TLBIQ_TAIL,
        regs::TLBIQ_HEAD,
    ] {
        assert_eq!(d.r32(off), 0, "{off:#x}");
    }
    for off in [regs::TLBIQ_BASE, regs::TLBIQ_PERFORMED, regs::TLBIQ_FENCES] {
        assert_eq!(d.r64(off), 0, "{off:#x}");
    }
    assert_eq!(d.take_error().0, 0);
    let access = |off| (ErrorCode::BadRegisterAccess as u32, off);
    d.w64(regs::TLBIQ_BASE, CTRL_IOVA + TLBIQ_OFF);
    assert_eq!(d.take_error(), access(regs::TLBIQ_BASE));
    for off in [regs::TLBIQ_ENTRIES, regs::TLBIQ_CTRL, regs::TLBIQ_TAIL] {
        d.w32(off, 1);
        assert_eq!(d.take_error(), access(off));
    }
    assert_eq!(d.r64(regs::TLBIQ_BASE), 0);
}
