//! Two-pass subscribers (`Callbacks::two_pass`): every first pass of an event runs before any
//! second pass, the event returns only after the last second pass, a one-pass subscriber beside
//! them is called once, and a panicking second pass is caught and counted.

use std::sync::{Arc, Mutex};

use mirror::{AddressSpace, Callbacks, Config, Invalidation, Mapping};

type Log = Arc<Mutex<Vec<(&'static str, usize)>>>;

fn two_pass(log: &Log, id: usize) -> Callbacks<()> {
    let (a, b) = (log.clone(), log.clone());
    Callbacks::new(move |_: &mut (), _: &Invalidation| a.lock().unwrap().push(("start", id)))
        .two_pass(move |_: &mut (), _: &Invalidation| b.lock().unwrap().push(("finish", id)))
}

#[test]
fn every_first_pass_runs_before_any_second_pass_and_the_event_waits_for_the_last() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let buf = Mapping::anonymous(4 * 4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    let log: Log = Arc::default();
    let mut subs = Vec::new();
    for id in 0..8 {
        subs.push(
            mm.subscribe_with(buf.range(), (), two_pass(&log, id))
                .unwrap(),
        );
    }
    let plain = log.clone();
    let one_pass = mm
        .subscribe(buf.range(), (), move |_: &mut (), _: &Invalidation| {
            plain.lock().unwrap().push(("one-pass", 99))
        })
        .unwrap();
    let before = mm.stats();
    mm.invalidate(buf.range()).unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 17, "{log:?}");
    let last_start = log.iter().rposition(|(p, _)| *p != "finish").unwrap();
    let first_finish = log.iter().position(|(p, _)| *p == "finish").unwrap();
    assert!(last_start < first_finish, "{log:?}");
    for id in 0..8 {
        assert_eq!(log.iter().filter(|e| **e == ("finish", id)).count(), 1);
    }
    let after = mm.stats();
    assert_eq!(after.invalidations - before.invalidations, 9);
    assert_eq!(
        after.invalidation_finishes - before.invalidation_finishes,
        8
    );
    drop((subs, one_pass));
}

#[test]
fn a_subscription_outside_the_event_gets_neither_pass() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let a = Mapping::anonymous(4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    let b = Mapping::anonymous(4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    let log: Log = Arc::default();
    let _sa = mm.subscribe_with(a.range(), (), two_pass(&log, 1)).unwrap();
    let _sb = mm.subscribe_with(b.range(), (), two_pass(&log, 2)).unwrap();
    mm.invalidate(a.range()).unwrap();
    assert_eq!(*log.lock().unwrap(), [("start", 1), ("finish", 1)]);
}

#[test]
fn a_panicking_second_pass_is_caught_counted_and_the_others_still_run() {
    let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    let buf = Mapping::anonymous(4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    let log: Log = Arc::default();
    let bad = Callbacks::new(|_: &mut (), _: &Invalidation| {})
        .two_pass(|_: &mut (), _: &Invalidation| panic!("second pass fails"));
    let _bad = mm.subscribe_with(buf.range(), (), bad).unwrap();
    let _good = mm
        .subscribe_with(buf.range(), (), two_pass(&log, 7))
        .unwrap();
    let before = mm.stats().callback_panics;
    mm.invalidate(buf.range()).unwrap();
    assert_eq!(mm.stats().callback_panics - before, 1);
    assert!(log.lock().unwrap().contains(&("finish", 7)));
    // The subscriber lock was released: the next event reaches it again.
    mm.invalidate(buf.range()).unwrap();
    assert_eq!(mm.stats().callback_panics - before, 2);
}
