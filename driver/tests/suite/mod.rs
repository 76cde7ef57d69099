//! The driver's integration suite, written once and instantiated per backend with
//! `backend_suite!(open_fn)`: every case takes a freshly opened runtime and asserts what the
//! device sees, what the device page table holds, and what the counters say.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use driver::fault::CancelReason;
use driver::runtime::{Op, Runtime};
use driver::PageSize;
use driver::{Context, Error};
use mirror::{Mapping, PageSize as CpuPageSize, VaRange};

pub const PAGE: usize = 4096;
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// Device fill over a raw range (the buffer is a Mapping, reached only through raw pointers).
pub fn device_fill(ctx: &Context, addr: u64, len: u64, pattern: u64) -> Result<u64, Error> {
    // SAFETY: the ranges in these tests are Mappings that no Rust reference points into.
    let t = unsafe {
        ctx.submit(Op::Fill {
            dst: addr,
            len,
            pattern,
        })?
    };
    ctx.wait(t)
}

pub fn device_checksum(ctx: &Context, addr: u64, len: u64) -> Result<u64, Error> {
    // SAFETY: as above; the device only reads.
    let t = unsafe { ctx.submit(Op::Checksum { src: addr, len })? };
    ctx.wait(t)
}

pub fn cpu_checksum(m: &Mapping, offset: usize, len: usize) -> u64 {
    let mut state = accel_abi::FNV_OFFSET;
    for i in offset..offset + len {
        state = accel_abi::fnv1a_update(state, &[m.read_byte(i)]);
    }
    state
}

pub fn fresh(rt: &Arc<Runtime>) -> Context {
    rt.create_context().expect("create context")
}

pub fn faults_on_fresh_memory(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    let m = Mapping::anonymous(16 * PAGE, RW).unwrap();
    device_fill(&ctx, m.addr(), m.len() as u64, 0x0101_0101_0101_0101).unwrap();
    for i in (0..m.len()).step_by(511) {
        assert_eq!(m.read_byte(i), 1, "byte {i}");
    }
    let s = ctx.stats();
    assert!(s.faults >= 1, "{s:?}");
    assert!(s.pages_mapped >= 16, "{s:?}");
    assert!(ctx.device_translation(m.addr()).is_some());
}

pub fn faults_on_populated_memory(rt: Arc<Runtime>) {
    // Exact faults: a fault-around block could reach a neighbour's memory merged into the
    // buffer's VMA (another test's mapping), and that neighbour's munmap would then tear this
    // mapping down too (seen once under load: the second pass faulted again).
    let ctx = exact(&rt);
    let m = Mapping::anonymous(8 * PAGE, RW).unwrap();
    for i in 0..m.len() {
        m.write_byte(i, (i * 7 % 251) as u8);
    }
    let sum = device_checksum(&ctx, m.addr(), m.len() as u64).unwrap();
    assert_eq!(sum, cpu_checksum(&m, 0, m.len()));
    // A second pass finds everything mapped: no new faults.
    let before = ctx.stats().faults;
    assert_eq!(
        device_checksum(&ctx, m.addr(), m.len() as u64).unwrap(),
        sum
    );
    assert_eq!(ctx.stats().faults, before);
}

pub fn copy_between_buffers(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    let src: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let mut dst = vec![0u8; src.len()];
    ctx.copy(&mut dst, &src).unwrap();
    assert_eq!(dst, src);
    let counter = AtomicU64::new(40);
    assert_eq!(ctx.atomic_add(&counter, 2).unwrap(), 40);
    assert_eq!(counter.load(Ordering::SeqCst), 42);
}

pub fn large_pages(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    let len = 2 << 20;
    let m = Mapping::anonymous_aligned(len, len, RW).unwrap();
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(m.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    m.write_byte(0, 1);
    let snap = ctx.address_space().snapshot(m.range()).unwrap();
    if snap.pages()[0].size != CpuPageSize::Thp {
        eprintln!("SKIP large_pages: the kernel did not back the buffer with a THP (THP disabled or memory fragmented)");
        return;
    }
    device_fill(&ctx, m.addr(), len as u64, 0x7777_7777_7777_7777).unwrap();
    assert_eq!(m.read_byte(len - 1), 0x77);
    let t = ctx.device_translation(m.addr() + 12345).expect("mapped");
    assert_eq!(t.size, PageSize::Large);
    let s = ctx.stats();
    assert_eq!(s.large_leaves, 1, "{s:?}");
    assert_eq!(s.small_leaves, 0, "{s:?}");
    // One stall (its record, and the lookahead records for the next pages, in one batch).
    assert_eq!(s.runs, 1, "one fault maps the whole 2 MiB: {s:?}");
}

pub fn munmap_invalidates_strictly(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    let m = Mapping::anonymous(8 * PAGE, RW).unwrap();
    device_fill(&ctx, m.addr(), m.len() as u64, 3).unwrap();
    let before = ctx.stats();
    assert!(before.mapped_bytes >= m.len() as u64);
    let range = m.forget();
    let tail = VaRange::new(range.start() + 4 * PAGE as u64, 4 * PAGE as u64).unwrap();
    // SAFETY: the tail is ours and nothing refers into it.
    unsafe { ctx.address_space().munmap(tail).unwrap() };
    // Strict: when munmap returns, the device entries are gone and the pins released.
    assert!(ctx.device_translation(tail.start()).is_none());
    assert!(ctx.device_translation(tail.end() - 1).is_none());
    let after = ctx.stats();
    assert!(after.tlb_fences > before.tlb_fences, "{after:?}");
    assert!(after.mapped_bytes < before.mapped_bytes, "{after:?}");
    // A device access to the unmapped tail now fails cleanly.
    let err = device_fill(&ctx, tail.start(), PAGE as u64, 1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cancelled {
                reason: CancelReason::NoMapping
            }
        ),
        "{err}"
    );
    // The head still works.
    device_fill(&ctx, range.start(), 4 * PAGE as u64, 9).unwrap();
    // SAFETY: the head is ours.
    unsafe {
        ctx.address_space()
            .munmap(VaRange::new(range.start(), 4 * PAGE as u64).unwrap())
            .unwrap()
    };
}

pub fn munmap_seen_through_userfaultfd(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    if ctx.address_space().capabilities().uffd.is_none() {
        eprintln!(
            "SKIP munmap_seen_through_userfaultfd: no userfaultfd here ({:?})",
            ctx.address_space().capabilities()
        );
        return;
    }
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    device_fill(&ctx, m.addr(), m.len() as u64, 5).unwrap();
    let addr = m.addr();
    let mapped = ctx.stats().mapped_bytes;
    drop(m); // a plain munmap: only the uffd UNMAP event tells the mirror
    ctx.address_space().settle().unwrap();
    assert!(ctx.device_translation(addr).is_none());
    assert!(ctx.stats().mapped_bytes < mapped);
}

pub fn dontneed_gives_device_the_new_zero_page(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    if ctx.address_space().capabilities().uffd.is_none() {
        eprintln!("SKIP dontneed: no userfaultfd here");
        return;
    }
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    device_fill(&ctx, m.addr(), m.len() as u64, 0xabab_abab_abab_abab).unwrap();
    assert_eq!(m.read_byte(100), 0xab);
    let fences = ctx.stats().tlb_fences;
    m.discard(0, m.len()).unwrap();
    ctx.address_space().settle().unwrap();
    assert!(ctx.device_translation(m.addr()).is_none());
    assert!(ctx.stats().tlb_fences > fences);
    // The device faults again and reads zeros, like the CPU.
    let zeros = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &vec![0u8; m.len()]);
    assert_eq!(
        device_checksum(&ctx, m.addr(), m.len() as u64).unwrap(),
        zeros
    );
}

pub fn permission_errors(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    m.write_byte(0, 1);
    // SAFETY: protect our own mapping through the strict wrapper.
    unsafe {
        ctx.address_space()
            .mprotect(m.range(), mirror::Perms::READ)
            .unwrap()
    };
    let err = device_fill(&ctx, m.addr(), PAGE as u64, 1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cancelled {
                reason: CancelReason::Permission
            }
        ),
        "{err}"
    );
    assert_eq!(m.read_byte(0), 1, "nothing was written");
    // Reads still work on read-only memory.
    device_checksum(&ctx, m.addr(), PAGE as u64).unwrap();
    // PROT_NONE: no access at all.
    // SAFETY: as above.
    unsafe {
        ctx.address_space()
            .mprotect(m.range(), mirror::Perms::NONE)
            .unwrap()
    };
    let err = device_checksum(&ctx, m.addr(), PAGE as u64).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cancelled {
                reason: CancelReason::NoMapping
            }
        ),
        "{err}"
    );
    // A hole: page 0 is below vm.mmap_min_addr and never mapped (a hole made by munmap could
    // be refilled at once by a test running in parallel).
    let err = device_fill(&ctx, 0x100, 8, 1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cancelled {
                reason: CancelReason::NoMapping
            }
        ),
        "{err}"
    );
    // Non-canonical address: the device refuses the command itself.
    let err = device_fill(&ctx, 1 << 50, 8, 1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CommandFailed {
                status: accel_abi::Status::NonCanonical,
                ..
            }
        ),
        "{err}"
    );
    assert!(ctx.stats().failures >= 3);
}

pub fn collision_between_walk_and_install_retries(rt: Arc<Runtime>) {
    let fired = Arc::new(AtomicBool::new(false));
    let mm = Arc::new(std::sync::Mutex::new(None::<Arc<mirror::AddressSpace>>));
    let hook_mm = mm.clone();
    let hook_fired = fired.clone();
    let options = driver::context::ContextOptions {
        walk_hook: Some(Arc::new(move |range: VaRange| {
            // First walk only: invalidate the range between walk and install.
            if !hook_fired.swap(true, Ordering::SeqCst) {
                if let Some(mm) = hook_mm.lock().unwrap().as_ref() {
                    mm.invalidate(range).unwrap();
                }
            }
        })),
        ..Default::default()
    };
    let ctx = rt.create_context_with(options).unwrap();
    *mm.lock().unwrap() = Some(ctx.address_space().clone());
    let retries = ctx.stats().retries;
    let m = Mapping::anonymous(PAGE, RW).unwrap();
    device_fill(&ctx, m.addr(), PAGE as u64, 0x4242_4242_4242_4242).unwrap();
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!(m.read_byte(4095), 0x42);
    assert!(
        ctx.stats().retries > retries,
        "the collision was retried: {:?}",
        ctx.stats()
    );
    assert_eq!(ctx.stats().runs, 1, "exactly one install survived");
}

pub fn exact(rt: &Arc<Runtime>) -> Context {
    let options = driver::context::ContextOptions {
        fault_around: 0,
        ..Default::default()
    };
    rt.create_context_with(options).unwrap()
}

/// Lookahead records are hints: a page the device reported ahead that cannot be mapped does
/// not cancel the work item early. A FILL over two writable pages and a PROT_NONE one stalls
/// on page 0 and reports pages 1 and 2 ahead; page 2 fails, yet the item goes on, writes pages
/// 0 and 1, and is cancelled only when it reaches page 2 itself.
pub fn lookahead_failure_does_not_cancel_early(rt: Arc<Runtime>) {
    let ctx = exact(&rt);
    let m = Mapping::anonymous(3 * PAGE, RW).unwrap();
    m.protect(2 * PAGE, PAGE, libc::PROT_NONE).unwrap();
    let service = rt.service().stats();
    let before = (
        service.lookahead_records.load(Ordering::Relaxed),
        service.lookahead_failed.load(Ordering::Relaxed),
    );
    let r = device_fill(&ctx, m.addr(), 3 * PAGE as u64, 0x4242_4242_4242_4242);
    assert!(
        matches!(
            &r,
            Err(Error::Cancelled {
                reason: CancelReason::NoMapping
            })
        ),
        "{r:?}"
    );
    for i in (0..2 * PAGE).step_by(509) {
        assert_eq!(
            m.read_byte(i),
            0x42,
            "byte {i}: the item ran up to the hole"
        );
    }
    let after = (
        service.lookahead_records.load(Ordering::Relaxed),
        service.lookahead_failed.load(Ordering::Relaxed),
    );
    if rt.device().caps().fault_lookahead > 0 {
        assert!(after.0 >= before.0 + 2, "{before:?} -> {after:?}");
        assert!(after.1 > before.1, "{before:?} -> {after:?}");
    }
}

pub fn fault_around_stays_inside_the_vma(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    let block = 64 << 10;
    let m = Mapping::anonymous_aligned(2 * block, block, RW).unwrap();
    // Two VMAs: [0, 32K) read-write, [32K, 128K) read-only.
    m.protect(block / 2, m.len() - block / 2, libc::PROT_READ)
        .unwrap();
    let page = m.addr() + (block / 2 - PAGE) as u64;
    device_checksum(&ctx, page, 8).unwrap();
    assert!(
        ctx.device_translation(m.addr()).is_some(),
        "the neighbour in the same VMA was faulted around"
    );
    assert!(
        ctx.device_translation(m.addr() + (block / 2) as u64)
            .is_none(),
        "fault-around must not reach into the next VMA"
    );
    // Without fault-around only the faulting page is mapped.
    let exact = exact(&rt);
    device_checksum(&exact, page, 8).unwrap();
    assert!(exact.device_translation(page).is_some());
    assert!(exact.device_translation(m.addr()).is_none());
}

pub fn large_mirror_uses_few_mappings(rt: Arc<Runtime>) {
    let ctx = fresh(&rt);
    let len = 32 << 20;
    let m = Mapping::anonymous(len, RW).unwrap();
    // SAFETY: advice on our own mapping: 4 KiB pages only, so no 2 MiB shortcut.
    unsafe { libc::madvise(m.as_ptr().cast(), len, libc::MADV_NOHUGEPAGE) };
    device_fill(&ctx, m.addr(), len as u64, 0x0f0f_0f0f_0f0f_0f0f).unwrap();
    assert_eq!(m.read_byte(len - 1), 0x0f);
    let s = ctx.stats();
    // 8192 pages: a sequential stream grows its mappings to 2 MiB (TYPE1 allows 65535 in all).
    assert!(
        s.mappings <= 32,
        "{} DMA mappings for {} pages: {s:?}",
        s.mappings,
        len / PAGE
    );
    assert!(s.runs <= 64, "{s:?}");
    assert_eq!(s.small_leaves, (len / PAGE) as u64);
    eprintln!(
        "large_mirror_uses_few_mappings: {} mappings, {} runs ({} pages faulted) for {} pages",
        s.mappings,
        s.runs,
        s.faults,
        len / PAGE
    );
}

/// A MAP_SHARED memfd arena, as a runtime or the daemon hands out.
pub fn memfd_arena(name: &str, len: usize) -> (std::fs::File, Mapping) {
    let cname = std::ffi::CString::new(name).unwrap();
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .unwrap();
    let file = std::fs::File::from(fd);
    file.set_len(len as u64).unwrap();
    let m = Mapping::with_flags(
        len,
        RW,
        libc::MAP_SHARED,
        Some(std::os::fd::AsFd::as_fd(&file)),
        0,
    )
    .unwrap();
    (file, m)
}

pub fn shared_memfd_memory(rt: Arc<Runtime>) {
    use std::os::unix::fs::FileExt;
    let ctx = fresh(&rt);
    let (file, m) = memfd_arena("suite-shared-arena", 16 * PAGE);
    device_fill(
        &ctx,
        m.addr() + PAGE as u64,
        2 * PAGE as u64,
        0x3c3c_3c3c_3c3c_3c3c,
    )
    .unwrap();
    let mut back = vec![0u8; 2 * PAGE];
    file.read_exact_at(&mut back, PAGE as u64).unwrap();
    assert!(
        back.iter().all(|b| *b == 0x3c),
        "the device's bytes are in the file"
    );
    assert_eq!(m.read_byte(0), 0, "nothing outside the range was written");
    file.write_all_at(&[7u8; 64], 3 * PAGE as u64).unwrap();
    let want = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &[7u8; 64]);
    assert_eq!(
        device_checksum(&ctx, m.addr() + 3 * PAGE as u64, 64).unwrap(),
        want,
        "file writes reach the device"
    );
}

pub fn several_contexts_on_one_device(rt: Arc<Runtime>) {
    let a = exact(&rt);
    let b = exact(&rt);
    assert_ne!(a.asid(), b.asid());
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    device_fill(&a, m.addr(), 2 * PAGE as u64, 0x1111_1111_1111_1111).unwrap();
    device_fill(
        &b,
        m.addr() + 2 * PAGE as u64,
        2 * PAGE as u64,
        0x2222_2222_2222_2222,
    )
    .unwrap();
    assert_eq!(m.read_byte(0), 0x11);
    assert_eq!(m.read_byte(3 * PAGE), 0x22);
    // Each context only mapped what it touched.
    assert!(a.device_translation(m.addr() + 3 * PAGE as u64).is_none());
    assert!(b.device_translation(m.addr()).is_none());
    // Both read the whole range, then one CPU event invalidates both.
    device_checksum(&a, m.addr(), m.len() as u64).unwrap();
    device_checksum(&b, m.addr(), m.len() as u64).unwrap();
    let range = m.forget();
    // SAFETY: ours, nothing refers into it.
    unsafe { a.address_space().munmap(range).unwrap() };
    assert!(a.device_translation(range.start()).is_none());
    assert!(b.device_translation(range.start()).is_none());
}

pub fn dropping_a_context_releases_everything(rt: Arc<Runtime>) {
    let m = Mapping::anonymous(32 * PAGE, RW).unwrap();
    let baseline = rt.device().in_flight();
    {
        let ctx = fresh(&rt);
        device_fill(&ctx, m.addr(), m.len() as u64, 6).unwrap();
        assert!(ctx.stats().mapped_bytes > 0);
        // Work still queued when the context goes away.
        // SAFETY: the Mapping is reached only through raw pointers.
        let _t = unsafe {
            ctx.submit(Op::Checksum {
                src: m.addr(),
                len: m.len() as u64,
            })
            .unwrap()
        };
    }
    assert_eq!(
        rt.device().in_flight(),
        baseline,
        "the dropped context's work was collected"
    );
    // Its address space is free again: a new context reuses the ASID and starts empty.
    let ctx = fresh(&rt);
    assert_eq!(ctx.stats().mapped_bytes, 0);
    assert!(ctx.device_translation(m.addr()).is_none());
}

#[macro_export]
macro_rules! backend_suite {
    ($open:expr) => {
        $crate::backend_suite!($open, after = |_rt| {});
    };
    // `after` gets the case's runtime once the case is done with it (the guest's pin check).
    ($open:expr, after = $after:expr) => {
        $crate::backend_suite!(@cases $open; $after;
            faults_on_fresh_memory,
            faults_on_populated_memory,
            copy_between_buffers,
            large_pages,
            munmap_invalidates_strictly,
            munmap_seen_through_userfaultfd,
            dontneed_gives_device_the_new_zero_page,
            permission_errors,
            collision_between_walk_and_install_retries,
            several_contexts_on_one_device,
            fault_around_stays_inside_the_vma,
            lookahead_failure_does_not_cancel_early,
            large_mirror_uses_few_mappings,
            shared_memfd_memory,
            dropping_a_context_releases_everything
        );
    };
    (@cases $open:expr; $after:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let rt = $open();
                suite::$case(rt.clone());
                ($after)(rt);
            }
        )*
    };
}
