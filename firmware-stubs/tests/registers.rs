//! The register file and configuration space: identity, access rules, value checks, the error
//! vector.

mod common;

use accel_abi::regs::{self, Access, ErrorCode, FIXED_REGISTERS};
use accel_abi::{config, vector};
use common::*;
use firmware_stubs::{Accelerator, AcceleratorConfig};

#[test]
fn identity_and_capabilities() {
    let d = TestDriver::with(
        AcceleratorConfig {
            asids: 16,
            fault_entries_max: 256,
            cmdq_entries_max: 128,
            ..Default::default()
        },
        32,
    );
    assert_eq!(d.r32(regs::ID), regs::ID_VALUE);
    assert_eq!(d.r32(regs::VERSION), regs::VERSION_VALUE);
    assert_eq!(d.r32(regs::CAP_ASIDS), 16);
    let pt = d.r32(regs::CAP_PT);
    assert_eq!(
        (regs::cap_pt::levels(pt), regs::cap_pt::va_bits(pt)),
        (4, 48)
    );
    assert_eq!(d.r32(regs::CAP_PAGE_SIZES), (1 << 12) | (1 << 21));
    assert_eq!(d.r32(regs::CAP_FAULT_ENTRIES), 256);
    assert_eq!(d.r32(regs::CAP_CMDQ_ENTRIES), 128);
    assert_eq!(d.r32(regs::CAP_VECTORS), 3);
    assert_eq!(
        d.r32(regs::CAP_FAULT_LOOKAHEAD),
        firmware_stubs::DEFAULT_FAULT_LOOKAHEAD
    );
    // Root registers exist only for the configured ASIDs.
    d.w64(regs::asid_root(15), 0);
    assert_eq!(d.r32(regs::ERROR_CODE), 0);
    d.w64(regs::asid_root(16), 0);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadRegisterAccess as u32, regs::asid_root(16))
    );
}

#[test]
fn bad_accesses_read_all_ones_and_record_the_first_error() {
    let d = TestDriver::new();
    let mut b8 = [0u8; 8];
    d.dev.bar_read(0, regs::ID, &mut b8); // 32-bit register read as 64
    assert_eq!(b8, [0xff; 8]);
    assert_eq!(d.r32(regs::ERROR_CODE), ErrorCode::BadRegisterAccess as u32);
    assert_eq!(d.r64(regs::ERROR_INFO), regs::ID);
    // A second error does not overwrite the first.
    let mut b4 = [0u8; 4];
    d.dev.bar_read(0, 0x03c, &mut b4); // no register there
    assert_eq!(b4, [0xff; 4]);
    assert_eq!(d.r64(regs::ERROR_INFO), regs::ID);
    assert_ne!(d.r32(regs::STATUS) & regs::status::ERROR, 0);
    d.take_error();
    assert_eq!(d.r32(regs::STATUS) & regs::status::ERROR, 0);

    let cases: &[(u32, u64, usize, &str)] = &[
        (0, regs::RESET, 4, "read of a write-only register"),
        (0, regs::CONTROL + 1, 4, "misaligned"),
        (0, regs::ERROR_INFO, 4, "64-bit register read as 32"),
        (0, regs::BAR0_SIZE, 4, "beyond BAR0"),
        (1, regs::ID, 4, "no BAR1"),
        (0, regs::ID, 2, "16-bit access"),
    ];
    for &(bar, off, len, what) in cases {
        let mut buf = vec![0u8; len];
        d.dev.bar_read(bar, off, &mut buf);
        assert!(buf.iter().all(|b| *b == 0xff), "{what}");
        assert_eq!(
            d.take_error().0,
            ErrorCode::BadRegisterAccess as u32,
            "{what}"
        );
    }
    // Writes to read-only registers are refused.
    d.w32(regs::FAULT_BUF_PUT, 5);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadRegisterAccess as u32, regs::FAULT_BUF_PUT)
    );
    assert_eq!(d.r32(regs::FAULT_BUF_PUT), 0);
}

#[test]
fn bad_values_are_rejected_and_change_nothing() {
    let d = TestDriver::new();
    let bad = |off: u64, width: usize, v: u64| {
        let before = if width == 4 {
            d.r32(off).into()
        } else {
            d.r64(off)
        };
        d.take_error(); // reading a write-only register is itself an error
        if width == 4 {
            d.w32(off, v as u32)
        } else {
            d.w64(off, v)
        }
        assert_eq!(
            d.take_error(),
            (ErrorCode::BadRegisterValue as u32, off),
            "write {v:#x} to {off:#x}"
        );
        let after = if width == 4 {
            d.r32(off).into()
        } else {
            d.r64(off)
        };
        d.take_error();
        assert_eq!(before, after, "register {off:#x} changed");
    };
    bad(regs::CONTROL, 4, 0x2);
    bad(regs::RESET, 4, 0x1234);
    bad(regs::INTR_MASK, 4, 0x8);
    // Ring geometry is locked while the ring is enabled.
    bad(regs::CMDQ_BASE, 8, 0x20_0000);
    bad(regs::CMDQ_ENTRIES, 4, 32);
    bad(regs::FAULT_BUF_BASE, 8, 0x20_0000);
    bad(regs::FAULT_BUF_ENTRIES, 4, 8);
    bad(regs::FAULT_BUF_GET, 4, 1); // beyond PUT
    bad(regs::TLBI_SCOPE, 4, 3);
    bad(regs::asid_root(0), 8, 1 << 63);
    bad(regs::asid_root(0), 8, 0x1000 | 2);
    // With the rings disabled, values are still checked.
    d.w32(regs::CMDQ_CTRL, 0);
    bad(regs::CMDQ_ENTRIES, 4, 48);
    bad(regs::CMDQ_ENTRIES, 4, 1 << 20);
    bad(regs::CMDQ_BASE, 8, 0x1234);
    d.w32(regs::CMDQ_ENTRIES, 2);
    assert_eq!(d.r32(regs::CMDQ_ENTRIES), 2);
}

#[test]
fn doorbell_rejects_backwards_and_overfull_tails() {
    let d = TestDriver::new();
    d.w32(regs::CONTROL, 0); // keep commands queued
    d.w32(regs::CMDQ_TAIL, 3);
    assert_eq!(d.r32(regs::ERROR_CODE), 0);
    d.w32(regs::CMDQ_TAIL, 2);
    assert_eq!(d.take_error(), (ErrorCode::BadDoorbell as u32, 2));
    d.w32(regs::CMDQ_TAIL, CMDQ_ENTRIES + 1);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadDoorbell as u32, u64::from(CMDQ_ENTRIES) + 1)
    );
    assert_eq!(d.r32(regs::CMDQ_TAIL), 3);
    d.w32(regs::CMDQ_TAIL, CMDQ_ENTRIES);
    assert_eq!(d.r32(regs::ERROR_CODE), 0, "exactly full is fine");
}

#[test]
fn tlbi_with_bad_parameters_does_not_complete() {
    let d = TestDriver::new();
    d.w32(regs::TLBI_ASID, 0);
    d.w32(regs::TLBI_SCOPE, regs::TlbiScope::Range as u32);
    d.w64(regs::TLBI_VA, VA + 1);
    d.w64(regs::TLBI_SIZE, 4096);
    d.w32(regs::TLBI_TRIGGER, 7);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadRegisterValue as u32, regs::TLBI_VA)
    );
    d.w64(regs::TLBI_VA, VA);
    d.w64(regs::TLBI_SIZE, 0);
    d.w32(regs::TLBI_TRIGGER, 7);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadRegisterValue as u32, regs::TLBI_SIZE)
    );
    d.w32(regs::TLBI_SCOPE, regs::TlbiScope::Asid as u32);
    d.w32(regs::TLBI_ASID, 64);
    d.w32(regs::TLBI_TRIGGER, 7);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadRegisterValue as u32, regs::TLBI_ASID)
    );
    assert_eq!(d.r32(regs::TLBI_DONE), 0);
    assert_eq!(d.r32(regs::TLBI_COUNT), 0);
    d.w32(regs::TLBI_ASID, 63);
    d.w32(regs::TLBI_TRIGGER, 7);
    assert_eq!((d.r32(regs::TLBI_DONE), d.r32(regs::TLBI_COUNT)), (7, 1));
}

#[test]
fn error_vector_fires_on_the_first_error_until_cleared() {
    let d = TestDriver::new();
    let (ev, fd) = irq_eventfd();
    d.dev.set_irq(vector::ERROR, Some(fd)).expect("set_irq");
    d.w32(regs::CONTROL, 0xff);
    d.w32(regs::CONTROL, 0xff);
    assert_eq!(drain(&ev), 1);
    assert_eq!(d.r32(regs::INTR_STATUS), regs::intr::ERROR);
    d.w32(regs::INTR_STATUS, regs::intr::ERROR);
    d.take_error();
    d.w32(regs::CONTROL, 0xff);
    assert_eq!(drain(&ev), 1, "fires again after the clear");
}

#[test]
fn config_space_header_and_msi_capability() {
    let dev = Accelerator::new(AcceleratorConfig::default()).expect("device");
    let rd = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        dev.config_read(off, &mut b);
        b
    };
    let u16_at = |off: usize| {
        let b = rd(off as u64, 2);
        u16::from_le_bytes([b[0], b[1]])
    };
    assert_eq!(u16_at(config::off::VENDOR_ID), config::VENDOR_ID);
    assert_eq!(u16_at(config::off::DEVICE_ID), config::DEVICE_ID);
    assert_eq!(
        u16_at(config::off::COMMAND),
        0,
        "power-on: decoding and DMA off"
    );
    assert_ne!(u16_at(config::off::STATUS) & config::STATUS_CAP_LIST, 0);
    let class = rd(config::off::CLASS as u64, 3);
    assert_eq!(class, vec![0x00, 0x00, 0x12]);
    assert_eq!(rd(config::off::HEADER_TYPE as u64, 1), vec![0]);
    assert_eq!(rd(config::off::INTERRUPT_PIN as u64, 1), vec![0]);
    assert_eq!(u16_at(config::off::SUBSYSTEM_ID), config::SUBSYSTEM_ID);
    // BAR sizing: all ones in, size mask (and 64-bit memory type) out.
    dev.config_write(config::off::BAR0 as u64, &[0xff; 8]);
    let bar = rd(config::off::BAR0 as u64, 8);
    let lo = u32::from_le_bytes([bar[0], bar[1], bar[2], bar[3]]);
    assert_eq!(lo & !0xf, !(regs::BAR0_SIZE as u32 - 1));
    assert_eq!(lo & 0x6, 0x4, "64-bit memory BAR");
    assert_eq!(&bar[4..], &[0xff; 4]);
    // Capability list: MSI at CAP_PTR, last in the list.
    let cap = rd(config::off::CAP_PTR as u64, 1)[0] as usize;
    assert_eq!(cap, config::MSI_CAP);
    assert_eq!(rd(cap as u64, 2), vec![config::MSI_CAP_ID, 0]);
    assert_eq!(u16_at(cap + 2), config::MSI_CONTROL_CAPS);
    dev.config_write(cap as u64 + 2, &0xffffu16.to_le_bytes());
    assert_eq!(u16_at(cap + 2), config::MSI_CONTROL_CAPS | 0x71);
    // Read-only fields ignore writes; beyond the space reads 0xff.
    dev.config_write(0, &[0; 4]);
    assert_eq!(u16_at(0), config::VENDOR_ID);
    assert_eq!(rd(0x100, 4), vec![0xff; 4]);
}

#[test]
fn every_fixed_register_honours_its_access_mode() {
    let d = TestDriver::new();
    for (off, info) in FIXED_REGISTERS {
        let mut buf = vec![0u8; info.width.bytes()];
        d.dev.bar_read(0, *off, &mut buf);
        let read_error = d.take_error().0;
        match info.access {
            Access::WriteOnly => {
                assert_eq!(
                    read_error,
                    ErrorCode::BadRegisterAccess as u32,
                    "{}",
                    info.name
                );
                assert!(buf.iter().all(|b| *b == 0xff), "{}", info.name);
            }
            _ => assert_eq!(read_error, 0, "{}", info.name),
        }
    }
}

#[test]
fn revision_2_features_follow_the_configuration() {
    use regs::features::{ACCESSED_DIRTY, LOOKAHEAD_DEPTH, SCOPED_REPLAY, TLBI_QUEUE, WALK_CACHE};
    // The revision-3 features are on by default; this test is about the revision-2 ones.
    const R3: u32 = TLBI_QUEUE | SCOPED_REPLAY | LOOKAHEAD_DEPTH;
    let cases = [
        (true, 64, ACCESSED_DIRTY | WALK_CACHE),
        (false, 64, WALK_CACHE),
        (true, 0, ACCESSED_DIRTY),
        (false, 0, 0),
    ];
    for (accessed_dirty, walk_cache_entries, want) in cases {
        let cfg = AcceleratorConfig {
            accessed_dirty,
            walk_cache_entries,
            ..Default::default()
        };
        let want = want | R3;
        assert_eq!(cfg.features(), want);
        let d = TestDriver::with(cfg, 32);
        assert_eq!(
            d.r32(regs::VERSION),
            (1 << 16) | 2,
            "a revision-3 device is 1.2"
        );
        assert_eq!(
            d.r32(regs::CAP_FEATURES),
            want,
            "{accessed_dirty} {walk_cache_entries}"
        );
        assert_eq!(d.r32(regs::PT_CTRL), 0, "power-on PT_CTRL");
        assert_eq!(d.r64(regs::WALK_CACHE_HITS), 0);
        assert_eq!(d.r64(regs::AD_UPDATES), 0);
    }
    assert_eq!(AcceleratorConfig::default().features(), regs::features::ALL);
}

#[test]
fn pt_ctrl_refuses_reserved_and_unsupported_bits() {
    let d = TestDriver::new();
    d.w32(regs::PT_CTRL, regs::pt_ctrl::AD_ENABLE);
    assert_eq!(d.take_error().0, 0);
    assert_eq!(d.r32(regs::PT_CTRL), regs::pt_ctrl::AD_ENABLE);
    for bad in [1 << 1, 1 << 31, regs::pt_ctrl::AD_ENABLE | 1 << 4] {
        d.w32(regs::PT_CTRL, bad);
        assert_eq!(
            d.take_error(),
            (ErrorCode::BadRegisterValue as u32, regs::PT_CTRL),
            "{bad:#x}"
        );
        assert_eq!(d.r32(regs::PT_CTRL), regs::pt_ctrl::AD_ENABLE, "unchanged");
    }
    d.w32(regs::PT_CTRL, 0);
    assert_eq!((d.take_error().0, d.r32(regs::PT_CTRL)), (0, 0));
    // A reset returns it to 0.
    d.w32(regs::PT_CTRL, regs::pt_ctrl::AD_ENABLE);
    d.dev.reset();
    d.enable_pci();
    assert_eq!(d.r32(regs::PT_CTRL), 0);

    // Without the feature AD_ENABLE is an unsupported bit.
    let d = TestDriver::with(
        AcceleratorConfig {
            accessed_dirty: false,
            ..Default::default()
        },
        32,
    );
    d.w32(regs::PT_CTRL, regs::pt_ctrl::AD_ENABLE);
    assert_eq!(
        d.take_error(),
        (ErrorCode::BadRegisterValue as u32, regs::PT_CTRL)
    );
    assert_eq!(d.r32(regs::PT_CTRL), 0);
}

#[test]
fn tlbi_scope_accepts_leaf_only_and_refuses_reserved_bits() {
    use regs::{tlbi_scope::LEAF_ONLY, TlbiScope};
    let d = TestDriver::new();
    let ok = TlbiScope::Asid.encode(true);
    d.w32(regs::TLBI_SCOPE, ok);
    assert_eq!(d.take_error().0, 0);
    assert_eq!(d.r32(regs::TLBI_SCOPE), ok);
    for bad in [1 << 4, LEAF_ONLY | 3, 1 << 9, 3] {
        d.w32(regs::TLBI_SCOPE, bad);
        assert_eq!(
            d.take_error(),
            (ErrorCode::BadRegisterValue as u32, regs::TLBI_SCOPE),
            "{bad:#x}"
        );
        assert_eq!(d.r32(regs::TLBI_SCOPE), ok, "unchanged");
    }
    // A LEAF_ONLY invalidation completes like any other, with or without a walk cache.
    for walk_cache_entries in [64, 0] {
        let d = TestDriver::with(
            AcceleratorConfig {
                walk_cache_entries,
                ..Default::default()
            },
            32,
        );
        let count = d.r32(regs::TLBI_COUNT);
        d.tlbi_scoped(TlbiScope::All, true, 0, 0, 0);
        assert_eq!(d.r32(regs::TLBI_COUNT), count + 1);
        assert_eq!(d.take_error().0, 0);
    }
}
