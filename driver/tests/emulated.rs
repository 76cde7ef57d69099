//! The integration suite on the in-process emulator, in both service modes.
mod suite;

use std::sync::Arc;

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

fn open(mode: ServiceMode) -> Arc<Runtime> {
    let options = RuntimeOptions {
        mode,
        ..Default::default()
    };
    Runtime::open(DeviceSpec::emulated(), options).expect("open the emulated device")
}

mod interrupt {
    use super::*;
    backend_suite!(|| open(ServiceMode::Interrupt));
}

mod polling {
    use super::*;
    backend_suite!(|| open(ServiceMode::Polling));
}

mod interrupts {
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use driver::fault::{ServiceMode, MISS_GRACE};
    use driver::runtime::{AcceleratorConfig, DeviceSpec, InterruptStats, Runtime, RuntimeOptions};
    use mirror::Mapping;

    use super::suite::{self, PAGE};

    const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

    fn open_with(device: AcceleratorConfig, mode: ServiceMode) -> std::sync::Arc<Runtime> {
        let options = RuntimeOptions {
            mode,
            ..Default::default()
        };
        Runtime::open(DeviceSpec::Emulated(device), options).expect("open the emulated device")
    }

    /// One fill per page, so every page faults and every command completes on its own.
    fn workload(rt: &std::sync::Arc<Runtime>, pages: usize) {
        let ctx = suite::exact(rt);
        let m = Mapping::anonymous(pages * PAGE, RW).unwrap();
        for i in 0..pages {
            let at = m.addr() + (i * PAGE) as u64;
            suite::device_fill(&ctx, at, PAGE as u64, 0x0707_0707_0707_0707).unwrap();
            assert_eq!(m.read_byte(i * PAGE + 17), 7, "page {i}");
        }
        assert!(ctx.stats().faults >= pages as u64, "{:?}", ctx.stats());
    }

    #[test]
    fn interrupt_mode_counts_the_interrupts_and_misses_none() {
        let rt = open_with(AcceleratorConfig::default(), ServiceMode::Interrupt);
        workload(&rt, 8);
        // Anything found without its interrupt would be judged within the grace period.
        std::thread::sleep(MISS_GRACE + Duration::from_millis(250));
        let s = rt.interrupt_stats();
        assert!(s.fault > 0 && s.completion > 0, "{s:?}");
        assert_eq!(
            (s.missed_fault, s.missed_completion, s.error),
            (0, 0, 0),
            "{s:?}"
        );
    }

    #[test]
    fn polling_mode_uses_no_interrupts_and_counts_nothing() {
        let rt = open_with(AcceleratorConfig::default(), ServiceMode::Polling);
        workload(&rt, 4);
        assert_eq!(rt.interrupt_stats(), InterruptStats::default());
    }

    /// Everything logged at WARN and above in this test binary (the service threads' too).
    fn captured_warnings() -> Arc<Mutex<Vec<u8>>> {
        static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
        LOG.get_or_init(|| {
            let log = Arc::new(Mutex::new(Vec::new()));
            let sink = log.clone();
            let writer = move || Sink(sink.clone());
            tracing_subscriber::fmt()
                .with_writer(writer)
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .init();
            log
        })
        .clone()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// MSI routed but never delivered (a guest whose hypervisor failed to enable MSI): the work
    /// still completes, at timeout-polling speed, and the misses are counted and warned about
    /// once.
    #[test]
    fn interrupts_that_never_arrive_are_counted_as_misses_and_the_work_completes() {
        let log = captured_warnings();
        let device = AcceleratorConfig {
            deliver_msi: false,
            ..Default::default()
        };
        let rt = open_with(device, ServiceMode::Interrupt);
        let start = Instant::now();
        workload(&rt, 4);
        // Each page waited for the 100 ms poll timeout.
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        let deadline = Instant::now() + MISS_GRACE * 4;
        let s = loop {
            let s = rt.interrupt_stats();
            if (s.missed_fault > 0 && s.missed_completion > 0) || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(s.missed_fault > 0 && s.missed_completion > 0, "{s:?}");
        // At most one miss per fault and per command: each was found once, by one timeout.
        assert!(s.missed_fault <= 4 && s.missed_completion <= 4, "{s:?}");
        assert_eq!((s.fault, s.completion, s.error), (0, 0, 0), "{s:?}");
        let log = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        let once = |what: &str| log.matches(what).count() == 1;
        assert!(
            once("no fault interrupt arrived: faults serviced by 100 ms timeout polling; check that MSI was enabled")
                && once("no completion interrupt arrived: completions found by 50 ms timeout polling; check that MSI was enabled"),
            "one warning per vector expected:\n{log}"
        );
    }
}

/// Fault records that were already stale when the service drained them.
mod stale_records {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use accel_abi::FaultRecord;
    use driver::fault::ServiceMode;
    use driver::runtime::Op;
    use mirror::{Mapping, Perms, VaRange};

    use super::open;
    use super::suite::PAGE;

    const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
    const WAIT: Duration = Duration::from_secs(10);

    /// Holds every batch with records of `asid` on the service thread after its drain: the test
    /// gets the records and lets the batch go on with `()`. Dropping the receiver ends it.
    fn hold_batches(
        rt: &driver::runtime::Runtime,
        asid: u16,
    ) -> (mpsc::Receiver<Vec<FaultRecord>>, mpsc::Sender<()>) {
        let (drained_tx, drained) = mpsc::channel::<Vec<FaultRecord>>();
        let (go, go_rx) = mpsc::channel::<()>();
        let (drained_tx, go_rx) = (Mutex::new(drained_tx), Mutex::new(go_rx));
        rt.service()
            .set_drain_hook(Some(Arc::new(move |records: &[FaultRecord]| {
                let mine: Vec<FaultRecord> =
                    records.iter().filter(|r| r.asid == asid).copied().collect();
                if !mine.is_empty() && drained_tx.lock().unwrap().send(mine).is_ok() {
                    let _ = go_rx.lock().unwrap().recv_timeout(WAIT);
                }
            })));
        (drained, go)
    }

    /// Submits a fill of all of `m` and returns its ticket.
    fn fill_without_waiting(
        ctx: &driver::runtime::Context,
        m: &Mapping,
        pattern: u64,
    ) -> driver::device::Ticket {
        // SAFETY: no Rust reference points into the tests' mappings while the device writes.
        unsafe {
            ctx.submit(Op::Fill {
                dst: m.addr(),
                len: m.len() as u64,
                pattern,
            })
        }
        .unwrap()
    }

    /// A replay from the test thread (a context being dropped does one) while a batch is held:
    /// the stalled item retries, faults on the same page and posts its records again.
    fn replay_and_wait_for_the_second_stall(rt: &driver::runtime::Runtime) {
        rt.device().replay().unwrap();
        wait_until("the item's second stall", || rt.device().fault_pending());
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The race the daemon hit on kernel VFIO in a slow guest, made deterministic: a work item
    /// posts its fault records again after a replay retried it while its first records were
    /// being serviced; the service's own replay then lets it run to completion, and only after
    /// that (the memory unmapped meanwhile) are its second records drained. They describe a
    /// stall that is over: the item is complete. Servicing them fails, and that must neither
    /// count as a failure of the context nor cancel the item (the device refuses a cancel of an
    /// item that is not stalled and latches BAD_REGISTER_VALUE).
    fn a_record_drained_after_its_item_was_replayed(mode: ServiceMode) {
        let rt = open(mode);
        // Exact faults: a fault-around block can cover a neighbouring test's memory merged
        // into the same VMA, whose munmap then tears this mapping down too (the item would
        // fault again for real).
        let ctx = super::suite::exact(&rt);
        let m = Mapping::anonymous(16 * PAGE, RW).unwrap();
        let (drained, go) = hold_batches(&rt, ctx.asid());
        let ticket = fill_without_waiting(&ctx, &m, 0x5151_5151_5151_5151);
        let first = drained.recv_timeout(WAIT).expect("the fill's first stall");
        assert!(
            first
                .iter()
                .any(|r| r.work_id == ticket.work_id && !r.lookahead && r.va == m.addr()),
            "{first:?}"
        );
        replay_and_wait_for_the_second_stall(&rt);
        go.send(()).unwrap();
        // The held batch maps the pages and replays: the item completes. Its second records
        // are drained next, and held.
        let second = drained.recv_timeout(WAIT).expect("the second records");
        assert!(
            second.iter().all(|r| r.work_id == ticket.work_id),
            "{second:?}"
        );
        ctx.wait(ticket).expect("the fill completes");
        assert_eq!(m.read_byte(16 * PAGE - 1), 0x51);
        let range = VaRange::new(m.addr(), m.len() as u64).unwrap();
        // SAFETY: nothing touches the mapping after this.
        unsafe { ctx.address_space().mprotect(range, Perms::NONE) }.unwrap();
        let service = rt.service().stats();
        let batches = service.batches.load(Ordering::Relaxed);
        go.send(()).unwrap();
        wait_until("the stale batch to be serviced", || {
            service.batches.load(Ordering::Relaxed) > batches
        });
        drop(drained);
        let latched = rt.device().take_error().unwrap();
        let cancels = |s: &driver::fault::ServiceStats| {
            [&s.device_errors, &s.cancels, &s.cancels_refused].map(|c| c.load(Ordering::Relaxed))
        };
        assert_eq!(
            (latched, cancels(service)),
            (None, [0; 3]),
            "a stale record cancelled a work item that was not stalled"
        );
        let s = ctx.stats();
        assert_eq!(s.failures, 0, "stale records counted as failures: {s:?}");
        assert!(
            service.replayed_records.load(Ordering::Relaxed) >= second.len() as u64
                && service.replayed_failed.load(Ordering::Relaxed) > 0,
            "the second records were not the stale ones: {service:?}"
        );
        rt.service().set_drain_hook(None);
    }

    /// The other side of it: an access that really cannot be serviced is still cancelled when
    /// its first records went stale under it. The batch with the fill's records (its third page
    /// PROT_NONE) is held while another thread replays, so those records no longer prove the
    /// item stalled and nothing is cancelled from them; the item, retried, faults again on the
    /// hole, and that record cancels it with the right reason. The device latches no error.
    fn an_unreachable_page_is_still_cancelled_after_a_replay_overtook_its_records(
        mode: ServiceMode,
    ) {
        let rt = open(mode);
        let ctx = super::suite::exact(&rt);
        let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
        m.protect(2 * PAGE, PAGE, libc::PROT_NONE).unwrap();
        let (drained, go) = hold_batches(&rt, ctx.asid());
        let ticket = fill_without_waiting(&ctx, &m, 0x6262_6262_6262_6262);
        drained.recv_timeout(WAIT).expect("the fill's first stall");
        replay_and_wait_for_the_second_stall(&rt);
        drop(drained);
        go.send(()).unwrap();
        let r = ctx.wait(ticket);
        assert!(
            matches!(
                r,
                Err(driver::Error::Cancelled {
                    reason: driver::fault::CancelReason::NoMapping
                })
            ),
            "{r:?}"
        );
        assert_eq!(
            m.read_byte(2 * PAGE - 1),
            0x62,
            "the item ran up to the hole"
        );
        assert_eq!(rt.device().take_error().unwrap(), None);
        let service = rt.service().stats();
        assert_eq!(service.device_errors.load(Ordering::Relaxed), 0);
        assert!(ctx.stats().failures > 0, "{:?}", ctx.stats());
        rt.service().set_drain_hook(None);
    }

    #[test]
    fn an_unreachable_page_is_still_cancelled_after_a_replay_overtook_its_records_interrupt_mode() {
        an_unreachable_page_is_still_cancelled_after_a_replay_overtook_its_records(
            ServiceMode::Interrupt,
        );
    }

    #[test]
    fn an_unreachable_page_is_still_cancelled_after_a_replay_overtook_its_records_polling_mode() {
        an_unreachable_page_is_still_cancelled_after_a_replay_overtook_its_records(
            ServiceMode::Polling,
        );
    }

    /// The service's cancel writes nothing after a replay it did not see, and a cancel the
    /// device refuses (the item is not stalled) is reported as such and leaves no error latched.
    /// Checked on the service thread (in the drain hook), the only reader of the error register.
    #[test]
    fn a_refused_or_overtaken_cancel_leaves_no_device_error() {
        use driver::device::CancelOutcome;
        let rt = open(ServiceMode::Interrupt);
        let ctx = rt.create_context().unwrap();
        let asid = ctx.asid();
        let m = Mapping::anonymous(PAGE, RW).unwrap();
        let (done_tx, done) = mpsc::channel();
        let done_tx = Mutex::new(Some(done_tx));
        let device = Arc::downgrade(rt.device());
        rt.service()
            .set_drain_hook(Some(Arc::new(move |_: &[FaultRecord]| {
                let (Some(tx), Some(device)) = (done_tx.lock().unwrap().take(), device.upgrade())
                else {
                    return;
                };
                let none = 0x00ab_cdef; // no such item: refused, as one running or complete is
                let replays = device.replays();
                let refused = device.cancel_stalled(none, asid, 7, replays).unwrap();
                let after_refusal = device.take_error().unwrap();
                device.replay().unwrap();
                let overtaken = device.cancel_stalled(none, asid, 7, replays).unwrap();
                let after_overtaken = device.take_error().unwrap();
                device.cancel(none, 7).unwrap();
                let plain = device.take_error().unwrap();
                let _ = tx.send((refused, after_refusal, overtaken, after_overtaken, plain));
            })));
        let r = super::suite::device_fill(&ctx, m.addr(), PAGE as u64, 0x7373_7373_7373_7373);
        assert!(r.is_ok(), "{r:?}");
        let (refused, after_refusal, overtaken, after_overtaken, plain) =
            done.recv_timeout(WAIT).unwrap();
        assert_eq!((refused, after_refusal), (CancelOutcome::Refused, None));
        assert_eq!(
            (overtaken, after_overtaken),
            (CancelOutcome::Replayed, None)
        );
        assert!(plain.is_some(), "a plain cancel of it is latched");
        rt.service().set_drain_hook(None);
    }

    #[test]
    fn a_record_drained_after_its_item_was_replayed_is_no_failure_interrupt_mode() {
        a_record_drained_after_its_item_was_replayed(ServiceMode::Interrupt);
    }

    #[test]
    fn a_record_drained_after_its_item_was_replayed_is_no_failure_polling_mode() {
        a_record_drained_after_its_item_was_replayed(ServiceMode::Polling);
    }
}
