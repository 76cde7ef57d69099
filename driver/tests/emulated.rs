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
