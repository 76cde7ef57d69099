//! `snapshot` against a slow reference computed here, page by page, from /proc/self/maps, one
//! /proc/self/pagemap pread per page and one PAGEMAP_SCAN per page, over a mapping that mixes
//! page kinds: populated, zero page, untouched, holes, read-only, PROT_NONE, guard pages, a
//! 2 MiB THP window, shared and private memfd pages, pages shared with a forked child, and a
//! populated run longer than one pagemap read.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use mirror::{AddressSpace, Config, Mapping, PageError, PageInfo, PageSize, PageState, VaRange};

const PAGE: usize = 4096;
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const THP: usize = 2 << 20;
/// Longer than the walker's pagemap chunk, and starting off a 2 MiB boundary.
const LONG_PAGES: usize = 4700;

const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
const PM_GUARD: u64 = 1 << 58;
const PM_EXCLUSIVE: u64 = 1 << 56;

const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
const PAGE_IS_HUGE: u64 = 1 << 6;
const MADV_GUARD_INSTALL: libc::c_int = 102;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct ScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

/// PAGEMAP_SCAN categories (present, zero page, huge) of the one page at `addr`, or `None` when
/// the ioctl is unavailable.
fn scan_page(pagemap: &File, addr: u64) -> Option<u64> {
    let mut region = [Region::default(); 1];
    let mut arg = ScanArg {
        size: std::mem::size_of::<ScanArg>() as u64,
        start: addr,
        end: addr + PAGE as u64,
        vec: region.as_mut_ptr() as u64,
        vec_len: 1,
        category_anyof_mask: PAGE_IS_PRESENT,
        return_mask: PAGE_IS_PRESENT | PAGE_IS_PFNZERO | PAGE_IS_HUGE,
        ..Default::default()
    };
    // SAFETY: `arg` and the one-entry `region` vector outlive the call and match the kernel ABI.
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
    match n {
        n if n < 0 => None,
        0 => Some(0),
        _ => Some(region[0].categories),
    }
}

struct MapsVma {
    start: u64,
    end: u64,
    read: bool,
    write: bool,
    shared: bool,
}

fn maps() -> Vec<MapsVma> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next().unwrap().split_once('-').unwrap();
            let p = f.next().unwrap().as_bytes();
            MapsVma {
                start: u64::from_str_radix(a, 16).unwrap(),
                end: u64::from_str_radix(b, 16).unwrap(),
                read: p[0] == b'r',
                write: p[1] == b'w',
                shared: p[3] == b's',
            }
        })
        .collect()
}

/// What `snapshot` must say about each page of `range`, computed one page at a time.
fn reference(range: VaRange) -> Vec<PageInfo> {
    let vmas = maps();
    let pagemap = File::open("/proc/self/pagemap").unwrap();
    let base = |state| PageInfo {
        state,
        size: PageSize::Base,
    };
    (0..range.pages() as u64)
        .map(|i| {
            let addr = range.start() + i * PAGE as u64;
            let Some(vma) = vmas.iter().find(|v| v.start <= addr && addr < v.end) else {
                return base(PageState::Error(PageError::NoVma));
            };
            if !vma.read {
                return base(PageState::Error(PageError::NoAccess));
            }
            let mut e = [0u8; 8];
            pagemap
                .read_exact_at(&mut e, addr / PAGE as u64 * 8)
                .unwrap();
            let e = u64::from_ne_bytes(e);
            if e & PM_PRESENT == 0 {
                return base(if e & PM_GUARD != 0 {
                    PageState::Error(PageError::Guard)
                } else {
                    PageState::None
                });
            }
            let cat = scan_page(&pagemap, addr).expect("PAGEMAP_SCAN");
            let state = if cat & PAGE_IS_PFNZERO != 0 {
                PageState::Zero
            } else if vma.write && (vma.shared || (e & PM_EXCLUSIVE != 0 && e & PM_FILE == 0)) {
                PageState::Write
            } else {
                PageState::Read
            };
            let size = if cat & PAGE_IS_HUGE != 0 {
                PageSize::Thp
            } else {
                PageSize::Base
            };
            PageInfo { state, size }
        })
        .collect()
}

fn check(mm: &AddressSpace, range: VaRange, what: &str) {
    let got = mm.snapshot(range).unwrap();
    assert_eq!(got.range(), range);
    let want = reference(range);
    let bad: Vec<String> = got
        .pages()
        .iter()
        .zip(&want)
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .take(8)
        .map(|(i, (g, w))| format!("page {i}: snapshot {g:?}, reference {w:?}"))
        .collect();
    assert!(bad.is_empty(), "{what}: {}", bad.join("; "));
    assert_eq!(got.pages().len(), want.len());
}

fn memfd(pages: usize) -> OwnedFd {
    // SAFETY: a plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"snapshot_equivalence".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on an fd we own.
    assert_eq!(
        unsafe { libc::ftruncate(fd.as_raw_fd(), (pages * PAGE) as i64) },
        0
    );
    fd
}

/// Maps `pages` pages of `fd` over `addr` (inside a reservation this test owns).
fn map_file_at(addr: u64, pages: usize, prot: libc::c_int, flags: libc::c_int, fd: &OwnedFd) {
    // SAFETY: MAP_FIXED over part of the test's own reservation, which nothing else uses.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            pages * PAGE,
            prot,
            flags | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_eq!(p as u64, addr, "mmap: {}", std::io::Error::last_os_error());
}

fn madvise(addr: u64, len: usize, advice: libc::c_int) -> bool {
    // SAFETY: advice on the test's own mapping; none of the advice used discards data.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) == 0 }
}

fn write(addr: u64) {
    // SAFETY: `addr` is in a writable mapping of this test.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 1) }
}

fn read(addr: u64) {
    // SAFETY: `addr` is in a readable mapping of this test.
    unsafe { std::ptr::read_volatile(addr as *const u8) };
}

#[test]
fn snapshot_matches_a_per_page_reference_on_mixed_mappings() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    if !mm.capabilities().walker.pagemap_scan {
        println!("SKIP: PAGEMAP_SCAN unavailable, the reference needs it");
        return;
    }
    let pg = PAGE as u64;
    let small = 160usize;
    let total = THP + (small + LONG_PAGES) * PAGE;
    let m = Mapping::anonymous_aligned(total, THP, RW).unwrap();
    let b = m.addr();

    // [0, 2 MiB): a THP window (4 KiB pages if THP is off: the reference says so too).
    madvise(b, THP, libc::MADV_HUGEPAGE);
    for i in 0..THP / PAGE {
        write(b + i as u64 * pg);
    }
    let s = b + THP as u64;
    // 32 anon pages: written, zero page, untouched, written.
    for i in 0..32u64 {
        match i % 4 {
            0 | 3 => write(s + i * pg),
            1 => read(s + i * pg),
            _ => {}
        }
    }
    // A 4-page hole.
    // SAFETY: unmaps part of the test's own reservation.
    assert_eq!(
        unsafe { libc::munmap((s + 32 * pg) as *mut libc::c_void, 4 * PAGE) },
        0
    );
    // 8 read-only anon pages: written before mprotect, zero page, untouched.
    let ro = s + 36 * pg;
    for i in 0..8u64 {
        match i % 3 {
            0 => write(ro + i * pg),
            1 => read(ro + i * pg),
            _ => {}
        }
    }
    m.protect((ro - b) as usize, 8 * PAGE, libc::PROT_READ)
        .unwrap();
    // 4 PROT_NONE pages.
    m.protect((s + 44 * pg - b) as usize, 4 * PAGE, libc::PROT_NONE)
        .unwrap();
    // memfd: 8 pages shared RW (4 written), 8 private RW of the same file (read, written,
    // untouched), 8 shared read-only (4 read).
    let fd = memfd(8);
    let sh = s + 48 * pg;
    map_file_at(sh, 8, RW, libc::MAP_SHARED, &fd);
    for i in 0..4 {
        write(sh + i * pg);
    }
    let pv = s + 56 * pg;
    map_file_at(pv, 8, RW, libc::MAP_PRIVATE, &fd);
    read(pv);
    read(pv + 2 * pg);
    write(pv + pg);
    write(pv + 5 * pg);
    let sr = s + 64 * pg;
    map_file_at(sr, 8, libc::PROT_READ, libc::MAP_SHARED, &fd);
    for i in 0..4 {
        read(sr + i * pg);
    }
    // 16 anon pages with 2 guard pages in the middle (if the kernel has guard regions).
    let g = s + 72 * pg;
    for i in 0..16 {
        write(g + i * pg);
    }
    let guards = madvise(g + 6 * pg, 2 * PAGE, MADV_GUARD_INSTALL);
    // The rest of the small part stays untouched; then a long populated run.
    let long = s + small as u64 * pg;
    for i in 0..LONG_PAGES as u64 {
        if i % 97 != 5 {
            write(long + i * pg);
        }
    }

    let whole = m.range();
    let ranges = [
        (whole, "the whole mapping"),
        (
            VaRange::from_bounds(b + 3 * pg, whole.end() - 5 * pg).unwrap(),
            "a range starting and ending mid-window",
        ),
        (
            VaRange::from_bounds(b + 100 * pg, s + 80 * pg).unwrap(),
            "part of the THP window and the small pages",
        ),
        (VaRange::new(pv + pg, pg).unwrap(), "one private file page"),
        (
            VaRange::from_bounds(long + 7 * pg, long + 4200 * pg).unwrap(),
            "inside the long run",
        ),
    ];
    for (r, what) in ranges {
        check(&mm, r, what);
    }
    let snap = mm.snapshot(whole).unwrap();
    let kinds = |f: &dyn Fn(&PageInfo) -> bool| snap.pages().iter().filter(|p| f(p)).count();
    // The mix really is a mix (so the comparison above covers each kind).
    assert!(kinds(&|p| p.state == PageState::Write) > LONG_PAGES);
    assert!(kinds(&|p| p.state == PageState::Zero) >= 8);
    assert!(kinds(&|p| p.state == PageState::Read) >= 6);
    assert!(kinds(&|p| p.state == PageState::None) > 10);
    assert_eq!(kinds(&|p| p.state == PageState::Error(PageError::NoVma)), 4);
    assert_eq!(
        kinds(&|p| p.state == PageState::Error(PageError::NoAccess)),
        4
    );
    if guards {
        assert_eq!(kinds(&|p| p.state == PageState::Error(PageError::Guard)), 2);
    }
    println!(
        "THP pages: {} of {}",
        kinds(&|p| p.size == PageSize::Thp),
        THP / PAGE
    );

    // Fork a child that only waits: every anonymous page is now shared (copy-on-write), so a
    // private writable page is no longer exclusive; writing some back makes them exclusive again.
    // SAFETY: the child only calls async-signal-safe functions (pause, _exit).
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
    if child == 0 {
        // SAFETY: in the child: wait for the parent's SIGKILL.
        unsafe {
            libc::pause();
            libc::_exit(0)
        }
    }
    for i in (0..LONG_PAGES as u64).step_by(3) {
        write(long + i * pg);
    }
    write(s);
    write(pv + 5 * pg);
    let shared_check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for (r, what) in ranges {
            check(&mm, r, &format!("{what}, with a forked child"));
        }
        let snap = mm.snapshot(whole).unwrap();
        let read = snap
            .pages()
            .iter()
            .filter(|p| p.state == PageState::Read)
            .count();
        assert!(read > LONG_PAGES / 2, "only {read} copy-on-write pages");
    }));
    // SAFETY: `child` is our own child process.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    if let Err(e) = shared_check {
        std::panic::resume_unwind(e);
    }
    drop(fd);
}
