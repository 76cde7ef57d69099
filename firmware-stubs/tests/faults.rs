//! Replayable faults: stall, fault record, replay, cancel, the fault ring (wrap, overflow) and
//! the coalesced fault interrupt.

mod common;

use accel_abi::pt::Perms;
use accel_abi::regs::{self, ErrorCode};
use accel_abi::{vector, AccessKind, Command, FaultReason, Status, PAGE_SIZE};
use common::*;
use firmware_stubs::AcceleratorConfig;

#[test]
fn stall_fault_replay_completes_and_keeps_progress() {
    let mut d = TestDriver::new();
    // Pages 0 and 2 mapped, page 1 not: the FILL stalls at the start of page 1.
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.map_4k(0, VA + 2 * PAGE_SIZE, DATA_IOVA + 2 * PAGE_SIZE, Perms::RW);
    let id = d.submit(Command::fill(0, VA, 3 * PAGE_SIZE, 0x5a5a_5a5a_5a5a_5a5a));
    let f = d.wait_fault();
    assert_eq!(f.work_id, id);
    assert_eq!(f.va, VA + PAGE_SIZE);
    assert_eq!(f.asid, 0);
    assert_eq!(
        (f.access, f.reason),
        (AccessKind::Write, FaultReason::NotPresent)
    );
    assert!(d.try_completion(id).is_none());
    assert_ne!(d.r32(regs::STATUS) & regs::status::STALLED, 0);
    // Progress so far is kept: page 0 is written, page 2 not yet.
    assert!(d
        .data_read(0, PAGE_SIZE as usize)
        .iter()
        .all(|b| *b == 0x5a));
    assert!(d.data_read(2 * PAGE_SIZE, 8).iter().all(|b| *b == 0));

    // A replay without servicing re-faults at the same place, with a new record.
    d.replay();
    let again = d.wait_fault();
    assert_eq!((again.work_id, again.va), (id, VA + PAGE_SIZE));
    assert!(again.timestamp_ns >= f.timestamp_ns);

    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::RW);
    d.replay();
    let c = d.wait_completion(id);
    assert_eq!((c.status, c.result), (Status::Ok, 0));
    assert!(d
        .data_read(0, 3 * PAGE_SIZE as usize)
        .iter()
        .all(|b| *b == 0x5a));
    assert_eq!(
        d.r32(regs::STATUS) & (regs::status::STALLED | regs::status::BUSY),
        0
    );
}

#[test]
fn copy_and_checksum_resume_exactly_where_they_stalled() {
    let mut d = TestDriver::new();
    let src: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    d.data_write(0, &src);
    // Source fully mapped, destination's second page missing; unaligned start offsets so that
    // chunks are bounded by both operands' page boundaries.
    d.map_data(0, VA, 0, 2 * PAGE_SIZE, Perms::R);
    let dst_va = VA + 0x10_0000;
    d.map_4k(0, dst_va, DATA_IOVA + 8 * PAGE_SIZE, Perms::RW);
    let len = 2 * PAGE_SIZE - 300;
    let id = d.submit(Command::copy(0, dst_va + 100, VA + 200, len));
    let f = d.wait_fault();
    assert_eq!((f.va, f.access), (dst_va + PAGE_SIZE, AccessKind::Write));
    d.map_4k(0, dst_va + PAGE_SIZE, DATA_IOVA + 9 * PAGE_SIZE, Perms::RW);
    d.replay();
    assert_eq!(d.wait_completion(id).status, Status::Ok);
    let out = d.data_read(8 * PAGE_SIZE + 100, len as usize);
    assert_eq!(out, &src[200..200 + len as usize]);

    // CHECKSUM over a range with a hole, serviced mid-way, equals the one-shot FNV-1a.
    let va2 = VA + 0x20_0000;
    d.map_4k(0, va2, DATA_IOVA, Perms::R);
    let id = d.submit(Command::checksum(0, va2 + 10, 2 * PAGE_SIZE - 20));
    assert_eq!(d.wait_fault().va, va2 + PAGE_SIZE);
    d.map_4k(0, va2 + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::R);
    d.replay();
    let c = d.wait_completion(id);
    let expect = accel_abi::fnv1a_update(
        accel_abi::FNV_OFFSET,
        &src[10..(2 * PAGE_SIZE - 10) as usize],
    );
    assert_eq!((c.status, c.result), (Status::Ok, expect));
}

#[test]
fn cancel_completes_a_stalled_item_with_the_drivers_code() {
    let mut d = TestDriver::new();
    d.root(0);
    let id = d.submit(Command::fill(0, VA, 8, 1));
    assert_eq!(d.wait_fault().work_id, id);
    d.cancel(id, 0xdead);
    let c = d.wait_completion(id);
    assert_eq!((c.status, c.result), (Status::Cancelled, 0xdead));
    assert_eq!(d.r32(regs::STATUS) & regs::status::STALLED, 0);
    // Cancelling it again (no longer stalled) is a bad register value and changes nothing.
    d.cancel(id, 1);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadRegisterValue as u32, regs::FAULT_CANCEL)
    );
    assert_eq!(d.wait_completion(id).result, 0xdead);
}

#[test]
fn cancel_racing_a_replay_is_retried_until_it_lands() {
    // After a replay the item may be running when the cancel arrives; the cancel is then
    // refused (BAD_REGISTER_VALUE) and the item re-faults, so the driver cancels again. The item
    // must end up cancelled exactly once whatever the interleaving.
    let mut d = TestDriver::new();
    d.root(0);
    let id = d.submit(Command::fill(0, VA, 8, 1));
    assert_eq!(d.wait_fault().work_id, id);
    d.replay();
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 1000, "cancel never landed");
        d.cancel(id, 5);
        let (code, _) = d.take_error();
        if code == 0 {
            break;
        }
        assert_eq!(code, ErrorCode::BadRegisterValue as u32);
        assert_eq!(
            d.wait_fault().work_id,
            id,
            "a refused cancel means it re-faults"
        );
    }
    let c = d.wait_completion(id);
    assert_eq!((c.status, c.result), (Status::Cancelled, 5));
}

#[test]
fn fault_ring_wraps_with_free_running_indices() {
    let mut d = TestDriver::with(AcceleratorConfig::default(), 4);
    d.root(0);
    let mut last_ts = 0;
    for i in 0..10u64 {
        let id = d.submit(Command::fill(0, VA + i * PAGE_SIZE, 8, i));
        let f = d.wait_fault();
        assert_eq!((f.work_id, f.va), (id, VA + i * PAGE_SIZE));
        assert!(f.timestamp_ns >= last_ts);
        last_ts = f.timestamp_ns;
        d.cancel(id, 0);
        d.wait_completion(id);
    }
    assert_eq!(d.r32(regs::FAULT_BUF_PUT), 10);
    assert_eq!(d.r32(regs::FAULT_BUF_GET), 10);
    assert_eq!(d.r32(regs::FAULT_BUF_CTRL) & regs::fault_ctrl::OVERFLOW, 0);
}

#[test]
fn overflow_drops_the_record_but_keeps_the_item_stalled() {
    let mut d = TestDriver::with(AcceleratorConfig::default(), 2);
    d.root(0);
    let ids: Vec<u32> = (0..3u64)
        .map(|i| d.submit(Command::fill(0, VA + i * PAGE_SIZE, 8, 0x77)))
        .collect();
    wait_until("overflow", || {
        d.r32(regs::STATUS) & regs::status::FAULT_OVERFLOW != 0
    });
    assert_eq!(
        d.r32(regs::FAULT_BUF_PUT),
        2,
        "ring holds exactly 2 records"
    );
    assert_ne!(d.r32(regs::FAULT_BUF_CTRL) & regs::fault_ctrl::OVERFLOW, 0);
    let mut seen: Vec<u32> = vec![d.wait_fault().work_id, d.wait_fault().work_id];
    assert!(d.next_fault().is_none());
    // Clear OVERFLOW (W1C, keeping ENABLE) and service every page.
    d.w32(
        regs::FAULT_BUF_CTRL,
        regs::fault_ctrl::ENABLE | regs::fault_ctrl::OVERFLOW,
    );
    assert_eq!(d.r32(regs::FAULT_BUF_CTRL), regs::fault_ctrl::ENABLE);
    // Only the items seen get serviced at first: the dropped one re-faults on replay.
    let dropped = *ids.iter().find(|i| !seen.contains(i)).expect("one dropped");
    for i in 0..3u64 {
        if ids[i as usize] != dropped {
            d.map_4k(0, VA + i * PAGE_SIZE, DATA_IOVA + i * PAGE_SIZE, Perms::RW);
        }
    }
    d.replay();
    let f = d.wait_fault();
    assert_eq!(f.work_id, dropped, "the dropped fault comes back on replay");
    seen.push(f.work_id);
    let i = ids.iter().position(|x| *x == dropped).expect("index") as u64;
    d.map_4k(0, VA + i * PAGE_SIZE, DATA_IOVA + i * PAGE_SIZE, Perms::RW);
    d.replay();
    for id in ids {
        assert_eq!(d.wait_completion(id).status, Status::Ok);
    }
    for i in 0..3 {
        assert_eq!(d.data_read(i * PAGE_SIZE, 1), vec![0x77]);
    }
}

#[test]
fn disabled_fault_buffer_makes_translation_faults_fatal() {
    let mut d = TestDriver::new();
    d.w32(regs::FAULT_BUF_CTRL, 0);
    d.root(0);
    let c = d.run(Command::fill(0, VA + 8, 8, 1));
    assert_eq!((c.status, c.result), (Status::PageFault, VA + 8));
    assert_eq!(d.r32(regs::FAULT_BUF_PUT), 0);
}

#[test]
fn stalled_items_do_not_occupy_workers() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            workers: 1,
            ..Default::default()
        },
        32,
    );
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    let stalled: Vec<u32> = (1..4u64)
        .map(|i| d.submit(Command::fill(0, VA + i * PAGE_SIZE, 8, 1)))
        .collect();
    for _ in 0..3 {
        d.wait_fault();
    }
    // The single worker is free: later work runs while three items are stalled.
    let c = d.run(Command::fill(0, VA, 8, 2));
    assert_eq!(c.status, Status::Ok);
    for id in stalled {
        assert!(d.try_completion(id).is_none());
        d.cancel(id, 0);
    }
}

#[test]
fn fault_interrupt_is_coalesced_until_cleared() {
    let mut d = TestDriver::new();
    let (ev, fd) = irq_eventfd();
    d.dev.set_irq(vector::FAULT, Some(fd)).expect("set_irq");
    d.root(0);
    let a = d.submit(Command::fill(0, VA, 8, 1));
    let b = d.submit(Command::fill(0, VA + PAGE_SIZE, 8, 1));
    d.wait_put(2);
    assert_eq!(
        drain(&ev),
        1,
        "two faults, one interrupt until INTR_STATUS is cleared"
    );
    assert_ne!(d.r32(regs::INTR_STATUS) & regs::intr::FAULT, 0);
    // Driver protocol: clear, then drain the ring.
    d.w32(regs::INTR_STATUS, regs::intr::FAULT);
    d.wait_fault();
    d.wait_fault();
    d.cancel(a, 0);
    d.cancel(b, 0);
    let c = d.submit(Command::fill(0, VA + 2 * PAGE_SIZE, 8, 1));
    d.wait_put(3);
    assert_eq!(drain(&ev), 1, "a fault after the clear interrupts again");
    // Masked: the status bit is set but nothing fires until unmasked.
    d.w32(regs::INTR_STATUS, regs::intr::FAULT);
    d.w32(regs::INTR_MASK, regs::intr::FAULT);
    d.wait_fault();
    d.replay();
    d.wait_put(4);
    assert_eq!(drain(&ev), 0);
    assert_ne!(d.r32(regs::INTR_STATUS) & regs::intr::FAULT, 0);
    d.w32(regs::INTR_MASK, 0);
    assert_eq!(drain(&ev), 1, "unmasking a pending status bit delivers it");
    d.cancel(c, 0);
}

fn enable_lookahead(d: &TestDriver) {
    d.w32(
        regs::FAULT_BUF_CTRL,
        regs::fault_ctrl::ENABLE | regs::fault_ctrl::LOOKAHEAD,
    );
    assert_eq!(d.r32(regs::ERROR_CODE), 0);
}

#[test]
fn lookahead_reports_the_next_missing_pages_of_the_operand_at_once() {
    let mut d = TestDriver::new();
    enable_lookahead(&d);
    // Six pages (the last one partly): 0 and 3 mapped. The FILL stalls at page 1; the device
    // also reports page 2 and stops looking at page 3, which translates.
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.map_4k(0, VA + 3 * PAGE_SIZE, DATA_IOVA + 3 * PAGE_SIZE, Perms::RW);
    let len = 5 * PAGE_SIZE + 100;
    let id = d.submit(Command::fill(0, VA, len, 0x1111_1111_1111_1111));
    d.wait_put(2);
    let first = d.next_fault().unwrap();
    let ahead = d.next_fault().unwrap();
    assert_eq!((first.va, first.lookahead), (VA + PAGE_SIZE, false));
    assert_eq!(
        (ahead.va, ahead.work_id, ahead.access, ahead.lookahead),
        (VA + 2 * PAGE_SIZE, id, AccessKind::Write, true)
    );
    assert!(d.next_fault().is_none());
    // Looking ahead wrote nothing: page 3 is untouched until the item gets there.
    assert!(d.data_read(3 * PAGE_SIZE, 8).iter().all(|b| *b == 0));

    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::RW);
    d.map_4k(0, VA + 2 * PAGE_SIZE, DATA_IOVA + 2 * PAGE_SIZE, Perms::RW);
    d.replay();
    // Pages 4 and 5 (5 only partly inside the operand) come in the next stall's records.
    d.wait_put(4);
    let vas: Vec<(u64, bool)> = std::iter::from_fn(|| d.next_fault())
        .map(|f| (f.va, f.lookahead))
        .collect();
    assert_eq!(
        vas,
        [(VA + 4 * PAGE_SIZE, false), (VA + 5 * PAGE_SIZE, true)]
    );
    d.map_4k(0, VA + 4 * PAGE_SIZE, DATA_IOVA + 4 * PAGE_SIZE, Perms::RW);
    d.map_4k(0, VA + 5 * PAGE_SIZE, DATA_IOVA + 5 * PAGE_SIZE, Perms::RW);
    d.replay();
    assert_eq!(d.wait_completion(id).status, Status::Ok);
    assert!(d.data_read(0, len as usize).iter().all(|b| *b == 0x11));
    assert_eq!(d.data_read(len, 8), [0; 8]);
}

#[test]
fn lookahead_is_bounded_by_its_depth_and_free_slots_and_never_overflows() {
    let depth = 5;
    let mut d = TestDriver::with(
        AcceleratorConfig {
            fault_lookahead: depth,
            ..Default::default()
        },
        8,
    );
    enable_lookahead(&d);
    d.root(0);
    assert_eq!(d.r32(regs::CAP_FAULT_LOOKAHEAD), depth);
    // A 16-page CHECKSUM over nothing mapped: 1 + depth records.
    let a = d.submit(Command::checksum(0, VA, 16 * PAGE_SIZE));
    d.wait_put(6);
    // A second one while those 6 of the 8 slots are unconsumed: 1 + 1, and the rest of its
    // lookahead is dropped without OVERFLOW.
    let vb = VA + 0x10_0000;
    let b = d.submit(Command::checksum(0, vb, 16 * PAGE_SIZE));
    d.wait_put(8);
    let got: Vec<(u32, u64, AccessKind, bool)> = std::iter::from_fn(|| d.next_fault())
        .map(|f| (f.work_id, f.va, f.access, f.lookahead))
        .collect();
    let want: Vec<(u32, u64, AccessKind, bool)> = (0..6)
        .map(|k| (a, VA + k * PAGE_SIZE, AccessKind::Read, k > 0))
        .chain((0..2).map(|k| (b, vb + k * PAGE_SIZE, AccessKind::Read, k > 0)))
        .collect();
    assert_eq!(got, want);
    assert_eq!(d.r32(regs::FAULT_BUF_CTRL) & regs::fault_ctrl::OVERFLOW, 0);
    for id in [a, b] {
        d.cancel(id, 1);
        assert_eq!(d.wait_completion(id).status, Status::Cancelled);
    }
}

#[test]
fn lookahead_stays_off_until_the_driver_asks_and_never_latches_errors() {
    let mut d = TestDriver::new();
    d.root(0);
    // Without FAULT_BUF_CTRL.LOOKAHEAD: one record per stall, as before.
    let id = d.submit(Command::fill(0, VA, 4 * PAGE_SIZE, 0));
    d.wait_put(1);
    assert!(!d.wait_fault().lookahead);
    assert!(d.next_fault().is_none());
    d.cancel(id, 1);
    d.wait_completion(id);
    // With it: a malformed entry two pages ahead ends the lookahead silently; only the access
    // that reaches it reports BAD_PTE.
    enable_lookahead(&d);
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA, Perms::R); // read-only: Permission ahead
                                                      // A valid leaf with a reserved bit set: malformed.
    d.set_entry(
        0,
        VA + 2 * PAGE_SIZE,
        1,
        accel_abi::pt::VALID | accel_abi::pt::LEAF | accel_abi::pt::READ | (1 << 62),
    );
    let id = d.submit(Command::fill(0, VA, 4 * PAGE_SIZE, 0));
    d.wait_put(3);
    let a = d.wait_fault();
    let b = d.wait_fault();
    assert_eq!(
        (a.va, a.reason, a.lookahead),
        (VA, FaultReason::NotPresent, false)
    );
    assert_eq!(
        (b.va, b.reason, b.lookahead),
        (VA + PAGE_SIZE, FaultReason::Permission, true)
    );
    assert!(d.next_fault().is_none());
    assert_eq!(d.r32(regs::ERROR_CODE), 0);
    d.cancel(id, 1);
    d.wait_completion(id);
}
