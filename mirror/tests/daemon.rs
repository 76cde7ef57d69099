//! Daemon mode: a client process sends its userfaultfd over a Unix socket; this test process
//! mirrors the client's address space, still receives its events, and sees its exit through the
//! pidfd.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use mirror::{Access, AddressSpace, Config, Error, EventKind, EventSource, PageState, VaRange};

struct Client {
    child: Child,
    sock: UnixStream,
    region: VaRange,
    uffd: std::os::fd::OwnedFd,
}

fn spawn_client(tag: &str) -> Client {
    let path =
        std::env::temp_dir().join(format!("mirror-daemon-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mirror-uffd-client"))
        .arg(&path)
        .spawn()
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut payload = [0u8; 16];
    let (uffd, n) = mirror::uffd::recv_fd(sock.as_fd(), &mut payload).unwrap();
    assert_eq!(n, 16);
    let addr = u64::from_le_bytes(payload[..8].try_into().unwrap());
    let len = u64::from_le_bytes(payload[8..].try_into().unwrap());
    Client {
        child,
        sock,
        region: VaRange::new(addr, len).unwrap(),
        uffd,
    }
}

impl Client {
    fn command(&mut self, c: u8) {
        self.sock.write_all(&[c]).unwrap();
        let mut ack = [0u8; 1];
        self.sock.read_exact(&mut ack).unwrap();
        assert_eq!(ack[0], b'k', "client failed command {}", c as char);
    }

    fn page(&self, i: u64) -> VaRange {
        VaRange::new(self.region.start() + i * PAGE as u64, PAGE as u64).unwrap()
    }
}

fn wait_released(mm: &AddressSpace) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if mm.is_released() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn uffd_passed_to_another_process_still_delivers_events_and_exit_releases() {
    let mut client = spawn_client("events");
    let pid = client.child.id() as libc::pid_t;
    let uffd = std::mem::replace(
        &mut client.uffd,
        mirror::uffd::create_uninitialised().unwrap(),
    );
    let mm = AddressSpace::for_process(pid, None, Some(uffd), Config::default()).unwrap();
    assert_eq!(mm.pid(), Some(pid));
    let caps = mm.capabilities();
    assert!(caps.pidfd);
    assert!(caps.uffd.is_some(), "{:?}", caps.degraded);

    let rec = recorder(&mm, client.region);
    mm.track(client.region).unwrap();

    // Snapshot through /proc/PID/pagemap + PROCMAP_QUERY on /proc/PID/maps: the client wrote
    // every page.
    let snap = mm.snapshot(client.region).unwrap();
    assert!(
        snap.pages().iter().all(|p| p.state == PageState::Write),
        "{snap:?}"
    );

    client.command(b'd');
    client.command(b'u');
    client.command(b'm');
    mm.settle().unwrap();
    let log: Vec<_> = rec
        .lock()
        .iter()
        .map(|i| (i.kind, i.range, i.source))
        .collect();
    let uffd_src = EventSource::Userfaultfd;
    assert!(
        log.contains(&(EventKind::Discard, client.page(0), uffd_src)),
        "{log:?}"
    );
    assert!(
        log.contains(&(EventKind::Unmap, client.page(1), uffd_src)),
        "{log:?}"
    );
    let moved = VaRange::new(client.page(2).start(), 2 * PAGE as u64).unwrap();
    assert!(
        log.iter()
            .any(|(k, r, _)| matches!(k, EventKind::Remap { to: Some(_) }) && *r == moved),
        "{log:?}"
    );
    assert!(
        log.contains(&(EventKind::Unmap, moved, uffd_src)),
        "{log:?}"
    );

    if mm.capabilities().uffd.as_ref().unwrap().fork_events {
        client.command(b'f');
        mm.settle().unwrap();
        assert!(rec.lock().iter().any(|i| i.kind == EventKind::Fork));
    } else {
        println!(
            "SKIP fork part: no FORK events ({:?})",
            mm.capabilities().degraded
        );
    }

    // The walker on a foreign process: page 0 was discarded, read fault-in works through
    // process_vm_readv, write fault-in is refused with a clear error.
    assert_eq!(
        mm.snapshot(client.page(0)).unwrap().pages()[0].state,
        PageState::None
    );
    mm.fault(client.page(0), Access::Read).unwrap();
    assert_eq!(
        mm.snapshot(client.page(0)).unwrap().pages()[0].state,
        PageState::Zero
    );
    assert!(matches!(
        mm.fault(client.page(0), Access::Write),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        mm.fault(client.page(1), Access::Read),
        Err(Error::Fault { .. })
    ));
    // Wrappers cannot change another process's mappings.
    // SAFETY: the wrapper refuses before any syscall.
    assert!(matches!(
        unsafe { mm.munmap(client.page(4)) },
        Err(Error::Unsupported { .. })
    ));

    client.command(b'x');
    client.child.wait().unwrap();
    assert!(
        wait_released(&mm),
        "pidfd exit must release the address space"
    );
    assert!(mm.process_exited());
    let log = rec.lock();
    assert_eq!(log.last().unwrap().kind, EventKind::Release);
    assert_eq!(log.last().unwrap().source, EventSource::ProcessExit);
    drop(log);
    assert!(matches!(rec.read_begin(), Err(Error::Released)));
    assert!(matches!(mm.snapshot(client.region), Err(Error::Released)));
    assert_eq!(mm.stats().release_events, 1);
}

#[test]
fn pidfd_release_without_uffd() {
    let mut client = spawn_client("pidfd");
    let pid = client.child.id() as libc::pid_t;
    let mm = AddressSpace::for_process(pid, None, None, Config::default()).unwrap();
    assert!(mm.capabilities().uffd.is_none());
    let a = recorder(&mm, client.region);
    let b = recorder(&mm, VaRange::whole());
    assert!(matches!(
        mm.track(client.region),
        Err(Error::Unsupported { .. })
    ));
    client.command(b'x');
    client.child.wait().unwrap();
    assert!(wait_released(&mm));
    for r in [&a, &b] {
        let log = r.lock();
        assert_eq!(log.len(), 1, "exactly one release per subscription");
        assert_eq!(
            (log[0].kind, log[0].source),
            (EventKind::Release, EventSource::ProcessExit)
        );
    }
}

#[test]
fn for_process_rejects_bad_pids() {
    assert!(matches!(
        AddressSpace::for_process(0, None, None, Config::default()),
        Err(Error::InvalidArgument { .. })
    ));
    // A pid that does not exist (pid_max is far below i32::MAX - 1 here).
    assert!(matches!(
        AddressSpace::for_process(i32::MAX - 1, None, None, Config::default()),
        Err(Error::Released) | Err(Error::Sys { .. })
    ));
}

#[test]
fn unprivileged_process_degrades_as_documented() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or("");
    if euid != "0" {
        println!("SKIP unprivileged degradation: needs root to drop to uid 65534");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_mirror-uffd-client"))
        .arg("--unprivileged-report")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    // PFNs are hidden from an unprivileged pagemap reader: the zero page is still recognised,
    // through PAGEMAP_SCAN.
    assert_eq!(get("pfn_visible").as_deref(), Some("false"), "{text}");
    assert!(text.contains("degraded=pagemap hides PFNs"), "{text}");
    assert_eq!(get("page0").as_deref(), Some("Zero"), "{text}");
    assert_eq!(get("page1").as_deref(), Some("Write"), "{text}");
    if get("uffd").as_deref() == Some("true") {
        // vm.unprivileged_userfaultfd=0 forces user-mode-only; FORK needs CAP_SYS_PTRACE.
        assert_eq!(get("fork_events").as_deref(), Some("false"), "{text}");
        assert_eq!(get("user_mode_only").as_deref(), Some("true"), "{text}");
        assert!(
            text.contains("degraded=userfaultfd created with UFFD_USER_MODE_ONLY"),
            "{text}"
        );
        assert!(text.contains("degraded=no FORK events"), "{text}");
        assert_eq!(get("events").as_deref(), Some("[Discard]"), "{text}");
    } else {
        assert!(text.contains("degraded=userfaultfd unavailable"), "{text}");
        assert!(get("track_error").is_some(), "{text}");
    }
}
