//! The hostile-input rule: random register traffic, random commands and random page tables
//! never panic the emulator or wedge it; after a reset it works normally.
//!
//! The device runs with a single worker, so a worker thread that panicked would leave nothing
//! to run the final sanity command, and the test would fail on its completion timeout.

mod common;

use accel_abi::pt::Perms;
use accel_abi::regs::{self, FIXED_REGISTERS};
use accel_abi::{Command, Opcode, Status, PAGE_SIZE};
use common::*;
use firmware_stubs::AcceleratorConfig;
use proptest::prelude::*;

fn one_worker() -> TestDriver {
    TestDriver::with(
        AcceleratorConfig {
            workers: 1,
            asids: 8,
            ..Default::default()
        },
        8,
    )
}

/// Reset, bring the device back up and check that it runs a command correctly.
fn assert_still_works(d: &mut TestDriver) {
    d.enable_pci();
    d.dev.reset();
    d.bring_up();
    d.map_4k(0, VA, DATA_IOVA + 3 * PAGE_SIZE, Perms::RW);
    let c = d.run(Command::fill(0, VA, 64, 0x6b6b_6b6b_6b6b_6b6b));
    assert_eq!(c.status, Status::Ok);
    assert_eq!(d.data_read(3 * PAGE_SIZE, 64), vec![0x6b; 64]);
}

#[derive(Debug, Clone)]
enum Op {
    Read {
        bar: u32,
        offset: u64,
        len: usize,
    },
    Write {
        bar: u32,
        offset: u64,
        bytes: Vec<u8>,
    },
    Config {
        offset: u64,
        bytes: Vec<u8>,
    },
}

fn offset() -> impl Strategy<Value = u64> {
    let fixed: Vec<u64> = FIXED_REGISTERS.iter().map(|(o, _)| *o).collect();
    prop_oneof![
        4 => proptest::sample::select(fixed),
        2 => (0u16..16).prop_map(regs::asid_root),
        2 => 0u64..0x4100,
        1 => any::<u64>(),
    ]
}

/// Values that are sometimes meaningful (magic, enables, small indices, aligned IOVAs).
fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(u64::from(regs::RESET_MAGIC)),
        0u64..8,
        (0u64..0x200).prop_map(|p| p * PAGE_SIZE),
        (0u64..0x200).prop_map(|p| (CTRL_IOVA + p * PAGE_SIZE) | 1),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![4 => Just(4usize), 4 => Just(8usize), 1 => 0usize..12];
    prop_oneof![
        3 => (0u32..2, offset(), len.clone()).prop_map(|(b, o, l)| Op::Read {
            bar: if b == 0 { 0 } else { 1 + b },
            offset: o,
            len: l,
        }),
        6 => (offset(), value(), len).prop_map(|(o, v, l)| Op::Write {
            bar: 0,
            offset: o,
            bytes: v.to_le_bytes().iter().copied().cycle().take(l).collect(),
        }),
        1 => (0u64..0x110, proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(o, b)| Op::Config { offset: o, bytes: b }),
    ]
}

/// A command that is often almost valid: a real opcode and ASID with random operands, or
/// random bytes altogether.
fn command() -> impl Strategy<Value = [u8; 64]> {
    let structured = (
        1u8..=7,
        0u8..3,
        0u16..10,
        prop_oneof![Just(VA), any::<u64>(), VA..VA + 0x10_0000],
        prop_oneof![Just(VA), any::<u64>(), VA..VA + 0x10_0000],
        prop_oneof![0u64..0x3000, any::<u64>()],
        any::<u64>(),
        prop_oneof![
            Just(0u64),
            (0u64..256).prop_map(|s| CTRL_IOVA + COMPL_OFF + 16 * s),
            any::<u64>()
        ],
    )
        .prop_map(|(op, flags, asid, dst, src, len, value, completion)| {
            let mut b = [0u8; 64];
            b[0] = op;
            b[1] = flags;
            b[2..4].copy_from_slice(&asid.to_le_bytes());
            b[8..16].copy_from_slice(&dst.to_le_bytes());
            b[16..24].copy_from_slice(&src.to_le_bytes());
            b[24..32].copy_from_slice(&len.to_le_bytes());
            b[32..40].copy_from_slice(&value.to_le_bytes());
            b[40..48].copy_from_slice(&completion.to_le_bytes());
            b
        });
    let random = proptest::collection::vec(any::<u8>(), 64).prop_map(|v| {
        let mut b = [0u8; 64];
        b.copy_from_slice(&v);
        b
    });
    prop_oneof![3 => structured, 1 => random]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_register_traffic(ops in proptest::collection::vec(op(), 1..40)) {
        let mut d = one_worker();
        d.map_data(0, VA, 0, 4 * PAGE_SIZE, Perms::RW);
        for op in &ops {
            match op {
                Op::Read { bar, offset, len } => {
                    let mut buf = vec![0u8; *len];
                    d.dev.bar_read(*bar, *offset, &mut buf);
                }
                Op::Write { bar, offset, bytes } => d.dev.bar_write(*bar, *offset, bytes),
                Op::Config { offset, bytes } => d.dev.config_write(*offset, bytes),
            }
        }
        // Whatever happened, ID still reads back once decoding is on.
        d.enable_pci();
        prop_assert_eq!(d.r32(regs::ID), regs::ID_VALUE);
        assert_still_works(&mut d);
    }

    #[test]
    fn random_commands(cmds in proptest::collection::vec(command(), 1..24)) {
        let mut d = one_worker();
        d.map_data(0, VA, 0, 4 * PAGE_SIZE, Perms::RW);
        d.map_4k(1, VA, DATA_IOVA + 8 * PAGE_SIZE, Perms::R);
        for c in &cmds {
            let decodes = Command::decode(c).is_ok();
            let id = d.submit_raw(c);
            // Every command is fetched; undecodable ones retire at once with BAD_COMMAND.
            wait_until("fetch", || d.r32(regs::CMDQ_HEAD) == id.wrapping_add(1));
            if !decodes {
                wait_until("BAD_COMMAND", || d.r32(regs::ERROR_CODE) != 0);
                d.take_error();
            }
        }
        // Items that decoded either complete or stall; none may wedge the fetcher.
        // A fence behind possibly stalled work: reset must discard it too.
        d.submit(Command::fence(0x5eed));
        assert_still_works(&mut d);
    }

    #[test]
    fn random_page_tables(
        entries in proptest::collection::vec((0u64..4, 0usize..512, any::<u64>()), 1..64),
        opcode in prop_oneof![Just(Opcode::Fill), Just(Opcode::Checksum), Just(Opcode::Copy), Just(Opcode::AtomicAdd)],
        offset in 0u64..0x8000,
    ) {
        let mut d = one_worker();
        // A real table path for VA first, then random entries scribbled over the four levels.
        d.map_data(0, VA, 0, 8 * PAGE_SIZE, Perms::RW);
        let tables: Vec<u64> = (1..=4).map(|l| d.entry_iova(0, VA, l) & !(PAGE_SIZE - 1)).collect();
        for (level, index, raw) in entries {
            d.write_ctrl_u64(tables[level as usize] + 8 * index as u64, raw);
        }
        let va = VA + (offset & !7);
        let cmd = match opcode {
            Opcode::Fill => Command::fill(0, va, 5000, 3),
            Opcode::Checksum => Command::checksum(0, va, 5000),
            Opcode::Copy => Command::copy(0, va + 0x4000, va, 5000),
            _ => Command::atomic_add(0, va, 1),
        };
        let id = d.submit(cmd);
        // The item completes (any status) or stalls with a record; never hangs, never panics.
        wait_until("completion or fault", || {
            d.try_completion(id).is_some() || d.r32(regs::FAULT_BUF_PUT) != 0
        });
        if let Some(c) = d.try_completion(id) {
            prop_assert!(matches!(
                c.status,
                Status::Ok | Status::BadPte | Status::IommuFault | Status::NonCanonical
            ), "status {:?}", c.status);
        }
        assert_still_works(&mut d);
    }
}
