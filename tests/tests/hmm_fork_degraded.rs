//! Fork without the fork-event capability (docs/semantics.md §8: `UFFD_FEATURE_EVENT_FORK` needs
//! CAP_SYS_PTRACE; without it the handshake is retried without FORK, forks are not reported and
//! `capabilities().degraded` says so). Alone in its own process because it drops privileges
//! before the process-wide mirror is created.
mod hmm;

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
use hmm::*;

/// No FORK event reaches the mirror, the child gets no registration of its own, and the parent's
/// device view still equals its CPU view while the child shares the pages copy-on-write and
/// after the parent's CPU write breaks the sharing (the emulator reaches the parent's pages by
/// VA; a pinning backend relies on the kernel's early copy of pinned pages at fork).
#[test]
fn fork_without_fork_events() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        mirror::sys::process::become_unprivileged(65534, 65534).unwrap();
    }
    let rt = Runtime::open(
        DeviceSpec::emulated(),
        RuntimeOptions {
            mode: ServiceMode::Interrupt,
            ..Default::default()
        },
    )
    .expect("open the emulated device unprivileged");
    let ctx = hmm_ctx(&rt);
    let caps = ctx.address_space().capabilities().clone();
    let Some(uffd) = caps.uffd.clone() else {
        eprintln!("SKIP fork_without_fork_events: no userfaultfd at all ({caps:?})");
        return;
    };
    assert!(!uffd.fork_events, "unprivileged: no FORK events ({caps:?})");
    assert!(
        caps.degraded
            .iter()
            .any(|d| d.to_lowercase().contains("fork")),
        "the degradation is reported: {:?}",
        caps.degraded
    );
    let m = buffer(RW);
    device_fill(&ctx, m.addr(), BUF, 0x1111_1111_1111_1111).unwrap();
    let forks = ctx.address_space().stats().fork_events;
    // A child that only waits on a pipe (async-signal-safe) keeps the pages shared.
    let mut pipe = [0i32; 2];
    // SAFETY: pipe fills two fds.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child only reads one byte and exits (async-signal-safe).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: as above.
        unsafe {
            libc::read(pipe[0], (&mut b as *mut u8).cast(), 1);
            libc::_exit(0)
        }
    }
    ctx.address_space().settle().unwrap();
    assert_eq!(
        ctx.address_space().stats().fork_events,
        forks,
        "no FORK event without the capability"
    );
    assert_eq!(
        device_checksum(&ctx, m.addr(), BUF).unwrap(),
        cpu_checksum(m.addr(), BUF)
    );
    // The parent's CPU write breaks copy-on-write; the device must follow the parent's page.
    for i in (0..BUF).step_by(PAGE) {
        m.write_byte(i, 0x22);
    }
    assert_eq!(
        device_checksum(&ctx, m.addr(), BUF).unwrap(),
        cpu_checksum(m.addr(), BUF),
        "device view == CPU view after COW in the parent"
    );
    device_fill(&ctx, m.addr(), BUF, 0x3333_3333_3333_3333).unwrap();
    assert_eq!(m.read_byte(BUF - 1), 0x33);
    // SAFETY: wake and reap the child.
    unsafe {
        libc::write(pipe[1], [0u8].as_ptr().cast(), 1);
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
}
