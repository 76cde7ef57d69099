//! Each command, completion records and interrupts, FENCE ordering, the command ring.

mod common;

use accel_abi::pt::Perms;
use accel_abi::regs::{self, ErrorCode};
use accel_abi::{fnv1a_update, vector, AccessKind, Command, Status, FNV_OFFSET, PAGE_SIZE};
use common::*;
use firmware_stubs::AcceleratorConfig;

#[test]
fn copy_moves_bytes_between_unaligned_ranges() {
    let mut d = TestDriver::new();
    d.map_data(0, VA, 0, 16 * PAGE_SIZE, Perms::RW);
    let src: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 253) as u8).collect();
    d.data_write(0, &src);
    let len = 3 * PAGE_SIZE - 1000;
    let c = d.run(Command::copy(0, VA + 8 * PAGE_SIZE + 333, VA + 17, len));
    assert_eq!((c.status, c.result), (Status::Ok, 0));
    assert_eq!(
        d.data_read(8 * PAGE_SIZE + 333, len as usize),
        &src[17..17 + len as usize]
    );
    assert_eq!(d.data_read(8 * PAGE_SIZE + 332, 1), vec![0]);
}

#[test]
fn checksum_is_fnv1a_of_the_range() {
    let mut d = TestDriver::new();
    d.map_data(0, VA, 0, 2 * PAGE_SIZE, Perms::R);
    let bytes: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 256) as u8).collect();
    d.data_write(0, &bytes);
    let c = d.run(Command::checksum(0, VA + 3, 4990));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(c.result, fnv1a_update(FNV_OFFSET, &bytes[3..4993]));
}

#[test]
fn atomic_add_is_atomic_across_workers() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            workers: 4,
            ..Default::default()
        },
        32,
    );
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.data_write(64, &1000u64.to_le_bytes());
    let ids: Vec<u32> = (0..60)
        .map(|_| d.submit(Command::atomic_add(0, VA + 64, 3)))
        .collect();
    let mut olds: Vec<u64> = ids
        .iter()
        .map(|id| {
            let c = d.wait_completion(*id);
            assert_eq!(c.status, Status::Ok);
            c.result
        })
        .collect();
    assert_eq!(d.data_u64(64), 1000 + 60 * 3);
    // Every add saw a distinct old value: no lost update.
    olds.sort_unstable();
    let expect: Vec<u64> = (0..60).map(|i| 1000 + 3 * i).collect();
    assert_eq!(olds, expect);
}

#[test]
fn fence_completes_after_earlier_work_including_stalled_work() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    let stalled = d.submit(Command::fill(0, VA + PAGE_SIZE, 8, 1));
    d.wait_fault();
    let fence = d.submit(Command::fence(42));
    // Later work is not held back by the fence...
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
    // ...but the fence waits for the stalled item.
    assert!(d.try_completion(fence).is_none());
    assert_eq!(d.r64(regs::FENCE_DONE), 0);
    assert_ne!(d.r32(regs::STATUS) & regs::status::BUSY, 0);
    d.map_4k(0, VA + PAGE_SIZE, DATA_IOVA + PAGE_SIZE, Perms::RW);
    d.replay();
    assert_eq!(d.wait_completion(stalled).status, Status::Ok);
    assert_eq!(d.wait_completion(fence).status, Status::Ok);
    assert_eq!(d.r64(regs::FENCE_DONE), 42);
    // Fences complete in order.
    let f1 = d.submit(Command::fence(43));
    let f2 = d.submit(Command::fence(44));
    d.wait_completion(f1);
    d.wait_completion(f2);
    assert_eq!(d.r64(regs::FENCE_DONE), 44);
}

#[test]
fn prefetch_warms_the_tlb_and_faults_as_prefetch() {
    let mut d = TestDriver::new();
    d.map_data(0, VA, 0, 4 * PAGE_SIZE, Perms::R);
    assert_eq!(
        d.run(Command::prefetch(0, VA, 4 * PAGE_SIZE)).status,
        Status::Ok
    );
    let misses = d.r64(regs::TLB_MISSES);
    assert_eq!(
        d.run(Command::checksum(0, VA, 4 * PAGE_SIZE)).status,
        Status::Ok
    );
    assert_eq!(
        d.r64(regs::TLB_MISSES),
        misses,
        "all four pages were cached"
    );
    let id = d.submit(Command::prefetch(0, VA + 4 * PAGE_SIZE, 1));
    let f = d.wait_fault();
    assert_eq!((f.work_id, f.access), (id, AccessKind::Prefetch));
    d.cancel(id, 0);
}

#[test]
fn undecodable_command_completes_bad_command_and_the_queue_moves_on() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    let mut raw = Command::fill(0, VA, 8, 1).encode();
    raw[0] = 0x7e; // no such opcode
    let slot = CTRL_IOVA + COMPL_OFF + 16 * 200;
    raw[40..48].copy_from_slice(&slot.to_le_bytes());
    let id = d.submit_raw(&raw);
    wait_until("BadCommand", || d.r32(regs::ERROR_CODE) != 0);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadCommand as u32, u64::from(id))
    );
    let mut b = [0u8; 16];
    d.ctrl
        .read_bytes(COMPL_OFF + 16 * 200, &mut b)
        .expect("read");
    let c = accel_abi::Completion::decode(&b)
        .expect("decode")
        .expect("done");
    assert_eq!(c.status, Status::BadCommand);
    // The next command runs normally.
    assert_eq!(d.run(Command::fill(0, VA, 8, 1)).status, Status::Ok);
    assert_eq!(d.r32(regs::CMDQ_HEAD), 2);
}

#[test]
fn length_above_cap_max_transfer_is_a_bad_command() {
    let mut d = TestDriver::with(
        AcceleratorConfig {
            max_transfer: 8192,
            ..Default::default()
        },
        32,
    );
    assert_eq!(d.r32(regs::CAP_MAX_TRANSFER), 8192);
    d.map_data(0, VA, 0, 4 * PAGE_SIZE, Perms::RW);
    let c = d.run(Command::fill(0, VA, 8193, 1));
    assert_eq!(c.status, Status::BadCommand);
    assert_eq!(d.data_read(0, 1), vec![0], "nothing written");
    assert_eq!(d.run(Command::fill(0, VA, 8192, 1)).status, Status::Ok);
}

#[test]
fn completion_interrupt_only_for_irq_commands() {
    let mut d = TestDriver::new();
    let (ev, fd) = irq_eventfd();
    d.dev
        .set_irq(vector::COMPLETION, Some(fd))
        .expect("set_irq");
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.run(Command::fill(0, VA, 8, 1));
    // The record is written before the interrupt is raised: wait for the bookkeeping.
    d.wait_idle();
    assert_eq!(drain(&ev), 0);
    assert_eq!(d.r32(regs::INTR_STATUS) & regs::intr::COMPLETION, 0);
    d.run(Command::fill(0, VA, 8, 1).with_irq());
    d.wait_idle();
    assert_eq!(drain(&ev), 1);
    assert_ne!(d.r32(regs::INTR_STATUS) & regs::intr::COMPLETION, 0);
    d.w32(regs::INTR_STATUS, regs::intr::COMPLETION);
    d.run(Command::fence(1).with_irq());
    d.wait_idle();
    assert_eq!(drain(&ev), 1);
    assert!(d.dev.set_irq(3, None).is_err());
}

#[test]
fn command_ring_wraps_and_head_counts_fetches() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    let before = d.r32(regs::WORK_COMPLETED);
    for i in 0..150u64 {
        let c = d.run(Command::atomic_add(0, VA, i));
        assert_eq!(c.status, Status::Ok);
    }
    d.wait_idle();
    assert_eq!(d.r32(regs::CMDQ_HEAD), 150);
    assert_eq!(d.r32(regs::WORK_COMPLETED) - before, 150);
    assert_eq!(d.data_u64(0), (0..150).sum::<u64>());
}

#[test]
fn queued_commands_wait_for_control_enable() {
    let mut d = TestDriver::new();
    d.map_4k(0, VA, DATA_IOVA, Perms::RW);
    d.w32(regs::CONTROL, 0);
    let id = d.submit(Command::fill(0, VA, 8, 9));
    // Nothing is fetched while the engine is disabled; the doorbell itself is accepted.
    assert_eq!(d.r32(regs::CMDQ_HEAD), 0);
    assert_eq!(d.r32(regs::ERROR_CODE), 0);
    d.w32(regs::CONTROL, regs::control::ENABLE);
    assert_eq!(d.wait_completion(id).status, Status::Ok);
    assert_eq!(d.data_read(0, 1), vec![9]);
}
