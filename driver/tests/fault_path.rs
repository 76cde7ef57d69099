//! The fault path's shortcuts: pages the CPU populated already are mapped without a populate
//! call, and memory a context registered for CPU events is not registered again until an
//! event touches it; an event forgets the registration, so a mapping made later at the same
//! address is registered anew and its munmap still reaches the device.

use std::time::Duration;

use driver::{DeviceSpec, Runtime, RuntimeOptions};

const PAGE: usize = 4096;
const LARGE: usize = 2 << 20;

/// A fresh private anonymous mapping of `len` bytes at `hint` (exactly there if `fixed`).
fn map(len: usize, hint: usize, fixed: bool) -> usize {
    let flags =
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if fixed { libc::MAP_FIXED_NOREPLACE } else { 0 };
    // SAFETY: a new anonymous mapping; with MAP_FIXED_NOREPLACE it never replaces another.
    let p = unsafe {
        libc::mmap(
            hint as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    assert!(!fixed || p as usize == hint);
    p as usize
}

fn unmap(addr: usize, len: usize) {
    // SAFETY: our own mapping, no Rust reference into it is alive.
    assert_eq!(unsafe { libc::munmap(addr as *mut _, len) }, 0);
}

/// A device FILL of `len` bytes at `addr`, checked from the CPU.
fn device_fill(ctx: &driver::Context, addr: usize, len: usize, pattern: u64) {
    // SAFETY: `addr..addr + len` is a live read-write mapping of this test that nothing else
    // refers to while the slice lives.
    let buf = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    ctx.fill(buf, pattern).expect("fill");
    assert!(buf.chunks(8).all(|c| c == pattern.to_le_bytes()));
}

/// A 2 MiB-aligned address with a free 2 MiB window there (reserved and released again).
fn aligned_window() -> usize {
    let base = map(2 * LARGE, 0, false);
    unmap(base, 2 * LARGE);
    base.div_ceil(LARGE) * LARGE
}

fn settle(ctx: &driver::Context) {
    ctx.address_space().settle().expect("settle");
}

#[test]
fn populated_pages_are_mapped_without_a_populate_call_and_fresh_pages_with_one() {
    let rt = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).expect("open");
    let ctx = rt.create_context().expect("context");
    let len = 16 * PAGE;
    let populated = map(len, 0, false);
    // SAFETY: our mapping; populating it changes no contents.
    assert_eq!(
        unsafe { libc::madvise(populated as *mut _, len, libc::MADV_POPULATE_WRITE) },
        0
    );
    let before = ctx.stats().populate_calls;
    device_fill(&ctx, populated, len, 0x0101_0101_0101_0101);
    assert_eq!(ctx.stats().populate_calls, before, "every page was present");
    let fresh = map(len, 0, false);
    device_fill(&ctx, fresh, len, 0x0202_0202_0202_0202);
    assert!(
        ctx.stats().populate_calls > before,
        "fresh pages had to be populated"
    );
    unmap(populated, len);
    unmap(fresh, len);
}

#[test]
fn a_registration_is_reused_until_an_event_and_a_new_mapping_at_the_same_address_is_registered_again(
) {
    let rt = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).expect("open");
    let ctx = rt.create_context().expect("context");
    let at = aligned_window();
    let len = 64 * PAGE;
    let first = map(len, at, true);
    // Two faults in the same 2 MiB window: the second needs no registration.
    device_fill(&ctx, first, PAGE, 1);
    let skipped = ctx.stats().track_skipped;
    device_fill(&ctx, first + 48 * PAGE, PAGE, 2);
    assert_eq!(
        ctx.stats().track_skipped,
        skipped + 1,
        "the window was registered already"
    );
    // A plain munmap (no wrapper): only the userfaultfd event tells the driver.
    unmap(first, len);
    settle(&ctx);
    assert!(
        ctx.device_translation(first as u64).is_none(),
        "the event arrived"
    );
    // The same address again: the old registration died with the old mapping.
    let second = map(len, at, true);
    assert_eq!(second, first);
    let skipped = ctx.stats().track_skipped;
    device_fill(&ctx, second, PAGE, 3);
    assert_eq!(
        ctx.stats().track_skipped,
        skipped,
        "the new mapping was registered, not taken for the old one"
    );
    assert!(ctx.device_translation(second as u64).is_some());
    // And so its munmap reaches the device too.
    unmap(second, len);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        settle(&ctx);
        if ctx.device_translation(second as u64).is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the munmap of the new mapping never reached the device: it was not registered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_polling_waiter_services_posted_faults_itself_and_every_batch_is_counted_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let options = RuntimeOptions {
        mode: driver::fault::ServiceMode::Polling,
        ..Default::default()
    };
    let rt = Runtime::open(DeviceSpec::emulated(), options).expect("open");
    let ctx = rt.create_context().expect("context");
    let stats = rt.service().stats();
    let (batches0, assisted0) = (
        stats.batches.load(Relaxed),
        stats.assisted_batches.load(Relaxed),
    );
    // One fresh page per command, one command at a time: each wait spins while its own fault
    // is posted, so some of those faults are serviced by the waiter (the service thread sleeps
    // between them).
    for i in 0..200u64 {
        let page = map(PAGE, 0, false);
        device_fill(&ctx, page, PAGE, i);
        unmap(page, PAGE);
    }
    let assisted = stats.assisted_batches.load(Relaxed) - assisted0;
    let batches = stats.batches.load(Relaxed) - batches0;
    assert!(
        assisted > 0,
        "no waiter ever serviced a batch ({batches} batches)"
    );
    assert!(assisted <= batches, "{assisted} assisted of {batches}");
}

#[test]
fn every_vma_of_a_mapping_cut_into_many_is_registered_and_its_events_arrive() {
    let rt = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).expect("open");
    let ctx = rt.create_context().expect("context");
    let at = aligned_window();
    let pages = 32;
    let base = map(pages * PAGE, at, true);
    // Every other page PROT_NONE: 16 read-write one-page VMAs between 16 inaccessible ones.
    for i in (1..pages).step_by(2) {
        // SAFETY: our mapping; nothing refers to the page.
        let r = unsafe { libc::mprotect((base + i * PAGE) as *mut _, PAGE, libc::PROT_NONE) };
        assert_eq!(r, 0);
    }
    for i in (0..pages).step_by(2) {
        device_fill(&ctx, base + i * PAGE, PAGE, i as u64 + 1);
    }
    // A plain munmap of every read-write VMA reaches the device through the userfaultfd.
    for i in (0..pages).step_by(2) {
        unmap(base + i * PAGE, PAGE);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        settle(&ctx);
        let left = (0..pages)
            .step_by(2)
            .filter(|i| ctx.device_translation((base + i * PAGE) as u64).is_some())
            .count();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} munmaps never reached the device: their VMAs were not registered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in (1..pages).step_by(2) {
        unmap(base + i * PAGE, PAGE);
    }
}

#[test]
fn with_several_address_spaces_a_replay_names_the_ones_serviced_and_only_on_a_device_that_can() {
    use std::sync::atomic::Ordering::Relaxed;
    for scoped_replay in [true, false] {
        let cfg = firmware_stubs::AcceleratorConfig {
            scoped_replay,
            ..Default::default()
        };
        let rt = Runtime::open(DeviceSpec::Emulated(cfg), RuntimeOptions::default()).expect("open");
        let a = rt.create_context().expect("context");
        let _b = rt.create_context().expect("a second address space");
        let before = rt.service().stats().scoped_replays.load(Relaxed);
        let len = 8 * PAGE;
        let fresh = map(len, 0, false);
        device_fill(&a, fresh, len, 0x0303_0303_0303_0303);
        let scoped = rt.service().stats().scoped_replays.load(Relaxed) - before;
        if scoped_replay {
            assert!(
                scoped > 0,
                "faults of one address space of two: scoped replays"
            );
        } else {
            assert_eq!(scoped, 0, "the device cannot scope a replay");
        }
        unmap(fresh, len);
    }
}

#[test]
fn the_lookahead_depth_halves_when_most_lookahead_pages_cannot_be_mapped() {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).expect("open");
    let ctx = rt.create_context().expect("context");
    let stats = rt.service().stats();
    let cap = u64::from(rt.device().caps().fault_lookahead);
    assert_eq!(stats.lookahead_depth.load(Relaxed), cap, "power-on depth");
    // A FILL over 16 pages of which only the first two are accessible: the stall on page 0
    // reports pages 1..=15 ahead, and 14 of them cannot be mapped.
    let len = 16 * PAGE;
    let base = map(len, 0, false);
    // SAFETY: our mapping; nothing refers to those pages.
    let r = unsafe { libc::mprotect((base + 2 * PAGE) as *mut _, len - 2 * PAGE, libc::PROT_NONE) };
    assert_eq!(r, 0);
    // SAFETY: the slice covers our mapping; the device fails at the PROT_NONE page before the
    // CPU touches anything.
    let buf = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
    assert!(ctx.fill(buf, 7).is_err(), "the FILL cannot reach page 2");
    assert!(stats.lookahead_adjustments.load(Relaxed) >= 1);
    let depth = stats.lookahead_depth.load(Relaxed);
    assert!(depth < cap, "depth {depth} of {cap}");
    assert_eq!(
        rt.device().lookahead_depth().expect("read back"),
        depth as u32,
        "the device uses the depth the service set"
    );
    unmap(base, len);
}
