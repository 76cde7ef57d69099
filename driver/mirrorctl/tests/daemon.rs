//! The daemon with real client processes: this test binary re-runs itself as the clients (the
//! ignored `client_role` test, told its role through the environment), so each client is a
//! separate process with its own address space, userfaultfd and pidfd, as in production. The
//! daemon runs in the test process on the emulated device, or as `mirrorctl serve` for the
//! shutdown test and the isolation tests at the end.

mod daemon_support;
use daemon_support::{serve_on_a_thread, wait_for_socket, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::fault::{CancelReason, ServiceMode};
use driver::runtime::{DeviceSpec, Op, Runtime, RuntimeOptions};
use driver::{DeviceOps, Error};
use mirrord::{Daemon, DaemonConfig};
use mirrord_client::client::{checked_private_dir, ConnectOptions};
use mirrord_client::protocol::{self, kind, ErrorCode, Header, Reply, Request, HEADER_SIZE};
use mirrord_client::{DaemonClient, StatsReply};

const ROLE_ENV: &str = "MIRROR_DAEMON_TEST_ROLE";
const SOCKET_ENV: &str = "MIRROR_DAEMON_TEST_SOCKET";
const ARG_ENV: &str = "MIRROR_DAEMON_TEST_ARG";
/// The uid (and gid) a client process drops to before it connects.
const UID_ENV: &str = "MIRROR_DAEMON_TEST_UID";
/// nobody/nogroup.
const OTHER_UID: u32 = 65534;

// ---------------------------------------------------------------------------------------------
// The daemon side.

struct TestDaemon {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    daemon: Arc<Daemon>,
    _dir: TempDir,
}

impl TestDaemon {
    fn start(tag: &str, mode: ServiceMode, adjust: impl FnOnce(&mut DaemonConfig)) -> TestDaemon {
        Self::start_on(tag, DeviceSpec::emulated(), mode, adjust)
    }

    fn start_on(
        tag: &str,
        spec: DeviceSpec,
        mode: ServiceMode,
        adjust: impl FnOnce(&mut DaemonConfig),
    ) -> TestDaemon {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = TempDir::new(tag);
        let socket = dir.0.join("mirrord.sock");
        let runtime = Runtime::open(
            spec,
            RuntimeOptions {
                mode,
                ..RuntimeOptions::default()
            },
        )
        .expect("open the emulated device");
        let mut config = DaemonConfig::new(&socket);
        adjust(&mut config);
        let daemon = Arc::new(Daemon::new(runtime, config).expect("daemon"));
        let (tx, thread) = serve_on_a_thread(daemon.clone());
        wait_for_socket(&socket, "the test daemon");
        TestDaemon {
            socket,
            stop: Some(tx),
            thread: Some(thread),
            daemon,
            _dir: dir,
        }
    }

    fn client(&self, role: &str, arg: &str) -> Child {
        spawn_client(&self.socket, role, arg)
    }

    /// A client that drops to `uid` (needs root) before connecting.
    fn client_as(&self, uid: u32, role: &str, arg: &str) -> Child {
        spawn_client_with(&self.socket, role, arg, Some(uid))
    }

    /// Waits until the daemon has released every client (stats are daemon-wide).
    fn settle(&self) -> StatsReply {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.daemon.stats();
            if s.clients == 0 || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let served = self.thread.take().unwrap().join().expect("daemon thread");
        served.expect("serve returned an error");
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits (up to 20 s) until `what` has bound its socket at `path`.
fn spawn_client(socket: &Path, role: &str, arg: &str) -> Child {
    spawn_client_with(socket, role, arg, None)
}

fn spawn_client_with(socket: &Path, role: &str, arg: &str, uid: Option<u32>) -> Child {
    let mut cmd = client_command(socket, role, arg);
    if let Some(uid) = uid {
        cmd.env(UID_ENV, uid.to_string());
    }
    cmd.spawn().expect("spawn a client process")
}

/// This test binary, to run as a client process in `role`.
fn client_command(socket: &Path, role: &str, arg: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "client_role",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE_ENV, role)
    .env(SOCKET_ENV, socket)
    .env(ARG_ENV, arg)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    cmd
}

/// The client's report lines (`RESULT ...`), and whether it exited successfully.
fn finish(mut child: Child) -> (bool, Vec<String>) {
    drop(child.stdin.take());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let ok = wait_timeout(&mut child, Duration::from_secs(120));
    let lines = out
        .lines()
        // libtest prints "test client_role ... " in front of the first line.
        .filter_map(|l| l.find("RESULT ").map(|at| l[at + 7..].to_string()))
        .collect();
    (ok, lines)
}

fn wait_timeout(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads the client's stdout until a `READY` line.
fn wait_ready(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    wait_ready_line(child).0
}

/// Like [`wait_ready`], also returning what follows `READY` on its line.
fn wait_ready_line(child: &mut Child) -> (BufReader<std::process::ChildStdout>, String) {
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "client exited before it was ready");
        if let Some(at) = line.find("READY") {
            let rest = line[at + 5..].to_string();
            return (reader, rest);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client side: runs only in the child processes.

fn fnv(bytes: &[u8]) -> u64 {
    let mut h = accel_abi::FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn report(line: impl AsRef<str>) {
    println!("RESULT {}", line.as_ref());
    eprintln!("[client {}] {}", std::process::id(), line.as_ref());
    std::io::stdout().flush().unwrap();
}

fn cancelled(r: Result<(), Error>) -> Option<CancelReason> {
    match r {
        Err(Error::Cancelled { reason }) => Some(reason),
        _ => None,
    }
}

/// Real work on memory of its own: device fill, copy, checksum and atomics, checked by the CPU.
fn role_work(client: &Arc<DaemonClient>, seed: u64) {
    let mut arena = client.alloc_arena(2 << 20).expect("arena");
    let half = arena.len() / 2;
    let pattern = 0x0101_0101_0101_0101u64.wrapping_mul(seed % 251 + 1);
    client.fill(&mut arena[..half], pattern).expect("fill");
    assert!(arena[..half].iter().all(|b| *b == pattern.to_le_bytes()[0]));
    for (i, b) in arena[..half].iter_mut().enumerate().step_by(4093) {
        *b = (i as u64 ^ seed) as u8;
    }
    let (src, dst) = arena.split_at_mut(half);
    client.copy(dst, src).expect("copy");
    assert_eq!(src, dst);
    let sum = client.checksum(&arena[..half]).expect("checksum");
    assert_eq!(sum, fnv(&arena[..half]));
    // Atomics go to arena memory: place the counter there.
    let slot = &arena[half..half + 8];
    let slot = slot.as_ptr() as *const AtomicU64;
    // SAFETY: 8 aligned bytes of the arena, alive for the whole block; only atomics touch them.
    let counter_in_arena = unsafe { &*slot };
    counter_in_arena.store(0, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..100 {
        client.atomic_add(counter_in_arena, 3).expect("atomic add");
    }
    assert_eq!(
        counter_in_arena.load(std::sync::atomic::Ordering::Relaxed),
        300
    );
    let stats = client.stats().expect("stats");
    assert!(
        stats.pages_mapped > 0 && stats.commands == 103 && stats.arenas == 1,
        "{stats:?}"
    );
    report(format!(
        "work ok asid {} faults {} commands {}",
        client.asid(),
        stats.faults,
        stats.commands
    ));
}

/// Tries to make the device reach memory outside its arenas; reports what happened.
fn role_isolation(client: &Arc<DaemonClient>, daemon_canary: u64, other_arena: u64) {
    // Private memory of our own is out of reach.
    let mut private = vec![0x11u8; 64 << 10];
    let r = client.fill(&mut private, 0x2222_2222_2222_2222);
    report(format!("private {:?}", cancelled(r)));
    assert!(private.iter().all(|b| *b == 0x11));

    // An address in the daemon's own memory (its canary) means nothing in ours: unreachable.
    let op = Op::Fill {
        dst: daemon_canary,
        len: 4096,
        pattern: 0x3333_3333_3333_3333,
    };
    // SAFETY: the address is not ours; the device must refuse it, touching nothing of ours.
    let r = unsafe { client.run(op) }.map(drop);
    report(format!("daemon-address {:?}", cancelled(r)));

    // Another client's arena, by its address: in our address space nothing is there.
    let op = Op::Fill {
        dst: other_arena,
        len: 64 << 10,
        pattern: 0x6666_6666_6666_6666,
    };
    // SAFETY: as above.
    let r = unsafe { client.run(op) }.map(drop);
    report(format!("other-client {:?}", cancelled(r)));

    // A wild address range and a kernel address.
    for (name, dst) in [
        ("wild", 0x7fff_0000_0000u64),
        ("kernel", 0xffff_8000_0000_0000),
    ] {
        let op = Op::Fill {
            dst,
            len: 8192,
            pattern: 1,
        };
        // SAFETY: as above.
        let r = unsafe { client.run(op) }.map(drop);
        report(format!("{name} {}", outcome(&r)));
    }

    // An arena the daemon takes, then replaced under the same address by anonymous memory.
    let mut arena = client.alloc_arena(64 << 10).expect("arena");
    client
        .fill(&mut arena[..], 0x4444_4444_4444_4444)
        .expect("fill arena");
    let va = arena.va();
    // SAFETY: replaces our own arena mapping (which `arena` still owns and will munmap again,
    // harmlessly, on drop) with anonymous memory at the same address.
    let replaced = unsafe {
        libc::mmap(
            va as *mut libc::c_void,
            64 << 10,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    assert_eq!(replaced as u64, va);
    let op = Op::Fill {
        dst: va,
        len: 64 << 10,
        pattern: 0x5555_5555_5555_5555,
    };
    // SAFETY: the anonymous memory at `va` is ours and nothing references it in Rust.
    let r = unsafe { client.run(op) }.map(drop);
    report(format!("replaced-arena {:?}", cancelled(r)));
    // SAFETY: reads the anonymous page mapped above.
    let first = unsafe { *(va as *const u8) };
    report(format!("replaced-arena-byte {first}"));
    std::mem::forget(arena); // its memory is gone from our side; the daemon still unregisters on exit

    // Arenas the daemon must refuse.
    use std::os::fd::AsFd;
    let try_register = |name: &str, va: u64, len: u64, offset: u64, fd| {
        let req = Request::RegisterArena { va, len, offset };
        report(format!(
            "{name} {:?}",
            refusal(client.raw_request(req, &[fd]))
        ));
    };
    let memfd = memfd(64 << 10);
    try_register(
        "unmapped-arena",
        0x6000_0000_0000,
        64 << 10,
        0,
        memfd.as_fd(),
    );
    let tmp = std::env::temp_dir().join(format!("mirrord-notmemfd-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)
        .unwrap();
    file.set_len(64 << 10).unwrap();
    let _ = std::fs::remove_file(&tmp);
    let map_of = |f: &std::fs::File| {
        memmap2::MmapOptions::new()
            .len(64 << 10)
            .map_raw(f)
            .unwrap()
    };
    let (file_map, memfd_map) = (map_of(&file), map_of(&memfd));
    let (file_va, memfd_va) = (file_map.as_ptr() as u64, memfd_map.as_ptr() as u64);
    try_register("regular-file", file_va, 64 << 10, 0, file.as_fd());
    try_register("wrong-offset", memfd_va, 32 << 10, 4096, memfd.as_fd());
    try_register("past-eof", memfd_va, 1 << 20, 0, memfd.as_fd());
}

fn outcome(r: &Result<(), Error>) -> String {
    match r {
        Ok(()) => "SUCCEEDED".into(),
        Err(Error::Cancelled { reason }) => format!("cancelled {reason:?}"),
        Err(e) => format!("failed {e}"),
    }
}

fn refusal(r: Result<Reply, Error>) -> Option<ErrorCode> {
    match r {
        Err(Error::Daemon { code, .. }) => Some(code),
        _ => None,
    }
}

fn memfd(len: u64) -> std::fs::File {
    let fd = nix::sys::memfd::memfd_create(
        c"isolation",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
            | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(len).unwrap();
    f
}

/// Faults forever over a large arena (until killed).
fn role_storm(client: &Arc<DaemonClient>) {
    let arena = client.alloc_arena(48 << 20).expect("arena");
    let mut announced = false;
    let mut round = 0u64;
    loop {
        let chunk = 4 << 20;
        let at = (round as usize * chunk) % arena.len();
        let op = Op::Fill {
            dst: arena.va() + at as u64,
            len: chunk as u64,
            pattern: round,
        };
        // SAFETY: the arena is ours and no reference into it is used while the device runs.
        let ticket = match unsafe { client.submit(op) } {
            Ok(t) => t,
            Err(e) => {
                // The daemon went away (the shutdown test): stop quietly.
                report(format!("storm stopped: {e}"));
                return;
            }
        };
        if !announced {
            println!("READY");
            std::io::stdout().flush().unwrap();
            announced = true;
        }
        let _ = client.wait(ticket);
        // Free the pages so the next round faults again.
        // SAFETY: discards our own arena pages; the daemon hears of it through userfaultfd.
        unsafe {
            libc::madvise(
                (arena.va() + at as u64) as *mut libc::c_void,
                chunk,
                libc::MADV_REMOVE,
            );
        }
        round += 1;
    }
}

/// Keeps device-written data in an arena while others try to reach it; checks it at the end.
fn role_guard(client: &Arc<DaemonClient>) {
    let mut arena = client.alloc_arena(64 << 10).expect("arena");
    client
        .fill(&mut arena[..], 0x7777_7777_7777_7777)
        .expect("fill");
    println!("READY {}", arena.va());
    std::io::stdout().flush().unwrap();
    let mut sink = String::new();
    let _ = std::io::stdin().read_to_string(&mut sink);
    let intact = arena.iter().all(|b| *b == 0x77);
    let sum = client.checksum(&arena[..]).expect("checksum");
    report(format!(
        "guard intact {intact} device-agrees {}",
        sum == fnv(&arena[..])
    ));
}

/// Leaves long commands running and closes its connection while staying alive.
fn role_abandon(client: Arc<DaemonClient>) {
    let arena = client.alloc_arena(32 << 20).expect("arena");
    for _ in 0..client.limits().max_in_flight {
        let op = Op::Checksum {
            src: arena.va(),
            len: arena.len() as u64,
        };
        // SAFETY: the device only reads the arena; its tickets are never waited for.
        let _ = unsafe { client.submit(op) }.expect("submit");
    }
    // Walk away: end the session with the work still running (no unregister, no waits); the
    // process lives on.
    client.goodbye().expect("goodbye");
    std::mem::forget(arena);
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut sink = String::new();
    let _ = std::io::stdin().read_to_string(&mut sink);
}

/// Holds its session until stdin closes.
fn role_hold(_client: &Arc<DaemonClient>) {
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut sink = String::new();
    let _ = std::io::stdin().read_to_string(&mut sink);
}

/// Submits past its in-flight limit, and maps past its pinned-bytes quota.
fn role_quota(client: &Arc<DaemonClient>) {
    let limits = client.limits();
    let mut arena = client.alloc_arena(8 << 20).expect("arena");
    // Checksums of the arena's first MiB (inside the mapped quota), one SUBMIT at a time: each
    // keeps the device busy far longer than a round trip, so the daemon sees more than the
    // limit in flight. (`submit_batch` would not show it: it waits for completions rather than
    // ask past the quota.)
    let mut refused = None;
    let mut tickets = Vec::new();
    for _ in 0..limits.max_in_flight + 6 {
        let op = Op::Checksum {
            src: arena.va(),
            len: 1 << 20,
        };
        // SAFETY: the device only reads the arena, and every ticket is waited for below.
        match unsafe { client.submit(op) } {
            Ok(t) => tickets.push(t),
            Err(e) => {
                refused.get_or_insert(e.to_string());
            }
        }
    }
    report(format!("in-flight-refused {}", refused.unwrap_or_default()));
    for t in tickets {
        client.wait(t).expect("wait");
    }
    let r = client.fill(&mut arena[..], 7);
    let pinned = match r {
        Err(Error::QuotaExceeded { limit, .. }) => format!("limit {limit}"),
        other => format!("{other:?}"),
    };
    report(format!("pinned {pinned}"));
    let s = client.stats().unwrap();
    report(format!("mapped {}", s.mapped_bytes));
}

/// Fills an arena four times the pin budget in chunks, checks every byte, then fills a fresh
/// arena: under the budget the daemon evicts the client's cold mappings instead of cancelling.
fn role_oversubscribe(client: &Arc<DaemonClient>) {
    let chunk = 2 << 20;
    let mut arena = client.alloc_arena(32 << 20).expect("arena");
    let mut max_mapped = 0;
    for (i, piece) in arena.chunks_mut(chunk).enumerate() {
        if let Err(e) = client.fill(piece, 0x0101_0101_0101_0101 * (i as u64 + 1)) {
            report(format!("fill-error {i} {e}"));
            return;
        }
        max_mapped = max_mapped.max(client.stats().unwrap().mapped_bytes);
    }
    let wrong = arena
        .chunks(chunk)
        .enumerate()
        .filter(|(i, piece)| piece.iter().any(|b| *b != *i as u8 + 1))
        .count();
    report(format!("wrong-chunks {wrong}"));
    report(format!("max-mapped {max_mapped}"));
    let mut fresh = client.alloc_arena(64 << 10).expect("second arena");
    match client.fill(&mut fresh[..], 0x7777_7777_7777_7777) {
        Ok(()) => report(format!("fresh-ok {}", fresh.iter().all(|b| *b == 0x77))),
        Err(e) => report(format!("fresh-error {e}")),
    }
}

/// Fills a fresh arena, then does what the test says, one stdin line at a time: `unregister`
/// the arena (it stays mapped), or report its `stats` and end.
fn role_stale(client: &Arc<DaemonClient>) {
    let mut arena = client.alloc_arena(16 << 12).expect("arena");
    client
        .fill(&mut arena[..], 0x5d5d_5d5d_5d5d_5d5d)
        .expect("fill");
    assert!(arena.iter().all(|b| *b == 0x5d));
    report("filled");
    for line in std::io::stdin().lines() {
        match line.unwrap().as_str() {
            "unregister" => {
                let r = client.raw_request(Request::UnregisterArena { va: arena.va() }, &[]);
                report(format!("unregistered {}", r.is_ok()));
            }
            "stats" => {
                let s = client.stats().expect("stats");
                report(format!("failures {} faults {}", s.failures, s.faults));
                break;
            }
            other => panic!("unknown step {other}"),
        }
    }
}

/// Some work on an arena, then what STATS tells this client.
fn role_stats(client: &Arc<DaemonClient>) {
    let mut arena = client.alloc_arena(64 << 10).expect("arena");
    client.fill(&mut arena[..], 0x3c).expect("fill");
    let s = client.stats().expect("stats");
    report(format!(
        "stats uid {} pages {} clients {} mapped-total {} iova {} tables {}",
        nix::unistd::getuid(),
        s.pages_mapped,
        s.clients,
        s.mapped_bytes_total,
        s.iova_bytes,
        s.table_pages_in_use
    ));
}

/// Fills its arena over and over (its whole in-flight quota), says READY with the work in
/// flight, then waits for every command and reports how each ended, and how a submit after
/// them ends. The device is killed meanwhile.
fn role_lose(client: &Arc<DaemonClient>) {
    let arena = client.alloc_arena(32 << 20).expect("arena");
    let tickets: Vec<_> = (0..client.limits().max_in_flight as u64)
        .map(|i| {
            let op = Op::Fill {
                dst: arena.va(),
                len: arena.len() as u64,
                pattern: i,
            };
            // SAFETY: no reference into the arena is used while the commands run.
            unsafe { client.submit(op) }.expect("submit")
        })
        .collect();
    println!("READY");
    std::io::stdout().flush().unwrap();
    let (mut ok, mut lost, mut other) = (0, 0, Vec::new());
    let mut text = String::new();
    for t in tickets {
        match client.wait(t) {
            Ok(_) => ok += 1,
            Err(e @ Error::DeviceLost(_)) => {
                lost += 1;
                text = e.to_string();
            }
            Err(e) => {
                // Not the loss (a reply timeout): the rest would only time out too.
                other.push(e.to_string());
                break;
            }
        }
    }
    let op = Op::Fill {
        dst: arena.va(),
        len: 4096,
        pattern: 0,
    };
    // SAFETY: as above.
    let next = match unsafe { client.submit(op) } {
        Ok(_) => "accepted".to_string(),
        Err(Error::DeviceLost(_)) => "device-lost".to_string(),
        Err(e) => format!("other: {e}"),
    };
    report(format!("ok {ok} lost {lost} other {other:?} next {next}"));
    report(format!("text {text}"));
    // The arena's unregister fails (the daemon is gone): leak it rather than wait.
    std::mem::forget(arena);
}

#[test]
#[ignore = "the client processes of the daemon tests run this"]
fn client_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(SOCKET_ENV).unwrap());
    let arg = std::env::var(ARG_ENV).unwrap_or_default();
    if role == "listen" {
        role_listen(&socket);
        return;
    }
    if let Some(uid) = std::env::var(UID_ENV)
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
    {
        let dropped = nix::unistd::setgroups(&[])
            .and_then(|()| nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)))
            .and_then(|()| nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)));
        if let Err(e) = dropped {
            report(format!("setuid-error {e}"));
            return;
        }
    }
    let client = match DaemonClient::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            report(format!("connect-error {e}"));
            return;
        }
    };
    match role.as_str() {
        "work" => role_work(&client, arg.parse().unwrap_or(1)),
        "isolation" => {
            let (canary, other) = arg.split_once(',').unwrap();
            role_isolation(&client, canary.parse().unwrap(), other.parse().unwrap())
        }
        "guard" => role_guard(&client),
        "abandon" => role_abandon(client),
        "storm" => role_storm(&client),
        "hold" => role_hold(&client),
        "quota" => role_quota(&client),
        "oversubscribe" => role_oversubscribe(&client),
        "stats" => role_stats(&client),
        "stale" => role_stale(&client),
        "lose" => role_lose(&client),
        "batch" => role_batch(&client, arg.parse().unwrap()),
        "dead" => role_dead(&client),
        "mapped" => role_mapped(&client),
        "transfer" => role_transfer(&client),
        "arenas" => role_arenas(&client),
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn eight_concurrent_clients_compute_on_their_own_memory() {
    for mode in [ServiceMode::Interrupt, ServiceMode::Polling] {
        let d = TestDaemon::start("eight", mode, |_| {});
        let children: Vec<Child> = (0..8).map(|i| d.client("work", &i.to_string())).collect();
        let mut asids = Vec::new();
        for child in children {
            let (ok, lines) = finish(child);
            assert!(ok, "a client failed: {lines:?}");
            let line = lines
                .iter()
                .find(|l| l.starts_with("work ok"))
                .expect("report");
            asids.push(line.split_whitespace().nth(3).unwrap().to_string());
        }
        asids.sort();
        asids.dedup();
        assert_eq!(
            asids.len(),
            8,
            "every client had its own device address space"
        );
        let s = d.settle();
        assert_eq!((s.clients, s.mapped_bytes_total, s.released), (0, 0, 8));
        d.stop();
    }
}

#[test]
fn clients_cannot_reach_memory_outside_their_arenas() {
    let canary = vec![0xa5u8; 4096];
    let d = TestDaemon::start("isolation", ServiceMode::Interrupt, |_| {});
    let mut guard = d.client("guard", "");
    let mut guard_out = wait_ready_line(&mut guard);
    let other_arena: u64 = guard_out.1.trim().parse().unwrap();
    let child = d.client(
        "isolation",
        &format!("{},{other_arena}", canary.as_ptr() as u64),
    );
    let (ok, lines) = finish(child);
    assert!(ok, "isolation client failed: {lines:?}");
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k} ")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {k} in {lines:?}"))
    };
    assert_eq!(get("private"), "Some(Unreachable)");
    // Nothing of the client's is mapped at those addresses: no CPU mapping to mirror at all.
    assert_eq!(get("daemon-address"), "Some(NoMapping)");
    assert_eq!(get("other-client"), "Some(NoMapping)");
    assert_eq!(get("wild"), "cancelled NoMapping");
    assert!(!get("kernel").contains("SUCCEEDED"), "{lines:?}");
    assert_eq!(get("replaced-arena"), "Some(Unreachable)");
    assert_eq!(get("replaced-arena-byte"), "0");
    assert_eq!(get("unmapped-arena"), "Some(InvalidArgument)");
    assert_eq!(get("regular-file"), "Some(InvalidArgument)");
    assert_eq!(get("wrong-offset"), "Some(InvalidArgument)");
    assert_eq!(get("past-eof"), "Some(InvalidArgument)");
    assert!(
        canary.iter().all(|b| *b == 0xa5),
        "the daemon's memory changed"
    );
    drop(guard.stdin.take());
    let mut rest = String::new();
    guard_out.0.read_to_string(&mut rest).unwrap();
    assert!(wait_timeout(&mut guard, Duration::from_secs(30)));
    assert!(
        rest.contains("guard intact true device-agrees true"),
        "the other client's arena changed: {rest}"
    );
    let s = d.settle();
    assert_eq!((s.clients, s.mapped_bytes_total), (0, 0));
    d.stop();
}

/// Reads the client's report lines until one starting with `want`; returns the rest of it.
fn expect_report(out: &mut impl BufRead, want: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the client exited before reporting {want}"
        );
        if let Some(at) = line.find(&format!("RESULT {want}")) {
            return line[at + 7 + want.len()..].trim().to_string();
        }
    }
}

/// What the daemon saw on kernel VFIO in a slow guest (four clients allocating, filling and
/// unregistering arenas): fault records drained after the replay that retried their work
/// item, by then complete, and its arena unregistered. They were serviced as new faults, found
/// outside every arena, counted as the client's failures (10 to 16 per client), and their items
/// cancelled although they were not stalled (the device latched BAD_REGISTER_VALUE at
/// FAULT_CANCEL). Here the same order of events is forced: the service holds the batch with
/// the fill's records after its drain, a replay from another thread makes the item post them
/// again, the held batch maps the arena and replays (the fill completes), and the second
/// records are held until the client has unregistered the arena.
#[test]
fn records_drained_after_their_item_was_replayed_fail_nothing() {
    for mode in [ServiceMode::Interrupt, ServiceMode::Polling] {
        let d = TestDaemon::start("stale", mode, |_| {});
        let rt = d.daemon.runtime().clone();
        let (drained_tx, drained) = std::sync::mpsc::channel::<usize>();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (drained_tx, go_rx) = (
            std::sync::Mutex::new(drained_tx),
            std::sync::Mutex::new(go_rx),
        );
        let wait = Duration::from_secs(20);
        rt.service().set_drain_hook(Some(Arc::new(
            move |records: &[accel_abi::FaultRecord]| {
                if !records.is_empty() && drained_tx.lock().unwrap().send(records.len()).is_ok() {
                    let _ = go_rx.lock().unwrap().recv_timeout(wait);
                }
            },
        )));
        let mut client = d.client("stale", "");
        let mut to_client = client.stdin.take().unwrap();
        let mut out = BufReader::new(client.stdout.take().unwrap());
        drained.recv_timeout(wait).expect("the fill's first stall");
        rt.device().replay().unwrap();
        let deadline = Instant::now() + wait;
        while !rt.device().fault_pending() {
            assert!(Instant::now() < deadline, "the item did not fault again");
            std::thread::sleep(Duration::from_millis(1));
        }
        go.send(()).unwrap();
        drained.recv_timeout(wait).expect("the second records");
        expect_report(&mut out, "filled");
        writeln!(to_client, "unregister").unwrap();
        assert_eq!(expect_report(&mut out, "unregistered"), "true");
        let service = rt.service().stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let batches = load(&service.batches);
        go.send(()).unwrap();
        while load(&service.batches) == batches {
            assert!(Instant::now() < deadline, "the held batch was not serviced");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(drained);
        let latched = rt.device().take_error().unwrap();
        let cancels = [
            &service.device_errors,
            &service.cancels,
            &service.cancels_refused,
        ]
        .map(load);
        assert_eq!(
            (latched, cancels),
            (None, [0; 3]),
            "a stale record cancelled a work item that was not stalled"
        );
        assert!(
            load(&service.replayed_failed) > 0,
            "the held records were not the stale ones: {service:?}"
        );
        writeln!(to_client, "stats").unwrap();
        let stats = expect_report(&mut out, "failures");
        assert!(stats.starts_with("0 "), "the client's failures: {stats}");
        drop(to_client);
        assert!(wait_timeout(&mut client, Duration::from_secs(30)));
        rt.service().set_drain_hook(None);
        drop(rt);
        let s = d.settle();
        assert_eq!((s.clients, s.mapped_bytes_total), (0, 0));
        d.stop();
    }
}

#[test]
fn killed_clients_release_everything() {
    let d = TestDaemon::start("kill", ServiceMode::Interrupt, |_| {});
    let baseline = d.daemon.stats();
    let survivor = d.client("hold", "");
    let mut survivor = survivor;
    let _out = wait_ready(&mut survivor);
    for round in 0..5 {
        let mut storm = d.client("storm", "");
        let _out = wait_ready(&mut storm);
        // Let it get into the middle of fault batches.
        std::thread::sleep(Duration::from_millis(20 + 15 * round));
        storm.kill().unwrap();
        storm.wait().unwrap();
    }
    // The survivor still works after all that.
    let (ok, lines) = finish(d.client("work", "9"));
    assert!(ok, "a client after the kills failed: {lines:?}");
    drop(survivor.stdin.take());
    assert!(wait_timeout(&mut survivor, Duration::from_secs(30)));
    let s = d.settle();
    assert_eq!(s.clients, 0);
    assert_eq!(s.mapped_bytes_total, 0, "pins left behind");
    assert_eq!(s.quarantined, 0, "an address space was quarantined");
    assert_eq!(s.table_pages_in_use, 0, "device page tables left behind");
    // The table pool keeps its chunks for reuse; everything else returns to the baseline.
    assert_eq!(
        s.iova_bytes - s.table_pool_bytes,
        baseline.iova_bytes - baseline.table_pool_bytes,
        "IOVA usage did not return to the baseline"
    );
    assert_eq!(s.released, 7);
    d.stop();
}

#[test]
fn quotas_and_limits_are_named() {
    let d = TestDaemon::start("quota", ServiceMode::Interrupt, |c| {
        c.limits.max_in_flight = 4;
        c.limits.max_mapped_bytes = 1 << 20;
        c.max_clients = 3;
        c.max_clients_per_uid = 2;
    });
    let (ok, lines) = finish(d.client("quota", ""));
    assert!(ok, "{lines:?}");
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k} ")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {k} in {lines:?}"))
    };
    assert!(
        get("in-flight-refused").contains("in-flight commands per client is 4"),
        "{lines:?}"
    );
    assert_eq!(get("pinned"), format!("limit {}", 1 << 20), "{lines:?}");
    assert!(get("mapped").parse::<u64>().unwrap() <= 1 << 20);

    let mut a = d.client("hold", "");
    let _ra = wait_ready(&mut a);
    let mut b = d.client("hold", "");
    let _rb = wait_ready(&mut b);
    let (_, lines) = finish(d.client("hold", ""));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("connect-error") && l.contains("clients per uid is 2")),
        "{lines:?}"
    );
    for mut c in [a, b] {
        drop(c.stdin.take());
        assert!(wait_timeout(&mut c, Duration::from_secs(30)));
    }
    d.stop();
}

/// A client that fills four times its pin budget is not cancelled (it was, with `Quota`, at
/// exactly the mapped-bytes quota before the daemon evicted): its cold mappings are evicted,
/// its data is right, it never has more than the budget mapped, and a fresh arena afterwards
/// works.
#[test]
fn a_client_past_its_pin_budget_is_evicted_not_cancelled() {
    let budget = 8 << 20;
    let d = TestDaemon::start("oversub", ServiceMode::Polling, |c| {
        c.limits.max_mapped_bytes = budget;
        c.pin_budget_per_client = Some(budget);
    });
    let (ok, lines) = finish(d.client("oversubscribe", ""));
    assert!(ok, "{lines:?}");
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k} ")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {k} in {lines:?}"))
    };
    assert_eq!(get("wrong-chunks"), "0", "{lines:?}");
    assert!(
        get("max-mapped").parse::<u64>().unwrap() <= budget,
        "{lines:?}"
    );
    assert_eq!(get("fresh-ok"), "true", "{lines:?}");
    d.stop();
}

#[test]
fn uids_off_the_allow_list_are_refused() {
    let d = TestDaemon::start("uid", ServiceMode::Interrupt, |c| {
        c.allowed_uids = vec![nix::unistd::getuid().as_raw().wrapping_add(4242)];
    });
    let (_, lines) = finish(d.client("hold", ""));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("connect-error") && l.contains("is not allowed")),
        "{lines:?}"
    );
    d.stop();
}

#[test]
fn a_flooding_client_does_not_starve_another() {
    let d = TestDaemon::start("fair", ServiceMode::Interrupt, |_| {});
    let mut storms: Vec<Child> = (0..2).map(|_| d.client("storm", "")).collect();
    for s in &mut storms {
        let _ = wait_ready(s);
    }
    // While two clients flood the fault buffer, a third gets its work done.
    let (ok, lines) = finish(d.client("work", "5"));
    assert!(ok, "{lines:?}");
    for mut s in storms {
        s.kill().unwrap();
        s.wait().unwrap();
    }
    let s = d.settle();
    assert_eq!((s.clients, s.mapped_bytes_total), (0, 0));
    d.stop();
}

// --- raw protocol misbehaviour, from this process --------------------------------------------

fn raw_connect(d: &TestDaemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one frame; `None` at end of stream.
fn read_frame(s: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut head = [0u8; HEADER_SIZE];
    s.read_exact(&mut head).ok()?;
    let h = Header::decode_lenient(&head).expect("daemon frames decode");
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload).ok()?;
    Some((h, payload))
}

fn error_code(frame: &(Header, Vec<u8>)) -> Option<ErrorCode> {
    match Reply::decode(frame.0.kind & !protocol::REPLY, &frame.1) {
        Ok(Reply::Error { code, .. }) => Some(code),
        _ => None,
    }
}

#[test]
fn malformed_and_out_of_order_messages_get_errors_then_a_disconnect() {
    let d = TestDaemon::start("malformed", ServiceMode::Interrupt, |c| c.max_strikes = 3);
    // Out of order: SUBMIT before HELLO, three times, then the fourth disconnects.
    let mut s = raw_connect(&d);
    let (k, p) = Request::Submit {
        tag: 1,
        op: Op::Checksum { src: 0, len: 8 },
    }
    .encode();
    for i in 0..4 {
        s.write_all(&protocol::frame(k, i + 1, &p)).unwrap();
        let f = read_frame(&mut s).expect("an error reply");
        assert_eq!(f.0.id, i + 1);
        assert_eq!(error_code(&f), Some(ErrorCode::OutOfOrder));
    }
    assert!(
        read_frame(&mut s).is_none(),
        "disconnected after the strikes"
    );

    // Oversized: answered, skipped, and the stream stays usable.
    let mut s = raw_connect(&d);
    let mut big = Header {
        kind: kind::STATS,
        id: 9,
        len: protocol::MAX_PAYLOAD + 100,
    }
    .encode()
    .to_vec();
    big.extend(std::iter::repeat_n(
        0u8,
        protocol::MAX_PAYLOAD as usize + 100,
    ));
    s.write_all(&big).unwrap();
    let f = read_frame(&mut s).unwrap();
    assert_eq!((f.0.id, error_code(&f)), (9, Some(ErrorCode::TooLarge)));
    s.write_all(&protocol::frame(0x77, 10, &[])).unwrap();
    let f = read_frame(&mut s).unwrap();
    assert_eq!((f.0.id, error_code(&f)), (10, Some(ErrorCode::BadMessage)));

    // Bad magic: answered, then disconnected (the stream cannot be resynchronised).
    let mut s = raw_connect(&d);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let f = read_frame(&mut s).unwrap();
    assert_eq!(error_code(&f), Some(ErrorCode::BadMessage));
    assert!(read_frame(&mut s).is_none());

    // A version nobody speaks.
    let mut s = raw_connect(&d);
    let (k, p) = Request::Hello {
        min_version: 7,
        max_version: 9,
    }
    .encode();
    s.write_all(&protocol::frame(k, 1, &p)).unwrap();
    let f = read_frame(&mut s).unwrap();
    assert_eq!(error_code(&f), Some(ErrorCode::Version));
    let mut v2 = protocol::frame(kind::STATS, 2, &[]);
    v2[4] = 2;
    let mut s = raw_connect(&d);
    s.write_all(&v2).unwrap();
    let f = read_frame(&mut s).unwrap();
    assert_eq!(error_code(&f), Some(ErrorCode::Version));

    // HELLO without its userfaultfd.
    let mut s = raw_connect(&d);
    let (k, p) = Request::Hello {
        min_version: 1,
        max_version: 1,
    }
    .encode();
    s.write_all(&protocol::frame(k, 3, &p)).unwrap();
    let f = read_frame(&mut s).unwrap();
    assert_eq!(error_code(&f), Some(ErrorCode::BadMessage));

    // The daemon still serves a real client.
    let (ok, lines) = finish(d.client("work", "3"));
    assert!(ok, "{lines:?}");
    d.stop();
}

#[test]
fn random_bytes_never_take_the_daemon_down() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let d = TestDaemon::start("fuzz", ServiceMode::Interrupt, |_| {});
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    let frames = prop_oneof![
        // Well-framed, random kind and payload.
        (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(k, p)| { protocol::frame(k % 8, 1, &p) }),
        // Random everything.
        proptest::collection::vec(any::<u8>(), 0..200),
        // A valid header announcing more than follows.
        (any::<u16>(), 1u32..4096).prop_map(|(k, len)| {
            Header {
                kind: k,
                id: 1,
                len,
            }
            .encode()
            .to_vec()
        }),
    ];
    runner
        .run(&proptest::collection::vec(frames, 1..6), |msgs| {
            let mut s = raw_connect(&d);
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            for m in msgs {
                if s.write_all(&m).is_err() {
                    break;
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
            Ok(())
        })
        .unwrap();
    let (ok, lines) = finish(d.client("work", "4"));
    assert!(
        ok,
        "the daemon stopped serving after the fuzzing: {lines:?}"
    );
    d.stop();
}

#[test]
fn mirrorctl_serve_shuts_down_gracefully_on_sigterm() {
    let dir = TempDir::new("serve");
    let socket = dir.0.join("mirrord.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_mirrorctl"))
        .args(["serve", "--socket"])
        .arg(&socket)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&socket, "mirrorctl serve");
    let (ok, lines) = finish(spawn_client(&socket, "work", "2"));
    assert!(ok, "{lines:?}");
    let mut holder = spawn_client(&socket, "hold", "");
    let _out = wait_ready(&mut holder);
    // And one with commands and faults in flight when the signal comes.
    let mut busy = spawn_client(&socket, "storm", "");
    let _busy_out = wait_ready(&mut busy);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exited = wait_timeout(&mut daemon, Duration::from_secs(30));
    let mut log = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        exited,
        "mirrorctl serve did not exit 0 after SIGTERM:\n{log}"
    );
    assert!(!socket.exists(), "the socket was not removed");
    assert!(
        log.matches("client released").count() >= 3,
        "every client released:\n{log}"
    );
    assert!(log.contains("mirrord stopped"), "{log}");
    // The busy client's next submit fails (connection closed): it exits on its own.
    let _ = wait_timeout(&mut busy, Duration::from_secs(30));
    // The holder's session is gone; it exits when told to.
    drop(holder.stdin.take());
    assert!(wait_timeout(&mut holder, Duration::from_secs(30)));
}

#[test]
fn clients_work_with_the_device_in_another_process() {
    // Three kinds of process: the device (a vfio-user server), the daemon, the clients. Arena
    // memory reaches the device process by fd.
    let dir = TempDir::new("vfio-user");
    let device_socket = dir.0.join("device.sock");
    let mut device = Command::new(env!("CARGO_BIN_EXE_mirrorctl"))
        .args(["emulate", "--socket"])
        .arg(&device_socket)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&device_socket, "mirrorctl emulate");
    let d = TestDaemon::start_on(
        "over-vfio-user",
        DeviceSpec::VfioUser(device_socket),
        ServiceMode::Interrupt,
        |_| {},
    );
    let children: Vec<Child> = (0..2).map(|i| d.client("work", &i.to_string())).collect();
    for child in children {
        let (ok, lines) = finish(child);
        assert!(ok, "a client failed over vfio-user: {lines:?}");
    }
    let s = d.settle();
    assert_eq!((s.clients, s.mapped_bytes_total), (0, 0));
    d.stop();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(device.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_timeout(&mut device, Duration::from_secs(30)));
}

/// A child process killed and reaped when the test ends, even by a failed assertion.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A device process (`mirrorctl emulate`) serving on `socket`, once it listens.
fn spawn_device(socket: &Path) -> Reaped {
    let device = Reaped(
        Command::new(env!("CARGO_BIN_EXE_mirrorctl"))
            .args(["emulate", "--socket"])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(socket, "mirrorctl emulate");
    device
}

#[test]
fn a_lost_device_fails_every_clients_work_and_the_daemon_exits_saying_why() {
    // The device (a vfio-user server), `mirrorctl serve` on it, two clients with their whole
    // in-flight quota running; then the device process is SIGKILLed.
    let dir = TempDir::new("lost");
    let device_socket = dir.0.join("device.sock");
    let socket = dir.0.join("mirrord.sock");
    let mut device = spawn_device(&device_socket);
    let mut daemon = Reaped(
        Command::new(env!("CARGO_BIN_EXE_mirrorctl"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--vfio-user")
            .arg(&device_socket)
            // No device share: each client's whole quota is on the device when it is killed
            // (with the share, the submits would wait for one another's 32 MiB fills).
            .args(["--device-mib-per-client", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut log = daemon.0.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = log.read_to_string(&mut text);
        text
    });
    wait_for_socket(&socket, "mirrorctl serve");
    let device_name = device_socket.display().to_string();
    let mut clients: Vec<Child> = (0..2)
        .map(|_| spawn_client(&socket, "lose", &device_name))
        .collect();
    let outs: Vec<_> = clients.iter_mut().map(wait_ready).collect();
    let killed = Instant::now();
    device.0.kill().unwrap();
    let _ = device.0.wait();
    // Generous bounds that tell "noticed" from "timed out" (a client's reply timeout is 30 s).
    let prompt = Duration::from_secs(10);
    for (mut child, mut out) in clients.into_iter().zip(outs) {
        let summary = expect_report(&mut out, "ok ");
        let after = killed.elapsed();
        let text = expect_report(&mut out, "text ");
        assert!(
            wait_timeout(&mut child, Duration::from_secs(30)),
            "the client did not finish"
        );
        assert!(
            after < prompt,
            "a client's waits ended {after:?} after the kill"
        );
        assert!(
            summary.contains("other []") && summary.contains("next device-lost"),
            "every command not done before the kill fails with the loss, and so does the              next submit: {summary}"
        );
        assert!(
            !summary.contains("lost 0 "),
            "no command was in flight at the kill: {summary}"
        );
        assert!(
            text.contains(&device_name) && text.contains("lost"),
            "the error names the lost device: {text}"
        );
    }
    // The daemon then exits, non-zero, saying why, with its socket removed.
    let exited = Instant::now();
    let status = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break Some(status);
        }
        if exited.elapsed() > Duration::from_secs(30) {
            let _ = daemon.0.kill();
            let _ = daemon.0.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = log.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("mirrorctl serve did not exit:\n{log}"));
    assert!(!status.success(), "it exits non-zero: {status}\n{log}");
    assert!(
        log.lines().any(|l| l.starts_with("mirrorctl: ")
            && l.contains(&device_name)
            && l.contains("lost")),
        "its last word names the lost device:\n{log}"
    );
    assert!(log.contains("every client told"), "{log}");
    eprintln!("mirrorctl serve's log:\n{log}");
    assert!(!socket.exists(), "the socket was not removed");
}

#[test]
fn the_daemon_counts_the_device_loss_and_serve_returns_it() {
    // In process this time, to read the daemon's own figures after the loss.
    let dir = TempDir::new("lost-stats");
    let device_socket = dir.0.join("device.sock");
    let mut device = spawn_device(&device_socket);
    let mut d = TestDaemon::start_on(
        "lost-stats",
        DeviceSpec::VfioUser(device_socket.clone()),
        ServiceMode::Polling,
        // As above: the whole quota on the device at the kill.
        |c| c.device_bytes_per_client = 0,
    );
    let device_name = device_socket.display().to_string();
    let mut child = d.client("lose", &device_name);
    let mut out = wait_ready(&mut child);
    assert_eq!(d.daemon.stats().device_lost, 0);
    device.0.kill().unwrap();
    let _ = device.0.wait();
    let summary = expect_report(&mut out, "ok ");
    assert!(
        summary.contains("other []") && !summary.contains("lost 0 "),
        "{summary}"
    );
    assert!(wait_timeout(&mut child, Duration::from_secs(30)));
    let s = d.daemon.stats();
    assert_eq!(s.device_lost, 1, "{s:?}");
    assert!(s.lost_commands >= 1, "{s:?}");
    assert_eq!(s.quarantined, 0, "{s:?}");
    // serve() ends by itself, with the loss.
    let served = d.thread.take().unwrap().join().expect("daemon thread");
    match served {
        Err(Error::DeviceLost(lost)) => assert_eq!(lost.device, device_name),
        other => panic!("serve returned {other:?}"),
    }
    assert!(!d.socket.exists(), "the socket was not removed");
    assert_eq!(d.daemon.runtime().contexts_released_on_lost_device(), 1);
}

#[test]
fn the_daemon_benchmark_runs_its_client_processes() {
    use driver_bench::daemon::{measure, DaemonBenchSpec};
    let spec = DaemonBenchSpec {
        clients: vec![1, 3],
        rounds: 3,
        pages: 32,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_mirrorctl")),
        mode: ServiceMode::Interrupt,
    };
    let points = measure(&spec).expect("the daemon benchmark");
    assert_eq!(points.len(), 2);
    for p in &points {
        // Functional checks only: figures are the benchmark's business, not the test's.
        assert!(
            p.pages_per_s > 0.0 && p.p50_us > 0.0 && p.p99_us >= p.p50_us,
            "{p:?}"
        );
    }
    eprintln!("{points:?}");
    assert_eq!((points[0].clients, points[1].clients), (1, 3));
}

#[test]
fn a_client_that_walks_away_from_running_work_costs_nobody_anything() {
    let d = TestDaemon::start("abandon", ServiceMode::Interrupt, |_| {});
    let mut quitter = d.client("abandon", "");
    let _out = wait_ready(&mut quitter);
    let s = d.settle();
    assert_eq!(
        (s.clients, s.mapped_bytes_total, s.quarantined),
        (0, 0, 0),
        "{s:?}"
    );
    // The device queue (256 slots) still works all the way round for everyone else.
    for seed in 0..3 {
        let (ok, lines) = finish(d.client("work", &seed.to_string()));
        assert!(ok, "{lines:?}");
    }
    drop(quitter.stdin.take());
    assert!(wait_timeout(&mut quitter, Duration::from_secs(30)));
    d.stop();
}

/// Descriptors of this process that are memfds made by [`memfd`] (tests run in parallel threads
/// of one process, so counting every fd would see the others' come and go).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:isolation"))
        .count()
}

#[test]
fn extra_file_descriptors_are_refused_and_closed() {
    use std::os::fd::AsFd;
    let d = TestDaemon::start("fds", ServiceMode::Interrupt, |c| c.max_strikes = 10);
    let memfds: Vec<std::fs::File> = (0..6).map(|_| memfd(4096)).collect();
    let before = open_fds();
    assert!(before >= 6);
    for round in 0..5 {
        let s = raw_connect(&d);
        let (k, p) = Request::Hello {
            min_version: 1,
            max_version: 1,
        }
        .encode();
        let fds: Vec<_> = memfds.iter().map(|f| f.as_fd()).collect();
        let frame = protocol::frame(k, round + 1, &p);
        mirrord_client::unix_msg::send(s.as_fd(), &frame, &fds).unwrap();
        let mut s = s;
        let f = read_frame(&mut s).expect("an answer");
        assert_eq!(error_code(&f), Some(ErrorCode::BadMessage));
    }
    // Every descriptor the daemon received was closed again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(open_fds() <= before, "{} fds leaked", open_fds() - before);
    d.stop();
}

#[test]
fn a_connection_that_never_says_hello_is_closed() {
    // Long enough that the refused client process below starts and connects while the slot is
    // still held, even on a loaded machine (2 s was not, once, under the whole workspace's tests).
    let d = TestDaemon::start("hello-timeout", ServiceMode::Interrupt, |c| {
        c.hello_timeout = Duration::from_secs(8);
        c.max_handshakes = 1;
    });
    let mut s = raw_connect(&d);
    s.write_all(b"MXD1").unwrap(); // half a header, then nothing
                                   // Meanwhile it holds the only handshake slot: anybody else is refused at the door.
    let (_, lines) = finish(d.client("hold", ""));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("connect-error") && l.contains("connections before HELLO")),
        "{lines:?}"
    );
    let f = read_frame(&mut s).expect("an answer");
    assert_eq!(error_code(&f), Some(ErrorCode::OutOfOrder));
    assert!(read_frame(&mut s).is_none(), "closed after the answer");
    // Its slot is free again.
    let (ok, lines) = finish(d.client("work", "1"));
    assert!(ok, "{lines:?}");
    d.stop();
}

/// STATS shows a client of another uid its own figures only: the daemon-wide ones (how many
/// clients, everyone's mapped bytes, IOVA and table use) would tell it about other users' work.
/// The daemon's own uid (the operator) sees them.
#[test]
fn other_uids_see_only_their_own_statistics() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIP other_uids_see_only_their_own_statistics: needs root to run a client as uid {OTHER_UID}");
        return;
    }
    let own = nix::unistd::getuid().as_raw();
    let d = TestDaemon::start("stats-uid", ServiceMode::Interrupt, |c| {
        c.allowed_uids = vec![own, OTHER_UID];
    });
    let fields = |lines: &[String]| -> Vec<u64> {
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix("stats "))
            .unwrap_or_else(|| panic!("no stats line in {lines:?}"));
        line.split_whitespace()
            .skip(1)
            .step_by(2)
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let (ok, lines) = finish(d.client_as(OTHER_UID, "stats", ""));
    if lines.iter().any(|l| l.starts_with("setuid-error")) {
        eprintln!("SKIP other_uids_see_only_their_own_statistics: {lines:?}");
        d.stop();
        return;
    }
    assert!(ok, "{lines:?}");
    // uid, own pages, clients, mapped-total, iova, tables
    let other = fields(&lines);
    assert_eq!(other[0], u64::from(OTHER_UID), "{lines:?}");
    assert!(other[1] > 0, "its own figures are there: {lines:?}");
    assert_eq!(
        &other[2..],
        &[0, 0, 0, 0],
        "no daemon-wide figures: {lines:?}"
    );
    let (ok, lines) = finish(d.client("stats", ""));
    assert!(ok, "{lines:?}");
    let operator = fields(&lines);
    assert!(operator[1] > 0, "{lines:?}");
    assert!(
        operator[2] >= 1 && operator[3] > 0 && operator[4] > 0 && operator[5] > 0,
        "the operator sees the daemon: {lines:?}"
    );
    d.settle();
    d.stop();
}

// ---------------------------------------------------------------------------------------------
// Isolation and error promises against a hostile local user (issue 15, items 4, 5, 11, 12). The
// daemon runs as `mirrorctl serve`. Processes that must run as another uid are dropped to it by
// `Command::uid` at exec, so they stay dumpable like any process a user starts (a setuid inside
// a running process, as `client_as` does, makes it non-dumpable and would hide exactly what
// these tests look for).

impl TempDir {
    /// A directory another uid may create its socket in.
    fn for_uid(tag: &str, uid: u32) -> TempDir {
        let dir = TempDir::new(tag);
        nix::unistd::chown(
            &dir.0,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(uid)),
        )
        .unwrap();
        dir
    }
}

/// `mirrorctl serve` on `socket` with `flags`, as `uid` if given.
fn serve(socket: &Path, flags: &[&str], uid: Option<u32>) -> Reaped {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mirrorctl"));
    cmd.args(["serve", "--socket"]).arg(socket).args(flags);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let child = cmd
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mirrorctl serve");
    let daemon = Reaped(child);
    wait_for_socket(socket, "mirrorctl serve");
    daemon
}

/// `mirrorctl serve` with `flags` as this test's uid, on a socket of its own.
fn serve_here(tag: &str, flags: &[&str]) -> (TempDir, PathBuf, Reaped) {
    let dir = TempDir::new(tag);
    let socket = dir.0.join("mirrord.sock");
    let daemon = serve(&socket, flags, None);
    (dir, socket, daemon)
}

/// A client process in `role`, run as `uid` from its start if given.
fn spawn_role(socket: &Path, role: &str, arg: &str, uid: Option<u32>) -> Child {
    let mut cmd = client_command(socket, role, arg);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.spawn().expect("spawn a client process")
}

/// The value after `key ` in the client's report lines.
fn reported(lines: &[String], key: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{key} ")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {key} in {lines:?}"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For a test that runs processes as [`OTHER_UID`]: a socket path in a directory that uid may
/// write, or `None` (the test is skipped) without root.
fn socket_for_other_uid(test: &str) -> Option<(TempDir, PathBuf)> {
    if !is_root() {
        eprintln!("SKIP {test}: needs root to run processes as uid {OTHER_UID}");
        return None;
    }
    // A short tag: a socket path has at most 107 bytes.
    let dir = TempDir::for_uid(&test[..test.len().min(4)], OTHER_UID);
    let socket = dir.0.join("mirrord.sock");
    Some((dir, socket))
}

/// A process of [`OTHER_UID`] listening on `socket` ([`role_listen`]), once it listens.
fn impostor_on(socket: &Path) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut impostor = spawn_role(socket, "listen", "", Some(OTHER_UID));
    let out = wait_ready(&mut impostor);
    (impostor, out)
}

/// `arg` fills of 4 KiB each, one per page of an arena, in one `submit_batch`; every one must
/// be accepted and complete, and the CPU must see each page's own pattern.
fn role_batch(client: &Arc<DaemonClient>, count: usize) {
    let mut arena = client.alloc_arena(count * 4096).expect("arena");
    let ops: Vec<Op> = (0..count)
        .map(|i| Op::Fill {
            dst: arena.va() + (i * 4096) as u64,
            len: 4096,
            pattern: 0x0101_0101_0101_0101 * (i as u64 % 255 + 1),
        })
        .collect();
    let started = Instant::now();
    // SAFETY: no reference into the arena is used until every ticket is waited for.
    let results = unsafe { client.submit_batch(&ops) };
    let submit_time = started.elapsed();
    let mut refused = Vec::new();
    let mut tickets = Vec::new();
    for r in results {
        match r {
            Ok(t) => tickets.push(t),
            Err(e) => refused.push(e.to_string()),
        }
    }
    let refused_count = refused.len();
    let mut failed = 0;
    for t in tickets {
        if client.wait(t).is_err() {
            failed += 1;
        }
    }
    let wrong = (0..count)
        .filter(|i| {
            let want = (*i as u64 % 255 + 1) as u8;
            arena[i * 4096..(i + 1) * 4096].iter().any(|b| *b != want)
        })
        .count();
    eprintln!(
        "[client] {count} ops submitted in {submit_time:?}, in flight at most {}",
        client.limits().max_in_flight
    );
    refused.truncate(3);
    report(format!(
        "batch refused {refused_count} failed {failed} wrong-pages {wrong} first-refusals {refused:?}"
    ));
    let _ = &mut arena;
}

/// Ends its session, then asks again and again: the error must not grow.
fn role_dead(client: &Arc<DaemonClient>) {
    client.goodbye().expect("goodbye");
    let mut lengths = Vec::new();
    let mut last = String::new();
    for _ in 0..1000 {
        let e = client.stats().expect_err("a dead session answers nothing");
        last = e.to_string();
        lengths.push(last.len());
    }
    report(format!(
        "dead first {} last {} max {}",
        lengths[0],
        lengths[999],
        lengths.iter().max().unwrap()
    ));
    report(format!("dead-text {last}"));
}

/// Maps past the mapped-bytes quota; reports the error.
fn role_mapped(client: &Arc<DaemonClient>) {
    let mut arena = client.alloc_arena(8 << 20).expect("arena");
    let e = client
        .fill(&mut arena[..], 7)
        .expect_err("8 MiB cannot be mapped under a 1 MiB quota");
    report(format!("mapped-text {e}"));
}

/// One command longer than the device's maximum transfer (the emulator's: 64 MiB).
fn role_transfer(client: &Arc<DaemonClient>) {
    let len = (64 << 20) + 4096;
    let mut arena = client.alloc_arena(len).expect("arena");
    let e = client
        .fill(&mut arena[..], 9)
        .expect_err("longer than the maximum transfer");
    report(format!("transfer-text {e}"));
}

/// Registers arenas until the count limit, and one past the byte limit.
fn role_arenas(client: &Arc<DaemonClient>) {
    let limits = client.limits();
    report(format!(
        "limits arenas {} bytes {}",
        limits.max_arenas, limits.max_arena_bytes
    ));
    let too_big = client
        .alloc_arena(limits.max_arena_bytes as usize + 4096)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    report(format!("bytes-text {too_big}"));
    let mut held = Vec::new();
    let refused = loop {
        match client.alloc_arena(4096) {
            Ok(a) => held.push(a),
            Err(e) => break e.to_string(),
        }
        assert!(held.len() <= 1000, "no arena limit");
    };
    report(format!("count-text {refused}"));
    report(format!("held {}", held.len()));
}

/// Binds `socket` and reports what the first connection sent: its bytes and descriptors.
fn role_listen(socket: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind");
    report(format!("listening uid {}", nix::unistd::geteuid()));
    println!("READY");
    std::io::stdout().flush().unwrap();
    let (stream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut bytes, mut fds) = (0, 0);
    let mut buf = [0u8; 4096];
    loop {
        let mut got = Vec::new();
        match mirrord_client::unix_msg::recv(std::os::fd::AsFd::as_fd(&stream), &mut buf, &mut got)
        {
            Ok((0, _)) | Err(_) => break,
            Ok((n, _)) => {
                bytes += n;
                fds += got.len();
            }
        }
    }
    report(format!("received bytes {bytes} fds {fds}"));
}

// ---------------------------------------------------------------------------------------------
// Item 4: the client authenticates the daemon before it hands over any descriptor.

/// Another local user binds the socket a client is about to use (as it could in /tmp): the
/// client sees from SO_PEERCRED that the listener is neither root nor its own uid and sends it
/// nothing, not its userfaultfd, not its pidfd, not a byte.
#[test]
fn a_listener_of_another_uid_receives_nothing() {
    let test = "a_listener_of_another_uid_receives_nothing";
    let Some((_dir, socket)) = socket_for_other_uid(test) else {
        return;
    };
    let (mut impostor, mut out) = impostor_on(&socket);
    let r = DaemonClient::connect_with(&socket, Duration::from_secs(3));
    let Err(e) = r else {
        panic!("connected to a daemon of uid {OTHER_UID}");
    };
    let text = e.to_string();
    assert!(
        text.contains(&format!("uid {OTHER_UID}")) && text.contains("trust_uid"),
        "the error names the listener's uid and how to trust it: {text}"
    );
    drop(impostor.stdin.take());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(wait_timeout(&mut impostor, Duration::from_secs(30)));
    assert!(
        rest.contains("RESULT received bytes 0 fds 0"),
        "the impostor got something: {rest}"
    );

    // Told to trust that uid, the same client does talk to it (the check is what stopped it).
    std::fs::remove_file(&socket).unwrap();
    let (mut impostor, mut out) = impostor_on(&socket);
    let options = ConnectOptions::default()
        .timeout(Duration::from_secs(1))
        .trust_uid(OTHER_UID);
    let r = DaemonClient::connect_with_options(&socket, &options);
    assert!(r.is_err(), "the impostor never answers HELLO");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let _ = wait_timeout(&mut impostor, Duration::from_secs(30));
    assert!(
        rest.contains("RESULT received bytes 24 fds 2"),
        "a trusted listener gets HELLO with its two descriptors: {rest}"
    );
}

/// The other side of the check: a real daemon of the client's own uid is trusted and used.
#[test]
fn a_daemon_of_the_clients_own_uid_is_trusted() {
    let (_dir, socket, _daemon) = serve_here("own-uid", &[]);
    let (ok, lines) = finish(spawn_role(&socket, "work", "1", None));
    assert!(ok, "{lines:?}");
    assert!(reported(&lines, "work").starts_with("ok"), "{lines:?}");
}

/// The default socket needs no world-writable directory: without `XDG_RUNTIME_DIR` it lives in
/// a private directory that is created 0700, and refused, with a message that names
/// `XDG_RUNTIME_DIR`, when somebody else made it first, or made it a symlink, or opened it up.
#[test]
fn the_private_socket_directory_is_checked() {
    let base = TempDir::new("private");
    let mine = base.0.join("fresh");
    checked_private_dir(&mine).expect("a fresh directory is created");
    let meta = std::fs::symlink_metadata(&mine).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    checked_private_dir(&mine).expect("and accepted again");

    let open = base.0.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = checked_private_dir(&open).expect_err("a world-writable directory");
    assert!(e.to_string().contains("XDG_RUNTIME_DIR"), "{e}");
    assert!(e.to_string().contains("0777"), "{e}");

    let link = base.0.join("link");
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    let e = checked_private_dir(&link).expect_err("a symlink");
    assert!(e.to_string().contains("symbolic link"), "{e}");

    if is_root() {
        let theirs = base.0.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(OTHER_UID)), None).unwrap();
        let e = checked_private_dir(&theirs).expect_err("another uid's directory");
        let text = e.to_string();
        assert!(
            text.contains(&format!("owned by uid {OTHER_UID}")) && text.contains("XDG_RUNTIME_DIR"),
            "{text}"
        );
    }
}

/// `mirrorctl serve` as an ordinary user without `XDG_RUNTIME_DIR` (its temporary directory
/// moved by `TMPDIR`): it refuses a squatted socket directory, naming `XDG_RUNTIME_DIR`, and
/// otherwise serves from a private directory of its own.
#[test]
fn mirrorctl_serve_defaults_to_a_private_socket_directory() {
    let test = "mirrorctl_serve_defaults_to_a_private_socket_directory";
    let Some((tmp, _)) = socket_for_other_uid(test) else {
        return;
    };
    let private = tmp.0.join(format!("mirrord-{OTHER_UID}"));
    let serve_default = || {
        Command::new(env!("CARGO_BIN_EXE_mirrorctl"))
            .arg("serve")
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", &tmp.0)
            .uid(OTHER_UID)
            .gid(OTHER_UID)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mirrorctl serve")
    };
    // Somebody else (root here) made the directory first.
    std::fs::create_dir(&private).unwrap();
    let mut squatted = Reaped(serve_default());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = squatted.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "mirrorctl serve started in a directory somebody else made"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = String::new();
    let mut stderr = squatted.0.stderr.take().unwrap();
    stderr.read_to_string(&mut text).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("XDG_RUNTIME_DIR") && text.contains("owned by uid 0"),
        "{text}"
    );
    std::fs::remove_dir(&private).unwrap();

    let daemon = Reaped(serve_default());
    wait_for_socket(&private.join("mirrord.sock"), "mirrorctl serve");
    let meta = std::fs::symlink_metadata(&private).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (OTHER_UID, 0o700),
        "the socket directory is the daemon user's and private"
    );
    drop(daemon);
}

// ---------------------------------------------------------------------------------------------
// Item 5: the daemon is not dumpable.

/// Memfds of `pid` whose names start with one of `names`, as (fd number, name).
fn memfds_of(pid: u32, names: &[&str]) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().to_string();
            let name = target.strip_prefix("/memfd:")?;
            names.iter().any(|n| name.starts_with(n)).then(|| {
                (
                    e.file_name().to_string_lossy().to_string(),
                    name.to_string(),
                )
            })
        })
        .collect()
}

/// A same-uid process (not root) tries to open one of the daemon's descriptors read-write
/// through /proc; `true` if it could.
fn opened_as(uid: u32, path: &str) -> bool {
    let out = Command::new("/bin/sh")
        .args(["-c", "exec 3<>\"$1\" && echo OPENED", "sh", path])
        .uid(uid)
        .gid(uid)
        .stderr(Stdio::null())
        .output()
        .expect("run sh");
    String::from_utf8_lossy(&out.stdout).contains("OPENED")
}

/// The daemon and a hostile client run as the same ordinary uid; the client cannot open the
/// daemon's command queue, completion queue or fault buffer memfds through
/// `/proc/DAEMON/fd/N` (nor list that directory), while a normal client of that uid still
/// works.
#[test]
fn the_daemons_queue_memfds_cannot_be_opened_by_a_same_uid_process() {
    let test = "the_daemons_queue_memfds_cannot_be_opened_by_a_same_uid_process";
    let Some((dir, socket)) = socket_for_other_uid(test) else {
        return;
    };
    let daemon = serve(&socket, &[], Some(OTHER_UID));
    let pid = daemon.0.id();
    let (ok, lines) = finish(spawn_role(&socket, "work", "1", Some(OTHER_UID)));
    assert!(ok, "a client of the daemon's uid works: {lines:?}");
    assert!(reported(&lines, "work").starts_with("ok"), "{lines:?}");

    let queues = memfds_of(pid, &["mxa-cmdq", "mxa-completions", "mxa-faults"]);
    assert_eq!(queues.len(), 3, "the daemon's queue memfds: {queues:?}");
    // The control: a file of that uid's own opens, so a refusal below is the daemon's doing.
    let probe = dir.0.join("probe");
    std::fs::write(&probe, b"").unwrap();
    nix::unistd::chown(&probe, Some(nix::unistd::Uid::from_raw(OTHER_UID)), None).unwrap();
    assert!(
        opened_as(OTHER_UID, &probe.to_string_lossy()),
        "the control"
    );
    for (fd, name) in &queues {
        let path = format!("/proc/{pid}/fd/{fd}");
        assert!(
            !opened_as(OTHER_UID, &path),
            "uid {OTHER_UID} opened the daemon's {name} read-write through {path}"
        );
    }
    let listed = Command::new("/bin/ls")
        .arg(format!("/proc/{pid}/fd"))
        .uid(OTHER_UID)
        .gid(OTHER_UID)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        !listed.success(),
        "uid {OTHER_UID} listed the daemon's descriptors"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 11: submit_batch pipelines within the in-flight quota.

#[test]
fn submit_batch_pipelines_within_the_in_flight_quota_whatever_its_size() {
    let (_dir, socket, _daemon) = serve_here("batch", &["--max-in-flight", "32"]);
    for count in [1000, 2500] {
        let started = Instant::now();
        let (ok, lines) = finish(spawn_role(&socket, "batch", &count.to_string(), None));
        assert!(ok, "{lines:?}");
        assert_eq!(
            reported(&lines, "batch"),
            "refused 0 failed 0 wrong-pages 0 first-refusals []",
            "{count} ops"
        );
        // Not a timing assertion: the bug this guards against was a 10 s stall ending in a
        // disconnect; a generous bound tells the two apart.
        eprintln!("{count} ops: {:?}", started.elapsed());
    }
}

// ---------------------------------------------------------------------------------------------
// Item 12: errors that name the limit, its value and what changes it.

#[test]
fn a_dead_sessions_error_does_not_grow() {
    let (_dir, socket, _daemon) = serve_here("dead", &[]);
    let (ok, lines) = finish(spawn_role(&socket, "dead", "", None));
    assert!(ok, "{lines:?}");
    let line = reported(&lines, "dead");
    let n: Vec<usize> = line
        .split_whitespace()
        .skip(1)
        .step_by(2)
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(
        n[2] <= n[0].max(200),
        "the error grew from {} to {} bytes: {lines:?}",
        n[0],
        n[2]
    );
    assert_eq!(n[1], n[2], "{lines:?}");
}

#[test]
fn limit_errors_name_the_limit_its_value_and_the_flag() {
    let (_dir, socket, _daemon) = serve_here(
        "limits",
        &[
            "--max-mapped-mib",
            "1",
            "--max-arenas-per-client",
            "3",
            "--max-arena-mib-per-client",
            "80",
        ],
    );
    let (ok, lines) = finish(spawn_role(&socket, "mapped", "", None));
    assert!(ok, "{lines:?}");
    let text = reported(&lines, "mapped-text");
    for want in [
        "mapped (pinned) bytes per client",
        "1048576",
        "--max-mapped-mib",
    ] {
        assert!(text.contains(want), "no {want:?} in {text:?}");
    }

    let (ok, lines) = finish(spawn_role(&socket, "transfer", "", None));
    assert!(ok, "{lines:?}");
    let text = reported(&lines, "transfer-text");
    for want in ["maximum transfer", &(64u64 << 20).to_string(), "split"] {
        assert!(text.contains(want), "no {want:?} in {text:?}");
    }
    assert!(!text.contains("BadCommand"), "{text}");

    let (ok, lines) = finish(spawn_role(&socket, "arenas", "", None));
    assert!(ok, "{lines:?}");
    assert_eq!(
        reported(&lines, "limits"),
        format!("arenas 3 bytes {}", 80u64 << 20)
    );
    let text = reported(&lines, "bytes-text");
    for want in [
        "arena bytes per client",
        &(80u64 << 20).to_string(),
        "--max-arena-mib-per-client",
    ] {
        assert!(text.contains(want), "no {want:?} in {text:?}");
    }
    let text = reported(&lines, "count-text");
    for want in ["arenas per client is 3", "--max-arenas-per-client"] {
        assert!(text.contains(want), "no {want:?} in {text:?}");
    }
    assert_eq!(reported(&lines, "held"), "3");
}
