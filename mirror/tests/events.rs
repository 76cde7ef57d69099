//! Every event kind from real munmap / mremap / madvise, the explicit API's strict coherence,
//! release, the retry budget, settle, stats and latency. Fork has its own test binary
//! (`fork_event.rs`): a fork reaches every userfaultfd of the process with registered ranges as
//! a Fork over the whole address space, which would land in these tests' logs (seen once as a
//! third entry in the mremap case).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mirror::{
    AddressSpace, Config, Error, EventKind, EventSource, Invalidation, Mapping, Perms, VaRange,
};

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<AddressSpace>();
    check::<mirror::Subscription<Vec<u64>>>();
    check::<mirror::Walker>();
}

fn kinds(log: &[Invalidation]) -> Vec<(EventKind, VaRange, EventSource)> {
    log.iter().map(|i| (i.kind, i.range, i.source)).collect()
}

#[test]
fn munmap_delivers_unmap_of_exactly_the_unmapped_part() {
    let Some(mm) = uffd_mm() else { return };
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    let whole = m.range();
    let rec = recorder(&mm, whole);
    mm.track(whole).unwrap();
    let (keep, gone) = m.split_at(2 * PAGE).unwrap();
    let gone_range = gone.range();
    drop(gone);
    mm.settle().unwrap();
    assert_eq!(
        kinds(&rec.lock()),
        vec![(EventKind::Unmap, gone_range, EventSource::Userfaultfd)]
    );
    drop(keep);
    assert!(mm.stats().unmap_events >= 1);
}

#[test]
fn dontneed_delivers_discard() {
    let Some(mm) = uffd_mm() else { return };
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    m.write_byte(PAGE, 3);
    let rec = recorder(&mm, m.range());
    mm.track(m.range()).unwrap();
    m.discard(PAGE, PAGE).unwrap();
    mm.settle().unwrap();
    let log = rec.lock();
    assert!(!log.is_empty());
    // REMOVE may be repeated for the same range; every one is a Discard of page 1.
    for inv in log.iter() {
        assert_eq!(
            (inv.kind, inv.range, inv.source),
            (
                EventKind::Discard,
                sub_range(&m, 1, 1),
                EventSource::Userfaultfd
            )
        );
    }
    assert_eq!(m.read_byte(PAGE), 0, "the page really was discarded");
}

#[test]
fn mremap_move_delivers_remap_then_unmap_and_registration_follows() {
    let Some(mm) = uffd_mm() else { return };
    let m = Mapping::anonymous(2 * PAGE, RW).unwrap();
    m.write_byte(0, 9);
    let old = m.range();
    let everything = recorder(&mm, VaRange::whole());
    mm.track(old).unwrap();
    let moved = m.remap(2 * PAGE).unwrap();
    assert_eq!(moved.read_byte(0), 9);
    mm.settle().unwrap();
    let log: Vec<_> = kinds(&everything.lock())
        .into_iter()
        .filter(|(_, r, _)| r.overlaps(&old) || r.overlaps(&moved.range()))
        .collect();
    assert_eq!(
        log,
        vec![
            (
                EventKind::Remap {
                    to: Some(moved.addr())
                },
                old,
                EventSource::Userfaultfd
            ),
            (EventKind::Unmap, old, EventSource::Userfaultfd),
        ]
    );
    // REMAP was requested, so the moved VMA is still registered: unmapping it is reported.
    let new_range = moved.range();
    drop(moved);
    mm.settle().unwrap();
    assert!(kinds(&everything.lock()).contains(&(
        EventKind::Unmap,
        new_range,
        EventSource::Userfaultfd
    )));
}

#[test]
fn untracked_memory_produces_no_events() {
    let Some(mm) = uffd_mm() else { return };
    let m = Mapping::anonymous(2 * PAGE, RW).unwrap();
    let rec = recorder(&mm, m.range());
    m.discard(0, PAGE).unwrap();
    drop(m);
    mm.settle().unwrap();
    let log = rec.lock();
    assert!(log.is_empty(), "{:?}", *log);
}

#[test]
fn track_is_idempotent_and_refuses_foreign_registration() {
    let Some(mm) = uffd_mm() else { return };
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    mm.track(m.range()).unwrap();
    mm.track(m.range()).unwrap();
    mm.track(sub_range(&m, 1, 2)).unwrap();
    // A range with a hole is never fully covered, so each call registers its VMAs again: that
    // must stay harmless.
    let (a, rest) = Mapping::anonymous(3 * PAGE, RW)
        .unwrap()
        .split_at(PAGE)
        .unwrap();
    let (hole, c) = rest.split_at(PAGE).unwrap();
    drop(hole);
    let holey = VaRange::from_bounds(a.addr(), c.range().end()).unwrap();
    mm.track(holey).unwrap();
    mm.track(holey).unwrap();
    let holey_rec = recorder(&mm, holey);
    drop(c);
    mm.settle().unwrap();
    assert_eq!(holey_rec.lock().len(), 1, "one UNMAP for the last page");
    // A second address space (a second uffd) cannot register the same VMA.
    let other = uffd_mm().unwrap();
    match other.track(m.range()) {
        Err(Error::TrackedElsewhere { .. }) => {}
        r => panic!("expected TrackedElsewhere, got {r:?}"),
    }
    // untrack stops events.
    let rec = recorder(&mm, m.range());
    mm.untrack(m.range()).unwrap();
    m.discard(0, PAGE).unwrap();
    mm.settle().unwrap();
    assert!(rec.lock().is_empty());
}

#[test]
fn explicit_wrappers_are_strict() {
    let Some(mm) = uffd_mm() else { return };
    let m = Mapping::anonymous(6 * PAGE, RW).unwrap();
    for i in 0..6 {
        m.write_byte(i * PAGE, 1);
    }
    let dev = device(&mm, m.range());
    mm.track(m.range()).unwrap();
    assert_eq!(mirror_all(&mm, &dev, m.range()), 6);

    // munmap: when the wrapper returns the entries are gone, without settle().
    let r = sub_range(&m, 5, 1);
    // SAFETY: page 5 is not referenced; the Mapping's drop will unmap the already unmapped page
    // again, which munmap allows.
    unsafe { mm.munmap(r) }.unwrap();
    assert!(dev.sub.lock().iter().all(|a| !r.contains(*a)));
    assert_eq!(dev.log.lock().unwrap()[0].source, EventSource::Api);

    // madvise DONTNEED through the wrapper.
    let r = sub_range(&m, 4, 1);
    // SAFETY: nothing relies on page 4's contents.
    unsafe { mm.madvise(r, libc::MADV_DONTNEED) }.unwrap();
    assert!(dev.sub.lock().iter().all(|a| !r.contains(*a)));

    // mprotect has no uffd event at all: only the wrapper reports it.
    let r = sub_range(&m, 0, 2);
    // SAFETY: nothing holds references into the range.
    unsafe { mm.mprotect(r, Perms::READ) }.unwrap();
    assert!(dev.sub.lock().iter().all(|a| !r.contains(*a)));
    assert!(dev
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|i| i.kind == EventKind::Protect { perms: Perms::READ }
            && i.range == r
            && i.source == EventSource::Api));

    // mremap wrapper.
    let r = sub_range(&m, 2, 2);
    let target = Mapping::anonymous(2 * PAGE, libc::PROT_NONE).unwrap();
    let to = target.addr();
    // SAFETY: pages 2..4 and the reservation are not referenced; the reservation is replaced.
    let got = unsafe { mm.mremap(r, 2 * PAGE as u64, true, Some(to)) }.unwrap();
    assert_eq!(got, to);
    target.forget();
    assert!(dev.sub.lock().iter().all(|a| !r.contains(*a)));
    mm.settle().unwrap();
    // The moved pages: the wrapper's bracket saw Remap{to} first (strict), uffd repeated it.
    let log = dev.log.lock().unwrap();
    let remaps: Vec<_> = log
        .iter()
        .filter(|i| matches!(i.kind, EventKind::Remap { .. }))
        .collect();
    assert_eq!(remaps[0].source, EventSource::Api);
    assert_eq!(remaps[0].kind, EventKind::Remap { to: Some(to) });
    // SAFETY: the moved range is ours and unused.
    unsafe { mm.munmap(VaRange::new(to, 2 * PAGE as u64).unwrap()) }.unwrap();
}

#[test]
fn invalidate_and_protect_are_strict_and_counted() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let m = Mapping::anonymous(2 * PAGE, RW).unwrap();
    m.write_byte(0, 1);
    m.write_byte(PAGE, 1);
    let dev = device(&mm, m.range());
    assert_eq!(mirror_all(&mm, &dev, m.range()), 2);
    mm.invalidate(sub_range(&m, 0, 1)).unwrap();
    assert_eq!(*dev.sub.lock(), vec![m.addr() + PAGE as u64]);
    mm.protect(sub_range(&m, 1, 1), Perms::READ).unwrap();
    assert!(dev.sub.lock().is_empty());
    let s = mm.stats();
    assert_eq!(
        (s.explicit_events, s.protect_events, s.invalidations),
        (1, 1, 2)
    );
    // A range that overlaps no subscription calls nothing.
    mm.invalidate(VaRange::new(0x1000, 0x1000).unwrap())
        .unwrap();
    assert_eq!(mm.stats().invalidations, 2);
    // track without userfaultfd says why.
    assert!(matches!(
        mm.track(m.range()),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn release_reaches_every_subscription_and_fails_later_faults() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let m = Mapping::anonymous(PAGE, RW).unwrap();
    let a = recorder(&mm, m.range());
    let b = recorder(&mm, VaRange::whole());
    mm.release();
    for r in [&a, &b] {
        let log = r.lock();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].kind, EventKind::Release);
        assert_eq!(log[0].range, r.range());
    }
    assert!(matches!(a.read_begin(), Err(Error::Released)));
    assert!(matches!(mm.snapshot(m.range()), Err(Error::Released)));
    assert!(matches!(
        mm.subscribe(m.range(), (), |_, _| {}),
        Err(Error::Released)
    ));
}

#[test]
fn drop_of_address_space_releases_subscriptions() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let rec = recorder(&mm, VaRange::whole());
    drop(mm);
    assert_eq!(rec.lock()[0].kind, EventKind::Release);
    assert!(matches!(rec.read_begin(), Err(Error::Released)));
}

#[test]
fn retry_budget_turns_endless_collisions_into_an_error() {
    let mm = AddressSpace::current(Config {
        retry_budget: Duration::from_millis(50),
        ..Config::explicit_only()
    })
    .unwrap();
    let m = Mapping::anonymous(PAGE, RW).unwrap();
    let dev = device(&mm, m.range());
    // Every walk is overtaken by an invalidation, as under a storm of munmaps.
    let r = dev.sub.mirror_range(
        |_| {
            mm.invalidate(m.range())?;
            Ok(())
        },
        |_, ()| unreachable!("a collided walk must never install"),
    );
    match r {
        Err(Error::RetryBudgetExhausted { retries, budget }) => {
            assert!(retries >= 1);
            assert_eq!(budget, Duration::from_millis(50));
        }
        other => panic!("expected RetryBudgetExhausted, got {other:?}"),
    }
    let s = mm.stats();
    assert!(s.retries >= 1);
    assert_eq!(s.budget_exhaustions, 1);
}

#[test]
fn read_begin_waits_for_a_running_invalidation_of_its_interval() {
    let mm = Arc::new(
        AddressSpace::current(Config {
            retry_budget: Duration::from_millis(40),
            ..Config::explicit_only()
        })
        .unwrap(),
    );
    let m = Mapping::anonymous(PAGE, RW).unwrap();
    let range = m.range();
    let entered = Arc::new(AtomicBool::new(false));
    let e = entered.clone();
    // Subscribed first, so the invalidation reaches it first and sets its seq; a subscriber not
    // yet reached would get its old seq at once and be caught later by read_retry (as in the
    // kernel).
    let fast = recorder(&mm, range);
    // A slow subscriber (a device waiting for its TLB fence).
    let _slow = mm
        .subscribe(range, (), move |_, _| {
            e.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
        })
        .unwrap();
    let mm2 = mm.clone();
    let t = std::thread::spawn(move || mm2.invalidate(range).unwrap());
    while !entered.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // `fast` has been hit by the running invalidation: it cannot get a seq before the
    // invalidation ends, and the 40 ms budget runs out first.
    assert_eq!(fast.lock().len(), 1);
    assert!(matches!(
        fast.read_begin(),
        Err(Error::RetryBudgetExhausted { .. })
    ));
    t.join().unwrap();
    assert!(fast.read_begin().is_ok());
}

#[test]
fn observer_and_latency_are_reported_for_uffd_events() {
    let Some(mm) = uffd_mm() else { return };
    let records = Arc::new(Mutex::new(Vec::new()));
    let r2 = records.clone();
    mm.set_event_observer(Some(Box::new(move |rec| {
        r2.lock().unwrap().push(rec.clone())
    })));
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    let _rec = recorder(&mm, m.range());
    mm.track(m.range()).unwrap();
    for i in 0..4 {
        m.write_byte(i * PAGE, 1);
        m.discard(i * PAGE, PAGE).unwrap();
    }
    mm.settle().unwrap();
    let recs = records.lock().unwrap();
    let uffd: Vec<_> = recs
        .iter()
        .filter(|r| r.source == EventSource::Userfaultfd)
        .collect();
    assert!(uffd.len() >= 4);
    assert!(uffd
        .iter()
        .all(|r| r.latency.is_some() && r.subscribers_hit == 1));
    let s = mm.stats();
    assert!(s.event_latency.count >= 4);
    assert!(s.event_latency.max_ns > 0);
    assert!(s.discard_events >= 4);
}

#[test]
fn settle_from_a_callback_is_refused() {
    let Some(mm) = uffd_mm() else { return };
    let mm = Arc::new(mm);
    let m = Mapping::anonymous(PAGE, RW).unwrap();
    let seen = Arc::new(Mutex::new(None));
    let (mm2, s2) = (Arc::downgrade(&mm), seen.clone());
    let _sub = mm
        .subscribe(m.range(), (), move |_, _| {
            if let Some(mm) = mm2.upgrade() {
                *s2.lock().unwrap() =
                    Some(matches!(mm.settle(), Err(Error::CalledFromCallback { .. })));
            }
        })
        .unwrap();
    mm.invalidate(m.range()).unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(true));
}
