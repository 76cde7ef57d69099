//! docs/semantics.md section 1, "a device never reads or writes memory that was freed", at the
//! API boundary: once a safe call returns, with a result or an error, the device can no longer
//! touch the memory it borrowed; and section 5: a command never sees a mapping changed before
//! its submit.
//!
//! The emulator's `hold_work` knob makes a command outlast its submitter's timeout
//! deterministically: every work item pauses before its next step, as on a stuck engine.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use driver::backend::emulated::EmulatedBackend;
use driver::fault::CancelReason;
use driver::{Error, Runtime, RuntimeOptions};
use firmware_stubs::{Accelerator, AcceleratorConfig};
use sys_util::sync::lock;

/// The tests share the process's address space (one userfaultfd registers each range): one at
/// a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    lock(&SERIAL)
}

/// A runtime on an emulator the test holds, with a short wait timeout.
fn runtime(timeout: Duration) -> (Arc<Accelerator>, Arc<Runtime>) {
    let device = Arc::new(Accelerator::new(AcceleratorConfig::default()).unwrap());
    let backend = EmulatedBackend::from_device(device.clone());
    let options = RuntimeOptions {
        timeout,
        ..RuntimeOptions::default()
    };
    let rt = Runtime::open_backend(Box::new(backend), options).unwrap();
    (device, rt)
}

/// Waits (bounded: this is "not a timeout", no performance claim) until the device has no
/// fetched work left, neither running nor stalled.
fn wait_device_idle(device: &Accelerator) {
    assert!(
        device.wait_idle(Duration::from_secs(20)),
        "the device never went idle"
    );
}

const LEN: usize = 256 << 10;
const REUSED: u8 = 0x11;

/// The scenario of the issue: `fill` times out, the caller hands its buffer to a new owner
/// (who writes it), then the stuck command gets going again. It must not write a byte.
fn a_timed_out_fill_writes_nothing_after_it_returned(warm: bool) {
    let _serial = serial();
    let (device, rt) = runtime(Duration::from_millis(300));
    let ctx = rt.create_context().unwrap();
    let mut buf = vec![0u8; LEN];
    if warm {
        // Device page-table entries and TLB entries for the buffer already exist.
        ctx.fill(&mut buf, 0x0101_0101_0101_0101).unwrap();
        assert!(buf.iter().all(|b| *b == 0x01));
    }

    device.hold_work(true);
    let err = ctx.fill(&mut buf, 0x5a5a_5a5a_5a5a_5a5a).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");

    // The call returned: the memory is the caller's again. Free it and take it back from the
    // allocator as a new owner would, and write it.
    let at = buf.as_ptr() as usize;
    drop(buf);
    let mut reused: Vec<u8> = Vec::with_capacity(LEN);
    reused.resize(LEN, REUSED);
    eprintln!(
        "reused buffer at the freed address: {}",
        reused.as_ptr() as usize == at
    );
    // The stuck command gets going again.
    device.hold_work(false);
    wait_device_idle(&device);
    let written = reused.iter().filter(|b| **b != REUSED).count();
    assert_eq!(
        written, 0,
        "the device wrote {written} bytes into memory after the call that borrowed it returned"
    );
    assert_eq!(ctx.stats().revocations, 1);
    // The command was cancelled on the revoked pages and, once collected, gives them back:
    // the same memory works on the device again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctx.stats().revoked_in_flight > 0 {
        assert!(
            Instant::now() < deadline,
            "the revoked command was never collected"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ctx.fill(&mut reused, 0x7777_7777_7777_7777).unwrap();
    assert!(reused.iter().all(|b| *b == 0x77));
    assert_eq!(ctx.stats().revocations, 1);
}

#[test]
fn a_timed_out_fill_writes_nothing_after_it_returned_cold() {
    a_timed_out_fill_writes_nothing_after_it_returned(false);
}

#[test]
fn a_timed_out_fill_writes_nothing_after_it_returned_warm() {
    a_timed_out_fill_writes_nothing_after_it_returned(true);
}

/// The same through the unsafe submit/wait pair: `wait`'s error ends the contract too, and the
/// command is cancelled `Revoked` when it next touches its memory; a second wait on the ticket
/// collects that.
#[test]
fn a_wait_that_times_out_revokes_its_command_and_a_later_wait_sees_it_cancelled() {
    let _serial = serial();
    let (device, rt) = runtime(Duration::from_millis(300));
    let ctx = rt.create_context().unwrap();
    let src = vec![0x33u8; LEN];
    let mut dst = vec![0u8; LEN];
    ctx.copy(&mut dst, &src).unwrap();
    device.hold_work(true);
    let op = driver::Op::Copy {
        dst: dst.as_mut_ptr() as u64,
        src: src.as_ptr() as u64,
        len: LEN as u64,
    };
    // SAFETY: `dst` and `src` are not touched until `wait` has returned.
    let ticket = unsafe { ctx.submit(op) }.unwrap();
    let err = ctx.wait(ticket).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    dst.fill(REUSED);
    device.hold_work(false);
    wait_device_idle(&device);
    assert!(
        dst.iter().all(|b| *b == REUSED),
        "the copy landed after its wait returned"
    );
    match ctx.wait(ticket) {
        Err(Error::Cancelled {
            reason: CancelReason::Revoked,
        }) => {}
        other => panic!("expected the command cancelled Revoked, got {other:?}"),
    }
    assert_eq!(ctx.in_flight(), 0);
    assert_eq!(ctx.stats().revoked_in_flight, 0);
    // Collected: a third wait is refused instead of reading another command's slot.
    assert!(matches!(ctx.wait(ticket), Err(Error::InvalidArgument(_))));
}

/// A gate a mirror callback blocks on, so the monitor's worker stops handling events.
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    entered: Mutex<bool>,
}

impl Gate {
    fn pass(&self) {
        *self.entered.lock().unwrap() = true;
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
    }
    fn open(&self) {
        *lock(&self.closed) = false;
        self.opened.notify_all();
    }
}

/// Opens the gate however the test ends: a failed assertion must not leave the monitor's
/// worker blocked (the address space's drop joins it).
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// semantics.md section 5: a submit first waits until every CPU event the monitor has read is
/// handled. If that does not happen within the settle timeout, the submit fails and submits
/// nothing; it used to log a warning and submit anyway.
#[test]
fn a_submit_whose_cpu_events_are_not_caught_up_is_refused() {
    let _serial = serial();
    let (_device, rt) = runtime(Duration::from_secs(10));
    let config = mirror::Config {
        settle_timeout: Duration::from_millis(200),
        ..mirror::Config::default()
    };
    let mm = Arc::new(mirror::AddressSpace::current(config).unwrap());
    let ctx = rt
        .create_context_in(mm.clone(), driver::context::ContextOptions::default())
        .unwrap();
    let page = 4096usize;
    // SAFETY: a fresh anonymous mapping no Rust object refers to.
    let victim = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(victim, libc::MAP_FAILED);
    let range = mirror::VaRange::new(victim as u64, page as u64).unwrap();
    mm.track(range).unwrap();
    let gate = Arc::new(Gate {
        closed: Mutex::new(true),
        opened: Condvar::new(),
        entered: Mutex::new(false),
    });
    let in_callback = gate.clone();
    let _blocker = mm
        .subscribe(range, (), move |_, _| in_callback.pass())
        .unwrap();
    // Declared after the subscription, so dropped before it (its drop waits for the callback).
    let _open_on_drop = OpenOnDrop(gate.clone());
    // The kernel lets the munmap return once the monitor has read its event; the worker then
    // blocks in our callback and the event stays unhandled.
    // SAFETY: the mapping is ours and unused.
    assert_eq!(unsafe { libc::munmap(victim, page) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !*gate.entered.lock().unwrap() {
        assert!(
            Instant::now() < deadline,
            "the unmap event never reached the callback"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    let mut buf = vec![0u8; 64 << 10];
    let submitted = rt.commands_submitted();
    let err = ctx.fill(&mut buf, 0x5a5a_5a5a_5a5a_5a5a).unwrap_err();
    assert!(
        matches!(err, Error::Mirror(mirror::Error::SettleTimeout(_))),
        "{err}"
    );
    assert_eq!(
        rt.commands_submitted(),
        submitted,
        "a command was submitted"
    );
    assert!(buf.iter().all(|b| *b == 0));

    gate.open();
    ctx.fill(&mut buf, 0x5a5a_5a5a_5a5a_5a5a).unwrap();
    assert!(buf.iter().all(|b| *b == 0x5a));
}
