//! The CPU walker on every kind of mapping: snapshot states and page sizes, fault semantics.

mod common;

use std::os::fd::AsFd;

use common::*;
use mirror::{
    Access, AddressSpace, Config, Error, Mapping, PageError, PageSize, PageState, VaRange,
};

fn explicit_mm() -> AddressSpace {
    AddressSpace::current(Config::explicit_only()).unwrap()
}

fn states(mm: &AddressSpace, r: VaRange) -> Vec<PageState> {
    mm.snapshot(r)
        .unwrap()
        .pages()
        .iter()
        .map(|p| p.state)
        .collect()
}

#[test]
fn anonymous_none_zero_write_and_snapshot_does_not_fault() {
    let mm = explicit_mm();
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    assert_eq!(states(&mm, m.range()), vec![PageState::None; 4]);
    // Snapshot must not fault anything in: still none on a second look.
    assert_eq!(states(&mm, m.range()), vec![PageState::None; 4]);
    let _ = m.read_byte(PAGE); // page 1: zero page
    m.write_byte(2 * PAGE, 7); // page 2: written
    let s = states(&mm, m.range());
    assert_eq!(
        s,
        vec![
            PageState::None,
            PageState::Zero,
            PageState::Write,
            PageState::None
        ]
    );
    assert!(mm
        .snapshot(m.range())
        .unwrap()
        .pages()
        .iter()
        .all(|p| p.size == PageSize::Base));
}

#[test]
fn fault_read_maps_zero_page_and_write_makes_writable() {
    let mm = explicit_mm();
    let m = Mapping::anonymous(8 * PAGE, RW).unwrap();
    mm.fault(sub_range(&m, 0, 4), Access::Read).unwrap();
    mm.fault(sub_range(&m, 4, 4), Access::Write).unwrap();
    let s = states(&mm, m.range());
    assert_eq!(&s[..4], &[PageState::Zero; 4]);
    assert_eq!(&s[4..], &[PageState::Write; 4]);
}

#[test]
fn prot_none_is_error_and_fault_fails() {
    let mm = explicit_mm();
    let m = Mapping::anonymous(2 * PAGE, libc::PROT_NONE).unwrap();
    assert_eq!(
        states(&mm, m.range()),
        vec![PageState::Error(PageError::NoAccess); 2]
    );
    match mm.fault(m.range(), Access::Read) {
        Err(Error::Fault { addr, .. }) => assert_eq!(addr, m.addr()),
        other => panic!("expected a fault error, got {other:?}"),
    }
}

#[test]
fn read_only_reports_read_and_refuses_write_fault() {
    let mm = explicit_mm();
    let m = Mapping::anonymous(2 * PAGE, RW).unwrap();
    m.write_byte(0, 1);
    m.protect(0, 2 * PAGE, libc::PROT_READ).unwrap();
    assert_eq!(
        states(&mm, m.range()),
        vec![PageState::Read, PageState::None]
    );
    match mm.fault(m.range(), Access::Write) {
        Err(Error::PermissionDenied { addr, access }) => {
            assert_eq!((addr, access), (m.addr(), Access::Write))
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    mm.fault(m.range(), Access::Read).unwrap();
    assert_eq!(
        states(&mm, m.range()),
        vec![PageState::Read, PageState::Zero]
    );
}

#[test]
fn hole_is_error_and_fault_reports_its_address() {
    let mm = explicit_mm();
    let m = Mapping::anonymous(3 * PAGE, RW).unwrap();
    let (a, rest) = m.split_at(PAGE).unwrap();
    let (hole, c) = rest.split_at(PAGE).unwrap();
    let hole_addr = hole.addr();
    drop(hole);
    let whole = VaRange::from_bounds(a.addr(), c.range().end()).unwrap();
    let s = states(&mm, whole);
    assert_eq!(s[1], PageState::Error(PageError::NoVma));
    assert_eq!(s[0], PageState::None);
    match mm.fault(whole, Access::Write) {
        Err(Error::Fault { addr, .. }) => assert_eq!(addr, hole_addr),
        other => panic!("expected Fault at the hole, got {other:?}"),
    }
}

#[test]
fn shared_file_mapping_reports_file_pages() {
    let mm = explicit_mm();
    let f = regular_file(4 * PAGE, 0x11);
    let m = map_fd(f.as_fd(), 4 * PAGE, RW, libc::MAP_SHARED);
    assert_eq!(m.read_byte(0), 0x11);
    let s = states(&mm, m.range());
    assert!(
        matches!(s[0], PageState::Read | PageState::Write),
        "page 0: {:?}",
        s[0]
    );
    mm.fault(m.range(), Access::Write).unwrap();
    assert_eq!(states(&mm, m.range()), vec![PageState::Write; 4]);
    let vma = &mm.walker().vmas(m.range()).unwrap()[0];
    assert_eq!(vma.kind, mirror::VmaKind::File);
    assert!(vma.shared);
}

#[test]
fn private_file_mapping_is_read_until_copied() {
    let mm = explicit_mm();
    let f = regular_file(2 * PAGE, 0x22);
    let m = map_fd(f.as_fd(), 2 * PAGE, RW, libc::MAP_PRIVATE);
    mm.fault(m.range(), Access::Read).unwrap();
    assert_eq!(
        states(&mm, m.range()),
        vec![PageState::Read; 2],
        "page-cache pages, COW"
    );
    mm.fault(sub_range(&m, 0, 1), Access::Write).unwrap();
    assert_eq!(
        states(&mm, m.range()),
        vec![PageState::Write, PageState::Read]
    );
    assert_eq!(m.read_byte(0), 0x22, "the private copy keeps the file data");
}

#[test]
fn memfd_mapping() {
    let mm = explicit_mm();
    let fd = memfd(4 * PAGE);
    let m = map_fd(fd.as_fd(), 4 * PAGE, RW, libc::MAP_SHARED);
    assert_eq!(states(&mm, m.range()), vec![PageState::None; 4]);
    mm.fault(m.range(), Access::Write).unwrap();
    assert_eq!(states(&mm, m.range()), vec![PageState::Write; 4]);
    assert_eq!(
        mm.walker().vmas(m.range()).unwrap()[0].kind,
        mirror::VmaKind::File
    );
}

#[test]
fn thp_is_reported_as_2mib_pages() {
    let mm = explicit_mm();
    let two_mb = 2 << 20;
    let m = Mapping::anonymous_aligned(two_mb, two_mb, RW).unwrap();
    // SAFETY-free: MADV_HUGEPAGE is harmless advice, given through the wrapper.
    // SAFETY: MADV_HUGEPAGE neither discards nor moves memory.
    unsafe { mm.madvise(m.range(), libc::MADV_HUGEPAGE) }.unwrap();
    mm.fault(m.range(), Access::Write).unwrap();
    let snap = mm.snapshot(m.range()).unwrap();
    if snap.pages()[0].size != PageSize::Thp {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        println!("SKIP thp: the kernel did not back the range with a THP (enabled: {thp:?})");
        return;
    }
    assert!(snap
        .pages()
        .iter()
        .all(|p| p.size == PageSize::Thp && p.state == PageState::Write));
    assert_eq!(PageSize::Thp.bytes(), two_mb as u64);
    // A one-page snapshot inside the THP still learns the page size (so the driver can map 2 MiB).
    let one = mm.snapshot(sub_range(&m, 100, 1)).unwrap();
    assert_eq!(one.pages()[0].size, PageSize::Thp);
}

#[test]
fn hugetlb_mapping_or_skip() {
    let nr: u64 = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if nr == 0 {
        println!("SKIP hugetlb: /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages is 0 (no huge pages reserved; not changing system settings)");
        return;
    }
    let mm = explicit_mm();
    let len = 2 << 20;
    let m = Mapping::with_flags(
        len,
        RW,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
        None,
        0,
    )
    .unwrap();
    mm.fault(m.range(), Access::Write).unwrap();
    let snap = mm.snapshot(m.range()).unwrap();
    assert!(snap
        .pages()
        .iter()
        .all(|p| p.size == PageSize::Hugetlb { shift: 21 } && p.state == PageState::Write));
}

#[test]
fn special_mapping_vvar_is_refused() {
    let mm = explicit_mm();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let Some(line) = maps.lines().find(|l| l.ends_with("[vvar]")) else {
        println!("SKIP special mapping: this process has no [vvar] VMA");
        return;
    };
    let (s, e) = line
        .split_whitespace()
        .next()
        .unwrap()
        .split_once('-')
        .unwrap();
    let r = VaRange::from_bounds(
        u64::from_str_radix(s, 16).unwrap(),
        u64::from_str_radix(e, 16).unwrap(),
    )
    .unwrap();
    let snap = mm.snapshot(r).unwrap();
    assert!(snap
        .pages()
        .iter()
        .all(|p| p.state == PageState::Error(PageError::Special)));
    assert!(matches!(
        mm.fault(r, Access::Read),
        Err(Error::SpecialMapping { .. })
    ));
}

#[test]
fn bad_ranges_are_rejected_without_panic() {
    assert!(matches!(
        VaRange::new(0x1001, 0x1000),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        VaRange::new(0x1000, 0x800),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        VaRange::new(0x1000, 0),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        VaRange::new((1 << 47) - 0x1000, 0x2000),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        VaRange::new(!0xfff, 0x1000),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        VaRange::from_bounds(0x2000, 0x1000),
        Err(Error::InvalidRange { .. })
    ));
    // A valid range over nothing: snapshot says NoVma, fault says Fault at its start.
    let mm = explicit_mm();
    let r = VaRange::new(0x1000, 0x1000).unwrap();
    assert_eq!(states(&mm, r), vec![PageState::Error(PageError::NoVma)]);
    assert!(matches!(
        mm.fault(r, Access::Read),
        Err(Error::Fault { addr: 0x1000, .. })
    ));
}

#[test]
fn guard_region_is_error() {
    const MADV_GUARD_INSTALL: libc::c_int = 102;
    let mm = explicit_mm();
    let m = Mapping::anonymous(2 * PAGE, RW).unwrap();
    // SAFETY: the page is not referenced; guard install discards it.
    if let Err(e) = unsafe { mm.madvise(sub_range(&m, 0, 1), MADV_GUARD_INSTALL) } {
        println!("SKIP guard regions: MADV_GUARD_INSTALL unsupported here ({e})");
        return;
    }
    assert_eq!(
        states(&mm, m.range()),
        vec![PageState::Error(PageError::Guard), PageState::None]
    );
}

#[test]
fn snapshot_runs_group_pages() {
    let mm = explicit_mm();
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    m.write_byte(0, 1);
    m.write_byte(PAGE, 1);
    let snap = mm.snapshot(m.range()).unwrap();
    let runs: Vec<_> = snap.runs().map(|(r, p)| (r.pages(), p.state)).collect();
    assert_eq!(runs, vec![(2, PageState::Write), (2, PageState::None)]);
    assert_eq!(
        snap.page_at(m.addr() + PAGE as u64 + 5).unwrap().state,
        PageState::Write
    );
    assert!(snap.page_at(m.addr() + 4 * PAGE as u64).is_none());
}

#[test]
fn snapshot_fast_agrees_with_snapshot() {
    let mm = explicit_mm();
    if !mm.capabilities().walker.scan_guard {
        assert!(matches!(
            mm.snapshot_fast(VaRange::new(0x1000, 0x1000).unwrap()),
            Err(Error::Unsupported { .. })
        ));
        println!("SKIP snapshot_fast comparison: no PAGEMAP_SCAN guard reporting");
        return;
    }
    let anon = Mapping::anonymous(6 * PAGE, RW).unwrap();
    let _ = anon.read_byte(PAGE);
    anon.write_byte(2 * PAGE, 1);
    anon.write_byte(3 * PAGE, 1);
    anon.protect(3 * PAGE, PAGE, libc::PROT_READ).unwrap();
    anon.protect(4 * PAGE, PAGE, libc::PROT_NONE).unwrap();
    const MADV_GUARD_INSTALL: libc::c_int = 102;
    // SAFETY: page 5 is not referenced.
    unsafe { mm.madvise(sub_range(&anon, 5, 1), MADV_GUARD_INSTALL) }.unwrap();
    let f = regular_file(2 * PAGE, 3);
    let private_file = map_fd(f.as_fd(), 2 * PAGE, RW, libc::MAP_PRIVATE);
    let _ = private_file.read_byte(0);
    private_file.write_byte(PAGE, 1);
    let fd = memfd(2 * PAGE);
    let shm = map_fd(fd.as_fd(), 2 * PAGE, RW, libc::MAP_SHARED);
    shm.write_byte(0, 1);
    let two_mb = 2 << 20;
    let thp = Mapping::anonymous_aligned(two_mb, two_mb, RW).unwrap();
    // SAFETY: harmless advice.
    unsafe { mm.madvise(thp.range(), libc::MADV_HUGEPAGE) }.unwrap();
    mm.fault(thp.range(), Access::Write).unwrap();
    for (name, r) in [
        ("anon", anon.range()),
        ("private file", private_file.range()),
        ("memfd", shm.range()),
        ("thp", thp.range()),
    ] {
        let precise = mm.snapshot(r).unwrap();
        let fast = mm.snapshot_fast(r).unwrap();
        assert_eq!(precise.pages(), fast.pages(), "{name}");
    }
    assert_eq!(
        states(&mm, anon.range()),
        vec![
            PageState::None,
            PageState::Zero,
            PageState::Write,
            PageState::Read,
            PageState::Error(PageError::NoAccess),
            PageState::Error(PageError::Guard)
        ]
    );
}
