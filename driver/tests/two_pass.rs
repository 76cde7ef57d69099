//! Two-pass invalidation across address spaces: a CPU change that hits several contexts of
//! one device clears every context's entries and posts every TLB invalidation first, then
//! waits for one fence, and unpins only after it. Without the device's invalidation queue the
//! same change takes one register invalidation (one fence) per context, counted.

use driver::{DeviceSpec, Runtime, RuntimeOptions};
use firmware_stubs::AcceleratorConfig;
use mirror::VaRange;

const PAGE: usize = 4096;

fn map(len: usize) -> usize {
    // SAFETY: a new private anonymous mapping, replacing nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    p as usize
}

fn unmap(addr: usize, len: usize) {
    // SAFETY: our own mapping, no Rust reference into it is alive.
    assert_eq!(unsafe { libc::munmap(addr as *mut _, len) }, 0);
}

/// `contexts` contexts of one device all map one page; one strict invalidation of it.
/// Returns the device's queue counts before and after, with every context checked clean.
fn invalidate_one_page_in(
    cfg: AcceleratorConfig,
    contexts: usize,
) -> (
    driver::device::TlbiQueueCounts,
    driver::device::TlbiQueueCounts,
) {
    let rt = Runtime::open(DeviceSpec::Emulated(cfg), RuntimeOptions::default()).expect("open");
    let ctxs: Vec<_> = (0..contexts)
        .map(|_| rt.create_context().expect("context"))
        .collect();
    // The page between two PROT_NONE guards: its own VMA, so fault-around never grows a
    // mapping into a neighbour's memory (tests run in parallel in this process).
    let guarded = map(3 * PAGE);
    for guard in [guarded, guarded + 2 * PAGE] {
        // SAFETY: our mapping; nothing refers to the guard pages.
        assert_eq!(
            unsafe { libc::mprotect(guard as *mut _, PAGE, libc::PROT_NONE) },
            0
        );
    }
    let page = guarded + PAGE;
    for (i, ctx) in ctxs.iter().enumerate() {
        // SAFETY: our mapping; no other reference to it lives while the slice does.
        let buf = unsafe { std::slice::from_raw_parts_mut(page as *mut u8, PAGE) };
        ctx.fill(buf, i as u64 + 1).expect("fill");
        assert!(ctx.device_translation(page as u64).is_some());
        assert_eq!(ctx.stats().mapped_bytes, PAGE as u64);
    }
    let before = rt.device().tlbi_queue_counts();
    let range = VaRange::new(page as u64, PAGE as u64).expect("range");
    ctxs[0]
        .address_space()
        .invalidate(range)
        .expect("invalidate");
    let after = rt.device().tlbi_queue_counts();
    for ctx in &ctxs {
        assert!(ctx.device_translation(page as u64).is_none());
        let stats = ctx.stats();
        assert_eq!(
            (stats.mapped_bytes, stats.fence_failures),
            (0, 0),
            "unpinned after a fence that did not fail"
        );
    }
    // The device still works for every context after the shared fence.
    for (i, ctx) in ctxs.iter().enumerate() {
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts_mut(page as *mut u8, PAGE) };
        ctx.fill(buf, 0x100 + i as u64).expect("fill again");
        assert!(buf.chunks(8).all(|c| c == (0x100 + i as u64).to_le_bytes()));
    }
    drop(ctxs);
    unmap(guarded, 3 * PAGE);
    (before, after)
}

#[test]
fn sixteen_address_spaces_share_one_doorbell_and_one_fence() {
    let (before, after) = invalidate_one_page_in(AcceleratorConfig::default(), 16);
    assert!(after.entries > 0, "the default device has a queue");
    assert_eq!(
        after.posted - before.posted,
        16,
        "one invalidation per context"
    );
    assert_eq!(after.doorbells - before.doorbells, 1, "one fence for all");
    assert_eq!(after.shared_fences - before.shared_fences, 15);
    assert_eq!(after.unqueued, 0);
}

#[test]
fn without_a_queue_every_address_space_gets_its_own_fence_and_it_is_counted() {
    let cfg = AcceleratorConfig {
        tlbi_queue_entries: 0,
        ..Default::default()
    };
    let (before, after) = invalidate_one_page_in(cfg, 4);
    assert_eq!(after.entries, 0);
    assert_eq!(after.unqueued - before.unqueued, 4);
    assert_eq!((after.posted, after.doorbells), (0, 0));
}

#[test]
fn a_full_queue_is_flushed_before_more_is_posted() {
    // 4 descriptors of room, 9 contexts: the poster rings twice for room, the waiter once.
    let cfg = AcceleratorConfig {
        tlbi_queue_entries: 4,
        ..Default::default()
    };
    let (before, after) = invalidate_one_page_in(cfg, 9);
    assert_eq!(after.entries, 4);
    assert_eq!(after.posted - before.posted, 9);
    assert_eq!(after.doorbells - before.doorbells, 3);
}
