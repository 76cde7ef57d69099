//! The strict mremap wrapper in every form of the call: MREMAP_DONTUNMAP (with and without a
//! fixed target) is bracketed like a move, and a form the wrapper cannot bracket is refused
//! before anything is invalidated or changed.

mod common;

use common::*;
use mirror::{AddressSpace, Config, Error, EventKind, EventSource, Mapping, VaRange};

/// Reads one byte of a range the test owns but no `Mapping` holds (the kernel chose it).
fn read_raw(addr: u64) -> u8 {
    // SAFETY: every caller passes an address inside a mapping it created and has not unmapped.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

fn entries(dev: &Device) -> Vec<u64> {
    dev.sub.lock().clone()
}

/// mremap(MAYMOVE | DONTUNMAP) of the whole of `m` through the wrapper; returns the new start.
fn move_dontunmap(mm: &AddressSpace, m: &Mapping) -> u64 {
    // SAFETY: the tests reference no mapping contents across the move; the old range stays
    // mapped (emptied) and is unmapped by the Mapping's drop.
    unsafe {
        mm.mremap_with_flags(
            m.range(),
            m.len() as u64,
            libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP,
            0,
        )
    }
    .unwrap()
}

fn filled(pages: usize) -> Mapping {
    let m = Mapping::anonymous(pages * PAGE, RW).unwrap();
    for i in 0..pages {
        m.write_byte(i * PAGE, 0x40 + i as u8);
    }
    m
}

/// An address space without userfaultfd, a mapping of `pages` filled pages and a device
/// subscription over everything with an entry for each of those pages.
fn mirrored_without_events(pages: usize) -> (AddressSpace, Mapping, Device) {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let m = filled(pages);
    let dev = device(&mm, VaRange::whole());
    assert_eq!(mirror_all(&mm, &dev, m.range()), pages);
    (mm, m, dev)
}

/// Without userfaultfd nothing but the wrapper's own bracket can drop the entries, so an entry
/// gone when the call returns proves the DONTUNMAP form is strict.
#[test]
fn dontunmap_through_the_wrapper_drops_the_old_entries_before_it_returns() {
    let (mm, m, dev) = mirrored_without_events(4);

    let new = move_dontunmap(&mm, &m);
    assert_ne!(new, m.addr(), "the pages moved");
    let left = entries(&dev);
    assert!(
        left.iter().all(|a| !m.range().contains(*a)),
        "no device entry for the old range once the wrapper returned: {left:x?}"
    );
    let log = dev.log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(
        (log[0].kind, log[0].range, log[0].source),
        (EventKind::Remap { to: None }, m.range(), EventSource::Api)
    );
    for i in 0..4 {
        assert_eq!(
            read_raw(new + (i * PAGE) as u64),
            0x40 + i as u8,
            "page {i}"
        );
        assert_eq!(m.read_byte(i * PAGE), 0, "the old range is empty, page {i}");
    }
    // SAFETY: the moved range is ours and unused.
    unsafe { mm.munmap(VaRange::new(new, m.len() as u64).unwrap()) }.unwrap();
}

#[test]
fn dontunmap_to_a_fixed_target_also_drops_the_target_entries() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let m = filled(2);
    let target = filled(2);
    let dev = device(&mm, VaRange::whole());
    assert_eq!(mirror_all(&mm, &dev, m.range()), 2);
    assert_eq!(mirror_all(&mm, &dev, target.range()), 4);
    let to = target.addr();

    // SAFETY: neither range's contents are referenced; the target is replaced and forgotten.
    let got = unsafe {
        mm.mremap_with_flags(
            m.range(),
            m.len() as u64,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
            to,
        )
    }
    .unwrap();
    let target_range = target.forget();
    assert_eq!(got, to);
    assert_eq!(entries(&dev), Vec::<u64>::new());
    let log: Vec<_> = dev
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|i| (i.kind, i.range, i.source))
        .collect();
    assert!(log.contains(&(
        EventKind::Remap { to: Some(to) },
        m.range(),
        EventSource::Api
    )));
    assert!(log.contains(&(EventKind::Unmap, target_range, EventSource::Api)));
    assert_eq!(
        read_raw(to + PAGE as u64),
        0x41,
        "the old pages are at the target"
    );
    assert_eq!(m.read_byte(PAGE), 0);
    // SAFETY: the target now holds the moved pages, which nothing references.
    unsafe { mm.munmap(target_range) }.unwrap();
}

/// With userfaultfd the kernel reports the move later as well; the wrapper's bracket comes
/// first and the entries are gone without `settle()`.
#[test]
fn dontunmap_through_the_wrapper_is_strict_on_a_tracked_range() {
    let Some(mm) = uffd_mm() else { return };
    let m = filled(3);
    let dev = device(&mm, m.range());
    mm.track(m.range()).unwrap();
    assert_eq!(mirror_all(&mm, &dev, m.range()), 3);
    let new = move_dontunmap(&mm, &m);
    assert_eq!(entries(&dev), Vec::<u64>::new());
    assert_eq!(dev.log.lock().unwrap()[0].source, EventSource::Api);
    mm.settle().unwrap();
    assert_eq!(read_raw(new), 0x40);
    // SAFETY: the moved range is ours and unused.
    unsafe { mm.munmap(VaRange::new(new, m.len() as u64).unwrap()) }.unwrap();
}

#[test]
fn forms_the_wrapper_cannot_bracket_are_refused_before_anything_changes() {
    let (mm, m, dev) = mirrored_without_events(2);
    let len = m.len() as u64;
    let unknown_flag = 0x40;
    let cases = [
        (libc::MREMAP_MAYMOVE | unknown_flag, len, "0x40"),
        (
            libc::MREMAP_DONTUNMAP,
            len,
            "MREMAP_DONTUNMAP needs MREMAP_MAYMOVE",
        ),
        (
            libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP,
            2 * len,
            "new length equal",
        ),
        (libc::MREMAP_FIXED, len, "MREMAP_FIXED needs MREMAP_MAYMOVE"),
    ];
    for (flags, new_len, says) in cases {
        // SAFETY: every one of these is refused before the syscall.
        let err = unsafe { mm.mremap_with_flags(m.range(), new_len, flags, 0) }.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Unsupported { .. } | Error::InvalidArgument { .. }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(says), "{flags:#x}: {err}");
    }
    assert!(dev.log.lock().unwrap().is_empty(), "nothing invalidated");
    assert_eq!(dev.sub.lock().len(), 2);
    assert_eq!(m.read_byte(PAGE), 0x41, "nothing moved");
}
