//! The port of the kernel's `tools/testing/selftests/mm/hmm-tests.c` (run there against
//! `lib/test_hmm.c`, "dmirror") to the real stack: driver + a device backend. Every case takes a
//! freshly opened runtime, so the per-runtime counters (fault service, IOVA space) are ours alone;
//! `hmm_suite!(open_fn)` instantiates the whole suite for one backend (see `hmm_conformance.rs`).
//!
//! dmirror's counters map onto ours like this:
//! * `faults` (fault-service rounds of one device access) = `ContextStats::faults` on a context
//!   whose fault-around block covers the whole buffer (`hmm_ctx`): the device stalls at its first
//!   miss, posts one record, and one service run maps `[buffer start, end)`, like `dmirror_fault`
//!   over `[first miss, end)`. A second access to a populated range adds 0.
//! * `cpages` (pages the device touched) = `ContextStats::pages_mapped` growth, cross-checked with
//!   the fault service's `pages_serviced` and the data itself.
//!
//! The device's "read" of a buffer is a `Copy` into a bounce buffer (dmirror's `cmd.ptr`), which is
//! prefaulted so that only the buffer under test faults; a device "write" is a `Copy` from it.

#![allow(dead_code)]

use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use driver::context::ContextOptions;
use driver::fault::CancelReason;
use driver::runtime::{ContextStats, Op, Runtime};
use driver::{Context, Error};
use mirror::{Mapping, PageError, PageSize as CpuPageSize, PageState, Perms, VaRange};

pub const PAGE: usize = 4096;
/// hmm-tests' HMM_BUFFER_SIZE: 1024 pages.
pub const BUF: usize = 1024 * PAGE;
pub const NPAGES: u64 = (BUF / PAGE) as u64;
/// hmm-tests' NTIMES.
pub const NTIMES: usize = 10;
pub const TWOMEG: usize = 2 << 20;
pub const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A context whose fault-around block is the whole (aligned) test buffer: one device access to a
/// fresh buffer is serviced by one fault, like dmirror_fault over `[first miss, end)`.
pub fn hmm_ctx(rt: &Arc<Runtime>) -> Context {
    rt.create_context_with(ContextOptions {
        fault_around: BUF as u64,
        ..Default::default()
    })
    .expect("create context")
}

/// A context that maps exactly the faulting pages (no fault-around): for buffers not aligned to
/// a block, whose VMA may have merged with a neighbour's memory.
pub fn exact_ctx(rt: &Arc<Runtime>) -> Context {
    rt.create_context_with(ContextOptions {
        fault_around: 0,
        ..Default::default()
    })
    .expect("create context")
}

/// A test buffer aligned to its own size (so the fault-around block is exactly the buffer).
pub fn buffer(prot: libc::c_int) -> Mapping {
    Mapping::anonymous_aligned(BUF, BUF, prot).expect("mmap test buffer")
}

/// Waits until every CPU event queued so far has been handled. Needed before counting faults:
/// a plain munmap by a test running in parallel is delivered after the syscall (eventual
/// coherence), and if the kernel reuses the freed addresses for our new buffer at once, that late
/// UNMAP tears down our fresh device mapping (harmless, but the device then faults twice).
/// Such a munmap returns only once its event has been read, so `settle` covers it.
pub fn quiesce(ctx: &Context) {
    ctx.address_space().settle().expect("settle");
}

/// The bounce buffer ("mirror" in hmm-tests), already device-mapped for writing. Quiesces first
/// (see `quiesce`), which also covers every buffer mapped before it.
pub fn bounce(ctx: &Context, len: usize) -> Mapping {
    let m = Mapping::anonymous(len, RW).expect("mmap bounce buffer");
    quiesce(ctx);
    ctx.prefault(m.addr(), len as u64, true)
        .expect("prefault the bounce buffer");
    m
}

pub fn run(ctx: &Context, op: Op) -> Result<u64, Error> {
    // SAFETY: every range in these tests is a Mapping (or raw mmap) that no Rust reference points
    // into while the device works on it.
    let t = unsafe { ctx.submit(op)? };
    ctx.wait(t)
}

/// Device read of `len` bytes at `src` into `dst` (dmirror READ).
pub fn device_read(ctx: &Context, src: u64, dst: u64, len: usize) -> Result<u64, Error> {
    run(
        ctx,
        Op::Copy {
            dst,
            src,
            len: len as u64,
        },
    )
}

/// Device write of `len` bytes from `src` to `dst` (dmirror WRITE).
pub fn device_write(ctx: &Context, dst: u64, src: u64, len: usize) -> Result<u64, Error> {
    device_read(ctx, src, dst, len)
}

pub fn device_checksum(ctx: &Context, src: u64, len: usize) -> Result<u64, Error> {
    run(
        ctx,
        Op::Checksum {
            src,
            len: len as u64,
        },
    )
}

pub fn device_fill(ctx: &Context, dst: u64, len: usize, pattern: u64) -> Result<u64, Error> {
    run(
        ctx,
        Op::Fill {
            dst,
            len: len as u64,
            pattern,
        },
    )
}

/// dmirror's READ as the kernel test counts it: one device read of `len` bytes at `src` into
/// the bounce buffer takes exactly one fault and maps `cpages` pages (the caller checks the data).
pub fn read_once(ctx: &Context, src: u64, mirror: &Mapping, len: usize, cpages: u64) {
    let before = ctx.stats();
    device_read(ctx, src, mirror.addr(), len).unwrap();
    let after = ctx.stats();
    assert_eq!(
        after.fault_batches - before.fault_batches,
        1,
        "faults == 1: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.pages_mapped - before.pages_mapped,
        cpages,
        "cpages: {before:?} -> {after:?}"
    );
}

/// dmirror's WRITE as the kernel test checks it: the bounce buffer holds `i`, one device write of
/// `len` bytes to `dst` takes exactly one fault and maps every page, and the CPU reads `i` back.
pub fn write_ints_once(ctx: &Context, dst: u64, mirror: &Mapping, len: usize) {
    for i in 0..len / 4 {
        write_u32(mirror, i, i as u32);
    }
    let before = ctx.stats();
    device_write(ctx, dst, mirror.addr(), len).unwrap();
    let after = ctx.stats();
    assert_eq!(
        after.fault_batches - before.fault_batches,
        1,
        "faults == 1: {after:?}"
    );
    assert_eq!(
        after.pages_mapped - before.pages_mapped,
        (len / PAGE) as u64,
        "cpages == npages: {after:?}"
    );
    for i in 0..len / 4 {
        assert_eq!(read_u32_at(dst, i), i as u32, "CPU int {i}");
    }
}

/// Maps `fd` shared over a fresh reservation aligned to `len` (so the fault-around block of
/// `hmm_ctx` is exactly the mapping).
pub fn map_shared_aligned(fd: std::os::fd::RawFd, len: usize, prot: libc::c_int) -> u64 {
    map_fd_aligned(fd, len, prot, libc::MAP_SHARED)
}

/// Maps `fd` (MAP_SHARED or MAP_PRIVATE in `flags`) over a fresh reservation aligned to `len`.
pub fn map_fd_aligned(
    fd: std::os::fd::RawFd,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
) -> u64 {
    let at = Mapping::anonymous_aligned(len, len, libc::PROT_NONE)
        .unwrap()
        .forget();
    // SAFETY: replaces our own reservation with a mapping of the fd.
    let p = unsafe {
        libc::mmap(
            at.start() as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as u64
}

/// FNV-1a of CPU memory at a raw address (read with volatile loads).
pub fn cpu_checksum(addr: u64, len: usize) -> u64 {
    let mut state = accel_abi::FNV_OFFSET;
    for i in 0..len {
        // SAFETY: callers pass readable mapped memory.
        let b = unsafe { std::ptr::read_volatile((addr as *const u8).add(i)) };
        state = accel_abi::fnv1a_update(state, &[b]);
    }
    state
}

pub fn write_u32(m: &Mapping, index: usize, value: u32) {
    // SAFETY: in bounds of a writable mapping that no reference points into.
    unsafe { std::ptr::write_volatile((m.as_ptr() as *mut u32).add(index), value) }
}

pub fn read_u32(m: &Mapping, index: usize) -> u32 {
    // SAFETY: in bounds of a readable mapping.
    unsafe { std::ptr::read_volatile((m.as_ptr() as *const u32).add(index)) }
}

pub fn read_u32_at(addr: u64, index: usize) -> u32 {
    // SAFETY: callers pass readable mapped memory.
    unsafe { std::ptr::read_volatile((addr as *const u32).add(index)) }
}

pub fn ints(m: &Mapping) -> usize {
    m.len() / 4
}

pub fn is_cancel(err: &Error, want: CancelReason) -> bool {
    matches!(err, Error::Cancelled { reason } if *reason == want)
}

/// A device error a racing CPU change may legitimately cause: the item was cancelled (no
/// mapping any more) or the device's DMA was refused. Timeouts and anything else are not clean.
pub fn is_clean_race_error(err: &Error) -> bool {
    matches!(err, Error::Cancelled { .. } | Error::CommandFailed { .. })
}

pub fn strict_mprotect(ctx: &Context, range: VaRange, perms: Perms) {
    // SAFETY: test-owned range; no reference relies on the removed access.
    unsafe { ctx.address_space().mprotect(range, perms).unwrap() }
}

fn raw_mprotect(addr: u64, len: usize, prot: libc::c_int) {
    // SAFETY: test-owned range.
    let r = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
    assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
}

/// The counters a context's own work changes: invalidation callbacks and their fences are left
/// out, because every context subscribes to the whole address space this process shares with
/// the tests running in parallel, whose munmaps reach it too.
fn mapping_stats(mut s: ContextStats) -> ContextStats {
    s.invalidations = 0;
    s.tlb_fences = 0;
    s.retries = 0;
    s
}

fn iova_footprint(rt: &Arc<Runtime>) -> (u64, usize) {
    let iova = rt.device().dma().iova();
    (iova.used_bytes(), iova.allocations())
}

fn has_uffd(ctx: &Context, case: &str) -> bool {
    if ctx.address_space().capabilities().uffd.is_none() {
        eprintln!("SKIP {case}: no userfaultfd here");
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// 2.1 Basic mirror faults on system memory

/// Port of `open_close`: open the device, create a context, close both; nothing stays mapped.
pub fn open_close(rt: Arc<Runtime>) {
    let m = buffer(RW);
    let cycle = |rt: &Arc<Runtime>| {
        let ctx = hmm_ctx(rt);
        let s = ctx.stats();
        assert_eq!(
            (s.mappings, s.mapped_bytes, s.pinned_bytes),
            (0, 0, 0),
            "{s:?}"
        );
        device_fill(&ctx, m.addr(), PAGE, 1).unwrap();
        assert!(ctx.stats().mapped_bytes > 0);
        drop(ctx);
    };
    // The first context makes the device allocate its page-table pool (kept for the device's
    // lifetime); from then on every open/close cycle returns the IOVA space to the same state.
    cycle(&rt);
    let baseline = iova_footprint(&rt);
    for _ in 0..4 {
        cycle(&rt);
        assert_eq!(
            iova_footprint(&rt),
            baseline,
            "closing the context gave back every IOVA range"
        );
    }
    assert_eq!(rt.device().in_flight(), 0);
    // The device can be closed too (the runtime's drop joins the service thread).
    drop(rt);
}

/// Port of `anon_read`: page 0 untouched, page 1 the zero page, pages 2.. hold `i`, everything
/// read-only; one device read of all pages: one fault, every page copied, the data right.
pub fn anon_read(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let m = buffer(RW);
    let mirror = bounce(&ctx, BUF);
    for i in 2 * PAGE / 4..ints(&m) {
        write_u32(&m, i, i as u32);
    }
    assert_eq!(m.read_byte(PAGE), 0, "page 1 read: the shared zero page");
    strict_mprotect(&ctx, m.range(), Perms::READ);
    let service = rt.service().stats();
    let reached = || {
        service.records.load(Ordering::Relaxed) - service.lookahead_records.load(Ordering::Relaxed)
    };
    let (records, serviced) = (reached(), service.pages_serviced.load(Ordering::Relaxed));
    read_once(&ctx, m.addr(), &mirror, BUF, NPAGES);
    // The runtime is this test's own: its fault service drained exactly one record for an
    // access the device had reached (and maybe lookahead records for the pages after it).
    assert_eq!(reached() - records, 1);
    assert!(service.pages_serviced.load(Ordering::Relaxed) > serviced);
    for i in 0..ints(&mirror) {
        let want = if i < 2 * PAGE / 4 { 0 } else { i as u32 };
        assert_eq!(read_u32(&mirror, i), want, "int {i}");
    }
    let t = ctx.device_translation(m.addr()).expect("mapped");
    assert!(!t.perms.write, "a read-only VMA is mapped read-only");
}

/// Port of `anon_read_prot`: PROT_NONE memory cannot be read by the device; nothing is copied,
/// nothing is mapped, and the CPU data survives.
pub fn anon_read_prot(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let m = buffer(RW);
    let mirror = bounce(&ctx, BUF);
    for i in 0..ints(&m) {
        write_u32(&m, i, i as u32);
        write_u32(&mirror, i, (i as u32).wrapping_neg());
    }
    strict_mprotect(&ctx, m.range(), Perms::NONE);
    let before = ctx.stats();
    let err = device_read(&ctx, m.addr(), mirror.addr(), BUF).unwrap_err();
    assert!(is_cancel(&err, CancelReason::NoMapping), "-EFAULT: {err}");
    let after = ctx.stats();
    assert_eq!(
        after.pages_mapped, before.pages_mapped,
        "nothing mapped: {after:?}"
    );
    assert_eq!(after.mapped_bytes, before.mapped_bytes);
    assert!(ctx.device_translation(m.addr()).is_none());
    strict_mprotect(&ctx, m.range(), Perms::READ);
    for i in 0..ints(&m) {
        assert_eq!(read_u32(&m, i), i as u32, "CPU data intact at {i}");
        assert_eq!(
            read_u32(&mirror, i),
            (i as u32).wrapping_neg(),
            "device wrote nothing"
        );
    }
}

/// Port of `anon_write`: a device write into fresh memory: one fault, every page, CPU sees it.
pub fn anon_write(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let m = buffer(RW);
    let mirror = bounce(&ctx, BUF);
    write_ints_once(&ctx, m.addr(), &mirror, BUF);
    assert!(ctx.device_translation(m.addr()).unwrap().perms.write);
}

/// Port of `anon_write_prot` (adapted): read-only memory: a device read maps it read-only, a
/// device write is refused (-EPERM) and changes nothing; after `mprotect(RW)` and the explicit
/// `protect` that reports it (mprotect has no userfaultfd event), the write succeeds with one
/// fault: the read-only device entry is upgraded.
pub fn anon_write_prot(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let m = buffer(libc::PROT_READ);
    let mirror = bounce(&ctx, BUF);
    let before = ctx.stats();
    device_read(&ctx, m.addr(), mirror.addr(), PAGE).unwrap();
    assert_eq!(ctx.stats().fault_batches - before.fault_batches, 1);
    assert_eq!(read_u32(&mirror, 0), 0);
    for i in 0..ints(&mirror) {
        write_u32(&mirror, i, i as u32);
    }
    let err = device_write(&ctx, m.addr(), mirror.addr(), BUF).unwrap_err();
    assert!(is_cancel(&err, CancelReason::Permission), "-EPERM: {err}");
    for i in (0..ints(&m)).step_by(97) {
        assert_eq!(read_u32(&m, i), 0, "nothing written at {i}");
    }
    raw_mprotect(m.addr(), BUF, RW);
    ctx.address_space()
        .protect(m.range(), Perms::READ_WRITE)
        .unwrap();
    write_ints_once(&ctx, m.addr(), &mirror, BUF);
    assert!(ctx.device_translation(m.addr()).unwrap().perms.write);
}

fn memfd(name: &str, len: usize) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string; the returned fd is owned below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain ftruncate on our fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    fd
}

/// An `O_TMPFILE` in the temporary directory (what hmm-tests uses), if the file system allows it.
/// tmpfs's `f_type`: shmem, where the kernel grants writable long-term pins.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// An O_TMPFILE file of `len` bytes in the temporary directory: its fd, a description of the
/// file system, and whether that file system is shmem (tmpfs).
fn tmpfile(len: usize) -> Option<(OwnedFd, String, bool)> {
    let dir = std::env::temp_dir();
    let cdir = std::ffi::CString::new(dir.to_str()?).ok()?;
    // SAFETY: a valid C string; the fd is owned below.
    let fd = unsafe { libc::open(cdir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain ftruncate on our fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the struct.
    unsafe { libc::fstatfs(fd.as_raw_fd(), &mut sfs) };
    let fs = format!("{} (f_type {:#x})", dir.display(), sfs.f_type);
    Some((fd, fs, sfs.f_type as i64 == TMPFS_MAGIC))
}

fn unmap_strict(ctx: &Context, addr: u64, len: usize) {
    // SAFETY: test-owned raw mapping, nothing refers into it any more.
    unsafe {
        ctx.address_space()
            .munmap(VaRange::new(addr, len as u64).unwrap())
            .unwrap()
    }
}

fn pwrite_ints(fd: &OwnedFd, n: usize) {
    let bytes: Vec<u8> = (0..n as u32).flat_map(|i| i.to_ne_bytes()).collect();
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all(&bytes).unwrap();
}

fn file_read_on(ctx: &Context, fd: &OwnedFd, what: &str) {
    pwrite_ints(fd, BUF / 4);
    let addr = map_shared_aligned(fd.as_raw_fd(), BUF, libc::PROT_READ);
    let mirror = bounce(ctx, BUF);
    read_once(ctx, addr, &mirror, BUF, NPAGES);
    for i in 0..BUF / 4 {
        assert_eq!(read_u32(&mirror, i), i as u32, "{what}: int {i}");
    }
    unmap_strict(ctx, addr, BUF);
}

/// Port of `file_read`: a shared read-only file mapping (O_TMPFILE as in hmm-tests, and a memfd)
/// is read by the device: one fault, every page, the file's data.
pub fn file_read(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    file_read_on(&ctx, &memfd("hmm-file-read", BUF), "memfd");
    match tmpfile(BUF) {
        Some((fd, fs, _)) => file_read_on(&ctx, &fd, &fs),
        None => {
            eprintln!("SKIP file_read O_TMPFILE part: the temporary directory refuses O_TMPFILE")
        }
    }
}

fn file_write_on(ctx: &Context, fd: &OwnedFd, what: &str) {
    let addr = map_shared_aligned(fd.as_raw_fd(), BUF, RW);
    let mirror = bounce(ctx, BUF);
    for i in 0..ints(&mirror) {
        write_u32(&mirror, i, i as u32);
    }
    device_write(ctx, addr, mirror.addr(), BUF).unwrap();
    for i in 0..BUF / 4 {
        assert_eq!(read_u32_at(addr, i), i as u32, "{what}: CPU int {i}");
    }
    let mut back = vec![0u8; BUF];
    // SAFETY: pread into our own buffer.
    let n = unsafe { libc::pread(fd.as_raw_fd(), back.as_mut_ptr().cast(), BUF, 0) };
    assert_eq!(n, BUF as isize);
    for i in 0..BUF / 4 {
        let v = u32::from_ne_bytes(back[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(v, i as u32, "{what}: pread int {i}");
    }
    unmap_strict(ctx, addr, BUF);
}

/// Port of `file_write` (adapted): device write into a shared memfd (shmem) mapping; the CPU and
/// `pread` see the data. The O_TMPFILE part runs on whatever the temporary directory is. The
/// kernel refuses writable FOLL_LONGTERM pins of files on dirty-tracked file systems (ext4, xfs),
/// so a backend that pins (kernel VFIO) gets the device write cancelled with
/// `CancelReason::DmaMap` there, and nothing mapped; on tmpfs (shmem), or on a backend that takes
/// no long-term pin (the in-process one reaches memory with process_vm_writev), it succeeds.
pub fn file_write(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let pins = rt.device().backend().pins_memory();
    file_write_on(&ctx, &memfd("hmm-file-write", BUF), "memfd");
    match tmpfile(BUF) {
        Some((fd, fs, false)) if pins => {
            let addr = map_shared_aligned(fd.as_raw_fd(), BUF, RW);
            let mirror = bounce(&ctx, BUF);
            let err = device_write(&ctx, addr, mirror.addr(), BUF)
                .expect_err("a writable long-term pin of a dirty-tracked file was granted");
            assert!(is_cancel(&err, CancelReason::DmaMap), "{fs}: {err:?}");
            assert!(
                ctx.device_translation(addr).is_none(),
                "{fs}: a device entry stayed"
            );
            unmap_strict(&ctx, addr, BUF);
        }
        Some((fd, fs, _)) => file_write_on(&ctx, &fd, &fs),
        None => {
            eprintln!("SKIP file_write O_TMPFILE part: the temporary directory refuses O_TMPFILE")
        }
    }
}

/// Port of `anon_read_multiple`: ten fresh buffers read one after the other, each with one fault
/// and right data; each buffer's munmap (seen through userfaultfd) releases its DMA mapping, so
/// mappings, mapped bytes and the IOVA space stay flat across iterations.
pub fn anon_read_multiple(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    if !has_uffd(&ctx, "anon_read_multiple") {
        return;
    }
    let mirror = bounce(&ctx, BUF);
    let base = ctx.stats();
    let base_iova = iova_footprint(&rt);
    for c in 0..NTIMES {
        let m = buffer(RW);
        for i in 0..ints(&m) {
            write_u32(&m, i, (i + c) as u32);
        }
        quiesce(&ctx);
        read_once(&ctx, m.addr(), &mirror, BUF, NPAGES);
        for i in 0..ints(&mirror) {
            assert_eq!(
                read_u32(&mirror, i),
                (i + c) as u32,
                "iteration {c}: int {i}"
            );
        }
        drop(m); // a plain munmap: the UNMAP event releases the mapping
        ctx.address_space().settle().unwrap();
        let s = ctx.stats();
        assert_eq!(
            (s.mappings, s.mapped_bytes, s.pinned_bytes),
            (base.mappings, base.mapped_bytes, base.pinned_bytes),
            "iteration {c}: the buffer's mapping was released"
        );
        assert_eq!(
            iova_footprint(&rt),
            base_iova,
            "iteration {c}: IOVA space flat"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2.2 Teardown races

#[derive(Clone, Copy, Debug)]
enum Racer {
    Munmap,
    DontNeed,
    Mremap,
}

fn teardown_race(rt: Arc<Runtime>, racer: Racer) {
    let len = BUF / 4;
    // Fault-around over exactly one (aligned) buffer: one fault maps it all, like dmirror.
    let ctx = rt
        .create_context_with(ContextOptions {
            fault_around: len as u64,
            ..Default::default()
        })
        .unwrap();
    if !has_uffd(&ctx, "anon_teardown") {
        return;
    }
    let mirror = bounce(&ctx, len);
    let base = ctx.stats();
    let mut oks = 0;
    for round in 0..(2 * NTIMES) {
        let m = Mapping::anonymous_aligned(len, len, RW).unwrap();
        for i in 0..ints(&m) {
            write_u32(&m, i, (i + round) as u32);
        }
        quiesce(&ctx);
        let faults = ctx.stats().fault_batches;
        let start = m.addr();
        let range = m.forget();
        let half = start + (len / 2) as u64;
        let spin = (round as u64 * 7919) % 20_000;
        let (go, racer_thread) = spawn_racer(spin, move || {
            // SAFETY: the second half of a test-owned mapping; the device may be reading it,
            // which is the point, and no Rust reference points into it.
            let r = unsafe {
                match racer {
                    Racer::Munmap => libc::munmap(half as *mut libc::c_void, len / 2),
                    Racer::DontNeed => {
                        libc::madvise(half as *mut libc::c_void, len / 2, libc::MADV_DONTNEED)
                    }
                    Racer::Mremap => {
                        let p = libc::mremap(
                            half as *mut libc::c_void,
                            len / 2,
                            len / 2,
                            libc::MREMAP_MAYMOVE,
                        );
                        if p == libc::MAP_FAILED {
                            -1
                        } else {
                            libc::munmap(p, len / 2)
                        }
                    }
                }
            };
            assert_eq!(r, 0, "{racer:?}: {}", std::io::Error::last_os_error());
        });
        go.store(true, Ordering::Release);
        let result = device_read(&ctx, start, mirror.addr(), len);
        racer_thread.join().unwrap();
        match &result {
            Ok(_) => {
                oks += 1;
                // A racing DONTNEED invalidates and the device faults the zeroed pages again (as
                // dmirror counts faults == 2 when an invalidation lands in between); a read that
                // succeeds across munmap/mremap had the whole range all along: one fault.
                let f = ctx.stats().fault_batches - faults;
                if matches!(racer, Racer::DontNeed) {
                    assert!(f >= 1, "{racer:?} round {round}");
                } else {
                    assert_eq!(f, 1, "{racer:?} round {round}");
                }
                for i in 0..ints(&mirror) {
                    let got = read_u32(&mirror, i);
                    let want = (i + round) as u32;
                    // After DONTNEED the CPU itself reads zeros: a page read after the discard
                    // is zero (coherent), never anything else.
                    let zero_ok = matches!(racer, Racer::DontNeed) && i >= ints(&mirror) / 2;
                    assert!(
                        got == want || (zero_ok && got == 0),
                        "{racer:?} round {round}: a successful read returned {got:#x} at int {i}"
                    );
                }
            }
            Err(e) => assert!(is_clean_race_error(e), "{racer:?} round {round}: {e:?}"),
        }
        ctx.address_space().settle().unwrap();
        if !matches!(racer, Racer::DontNeed) {
            for p in (len / 2..len).step_by(PAGE) {
                assert!(
                    ctx.device_translation(start + p as u64).is_none(),
                    "{racer:?} round {round}: a device entry survived for the unmapped half"
                );
            }
        }
        // The rest goes through the strict wrapper; then nothing of this round stays mapped.
        let rest = if matches!(racer, Racer::DontNeed) {
            range
        } else {
            VaRange::new(start, (len / 2) as u64).unwrap()
        };
        // SAFETY: ours, no reference into it.
        unsafe { ctx.address_space().munmap(rest).unwrap() };
        let s = ctx.stats();
        assert_eq!(
            (s.mappings, s.mapped_bytes),
            (base.mappings, base.mapped_bytes),
            "{racer:?} round {round}: leaked mapping {s:?}"
        );
    }
    eprintln!(
        "anon_teardown {racer:?}: {oks} of {} reads succeeded",
        2 * NTIMES
    );
}

/// Port of `anon_teardown`: munmap of the second half races a device read of the whole buffer.
/// Ok => the data is complete and right; Err => a clean cancel/refusal; afterwards no device entry
/// for the unmapped half and no leaked mapping.
pub fn anon_teardown(rt: Arc<Runtime>) {
    teardown_race(rt, Racer::Munmap);
}

/// `anon_teardown` variant racing MADV_DONTNEED (userfaultfd REMOVE).
pub fn anon_teardown_dontneed(rt: Arc<Runtime>) {
    teardown_race(rt, Racer::DontNeed);
}

/// `anon_teardown` variant racing mremap of the second half away (userfaultfd REMAP).
pub fn anon_teardown_mremap(rt: Arc<Runtime>) {
    teardown_race(rt, Racer::Mremap);
}

// ---------------------------------------------------------------------------------------------
// 2.4 Huge pages

/// Port of `anon_write_huge`: a device write of one PMD of a THP-backed buffer: one fault, one
/// 2 MiB device leaf, data right.
pub fn anon_write_huge(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let m = Mapping::anonymous_aligned(TWOMEG, TWOMEG, RW).unwrap();
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(m.as_ptr().cast(), TWOMEG, libc::MADV_HUGEPAGE) };
    m.write_byte(0, 1);
    let snap = ctx.address_space().snapshot(m.range()).unwrap();
    if snap.pages()[0].size != CpuPageSize::Thp {
        eprintln!("SKIP anon_write_huge: no THP backs the buffer (THP off or memory fragmented)");
        return;
    }
    let mirror = bounce(&ctx, TWOMEG);
    let large = ctx.stats().large_mappings;
    write_ints_once(&ctx, m.addr(), &mirror, TWOMEG);
    assert_eq!(ctx.stats().large_mappings - large, 1, "one 2 MiB mapping");
    let t = ctx.device_translation(m.addr() + 4321).unwrap();
    assert_eq!(t.size, driver::PageSize::Large);
}

fn hugetlb_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn map_hugetlb() -> Option<u64> {
    if hugetlb_pages() == 0 {
        return None;
    }
    // SAFETY: a fresh anonymous hugetlb mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TWOMEG,
            RW,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as u64)
}

/// Port of `anon_write_hugetlbfs`: device write into a MAP_HUGETLB buffer. Skipped (with the
/// reason) when no free 2 MiB huge page is reserved; system settings are never changed.
pub fn anon_write_hugetlbfs(rt: Arc<Runtime>) {
    let Some(addr) = map_hugetlb() else {
        eprintln!("SKIP anon_write_hugetlbfs: no free 2 MiB hugetlb page (hugepages-2048kB/free_hugepages is 0)");
        return;
    };
    let ctx = hmm_ctx(&rt);
    let mirror = bounce(&ctx, TWOMEG);
    write_ints_once(&ctx, addr, &mirror, TWOMEG);
    unmap_strict(&ctx, addr, TWOMEG);
}

/// Port of `compound` (adapted): the CPU snapshot of a huge page reports WRITE at the huge level
/// on every page, then READ after mprotect — but mprotect sends no event, so the device entry
/// stays writable until the explicit `protect()`, after which device writes are refused.
/// hugetlbfs as in the kernel when a huge page is reserved; a THP otherwise.
pub fn compound(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let (addr, owned) = match map_hugetlb() {
        Some(a) => (a, None),
        None => {
            let m = Mapping::anonymous_aligned(TWOMEG, TWOMEG, RW).unwrap();
            // SAFETY: advice on our own mapping.
            unsafe { libc::madvise(m.as_ptr().cast(), TWOMEG, libc::MADV_HUGEPAGE) };
            (m.addr(), Some(m))
        }
    };
    let range = VaRange::new(addr, TWOMEG as u64).unwrap();
    for i in 0..TWOMEG / 4 {
        // SAFETY: our writable mapping.
        unsafe { std::ptr::write_volatile((addr as *mut u32).add(i), i as u32) };
    }
    let snap = ctx.address_space().snapshot(range).unwrap();
    let level = snap.pages()[0].size;
    if level == CpuPageSize::Base {
        eprintln!("SKIP compound: neither a hugetlb page nor a THP backs the buffer");
        return;
    }
    assert!(
        snap.pages()
            .iter()
            .all(|p| p.state == PageState::Write && p.size == level),
        "every page WRITE at {level:?}"
    );
    device_checksum(&ctx, addr, TWOMEG).unwrap();
    assert!(ctx.device_translation(addr).unwrap().perms.write);
    raw_mprotect(addr, TWOMEG, libc::PROT_READ);
    let snap = ctx.address_space().snapshot(range).unwrap();
    assert!(
        snap.pages()
            .iter()
            .all(|p| p.state == PageState::Read && p.size == level),
        "every page READ at {level:?} after mprotect"
    );
    // No event for mprotect: the device entry is unchanged until the caller reports it.
    assert!(ctx.device_translation(addr).unwrap().perms.write);
    ctx.address_space().protect(range, Perms::READ).unwrap();
    assert!(ctx.device_translation(addr).is_none_or(|t| !t.perms.write));
    let err = device_fill(&ctx, addr, PAGE, 7).unwrap_err();
    assert!(is_cancel(&err, CancelReason::Permission), "{err}");
    assert_eq!(read_u32_at(addr, 5), 5);
    assert_eq!(
        device_checksum(&ctx, addr, TWOMEG).unwrap(),
        cpu_checksum(addr, TWOMEG)
    );
    match owned {
        Some(m) => {
            let r = m.forget();
            unmap_strict(&ctx, r.start(), r.len() as usize);
        }
        None => unmap_strict(&ctx, addr, TWOMEG),
    }
}

// ---------------------------------------------------------------------------------------------
// 2.5 Snapshot

fn vvar() -> Option<VaRange> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[vvar]"))?;
    let (a, rest) = line.split_once('-')?;
    let b = rest.split_whitespace().next()?;
    VaRange::from_bounds(
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    )
    .ok()
}

/// Port of `mixedmap` (adapted): hmm-tests snapshots a VM_MIXEDMAP mapping of the dmirror fd; we
/// have no such driver mapping, so the special mapping is `[vvar]` (VM_PFNMAP/VM_IO): the snapshot
/// reports it as an error page and a device access is refused without mapping anything.
pub fn mixedmap(rt: Arc<Runtime>) {
    let Some(vvar) = vvar() else {
        eprintln!("SKIP mixedmap: no [vvar] in /proc/self/maps");
        return;
    };
    let ctx = hmm_ctx(&rt);
    let page = VaRange::new(vvar.start(), PAGE as u64).unwrap();
    let snap = ctx.address_space().snapshot(page).unwrap();
    assert_eq!(
        snap.pages()[0].state,
        PageState::Error(PageError::Special),
        "{snap:?}"
    );
    let before = ctx.stats();
    let err = device_checksum(&ctx, vvar.start(), 8).unwrap_err();
    assert!(is_cancel(&err, CancelReason::NoMapping), "{err}");
    assert_eq!(ctx.stats().mapped_bytes, before.mapped_bytes);
    assert!(ctx.device_translation(vvar.start()).is_none());
}

/// Port of `snapshot` (pages 0–4 plus an untouched page; the device-private pages 5–6 are out of
/// scope): PROT_NONE -> error, hole -> error, zero page -> ZERO, read-only data -> READ, written
/// -> WRITE, untouched -> NONE. A snapshot maps and pins nothing.
pub fn snapshot(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let m = Mapping::anonymous(6 * PAGE, RW).unwrap();
    // Page 0 PROT_NONE, pages 1 and 5 untouched, page 2 zero page read-only, page 3 data
    // read-only, page 4 written. The hole is page 0 of the address space (a hole made by munmap
    // here could be refilled at once by a parallel test).
    assert_eq!(m.read_byte(2 * PAGE), 0);
    m.write_byte(3 * PAGE, 3);
    m.write_byte(4 * PAGE, 4);
    m.protect(0, PAGE, libc::PROT_NONE).unwrap();
    m.protect(2 * PAGE, 2 * PAGE, libc::PROT_READ).unwrap();
    let before = ctx.stats();
    let iova = iova_footprint(&rt);
    let snap = ctx.address_space().snapshot(m.range()).unwrap();
    let states: Vec<PageState> = snap.pages().iter().map(|p| p.state).collect();
    let walker = ctx.address_space().walker().caps().clone();
    let zero = if walker.pagemap_scan || walker.pfn_visible {
        PageState::Zero
    } else {
        eprintln!("note: the zero page is not distinguishable here ({walker:?})");
        states[2]
    };
    assert_eq!(
        states,
        vec![
            PageState::Error(PageError::NoAccess),
            PageState::None,
            zero,
            PageState::Read,
            PageState::Write,
            PageState::None,
        ],
        "{snap:?}"
    );
    let hole = ctx
        .address_space()
        .snapshot(VaRange::new(0, PAGE as u64).unwrap())
        .unwrap();
    assert_eq!(hole.pages()[0].state, PageState::Error(PageError::NoVma));
    assert_eq!(
        mapping_stats(ctx.stats()),
        mapping_stats(before),
        "a snapshot creates no mapping and no pin"
    );
    assert_eq!(iova_footprint(&rt), iova);
    assert!(ctx.device_translation(m.addr() + 4 * PAGE as u64).is_none());
}

// ---------------------------------------------------------------------------------------------
// 2.6 Multi-device

/// Port of `double_map` (without the migration step): two devices mirror the one address space;
/// both read the read-only data with one fault each; one CPU event (a plain munmap seen through
/// userfaultfd) invalidates both device page tables. `open` must give a second, independent device.
pub fn double_map(rt: Arc<Runtime>, rt2: Arc<Runtime>) {
    let a = hmm_ctx(&rt);
    let b = hmm_ctx(&rt2);
    if !has_uffd(&a, "double_map") {
        return;
    }
    assert!(Arc::ptr_eq(a.address_space(), b.address_space()));
    let m = buffer(RW);
    for i in 0..6 * PAGE / 4 {
        write_u32(&m, i, i as u32);
    }
    strict_mprotect(&a, m.range(), Perms::READ);
    for ctx in [&a, &b] {
        let mirror = bounce(ctx, 6 * PAGE);
        // Fault-around maps the whole (aligned) buffer with that one fault.
        read_once(ctx, m.addr(), &mirror, 6 * PAGE, NPAGES);
        for i in 0..6 * PAGE / 4 {
            assert_eq!(read_u32(&mirror, i), i as u32);
        }
    }
    let addr = m.addr();
    let (fa, fb) = (a.stats().tlb_fences, b.stats().tlb_fences);
    drop(m);
    a.address_space().settle().unwrap();
    assert!(a.device_translation(addr).is_none(), "device 0 invalidated");
    assert!(b.device_translation(addr).is_none(), "device 1 invalidated");
    assert!(a.stats().tlb_fences > fa && b.stats().tlb_fences > fb);
}

// ---------------------------------------------------------------------------------------------
// 2.9 userfaultfd_read (proposed upstream)

/// The application's own userfaultfd, MISSING mode, on `range`.
fn app_uffd(range: VaRange) -> Result<OwnedFd, std::io::Error> {
    use sys_util::uffd;
    let fd = uffd::create(true, false)?;
    uffd::api(fd.as_fd(), 0)?;
    uffd::register(
        fd.as_fd(),
        range.start(),
        range.len(),
        uffd::REGISTER_MODE_MISSING,
    )?;
    Ok(fd)
}

/// Serves MISSING faults on `fd` with pages of 0xAB until `stop`; returns how many it served
/// (a fault counts whether or not its copy succeeded).
fn serve_missing(fd: OwnedFd, stop: Arc<AtomicBool>) -> usize {
    use sys_util::uffd::{resolve_missing, Missing};
    let page = vec![0xabu8; PAGE];
    let mut served = 0;
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
            continue;
        }
        match resolve_missing(fd.as_fd(), &page) {
            Ok(Missing::Filled(_) | Missing::CopyFailed(..)) => served += 1,
            Ok(Missing::Nothing) | Err(_) => {}
        }
    }
    served
}

/// The application's own userfaultfd (MISSING mode) over a mapping, served with 0xAB pages by a
/// thread until `stop`.
struct AppHandler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl AppHandler {
    /// `None` (after printing why `test` is skipped) if the application cannot register one.
    fn register(m: &Mapping, test: &str) -> Option<AppHandler> {
        let fd = match app_uffd(m.range()) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("SKIP {test}: the application cannot register its own uffd: {e}");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || serve_missing(fd, stop2));
        Some(AppHandler { stop, thread })
    }

    /// Stops the handler; returns how many faults it served.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap()
    }
}

/// Port of the proposed `userfaultfd_read`: the application serves MISSING faults of a 4-page
/// region with its own userfaultfd while the device reads it. The driver populates from its fault
/// service thread (never from its monitor), so the application's handler runs and the device reads
/// 0xAB. The mirror cannot also register the range for its events (one uffd per VMA): `track`
/// reports `TrackedElsewhere`, the driver logs it and serves the fault anyway — without CPU events
/// for that range, so coherence there relies on the explicit API.
pub fn userfaultfd_read(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    let Some(handler) = AppHandler::register(&m, "userfaultfd_read") else {
        return;
    };
    let mirror = bounce(&ctx, 4 * PAGE);
    let before = ctx.stats();
    let result = device_read(&ctx, m.addr(), mirror.addr(), 4 * PAGE);
    let tracked = ctx.address_space().track(m.range());
    let served = handler.stop();
    result.unwrap();
    assert_eq!(ctx.stats().fault_batches - before.fault_batches, 1);
    assert_eq!(ctx.stats().pages_mapped - before.pages_mapped, 4);
    assert_eq!(served, 4, "the application's handler served every page");
    for i in 0..4 * PAGE {
        assert_eq!(mirror.read_byte(i), 0xab, "byte {i}");
    }
    if ctx.address_space().capabilities().uffd.is_some() {
        assert!(
            matches!(tracked, Err(mirror::Error::TrackedElsewhere { .. })),
            "{tracked:?}"
        );
        // Mapped without CPU events, and said so.
        assert!(ctx.stats().untracked_runs > before.untracked_runs);
    }
    let r = m.forget();
    unmap_strict(&ctx, r.start(), r.len() as usize);
}

/// The same application-owned userfaultfd range on a context that requires CPU events
/// (`ContextOptions::require_events`): the device access is refused with `Untracked` instead of
/// mapping memory whose changes the mirror would never see, and nothing is mapped.
pub fn userfaultfd_owned_range_refused_when_events_required(rt: Arc<Runtime>) {
    let ctx = rt
        .create_context_with(ContextOptions {
            fault_around: BUF as u64,
            require_events: true,
            ..Default::default()
        })
        .expect("create context");
    if !has_uffd(&ctx, "userfaultfd_owned_range_refused_when_events_required") {
        return;
    }
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    let Some(handler) =
        AppHandler::register(&m, "userfaultfd_owned_range_refused_when_events_required")
    else {
        return;
    };
    let before = ctx.stats();
    let result = device_checksum(&ctx, m.addr(), 4 * PAGE);
    handler.stop();
    assert!(
        matches!(&result, Err(e) if is_cancel(e, CancelReason::Untracked)),
        "{result:?}"
    );
    let after = ctx.stats();
    assert_eq!(after.pages_mapped, before.pages_mapped, "{after:?}");
    assert_eq!(after.untracked_runs, before.untracked_runs, "{after:?}");
    assert!(ctx.device_translation(m.addr()).is_none());
    let r = m.forget();
    unmap_strict(&ctx, r.start(), r.len() as usize);
}

/// The other order: once the mirror tracks a range (after a device access), the application's
/// own UFFDIO_REGISTER on it fails with EBUSY.
pub fn userfaultfd_after_mirror_is_busy(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    if !has_uffd(&ctx, "userfaultfd_after_mirror_is_busy") {
        return;
    }
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    device_fill(&ctx, m.addr(), 4 * PAGE, 1).unwrap();
    let err = app_uffd(m.range()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Cases the kernel never needed (its notifiers are synchronous)

/// Partial munmap at head, middle and tail of a device-mapped buffer (strict wrapper). The driver
/// tears down every DMA mapping overlapping the change, so afterwards the unmapped part has no
/// device entry, and the untouched parts still work on the device (re-faulted where needed) with
/// their data intact.
pub fn partial_munmap(rt: Arc<Runtime>) {
    let ctx = exact_ctx(&rt);
    let n = 16;
    for (name, from, count) in [("head", 0, 4), ("middle", 6, 4), ("tail", 12, 4)] {
        let m = Mapping::anonymous(n * PAGE, RW).unwrap();
        for i in 0..ints(&m) {
            write_u32(&m, i, i as u32 ^ 0x5a5a);
        }
        let sum = device_checksum(&ctx, m.addr(), n * PAGE).unwrap();
        assert_eq!(sum, cpu_checksum(m.addr(), n * PAGE));
        let range = m.forget();
        let gone =
            VaRange::new(range.start() + (from * PAGE) as u64, (count * PAGE) as u64).unwrap();
        // SAFETY: ours; nothing refers into it.
        unsafe { ctx.address_space().munmap(gone).unwrap() };
        for p in 0..count {
            assert!(
                ctx.device_translation(gone.start() + (p * PAGE) as u64)
                    .is_none(),
                "{name}: unmapped page {p} still on the device"
            );
        }
        let faults = ctx.stats().faults;
        for (s, e) in [(0, from), (from + count, n)] {
            if s == e {
                continue;
            }
            let addr = range.start() + (s * PAGE) as u64;
            let len = (e - s) * PAGE;
            assert_eq!(
                device_checksum(&ctx, addr, len).unwrap(),
                cpu_checksum(addr, len),
                "{name}: surviving part [{s}, {e}) pages"
            );
            for i in 0..len / 4 {
                assert_eq!(read_u32_at(addr, i), (i + s * PAGE / 4) as u32 ^ 0x5a5a);
            }
            // SAFETY: ours.
            unsafe {
                ctx.address_space()
                    .munmap(VaRange::new(addr, len as u64).unwrap())
                    .unwrap()
            };
        }
        assert!(ctx.stats().faults >= faults);
        let err = device_checksum(&ctx, 0x1000, 8).unwrap_err();
        assert!(is_cancel(&err, CancelReason::NoMapping));
    }
    assert_eq!(
        ctx.stats().mapped_bytes,
        0,
        "nothing leaked: {:?}",
        ctx.stats()
    );
}

/// mremap move (strict wrapper) and MREMAP_DONTUNMAP (plain syscall, seen through userfaultfd):
/// the old range's device entries are dropped, the new range faults in with the data; after
/// DONTUNMAP the old range reads zeros on the device like on the CPU.
pub fn mremap_move_and_dontunmap(rt: Arc<Runtime>) {
    let ctx = exact_ctx(&rt);
    if !has_uffd(&ctx, "mremap") {
        return;
    }
    let len = 8 * PAGE;
    // Move.
    let m = Mapping::anonymous(len, RW).unwrap();
    for i in 0..ints(&m) {
        write_u32(&m, i, i as u32 + 11);
    }
    let sum = device_checksum(&ctx, m.addr(), len).unwrap();
    let old = m.forget();
    let target = Mapping::anonymous(len, libc::PROT_NONE).unwrap().forget();
    // SAFETY: the old range and the target reservation are ours and abandoned.
    let new = unsafe {
        ctx.address_space()
            .mremap(old, len as u64, true, Some(target.start()))
            .unwrap()
    };
    assert_eq!(new, target.start());
    assert!(ctx.device_translation(old.start()).is_none());
    assert!(
        ctx.device_translation(new).is_none(),
        "the new range faults in"
    );
    let faults = ctx.stats().faults;
    assert_eq!(device_checksum(&ctx, new, len).unwrap(), sum);
    assert!(ctx.stats().faults > faults);
    unmap_strict(&ctx, new, len);

    // DONTUNMAP: the old VMA stays, emptied.
    let m = Mapping::anonymous(len, RW).unwrap();
    for i in 0..ints(&m) {
        write_u32(&m, i, i as u32 + 22);
    }
    let sum = device_checksum(&ctx, m.addr(), len).unwrap();
    let old = m.forget();
    // SAFETY: moving our own mapping with DONTUNMAP; the old range stays mapped (empty).
    let p = unsafe {
        libc::mremap(
            old.start() as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP,
            // glibc reads a new address for DONTUNMAP too: pass "none" explicitly.
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mremap(DONTUNMAP): {}",
        std::io::Error::last_os_error()
    );
    let new = p as u64;
    ctx.address_space().settle().unwrap();
    assert!(
        ctx.device_translation(old.start()).is_none(),
        "old range dropped"
    );
    assert_eq!(device_checksum(&ctx, new, len).unwrap(), sum, "data moved");
    let zeros = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &vec![0u8; len]);
    assert_eq!(cpu_checksum(old.start(), len), zeros);
    assert_eq!(
        device_checksum(&ctx, old.start(), len).unwrap(),
        zeros,
        "old range is zero-fill"
    );
    unmap_strict(&ctx, new, len);
    unmap_strict(&ctx, old.start(), len);
}

/// Sequence collision between walk and install where the colliding event really changes the
/// memory (MADV_DONTNEED through the strict wrapper, from the walk hook): the install is retried
/// and the device never writes into the discarded page: the CPU sees the device's data.
pub fn collision_with_dontneed_is_never_stale(rt: Arc<Runtime>) {
    let fired = Arc::new(AtomicBool::new(false));
    let mm = Arc::new(std::sync::Mutex::new(None::<Arc<mirror::AddressSpace>>));
    let (hook_mm, hook_fired) = (mm.clone(), fired.clone());
    let ctx = rt
        .create_context_with(ContextOptions {
            fault_around: 0,
            walk_hook: Some(Arc::new(move |range: VaRange| {
                if !hook_fired.swap(true, Ordering::SeqCst) {
                    if let Some(mm) = hook_mm.lock().unwrap().as_ref() {
                        // SAFETY: the test's page; its old contents are not relied on.
                        unsafe { mm.madvise(range, libc::MADV_DONTNEED).unwrap() };
                    }
                }
            })),
            ..Default::default()
        })
        .unwrap();
    *mm.lock().unwrap() = Some(ctx.address_space().clone());
    let m = Mapping::anonymous(PAGE, RW).unwrap();
    m.write_byte(0, 9);
    let retries = ctx.stats().retries;
    device_fill(&ctx, m.addr(), PAGE, 0x3c3c_3c3c_3c3c_3c3c).unwrap();
    assert!(fired.load(Ordering::SeqCst));
    assert!(ctx.stats().retries > retries, "{:?}", ctx.stats());
    for i in 0..PAGE {
        assert_eq!(
            m.read_byte(i),
            0x3c,
            "byte {i}: the device wrote a stale page"
        );
    }
    assert_eq!(
        device_checksum(&ctx, m.addr(), PAGE).unwrap(),
        cpu_checksum(m.addr(), PAGE)
    );
}

/// Submits a device fill of the first `len` bytes of `m` and does not wait for it (the context
/// is about to be dropped under it).
fn submit_and_forget_fill(ctx: &Context, m: &Mapping, len: usize, pattern: u64) {
    // SAFETY: the buffer is reached only through raw pointers.
    let _ticket = unsafe {
        ctx.submit(Op::Fill {
            dst: m.addr(),
            len: len as u64,
            pattern,
        })
        .unwrap()
    };
}

/// Release ordering: the context is dropped while its work is stalled on faults. The drop
/// quiesces (the work completes or is cancelled), then tears the device view down, then unmaps;
/// the IOVA space and the device return to their baseline and the CPU memory stays usable.
pub fn release_while_busy(rt: Arc<Runtime>) {
    drop(hmm_ctx(&rt)); // the device's page-table pool now exists (kept for its lifetime)
    let baseline_iova = iova_footprint(&rt);
    let in_flight = rt.device().in_flight();
    let m = buffer(RW);
    {
        let ctx = rt
            .create_context_with(ContextOptions {
                fault_around: 0,
                ..Default::default()
            })
            .unwrap();
        submit_and_forget_fill(&ctx, &m, BUF, 0x6161_6161_6161_6161);
        // Dropped here without waiting: the fill is still faulting page by page.
    }
    assert_eq!(rt.device().in_flight(), in_flight, "the work was collected");
    assert_eq!(iova_footprint(&rt), baseline_iova, "every DMA mapping went");
    // Whatever the fill managed is a prefix of the pattern; the rest is untouched zeros.
    let mut seen_zero = false;
    for i in (0..BUF).step_by(PAGE) {
        match m.read_byte(i) {
            0x61 => assert!(
                !seen_zero,
                "page {} written after an unwritten one",
                i / PAGE
            ),
            0 => seen_zero = true,
            b => panic!("byte {b:#x} at {i}"),
        }
    }
    let ctx = hmm_ctx(&rt);
    assert_eq!(ctx.stats().mapped_bytes, 0);
    device_fill(&ctx, m.addr(), PAGE, 1).unwrap();
}

/// Release ordering, the fault service's side: the context is dropped while the service holds
/// a run it walked and DMA-mapped but has not installed. The drop clears the root, so the
/// replayed work fails at once (`BAD_ASID`) and the drop's wait for it ends early; the drop
/// must still wait for the batch, so that no DMA mapping outlives it. (Seen as an IOVA
/// footprint above baseline in `release_while_busy`, once, under load.)
pub fn release_while_servicing(rt: Arc<Runtime>) {
    drop(hmm_ctx(&rt)); // the device's page-table pool now exists (kept for its lifetime)
    let baseline_iova = iova_footprint(&rt);
    let m = buffer(RW);
    let (walked_tx, walked_rx) = std::sync::mpsc::channel::<()>();
    let walked_tx = Mutex::new(Some(walked_tx));
    let hook: Arc<dyn Fn(VaRange) + Send + Sync> = Arc::new(move |_| {
        if let Some(tx) = walked_tx.lock().unwrap().take() {
            let _ = tx.send(());
            // Hold the walked, DMA-mapped run while the test thread drops the context.
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let ctx = rt
        .create_context_with(ContextOptions {
            fault_around: 0,
            walk_hook: Some(hook),
            ..Default::default()
        })
        .unwrap();
    submit_and_forget_fill(&ctx, &m, PAGE, 0x6262_6262_6262_6262);
    walked_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the service walked the fault");
    drop(ctx);
    assert_eq!(
        iova_footprint(&rt),
        baseline_iova,
        "a DMA mapping outlived the context's drop"
    );
    let ctx = hmm_ctx(&rt);
    assert_eq!(ctx.stats().mapped_bytes, 0);
    device_fill(&ctx, m.addr(), PAGE, 1).unwrap();
}

/// A device write into a MAP_PRIVATE file mapping (the structure of `migrate_file_private`,
/// without migration): the driver breaks copy-on-write before mapping, so the CPU sees the device
/// data in its private copy and the file itself stays unchanged.
pub fn file_private_write(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    let fd = memfd("hmm-file-private", BUF);
    pwrite_ints(&fd, BUF / 4);
    let addr = map_fd_aligned(fd.as_raw_fd(), BUF, RW, libc::MAP_PRIVATE);
    assert_eq!(read_u32_at(addr, 7), 7, "the file's data before the write");
    let mirror = bounce(&ctx, BUF);
    device_fill(&ctx, addr, BUF, 0x0d0d_0d0d_0d0d_0d0d).unwrap();
    for i in (0..BUF).step_by(1021) {
        // SAFETY: our readable mapping.
        assert_eq!(
            unsafe { *((addr as *const u8).add(i)) },
            0x0d,
            "CPU byte {i}"
        );
    }
    let mut back = vec![0u8; PAGE];
    // SAFETY: pread into our own buffer.
    let n = unsafe { libc::pread(fd.as_raw_fd(), back.as_mut_ptr().cast(), PAGE, 0) };
    assert_eq!(n, PAGE as isize);
    assert_eq!(
        u32::from_ne_bytes(back[28..32].try_into().unwrap()),
        7,
        "the file is unchanged (private copy)"
    );
    device_read(&ctx, addr, mirror.addr(), BUF).unwrap();
    assert_eq!(mirror.read_byte(BUF - 1), 0x0d);
    unmap_strict(&ctx, addr, BUF);
}

/// Changes to part of a THP the device maps with one 2 MiB leaf: a strict munmap of one page in
/// the middle, a plain MADV_DONTNEED of another (userfaultfd REMOVE, then `settle`). The large
/// leaf goes; the unmapped page has no device entry; the rest is faulted again and the device
/// sees exactly the CPU contents (zeros where discarded).
pub fn thp_partial_changes(rt: Arc<Runtime>) {
    let ctx = hmm_ctx(&rt);
    if !has_uffd(&ctx, "thp_partial_changes") {
        return;
    }
    let m = Mapping::anonymous_aligned(TWOMEG, TWOMEG, RW).unwrap();
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(m.as_ptr().cast(), TWOMEG, libc::MADV_HUGEPAGE) };
    for i in 0..ints(&m) {
        write_u32(&m, i, i as u32 ^ 0xa5a5_0000);
    }
    let snap = ctx.address_space().snapshot(m.range()).unwrap();
    if snap.pages()[0].size != CpuPageSize::Thp {
        eprintln!("SKIP thp_partial_changes: no THP backs the buffer");
        return;
    }
    quiesce(&ctx);
    let sum = device_checksum(&ctx, m.addr(), TWOMEG).unwrap();
    assert_eq!(sum, cpu_checksum(m.addr(), TWOMEG));
    assert_eq!(
        ctx.device_translation(m.addr()).unwrap().size,
        driver::PageSize::Large
    );
    let range = m.forget();
    let hole = range.start() + 100 * PAGE as u64;
    unmap_strict(&ctx, hole, PAGE);
    assert!(ctx.device_translation(hole).is_none());
    let discarded = range.start() + 300 * PAGE as u64;
    // SAFETY: plain DONTNEED of one page of our mapping.
    assert_eq!(
        unsafe { libc::madvise(discarded as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) },
        0
    );
    quiesce(&ctx);
    assert!(
        ctx.device_translation(discarded)
            .is_none_or(|t| t.size == driver::PageSize::Small),
        "no 2 MiB leaf may still cover the discarded page"
    );
    let err = device_checksum(&ctx, hole, 8).unwrap_err();
    assert!(is_cancel(&err, CancelReason::NoMapping), "{err}");
    for (s, e) in [(range.start(), hole), (hole + PAGE as u64, range.end())] {
        let len = (e - s) as usize;
        assert_eq!(
            device_checksum(&ctx, s, len).unwrap(),
            cpu_checksum(s, len),
            "[{s:#x}, {e:#x})"
        );
    }
    assert_eq!(read_u32_at(discarded, 0), 0);
    assert_eq!(read_u32_at(range.start(), 1), 1 ^ 0xa5a5_0000);
    unmap_strict(&ctx, range.start(), 100 * PAGE);
    unmap_strict(&ctx, hole + PAGE as u64, TWOMEG - 101 * PAGE);
}

/// A racing thread: it waits for the returned flag, spins `spin` iterations, then runs `f`.
pub fn spawn_racer<T: Send + 'static>(
    spin: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<T>) {
    let go = Arc::new(AtomicBool::new(false));
    let go2 = go.clone();
    let handle = std::thread::spawn(move || {
        while !go2.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        for _ in 0..spin {
            std::hint::spin_loop();
        }
        f()
    });
    (go, handle)
}

/// Strict coherence against a running device: a long device fill (page by page, no
/// fault-around) races a strict `mprotect(PROT_READ)` from another thread. Once the wrapper
/// returns, the device must not write one more byte: the memory is copied at that instant and
/// must equal the memory after the fill has ended (which fails with `Permission` or had finished).
pub fn strict_mprotect_stops_device_writes(rt: Arc<Runtime>) {
    let ctx = Arc::new(exact_ctx(&rt));
    for round in 0..4u64 {
        let m = buffer(RW);
        let range = m.range();
        let addr = m.addr();
        let ctx2 = ctx.clone();
        let (go, protector) = spawn_racer(round * 150_000, move || {
            strict_mprotect(&ctx2, range, Perms::READ);
            // The instant the wrapper returned.
            let mut copy = vec![0u8; BUF];
            for (i, b) in copy.iter_mut().enumerate() {
                // SAFETY: readable test memory.
                *b = unsafe { std::ptr::read_volatile((addr as *const u8).add(i)) };
            }
            copy
        });
        go.store(true, Ordering::Release);
        let result = device_fill(&ctx, addr, BUF, 0x5555_5555_5555_5555);
        let copy = protector.join().unwrap();
        match &result {
            Ok(_) => {}
            Err(e) => assert!(is_cancel(e, CancelReason::Permission), "round {round}: {e}"),
        }
        let written = copy.iter().step_by(PAGE).filter(|b| **b == 0x55).count();
        eprintln!(
            "strict_mprotect round {round}: {written} of {} pages written when mprotect returned, fill {}",
            BUF / PAGE,
            if result.is_ok() { "finished" } else { "refused" }
        );
        let mut changed = 0;
        for (i, b) in copy.iter().enumerate() {
            if m.read_byte(i) != *b {
                changed += 1;
            }
        }
        assert_eq!(
            changed, 0,
            "round {round}: the device wrote {changed} bytes after the strict mprotect returned ({result:?})"
        );
        let r = m.forget();
        // SAFETY: ours.
        unsafe { ctx.address_space().munmap(r).unwrap() };
    }
}

/// Safety against a running device (semantics §1): a device fill faulting page by page races a
/// strict munmap of its buffer; the moment the wrapper returns, the same addresses are mapped again
/// read-only (fresh zero memory: "handed to someone else"). No byte of the fill may ever appear in
/// the new memory, and the fill ends with a clean error (or had finished before the munmap).
pub fn strict_munmap_then_reuse_sees_no_device_write(rt: Arc<Runtime>) {
    let ctx = Arc::new(exact_ctx(&rt));
    for round in 0..4u64 {
        let m = buffer(RW);
        let range = m.forget();
        let ctx2 = ctx.clone();
        let (go, unmapper) = spawn_racer(round * 150_000, move || {
            // SAFETY: ours; only the device (through raw addresses) uses it.
            unsafe { ctx2.address_space().munmap(range).unwrap() };
            Mapping::anonymous_at(range.start(), range.len() as usize, libc::PROT_READ).ok()
        });
        go.store(true, Ordering::Release);
        let result = device_fill(&ctx, range.start(), BUF, 0x5555_5555_5555_5555);
        let reused = unmapper.join().unwrap();
        if let Err(e) = &result {
            assert!(is_clean_race_error(e), "round {round}: {e:?}");
        }
        let Some(reused) = reused else {
            eprintln!("round {round}: the addresses were taken by someone else; not checked");
            continue;
        };
        let dirty = (0..BUF).filter(|&i| reused.read_byte(i) != 0).count();
        assert_eq!(
            dirty, 0,
            "round {round}: {dirty} bytes of the device fill landed in memory mapped after the strict munmap ({result:?})"
        );
        let r = reused.forget();
        // SAFETY: ours.
        unsafe { ctx.address_space().munmap(r).unwrap() };
    }
}

/// A vfio-user device for a test binary: the emulated MXA-1 served from another process, which
/// is the test binary itself re-executed in server mode (its `server_test` calls
/// `serve_if_server_mode`). One server per runtime; it exits when the runtime disconnects.
pub mod vfio_user {
    use std::io::{BufRead, BufReader, Read};
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use driver::fault::ServiceMode;
    use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

    const SERVER_SOCKET: &str = "HMM_VFU_SERVER_SOCKET";
    const READY: &str = "hmm vfio-user server listening";

    fn socket_path() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "hmm-vfu-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Start a device server process and connect a runtime to it.
    pub fn open(mode: ServiceMode, server_test: &str) -> Arc<Runtime> {
        let path = socket_path();
        let _ = std::fs::remove_file(&path);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", server_test, "--test-threads=1", "--nocapture"])
            .env(SERVER_SOCKET, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the device server");
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = lines
                .read_line(&mut line)
                .expect("read the server's stderr");
            assert!(n > 0, "the device server exited before listening");
            if line.contains(READY) {
                break;
            }
        }
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
            let _ = child.wait();
        });
        let options = RuntimeOptions {
            mode,
            ..Default::default()
        };
        Runtime::open(DeviceSpec::VfioUser(path), options).expect("open the vfio-user device")
    }

    /// In server mode (started by `open`): serve one client, then return. Otherwise nothing.
    pub fn serve_if_server_mode() {
        let Some(path) = std::env::var_os(SERVER_SOCKET) else {
            return;
        };
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        eprintln!("{READY} on {}", PathBuf::from(&path).display());
        let (stream, _) = listener.accept().expect("accept");
        let _ = std::fs::remove_file(&path);
        let cfg = firmware_stubs::AcceleratorConfig::default();
        if let Err(e) = firmware_stubs::vfio_user_server::serve_connection(stream, &cfg) {
            eprintln!("device server: {e}");
        }
    }
}

#[macro_export]
macro_rules! hmm_suite {
    ($open:expr) => {
        $crate::hmm_suite!($open, after = |_rt| {});
    };
    // `after` gets the case's runtime once the case is done with it (the guest's pin check).
    ($open:expr, after = $after:expr) => {
        $crate::hmm_suite!(@cases $open; $after;
            open_close,
            anon_read,
            anon_read_prot,
            anon_write,
            anon_write_prot,
            file_read,
            file_write,
            anon_read_multiple,
            anon_teardown,
            anon_teardown_dontneed,
            anon_teardown_mremap,
            anon_write_huge,
            anon_write_hugetlbfs,
            compound,
            mixedmap,
            snapshot,
            userfaultfd_read,
            userfaultfd_after_mirror_is_busy,
            userfaultfd_owned_range_refused_when_events_required,
            partial_munmap,
            mremap_move_and_dontunmap,
            collision_with_dontneed_is_never_stale,
            release_while_busy,
            release_while_servicing,
            file_private_write,
            thp_partial_changes,
            strict_mprotect_stops_device_writes,
            strict_munmap_then_reuse_sees_no_device_write
        );
        #[test]
        fn double_map() {
            let (a, b) = ($open(), $open());
            // `b` goes with the case; `after` sees every pin of both released once `a` goes.
            hmm::double_map(a.clone(), b);
            ($after)(a);
        }
    };
    (@cases $open:expr; $after:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let rt = $open();
                hmm::$case(rt.clone());
                ($after)(rt);
            }
        )*
    };
}
