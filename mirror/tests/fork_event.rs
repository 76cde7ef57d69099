//! FORK events, in a test binary of their own: a fork reaches every userfaultfd of the process
//! with registered ranges, so it would show up in the logs of any test running beside it.

mod common;

use std::sync::{mpsc, Mutex};
use std::time::Duration;

use common::*;
use mirror::{EventKind, EventSource, Mapping};

#[test]
fn fork_delivers_fork_and_hands_over_the_child_uffd() {
    let Some(mm) = uffd_mm() else { return };
    if !mm.capabilities().uffd.as_ref().unwrap().fork_events {
        println!("SKIP fork: no FORK events (needs CAP_SYS_PTRACE)");
        return;
    }
    let m = Mapping::anonymous(2 * PAGE, RW).unwrap();
    m.write_byte(0, 1);
    let rec = recorder(&mm, m.range());
    mm.track(m.range()).unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    mm.on_fork(Some(Box::new(move |fd| {
        let _ = tx.lock().unwrap().send(fd);
    })));
    let child = mirror::sys::process::fork_exiting_child(0).unwrap();
    nix::sys::wait::waitpid(child, None).unwrap();
    mm.settle().unwrap();
    assert!(rec
        .lock()
        .iter()
        .any(|i| (i.kind, i.range, i.source)
            == (EventKind::Fork, m.range(), EventSource::Userfaultfd)));
    let fd = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("child uffd handed over");
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .unwrap();
    assert!(link.to_string_lossy().contains("userfaultfd"), "{link:?}");
    assert!(mm.stats().fork_events >= 1);
    // After fork the parent's written page is shared with the (exited, maybe not yet reaped)
    // child or exclusive again; either way the walker still reports it mapped.
    assert!(matches!(
        mm.snapshot(sub_range(&m, 0, 1)).unwrap().pages()[0].state,
        mirror::PageState::Read | mirror::PageState::Write
    ));
}
