//! `clear_young` / `test_young`: an address space mirrored by several subscribers ages as one.
//!
//! The subscribers here are toy devices whose "accessed bits" are a set of page addresses; the
//! ranges are synthetic (nothing is walked or mapped), so no test depends on the CPU side.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mirror::{AddressSpace, AgeQuery, Config, Error, Subscription, VaRange, PAGE_SIZE};

const BASE: u64 = 0x4000_0000_0000;

fn mm() -> AddressSpace {
    AddressSpace::current(Config::explicit_only()).unwrap()
}

/// `[BASE + first page, BASE + first + pages)`.
fn pages(first: u64, pages: u64) -> VaRange {
    VaRange::new(BASE + first * PAGE_SIZE, pages * PAGE_SIZE).unwrap()
}

fn page(n: u64) -> u64 {
    BASE + n * PAGE_SIZE
}

/// A toy device: the pages it used since it last cleared them, and every query it was asked.
#[derive(Default)]
struct Accessed {
    used: BTreeSet<u64>,
    queries: Vec<AgeQuery>,
}

fn report_used(dev: &mut Accessed, query: &AgeQuery, out: &mut Vec<VaRange>) {
    dev.queries.push(*query);
    for &p in dev.used.range(query.range.start()..query.range.end()) {
        out.push(VaRange::new(p, PAGE_SIZE).unwrap());
    }
    if query.clear {
        dev.used.retain(|p| !query.range.contains(*p));
    }
}

fn toy(mm: &AddressSpace, range: VaRange, used: &[u64]) -> Subscription<Accessed> {
    let sub = mm
        .subscribe_aging(
            range,
            Accessed::default(),
            |dev: &mut Accessed, inv| dev.used.retain(|p| !inv.range.contains(*p)),
            report_used,
        )
        .unwrap();
    sub.lock().used.extend(used.iter().map(|&n| page(n)));
    sub
}

#[test]
fn a_page_is_young_if_any_subscriber_used_it() {
    let mm = mm();
    // A covers pages 0..8, B pages 4..12. A used 1, 3 and 5; B used 4, 5, 6 and 10.
    let a = toy(&mm, pages(0, 8), &[1, 3, 5]);
    let b = toy(&mm, pages(4, 8), &[4, 5, 6, 10]);
    let young = mm.test_young(pages(0, 12)).unwrap();
    // 3 (A) and 4..7 (B, with A's 5) touch, so they merge; sorted by address.
    assert_eq!(young, [pages(1, 1), pages(3, 4), pages(10, 1)]);
    assert_eq!(a.lock().queries.len(), 1);
    assert_eq!(b.lock().queries.len(), 1);
    let stats = mm.stats();
    assert_eq!(stats.aging_queries, 1);
    assert_eq!(stats.aging_callbacks, 2);
    assert_eq!(stats.aging_callback_panics, 0);
}

#[test]
fn test_young_keeps_the_record_and_clear_young_clears_it() {
    let mm = mm();
    let a = toy(&mm, pages(0, 8), &[2]);
    let b = toy(&mm, pages(0, 8), &[6]);
    let whole = pages(0, 8);
    let expected = [pages(2, 1), pages(6, 1)];
    assert_eq!(mm.test_young(whole).unwrap(), expected);
    assert_eq!(
        mm.test_young(whole).unwrap(),
        expected,
        "test must not clear"
    );
    assert_eq!(mm.clear_young(whole).unwrap(), expected);
    assert!(
        mm.test_young(whole).unwrap().is_empty(),
        "clear_young cleared"
    );
    assert!(mm.clear_young(whole).unwrap().is_empty());
    let clears: Vec<bool> = a.lock().queries.iter().map(|q| q.clear).collect();
    assert_eq!(clears, [false, false, true, false, true]);
    assert_eq!(b.lock().queries.len(), 5);
    // Use after the clear is seen again.
    b.lock().used.insert(page(7));
    assert_eq!(mm.clear_young(whole).unwrap(), [pages(7, 1)]);
    assert_eq!(mm.stats().aging_queries, 6);
}

#[test]
fn a_clear_of_part_of_a_range_leaves_the_rest_young() {
    let mm = mm();
    let _a = toy(&mm, pages(0, 8), &[1, 6]);
    assert_eq!(mm.clear_young(pages(0, 4)).unwrap(), [pages(1, 1)]);
    assert_eq!(mm.test_young(pages(0, 8)).unwrap(), [pages(6, 1)]);
}

#[test]
fn each_subscriber_is_asked_about_its_part_of_the_range_only() {
    let mm = mm();
    let a = toy(&mm, pages(0, 8), &[0, 7]);
    let b = toy(&mm, pages(6, 4), &[9]);
    let far = toy(&mm, pages(100, 4), &[100]);
    let young = mm.clear_young(pages(4, 4)).unwrap();
    assert_eq!(young, [pages(7, 1)]);
    assert_eq!(
        a.lock().queries,
        [AgeQuery {
            range: pages(4, 4),
            clear: true
        }]
    );
    assert_eq!(
        b.lock().queries,
        [AgeQuery {
            range: pages(6, 2),
            clear: true
        }]
    );
    assert!(far.lock().queries.is_empty(), "no overlap, not asked");
    // Outside the queried range nothing was cleared.
    assert!(a.lock().used.contains(&page(0)));
    assert!(b.lock().used.contains(&page(9)));
    assert_eq!(mm.stats().aging_callbacks, 2);
}

#[test]
fn answers_outside_the_query_are_clipped_away() {
    let mm = mm();
    // A misbehaving subscriber over pages 10..20 claims the whole address space, a range below
    // the query and one straddling its end.
    let _wide = mm
        .subscribe_aging(
            pages(10, 10),
            (),
            |_, _| {},
            |_, _, out| {
                out.push(VaRange::whole());
                out.push(pages(0, 5));
                out.push(pages(15, 50));
            },
        )
        .unwrap();
    assert_eq!(mm.test_young(pages(12, 4)).unwrap(), [pages(12, 4)]);
    // The query reaches past the subscription: the answer still stays inside the subscription.
    assert_eq!(mm.test_young(pages(0, 40)).unwrap(), [pages(10, 10)]);
    assert!(
        mm.test_young(pages(30, 4)).unwrap().is_empty(),
        "no overlap"
    );
}

#[test]
fn a_subscriber_without_an_aging_callback_is_skipped() {
    let mm = mm();
    let invalidated = Arc::new(AtomicUsize::new(0));
    let inv = invalidated.clone();
    let _plain = mm
        .subscribe(pages(0, 8), (), move |_, _| {
            inv.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    assert!(mm.clear_young(pages(0, 8)).unwrap().is_empty());
    let _aging = toy(&mm, pages(0, 8), &[3]);
    assert_eq!(mm.clear_young(pages(0, 8)).unwrap(), [pages(3, 1)]);
    let stats = mm.stats();
    assert_eq!(stats.aging_queries, 2);
    assert_eq!(stats.aging_callbacks, 1, "only the aging subscriber ran");
    assert_eq!(
        invalidated.load(Ordering::SeqCst),
        0,
        "aging never invalidates"
    );
}

#[test]
fn a_panicking_callback_is_counted_and_its_whole_range_is_young() {
    let mm = mm();
    let broken = mm
        .subscribe_aging(
            pages(4, 8),
            0u32,
            |_, _| {},
            |calls, _, out| {
                *calls += 1;
                // A partial answer before the panic must not narrow the result.
                out.push(pages(4, 1));
                panic!("the device's accessed bits could not be read");
            },
        )
        .unwrap();
    let healthy = toy(&mm, pages(0, 4), &[1]);
    let young = mm.clear_young(pages(0, 8)).unwrap();
    assert_eq!(young, [pages(1, 1), pages(4, 4)]);
    assert_eq!(
        healthy.lock().queries.len(),
        1,
        "the others are still asked"
    );
    let stats = mm.stats();
    assert_eq!(stats.aging_callback_panics, 1);
    assert_eq!(stats.aging_callbacks, 2);
    assert_eq!(stats.callback_panics, 0, "not an invalidate callback");
    // The subscription stays usable: its lock is free and it is asked again.
    assert_eq!(*broken.lock(), 1);
    assert_eq!(mm.test_young(pages(6, 1)).unwrap(), [pages(6, 1)]);
    assert_eq!(mm.stats().aging_callback_panics, 2);
    mm.invalidate(pages(4, 8)).unwrap();
}

/// What `clear_young` and `test_young` returned when called from inside a callback.
type Seen = Arc<Mutex<Vec<String>>>;

fn call_both(mm: &AddressSpace, range: VaRange, seen: &Seen) {
    for result in [mm.clear_young(range), mm.test_young(range)] {
        let verdict = match result {
            Err(Error::CalledFromCallback { what }) => format!("refused {what}"),
            other => format!("unexpected {other:?}"),
        };
        seen.lock().unwrap().push(verdict);
    }
}

#[test]
fn calling_from_inside_a_callback_is_refused() {
    let mm = Arc::new(mm());
    let seen: Seen = Arc::default();
    let (weak_inv, seen_inv) = (Arc::downgrade(&mm), seen.clone());
    let (weak_young, seen_young) = (Arc::downgrade(&mm), seen.clone());
    // The callbacks query a range overlapping their own subscription, which would deadlock.
    let sub = mm
        .subscribe_aging(
            pages(0, 4),
            (),
            move |_, inv| {
                if let Some(mm) = weak_inv.upgrade() {
                    call_both(&mm, inv.range, &seen_inv);
                }
            },
            move |_, query, _| {
                if let Some(mm) = weak_young.upgrade() {
                    call_both(&mm, query.range, &seen_young);
                }
            },
        )
        .unwrap();
    mm.invalidate(pages(0, 4)).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        ["refused clear_young", "refused test_young"]
    );
    seen.lock().unwrap().clear();
    assert!(mm.test_young(pages(0, 4)).unwrap().is_empty());
    assert_eq!(
        *seen.lock().unwrap(),
        ["refused clear_young", "refused test_young"]
    );
    drop(sub);
}

#[test]
fn calling_while_holding_a_subscriber_lock_is_refused() {
    let mm = mm();
    let _aging = toy(&mm, pages(0, 4), &[0]);
    // Even a lock on a subscription outside the range: another thread could hold the aging
    // subscriber's lock and wait for this one.
    let other = mm.subscribe(pages(50, 1), (), |_, _| {}).unwrap();
    let guard = other.lock();
    assert!(matches!(
        mm.clear_young(pages(0, 4)),
        Err(Error::SubscriberLockHeld {
            what: "clear_young"
        })
    ));
    assert!(matches!(
        mm.test_young(pages(0, 4)),
        Err(Error::SubscriberLockHeld { what: "test_young" })
    ));
    drop(guard);
    assert_eq!(mm.test_young(pages(0, 4)).unwrap(), [pages(0, 1)]);
    assert_eq!(mm.stats().aging_queries, 1, "refused calls are not counted");
    // Another thread's guard does not refuse this thread's query.
    let guard = other.lock();
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(mm.test_young(pages(0, 4)).unwrap(), [pages(0, 1)]));
    });
    drop(guard);
}

#[test]
fn queries_after_release_fail_released() {
    let mm = mm();
    let sub = toy(&mm, pages(0, 4), &[0]);
    mm.release();
    assert!(matches!(mm.clear_young(pages(0, 4)), Err(Error::Released)));
    assert!(matches!(mm.test_young(pages(0, 4)), Err(Error::Released)));
    assert!(sub.lock().queries.is_empty());
    assert_eq!(mm.stats().aging_queries, 0);
}

#[test]
fn a_subscription_dropped_during_a_query_is_not_called_after_its_drop_returned() {
    // The query has already collected both subscribers when `late` is dropped: `early` (asked
    // first, being older) holds the query up until the drop has returned.
    let mm = Arc::new(mm());
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let early = mm
        .subscribe_aging(
            pages(0, 4),
            (),
            |_, _| {},
            move |_, _, _| {
                entered_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            },
        )
        .unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let called_after_drop = Arc::new(AtomicUsize::new(0));
    let (d, c) = (dropped.clone(), called_after_drop.clone());
    let late = mm
        .subscribe_aging(
            pages(0, 4),
            (),
            |_, _| {},
            move |_, _, out| {
                if d.load(Ordering::SeqCst) {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                out.push(VaRange::whole());
            },
        )
        .unwrap();
    let mm2 = mm.clone();
    let query = std::thread::spawn(move || mm2.clear_young(pages(0, 4)));
    entered_rx.recv().unwrap();
    drop(late);
    dropped.store(true, Ordering::SeqCst);
    go_tx.send(()).unwrap();
    let young = query.join().unwrap().unwrap();
    assert_eq!(called_after_drop.load(Ordering::SeqCst), 0);
    assert!(
        young.is_empty(),
        "the dropped subscriber answered: {young:?}"
    );
    assert_eq!(mm.stats().aging_callbacks, 1);
    drop(early);
}

#[test]
fn dropping_a_subscription_waits_for_its_running_aging_callback() {
    let mm = Arc::new(mm());
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let running = Arc::new(AtomicBool::new(false));
    let r = running.clone();
    let sub = mm
        .subscribe_aging(
            pages(0, 4),
            (),
            |_, _| {},
            move |_, _, _| {
                r.store(true, Ordering::SeqCst);
                entered_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                r.store(false, Ordering::SeqCst);
            },
        )
        .unwrap();
    let mm2 = mm.clone();
    let query = std::thread::spawn(move || mm2.clear_young(pages(0, 4)));
    entered_rx.recv().unwrap();
    let r = running.clone();
    let dropper = std::thread::spawn(move || {
        drop(sub);
        // Once the drop returned the callback must have finished.
        !r.load(Ordering::SeqCst)
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !dropper.is_finished(),
        "the drop returned while its aging callback was running"
    );
    go_tx.send(()).unwrap();
    assert!(dropper.join().unwrap());
    query.join().unwrap().unwrap();
    assert_eq!(mm.subscription_count(), 0);
}

/// A subscription that owns itself through a slot its callbacks can empty.
type Slot = Arc<Mutex<Option<Subscription<()>>>>;

#[test]
fn a_subscription_may_drop_itself_from_its_own_callbacks() {
    let mm = mm();
    let asked = Arc::new(AtomicUsize::new(0));
    let self_dropping = |slot: &Slot, asked: &Arc<AtomicUsize>| {
        let (slot_inv, slot_young, asked) = (slot.clone(), slot.clone(), asked.clone());
        mm.subscribe_aging(
            pages(0, 4),
            (),
            move |_, _| drop(slot_inv.lock().unwrap().take()),
            move |_, _, out| {
                asked.fetch_add(1, Ordering::SeqCst);
                out.push(pages(0, 1));
                drop(slot_young.lock().unwrap().take());
            },
        )
        .unwrap()
    };
    // From the aging callback: the drop must not wait for the lock this very callback holds.
    let slot: Slot = Arc::default();
    *slot.lock().unwrap() = Some(self_dropping(&slot, &asked));
    assert_eq!(mm.clear_young(pages(0, 4)).unwrap(), [pages(0, 1)]);
    assert_eq!(mm.subscription_count(), 0);
    assert!(mm.clear_young(pages(0, 4)).unwrap().is_empty());
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "never asked after its drop"
    );
    // From the invalidate callback.
    let slot: Slot = Arc::default();
    *slot.lock().unwrap() = Some(self_dropping(&slot, &asked));
    mm.invalidate(pages(0, 4)).unwrap();
    assert_eq!(mm.subscription_count(), 0);
    assert!(mm.clear_young(pages(0, 4)).unwrap().is_empty());
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(mm.stats().aging_callback_panics, 0);
    assert_eq!(mm.stats().callback_panics, 0);
}

#[test]
fn drops_racing_clear_young_never_see_a_callback_after_the_drop() {
    let mm = Arc::new(mm());
    // A long-lived subscriber keeps the query busy, so drops land in the middle of queries.
    let _steady = toy(&mm, pages(0, 16), &[0, 5, 9]);
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicUsize::new(0));
    let queries = Arc::new(AtomicUsize::new(0));
    let (mm2, stop2, queries2) = (mm.clone(), stop.clone(), queries.clone());
    let querier = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            let young = mm2.clear_young(pages(0, 16)).unwrap();
            assert!(young.iter().all(|r| pages(0, 16).contains_range(r)));
            queries2.fetch_add(1, Ordering::SeqCst);
        }
    });
    while queries.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    // At least 300 drops, and at least 200 queries while they happen.
    let first = queries.load(Ordering::SeqCst);
    let mut round = 0u64;
    while round < 300 || queries.load(Ordering::SeqCst) < first + 200 {
        round += 1;
        let dropped = Arc::new(AtomicBool::new(false));
        let (d, v) = (dropped.clone(), violations.clone());
        let sub = mm
            .subscribe_aging(
                pages(round % 16, 1),
                (),
                |_, _| {},
                move |_, query, out| {
                    if d.load(Ordering::SeqCst) {
                        v.fetch_add(1, Ordering::SeqCst);
                    }
                    out.push(query.range);
                },
            )
            .unwrap();
        if round % 3 == 0 {
            std::thread::yield_now();
        }
        drop(sub);
        dropped.store(true, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    querier.join().unwrap();
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert_eq!(mm.subscription_count(), 1);
    assert_eq!(mm.stats().aging_callback_panics, 0);
}
