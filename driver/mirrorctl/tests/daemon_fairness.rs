//! Two daemon promises between clients, with real client processes (this binary re-run as
//! the clients through the ignored `fairness_client` test, told its role in the environment):
//!
//! - fairness: a client whose commands fill its device share waits in the daemon, so another
//!   client's small command reaches the device before the heavy client's queued ones (checked
//!   on the order of submission, not on time);
//! - INVALIDATE: a change no event reports (a punched hole in a memfd several clients map as
//!   arenas) tears down every sharer's device view, not only the caller's.

mod daemon_support;
use daemon_support::{serve_on_a_thread, ServeThread};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Op, Runtime, RuntimeOptions};
use driver::DeviceOps;
use mirrord::ClientSchedule;
use mirrord::{Daemon, DaemonConfig};
use mirrord_client::protocol::{Reply, Request};
use mirrord_client::DaemonClient;

const ROLE: &str = "MIRROR_FAIRNESS_ROLE";
const SOCKET: &str = "MIRROR_FAIRNESS_SOCKET";
const ARG: &str = "MIRROR_FAIRNESS_ARG";
/// Generous: only proves "not hung".
const PATIENCE: Duration = Duration::from_secs(60);

/// Commands the heavy client queues, and the size of each.
const HEAVY_OPS: usize = 32;
const HEAVY_LEN: usize = 8 << 20;

// ---------------------------------------------------------------------------------------------
// The daemon side.

/// A daemon serving on a private socket from a thread of the test process.
struct Served {
    daemon: Arc<Daemon>,
    socket: PathBuf,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<ServeThread>,
}

impl Served {
    fn start(tag: &str, spec: DeviceSpec) -> Served {
        let dir = std::env::temp_dir().join(format!("mirrord-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("mirrord.sock");
        let options = RuntimeOptions {
            mode: ServiceMode::Interrupt,
            ..RuntimeOptions::default()
        };
        let runtime = Runtime::open(spec, options).expect("open the device");
        let daemon = Arc::new(Daemon::new(runtime, DaemonConfig::new(&socket)).unwrap());
        let (stop, thread) = serve_on_a_thread(daemon.clone());
        wait_until("the daemon's socket", || socket.exists());
        Served {
            daemon,
            socket,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn client(&self, role: &str, arg: &str) -> Client {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fairness_client", "--ignored", "--nocapture"])
            .env(ROLE, role)
            .env(SOCKET, &self.socket)
            .env(ARG, arg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a client process");
        let to = child.stdin.take().unwrap();
        let from = BufReader::new(child.stdout.take().unwrap());
        let mut c = Client {
            child,
            to: Some(to),
            from,
        };
        c.expect("ready");
        c
    }

    fn schedule_of(&self, pid: u32) -> ClientSchedule {
        self.daemon
            .schedule()
            .into_iter()
            .find(|c| c.pid as u32 == pid)
            .expect("the client is registered")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client process: lines to its stdin, `RESULT` lines from its stdout.
struct Client {
    child: Child,
    /// Closed first when the client is dropped: that ends its step loop.
    to: Option<ChildStdin>,
    from: BufReader<ChildStdout>,
}

impl Client {
    fn say(&mut self, line: &str) {
        let to = self.to.as_mut().unwrap();
        writeln!(to, "{line}").unwrap();
        to.flush().unwrap();
    }

    /// The rest of the next `RESULT <word> ...` line.
    fn expect(&mut self, word: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.from.read_line(&mut line).unwrap() > 0,
                "the client ended before it said {word}"
            );
            // libtest may print "test fairness_client ... " in front of the first line.
            let Some(at) = line.find("RESULT ") else {
                continue;
            };
            let rest = line[at + 7..].trim();
            if let Some(tail) = rest.strip_prefix(word) {
                return tail.trim().to_string();
            }
            panic!("expected {word}, the client said {rest}");
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.to.take());
        // After a failed assertion the client may be stuck on held work: do not wait for it.
        let patience = if std::thread::panicking() {
            Duration::ZERO
        } else {
            PATIENCE
        };
        let deadline = Instant::now() + patience;
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------------
// The client side: runs only in the child processes.

fn report(line: impl AsRef<str>) {
    println!("RESULT {}", line.as_ref());
    std::io::stdout().flush().unwrap();
}

fn next_line() -> Option<String> {
    std::io::stdin().lines().next().map(|l| l.unwrap())
}

/// Queues [`HEAVY_OPS`] checksums of a fresh (never device-touched) arena in one batch, then
/// waits for them all and checks each.
fn role_heavy(client: &Arc<DaemonClient>) {
    let arena = client.alloc_arena(HEAVY_LEN).expect("arena");
    report("ready");
    next_line();
    let op = Op::Checksum {
        src: arena.va(),
        len: arena.len() as u64,
    };
    // SAFETY: checksums only read the arena, which lives until the end of the function.
    let tickets = unsafe { client.submit_batch(&vec![op; HEAVY_OPS]) };
    let zeros = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &arena[..]);
    for t in tickets {
        assert_eq!(client.wait(t.expect("submit")).expect("checksum"), zeros);
    }
    report("heavy-done");
}

/// One page, already faulted in on the device; on a line, a 4 KiB fill of it.
fn role_light(client: &Arc<DaemonClient>) {
    let mut arena = client.alloc_arena(4096).expect("arena");
    client.fill(&mut arena[..], 1).expect("warm-up fill");
    report("ready");
    next_line();
    client
        .fill(&mut arena[..], 0x7777_7777_7777_7777)
        .expect("fill");
    assert!(arena.iter().all(|b| *b == 0x77));
    report("light-done");
}

/// Maps the memfd the test shares (`/proc/PPID/fd/N`) and registers it as an arena; then runs
/// the steps it is told: `checksum`, `stats`, `punch` (a hole over the first half, then
/// INVALIDATE of it).
fn role_share(client: &Arc<DaemonClient>, arg: &str) {
    let (path, len) = arg.split_once(' ').unwrap();
    let len: usize = len.parse().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let map = memmap2::MmapOptions::new().len(len).map_raw(&file).unwrap();
    let va = map.as_ptr() as u64;
    let req = Request::RegisterArena {
        va,
        len: len as u64,
        offset: 0,
    };
    match client.raw_request(req, &[std::os::fd::AsFd::as_fd(&file)]) {
        Ok(Reply::Arena { .. }) => {}
        other => panic!("register the shared arena: {other:?}"),
    }
    report("ready");
    while let Some(step) = next_line() {
        match step.as_str() {
            "checksum" => {
                let op = Op::Checksum {
                    src: va,
                    len: len as u64,
                };
                // SAFETY: a checksum only reads the mapping, alive until the end.
                let t = unsafe { client.submit(op) }.expect("submit");
                report(format!("sum {}", client.wait(t).expect("checksum")));
            }
            "stats" => {
                let s = client.stats().expect("stats");
                report(format!("stats {} {}", s.mapped_bytes, s.invalidations));
            }
            "punch" => {
                let half = len as i64 / 2;
                nix::fcntl::fallocate(
                    file.as_raw_fd(),
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    0,
                    half,
                )
                .expect("punch a hole");
                client.invalidate(va, half as u64).expect("INVALIDATE");
                report("punched");
            }
            other => panic!("unknown step {other}"),
        }
    }
    drop(map);
}

/// (role, daemon socket, argument) from the environment the test gave its client process.
fn told_role() -> Option<(String, PathBuf, String)> {
    let var = |name| std::env::var(name).ok();
    Some((
        var(ROLE)?,
        PathBuf::from(var(SOCKET)?),
        var(ARG).unwrap_or_default(),
    ))
}

#[test]
#[ignore = "the client processes of the fairness tests run this"]
fn fairness_client() {
    // Run directly (not as a client), the environment names no role: nothing to do.
    let Some((role, socket, arg)) = told_role() else {
        return;
    };
    let client = DaemonClient::connect(&socket).expect("connect");
    match role.as_str() {
        "heavy" => role_heavy(&client),
        "light" => role_light(&client),
        "share" => role_share(&client, &arg),
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Holds the fault service on the first batch with records until `release` is dropped or sent
/// to, so a command that faults stays on the device, stalled, for as long as the test needs.
fn hold_first_fault_batch(rt: &Runtime) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (held_tx, held) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let once = Mutex::new(Some((held_tx, release_rx)));
    rt.service().set_drain_hook(Some(Arc::new(
        move |records: &[accel_abi::FaultRecord]| {
            if records.is_empty() {
                return;
            }
            let first = once.lock().unwrap().take();
            if let Some((held_tx, release_rx)) = first {
                let _ = held_tx.send(());
                let _ = release_rx.recv_timeout(PATIENCE);
            }
        },
    )));
    (held, release)
}

#[test]
fn a_small_op_reaches_the_device_before_a_heavy_clients_queued_ones() {
    let d = Served::start("fair", DeviceSpec::emulated());
    let rt = d.daemon.runtime().clone();
    let mut light = d.client("light", "");
    let mut heavy = d.client("heavy", "");
    let (held, release) = hold_first_fault_batch(&rt);
    heavy.say("go");
    held.recv_timeout(PATIENCE)
        .expect("the heavy client's first checksum faulted");
    // Its second command has reached the daemon (waiting for the client's device share, or
    // already on the device without one).
    let pid = heavy.pid();
    wait_until("the heavy client's second command", || {
        let s = d.schedule_of(pid);
        s.submitted + u64::from(s.waiting_for_device) >= 2
    });
    light.say("go");
    light.expect("light-done");
    let heavy_now = d.schedule_of(pid);
    assert!(
        heavy_now.submitted < 20,
        "the small op completed after the heavy client's 20th queued command went to the \
         device: {heavy_now:?}"
    );
    // The heavy client's first command fills its share (8 MiB): nothing else of it went.
    assert_eq!(heavy_now.submitted, 1, "{heavy_now:?}");
    drop(release);
    heavy.expect("heavy-done");
    rt.service().set_drain_hook(None);
}

/// A memfd of `len` bytes filled with `byte`, and the path another process opens it by.
fn shared_memfd(len: usize, byte: u8) -> (OwnedFd, String) {
    let fd = nix::sys::memfd::memfd_create(
        c"fairness-shared",
        nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .unwrap();
    let mut file = std::fs::File::from(fd.try_clone().unwrap());
    file.write_all(&vec![byte; len]).unwrap();
    let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    (fd, path)
}

/// (mapped bytes, invalidations) a `share` client reports.
fn shared_stats(c: &mut Client) -> (u64, u64) {
    c.say("stats");
    let s = c.expect("stats");
    let (mapped, inv) = s.split_once(' ').unwrap();
    (mapped.parse().unwrap(), inv.parse().unwrap())
}

fn punch_hole_reaches_every_sharer(d: &Served) {
    let len = 64 << 12;
    let (_fd, path) = shared_memfd(len, 0x5a);
    let arg = format!("{path} {len}");
    let mut a = d.client("share", &arg);
    let mut b = d.client("share", &arg);
    for c in [&mut a, &mut b] {
        c.say("checksum");
        c.expect("sum");
    }
    let (b_mapped, b_invalidations) = shared_stats(&mut b);
    assert_eq!(b_mapped, len as u64, "B's device view covers the arena");
    a.say("punch");
    a.expect("punched");
    let (b_mapped_after, b_invalidations_after) = shared_stats(&mut b);
    // The driver drops a DMA mapping whole when part of it is invalidated: less is mapped,
    // not necessarily exactly half.
    assert!(
        b_invalidations_after > b_invalidations && b_mapped_after < b_mapped,
        "A's INVALIDATE did not reach B's device view of the punched half: mapped {b_mapped} \
         -> {b_mapped_after}, invalidations {b_invalidations} -> {b_invalidations_after}"
    );
    let (a_mapped, _) = shared_stats(&mut a);
    assert!(a_mapped < len as u64, "A's own view of the half is gone");
    // B's device reads the hole as zeroes and the rest as before.
    let mut expected = vec![0u8; len / 2];
    expected.extend(std::iter::repeat_n(0x5a, len / 2));
    b.say("checksum");
    let sum: u64 = b.expect("sum").parse().unwrap();
    assert_eq!(
        sum,
        accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &expected)
    );
}

/// The daemon maps the memfd itself and the in-process emulator reaches it there.
#[test]
fn a_punched_hole_invalidates_every_sharers_view_emulated() {
    let d = Served::start("punch", DeviceSpec::emulated());
    punch_hole_reaches_every_sharer(&d);
}

/// The device is another process (`mirrorctl emulate`, vfio-user) that maps the memfd by fd
/// and so holds its pages itself. (No pinning backend runs here: kernel VFIO needs the QEMU
/// guest. What is checked is the daemon's side of the promise, that every sharer's device
/// entries for the pages are gone, which is what a pin's release depends on.)
#[test]
fn a_punched_hole_invalidates_every_sharers_view_over_vfio_user() {
    let dir = std::env::temp_dir().join(format!("mirrord-punch-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let device_socket = dir.join("device.sock");
    let device = Command::new(env!("CARGO_BIN_EXE_mirrorctl"))
        .args(["emulate", "--socket"])
        .arg(&device_socket)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed and reaped however the test ends.
    let _device = KilledOnDrop(device);
    wait_until("mirrorctl emulate", || device_socket.exists());
    let d = Served::start(
        "punch-vfio-user",
        DeviceSpec::VfioUser(device_socket.clone()),
    );
    punch_hole_reaches_every_sharer(&d);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

struct KilledOnDrop(Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fairness benchmark's client roles run (small sizes; no figure is checked).
#[test]
fn the_fairness_benchmark_clients_run() {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_mirrorctl"));
    let (unloaded, loaded) =
        driver_bench::daemon::measure_fairness(exe, 5, 4, 1 << 20, ServiceMode::Interrupt)
            .expect("the fairness benchmark");
    assert!(unloaded.p50_us > 0.0 && loaded.max_us >= loaded.p50_us);
}
