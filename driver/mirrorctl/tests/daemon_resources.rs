//! The daemon's resource limits (docs/daemon.md, "Quotas and back-pressure"): the open-files
//! limit (raised, sized for, refused with a reply when it runs out, no descriptor leaked by a
//! failed HELLO), stalled frames, handshakes apart from clients, and the daemon-wide arena
//! bytes bound.
//!
//! Some tests run parts of themselves in child processes (this test binary again, running the
//! ignored `child_role` test): a daemon under a low RLIMIT_NOFILE, and clients that register
//! arenas.

mod daemon_support;
use daemon_support::{serve_on_a_thread, wait_for_socket, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
use driver::Error;
use mirrord::{Daemon, DaemonConfig};
use mirrord_client::protocol::{self, ErrorCode, Header, Reply, Request, HEADER_SIZE};
use mirrord_client::DaemonClient;

const ROLE_ENV: &str = "MIRROR_RESOURCES_TEST_ROLE";
const SOCKET_ENV: &str = "MIRROR_RESOURCES_TEST_SOCKET";
const ARG_ENV: &str = "MIRROR_RESOURCES_TEST_ARG";

// ---------------------------------------------------------------------------------------------
// An in-process daemon.

struct TestDaemon {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    daemon: Arc<Daemon>,
    _dir: TempDir,
}

impl TestDaemon {
    fn start(tag: &str, adjust: impl FnOnce(&mut DaemonConfig)) -> TestDaemon {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = TempDir::new(tag);
        let socket = dir.0.join("mirrord.sock");
        let runtime = Runtime::open(
            DeviceSpec::emulated(),
            RuntimeOptions {
                mode: ServiceMode::Interrupt,
                ..RuntimeOptions::default()
            },
        )
        .expect("open the emulated device");
        let mut config = DaemonConfig::new(&socket);
        adjust(&mut config);
        let daemon = Arc::new(Daemon::new(runtime, config).expect("daemon"));
        let (stop, thread) = serve_on_a_thread(daemon.clone());
        wait_for_socket(&socket, "the test daemon");
        TestDaemon {
            socket,
            stop: Some(stop),
            thread: Some(thread),
            daemon,
            _dir: dir,
        }
    }

    /// Waits until the daemon has released every client.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.daemon.stats().clients > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the daemon serves at most `n` clients.
    fn settle_to(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.daemon.stats().clients > n && Instant::now() < deadline {
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

fn raw_connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads one frame; `None` at end of stream (or after the read timeout).
fn read_frame(s: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut head = [0u8; HEADER_SIZE];
    s.read_exact(&mut head).ok()?;
    let h = Header::decode_lenient(&head).expect("daemon frames decode");
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload).ok()?;
    Some((h, payload))
}

fn decoded(frame: &(Header, Vec<u8>)) -> Reply {
    Reply::decode(frame.0.kind & !protocol::REPLY, &frame.1).expect("a reply")
}

/// Send a HELLO (this process's own userfaultfd and pidfd) without reading the reply.
fn send_hello(socket: &Path) -> UnixStream {
    let s = raw_connect(socket);
    let uffd = mirror::uffd::create_uninitialised().expect("userfaultfd");
    let pidfd = mirrord_client::unix_msg::pidfd_open(std::process::id() as i32).expect("pidfd");
    let (k, p) = Request::Hello {
        min_version: 1,
        max_version: 1,
    }
    .encode();
    let frame = protocol::frame(k, 1, &p);
    mirrord_client::unix_msg::send(s.as_fd(), &frame, &[uffd.as_fd(), pidfd.as_fd()]).unwrap();
    s
}

/// A HELLO sent by hand from this process, and its successful reply read.
fn raw_hello(socket: &Path) -> UnixStream {
    let mut s = send_hello(socket);
    let reply = read_frame(&mut s).expect("a HELLO reply");
    assert!(
        matches!(decoded(&reply), Reply::Hello { .. }),
        "{:?}",
        decoded(&reply)
    );
    s
}

/// Retries `connect` until it succeeds (a released session's slot frees asynchronously).
fn connect_eventually(socket: &Path) -> Arc<DaemonClient> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match DaemonClient::connect(socket) {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no connection: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes.

fn spawn_role(role: &str, socket: &Path, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_role",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .env(SOCKET_ENV, socket)
        .env(ARG_ENV, arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a child process")
}

/// Kills and reaps its child when dropped (a failed test leaves nothing running).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn say(line: impl AsRef<str>) {
    println!("RESULT {}", line.as_ref());
    std::io::stdout().flush().unwrap();
}

/// The next `RESULT` line of a child.
fn next_result(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "the child exited");
        if let Some(at) = line.find("RESULT ") {
            return line[at + 7..].trim_end().to_string();
        }
    }
}

#[test]
#[ignore = "the child processes of the resource tests run this"]
fn child_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(SOCKET_ENV).unwrap());
    let arg = std::env::var(ARG_ENV).unwrap_or_default();
    match role.as_str() {
        "daemon" => role_fd_limited_daemon(&socket, &arg),
        "arenas" => role_arenas(&socket, &arg),
        "hello-as" => role_hello_as(&socket, &arg),
        "hello-and-die" => role_hello_and_die(&socket),
        other => panic!("unknown role {other}"),
    }
}

/// A daemon under `soft,hard` RLIMIT_NOFILE. Commands on stdin: `fill K` (take descriptors
/// until only K are free), `unfill`. Answers `RESULT` lines.
fn role_fd_limited_daemon(socket: &Path, arg: &str) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = arg.split_once(',').unwrap();
    let (soft, hard): (u64, u64) = (soft.parse().unwrap(), hard.parse().unwrap());
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let runtime = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default()).unwrap();
    let daemon = Arc::new(Daemon::new(runtime, DaemonConfig::new(socket)).unwrap());
    let (stop, thread) = serve_on_a_thread(daemon.clone());
    wait_for_socket(socket, "the daemon");
    let (now_soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let c = daemon.config();
    say(format!(
        "ready soft {now_soft} fd_limit {} max_clients {} max_handshakes {} max_arenas {}",
        daemon.fd_limit(),
        c.max_clients,
        c.max_handshakes,
        c.limits.max_arenas
    ));
    let mut fillers: Vec<std::fs::File> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["fill", k] => {
                let k: usize = k.parse().unwrap();
                fillers.clear();
                while let Ok(f) = std::fs::File::open("/dev/null") {
                    fillers.push(f);
                }
                for _ in 0..k {
                    fillers.pop();
                }
                say(format!(
                    "filled {} exhaustions {}",
                    fillers.len(),
                    daemon.fd_exhaustions()
                ));
            }
            ["unfill"] => {
                fillers.clear();
                say(format!("unfilled exhaustions {}", daemon.fd_exhaustions()));
            }
            _ => panic!("unknown command {line}"),
        }
    }
    let _ = stop.send(());
    thread.join().unwrap().unwrap();
}

/// Drop to uid `arg` (needs root), connect, say how it went.
fn role_hello_as(socket: &Path, arg: &str) {
    let uid: u32 = arg.parse().unwrap();
    let dropped = nix::unistd::setgroups(&[])
        .and_then(|()| nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)))
        .and_then(|()| nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)));
    if let Err(e) = dropped {
        say(format!("setuid-error {e}"));
        return;
    }
    match DaemonClient::connect(socket) {
        Ok(c) => {
            say("connected");
            let _ = c.goodbye();
        }
        Err(e) => say(format!("connect-error {e}")),
    }
}

/// Send HELLO and exit at once: the daemon builds a mirror of a process that is going or
/// gone, and its context may fail to come up after its page table was made.
fn role_hello_and_die(socket: &Path) {
    let s = send_hello(socket);
    std::mem::forget(s);
    std::process::exit(0);
}

/// Connect, register `count` arenas of `mib` MiB each, say how each went, then hold them
/// until stdin closes.
fn role_arenas(socket: &Path, arg: &str) {
    let (count, mib) = arg.split_once(',').unwrap();
    let (count, mib): (usize, usize) = (count.parse().unwrap(), mib.parse().unwrap());
    let client = DaemonClient::connect(socket).expect("connect");
    let mut held = Vec::new();
    for i in 0..count {
        match client.alloc_arena(mib << 20) {
            Ok(a) => {
                held.push(a);
                say(format!("arena {i} ok"));
            }
            Err(e) => say(format!("arena {i} refused {e}")),
        }
    }
    say("ready");
    let mut rest = String::new();
    let _ = std::io::stdin().read_to_string(&mut rest);
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// Open files.

struct FdLimitedDaemon {
    child: Reaped,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
    socket: PathBuf,
    log: std::sync::mpsc::Receiver<String>,
    _dir: TempDir,
}

impl FdLimitedDaemon {
    fn start(soft: u64, hard: u64) -> (FdLimitedDaemon, String) {
        let dir = TempDir::new("nofile");
        let socket = dir.0.join("mirrord.sock");
        let mut child = spawn_role("daemon", &socket, &format!("{soft},{hard}"));
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                let _ = tx.send(line);
            }
        });
        let ready = next_result(&mut out);
        let d = FdLimitedDaemon {
            child: Reaped(child),
            stdin,
            out,
            socket,
            log,
            _dir: dir,
        };
        (d, ready)
    }

    fn command(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        next_result(&mut self.out)
    }

    fn open_fds(&self) -> usize {
        self.fd_targets().len()
    }

    /// What each of the daemon's descriptors refers to, but `/dev/null`: the fillers, and the
    /// daemon's reserve descriptor, which comes and goes as the accept loop needs it.
    fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.0.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|t| t.to_string_lossy().into_owned())
            .filter(|t| t != "/dev/null")
            .collect()
    }

    /// Waits (up to 5 s) for the daemon's descriptor count to come down to `want`.
    fn fds_settle_to(&self, want: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.open_fds();
            if now <= want || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// The log lines so far, waiting (up to 10 s) until each of `wanted` is in one of them: the
    /// daemon's stderr is read by a thread of its own, which may lag behind its stdout.
    fn log_lines_with(&self, wanted: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = self.log_lines();
        while !wanted.iter().all(|w| lines.iter().any(|l| l.contains(w))) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(line) => lines.push(line),
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {}
            }
        }
        lines
    }
}

fn field(line: &str, name: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == name)
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    words[at + 1].parse().unwrap()
}

/// The soft limit goes up to the hard limit, and the client limit comes down to what that
/// holds (each client may hold its arenas' memfds besides its own descriptors).
#[test]
fn the_daemon_raises_its_open_files_limit_and_sizes_its_limits_from_it() {
    let (d, ready) = FdLimitedDaemon::start(128, 512);
    assert_eq!(field(&ready, "soft"), 512, "{ready}");
    assert_eq!(field(&ready, "fd_limit"), 512, "{ready}");
    let clients = field(&ready, "max_clients");
    let handshakes = field(&ready, "max_handshakes");
    let arenas = field(&ready, "max_arenas");
    assert!((1..64).contains(&clients), "{ready}");
    // Each client's descriptors plus one per arena, each handshake's three, all within.
    assert!(
        clients * (8 + arenas) + handshakes * 3 <= 512,
        "the limits do not fit: {ready}"
    );
    let log = d
        .log_lines_with(&["raised the open-files limit", "--max-clients lowered"])
        .join("\n");
    assert!(
        log.contains("raised the open-files limit") && log.contains("--max-clients lowered"),
        "{log}"
    );
}

/// At the limit, a new connection is answered at once with a reply naming the limit (not left
/// waiting), the accept loop does not log every retry, and every HELLO that fails for want of
/// descriptors closes every descriptor it brought.
#[test]
fn out_of_descriptors_clients_are_told_and_failed_hellos_leak_nothing() {
    let (mut d, _) = FdLimitedDaemon::start(1024, 1024);
    let _ = d.log_lines();
    d.command("fill 0");
    let full = d.open_fds();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let refused = DaemonClient::connect_with(&d.socket, Duration::from_secs(30))
            .err()
            .expect("refused at the limit");
        let text = refused.to_string();
        assert!(
            text.contains("open-files limit (RLIMIT_NOFILE) is 1024"),
            "{text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered, not left waiting: {:?}",
            started.elapsed()
        );
        slowest = slowest.max(started.elapsed());
    }
    let exhaustions = field(&d.command("unfill"), "exhaustions");
    assert!(exhaustions >= 20, "counted: {exhaustions}");
    let warnings = d
        .log_lines_with(&["out of file descriptors"])
        .iter()
        .filter(|l| l.contains("out of file descriptors"))
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "one warning per episode, not one per try: {warnings}"
    );
    eprintln!(
        "FIGURES 20 connections at a full table: slowest answer {slowest:?}, {exhaustions} \
         refusals counted, {warnings} warning line(s)"
    );
    // The loop accepts again once descriptors are free.
    let ok = DaemonClient::connect(&d.socket).expect("accepted again");
    ok.goodbye().unwrap();
    drop(ok);

    // A HELLO with only a few descriptors free (0 is the accept's case above). With 1 or 2
    // (3 when the accept loop's reserve descriptor happens to be out) the kernel installs
    // none or one of its two descriptors: answered too, but the one installed is only closed
    // in the test below.
    hellos_with_few_descriptors_free(&mut d, 4..13, true);
    hellos_with_few_descriptors_free(&mut d, 1..4, false);
    d.command("unfill");
    let _ = full;
}

/// A HELLO arriving when the kernel can install none or only one of its two descriptors.
#[test]
fn a_hello_whose_descriptors_cannot_all_be_installed_is_answered_and_leaks_nothing() {
    let (mut d, _) = FdLimitedDaemon::start(1024, 1024);
    hellos_with_few_descriptors_free(&mut d, 1..4, true);
    d.command("unfill");
}

/// For each count of free descriptors in `frees`: a HELLO then either succeeds or is refused
/// with a message naming the open-files limit, and (with `count_fds`) the daemon's descriptor
/// count comes back to where it was (every descriptor the HELLO brought is closed).
fn hellos_with_few_descriptors_free(
    d: &mut FdLimitedDaemon,
    frees: std::ops::Range<usize>,
    count_fds: bool,
) {
    for free in frees {
        let filled = d.command(&format!("fill {free}"));
        let before = d.open_fds();
        let targets = d.fd_targets();
        let outcome = DaemonClient::connect_with(&d.socket, Duration::from_secs(30));
        match &outcome {
            Ok(c) => {
                let _ = c.goodbye();
            }
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("RLIMIT_NOFILE"),
                    "with {free} free: the refusal names the limit: {text}"
                );
            }
        }
        let outcome = outcome.map(drop);
        if !count_fds {
            continue;
        }
        let after = d.fds_settle_to(before);
        let mut left: Vec<String> = d.fd_targets();
        for t in &targets {
            if let Some(at) = left.iter().position(|l| l == t) {
                left.swap_remove(at);
            }
        }
        assert!(
            after <= before,
            "with {free} descriptors free ({filled}): {} descriptors left behind: {left:?} \
             (outcome {:?})",
            after - before,
            outcome.as_ref().err()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Stalled sessions and handshakes.

/// A client past HELLO that stops in the middle of a frame is disconnected after the frame
/// timeout, which frees its client slot.
#[test]
fn a_session_stalled_mid_frame_after_hello_is_closed() {
    let d = TestDaemon::start("stall", |c| {
        c.max_clients = 1;
        c.frame_timeout = Duration::from_secs(1);
    });
    let mut stalled = raw_hello(&d.socket);
    stalled.write_all(b"MXD1\x01\x00").unwrap(); // part of a header, then nothing
    let refused = DaemonClient::connect(&d.socket).err().expect("slot taken");
    assert!(
        refused.to_string().contains("client limit reached"),
        "{refused}"
    );
    let started = Instant::now();
    let answer = read_frame(&mut stalled).expect("an answer before the read timeout");
    match decoded(&answer) {
        Reply::Error { code, message } => {
            assert_eq!(code, ErrorCode::Limit);
            assert!(message.contains("frame timeout"), "{message}");
            assert!(message.contains("--frame-timeout-secs"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(
        read_frame(&mut stalled).is_none(),
        "closed after the answer"
    );
    let c = connect_eventually(&d.socket);
    c.goodbye().unwrap();
    drop(c);
    d.settle();
    d.stop();
}

/// Opens `n` connections that never say HELLO; returns those the daemon kept and how many it
/// refused (each refusal checked to name the per-uid handshake limit of `limit`).
fn idle_connections(socket: &Path, n: usize, limit: usize) -> (Vec<UnixStream>, usize) {
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        let mut s = raw_connect(socket);
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match read_frame(&mut s) {
            Some(f) => {
                let Reply::Error { code, message } = decoded(&f) else {
                    panic!("{f:?}")
                };
                assert_eq!(code, ErrorCode::Limit);
                let want = format!(
                    "connections before HELLO per uid is {limit} (--max-handshakes-per-uid)"
                );
                assert!(message.contains(&want), "{message}");
                refused += 1;
            }
            None => idle.push(s),
        }
    }
    (idle, refused)
}

/// Connections that never say HELLO are handshakes, limited per uid and counted apart from
/// clients: however many one user opens, they take no client slot, and other users' clients
/// (and this user's clients already in) are unaffected.
#[test]
fn connections_that_never_say_hello_do_not_keep_clients_out() {
    const OTHER_UID: u32 = 65534;
    let own = nix::unistd::getuid().as_raw();
    let d = TestDaemon::start("handshakes", |c| {
        c.max_clients = 4;
        c.max_handshakes_per_uid = 3;
        c.hello_timeout = Duration::from_secs(60);
        c.allowed_uids = vec![own, OTHER_UID];
    });
    // Two clients of this uid are in; then this uid floods the daemon with idle connections.
    let first: Vec<_> = (0..2)
        .map(|_| DaemonClient::connect(&d.socket).expect("a client slot"))
        .collect();
    let (idle, refused) = idle_connections(&d.socket, 10, 3);
    assert_eq!(idle.len(), 3, "three handshakes of one uid at once");
    assert_eq!(refused, 7);
    // The clients already in are not disturbed, and the idle ones hold no client slot: the
    // two slots left are there for another uid's clients.
    for c in &first {
        c.stats().expect("still served");
    }
    if nix::unistd::getuid().is_root() {
        for _ in 0..2 {
            let mut other = Reaped(spawn_role("hello-as", &d.socket, &OTHER_UID.to_string()));
            let mut out = BufReader::new(other.0.stdout.take().unwrap());
            let said = next_result(&mut out);
            if said.starts_with("setuid-error") {
                eprintln!("SKIP the other-uid part: {said}");
                break;
            }
            assert_eq!(said, "connected", "another uid's client gets in");
            let _ = other.0.wait();
        }
    } else {
        eprintln!("SKIP the other-uid part: needs root to run a client as uid {OTHER_UID}");
    }
    // Once the idle connections go, this uid's clients fill the remaining slots, no more.
    drop(idle);
    d.settle_to(2);
    let more: Vec<_> = (0..2).map(|_| connect_eventually(&d.socket)).collect();
    let fifth = DaemonClient::connect(&d.socket)
        .err()
        .expect("four clients");
    assert!(fifth.to_string().contains("is 4 (--max-clients"), "{fifth}");
    for c in first.iter().chain(&more) {
        c.goodbye().unwrap();
    }
    d.settle();
    d.stop();
}

/// Clients that die right after HELLO (while the daemon builds their mirror and context)
/// leave no device page-table page behind. The deterministic check of the cause is the
/// driver's `a_view_dropped_without_shut_down_returns_its_table_pages`; this one runs the race.
#[test]
fn clients_dying_right_after_hello_leave_no_table_pages() {
    let d = TestDaemon::start("hello-die", |_| {});
    let baseline = d.daemon.stats().table_pages_in_use;
    // As in the report that found the leak: 1500 clients left 9 pages (30 here).
    let rounds = 150;
    let per_round = 10;
    for _ in 0..rounds {
        let children: Vec<Reaped> = (0..per_round)
            .map(|_| Reaped(spawn_role("hello-and-die", &d.socket, "")))
            .collect();
        for mut c in children {
            let _ = c.0.wait();
        }
    }
    d.settle();
    // `clients` does not count a handshake whose mirror and context the daemon is still
    // building (or dropping) for a client already gone: wait for the pages to come back. A
    // leaked page never does, so this still fails on a leak (after 20 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.daemon.stats().table_pages_in_use != baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = d.daemon.stats();
    eprintln!(
        "FIGURES {} clients died right after HELLO: table pages in use {} (baseline {baseline}), \
         released {}",
        rounds * per_round,
        s.table_pages_in_use,
        s.released
    );
    assert_eq!(s.table_pages_in_use, baseline, "table pages leaked: {s:?}");
    assert_eq!(s.quarantined, 0);
    d.stop();
}

// ---------------------------------------------------------------------------------------------
// Arena bytes.

fn arena_results(out: &mut BufReader<ChildStdout>) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = next_result(out);
        if line == "ready" {
            return lines;
        }
        lines.push(line);
    }
}

/// Arena bytes are bounded per uid (across that uid's clients) and in all, each refusal naming
/// the bound, its value and its flag; bytes come back when a client goes.
#[test]
fn arena_bytes_are_bounded_per_uid_and_in_all() {
    let d = TestDaemon::start("arena-bytes", |c| {
        c.max_arena_bytes_per_uid = 6 << 20;
    });
    let mut a = Reaped(spawn_role("arenas", &d.socket, "4,2"));
    let mut a_out = BufReader::new(a.0.stdout.take().unwrap());
    let lines = arena_results(&mut a_out);
    assert_eq!(&lines[..3], ["arena 0 ok", "arena 1 ok", "arena 2 ok"]);
    assert!(
        lines[3].contains("arena bytes per uid is 6 MiB (--max-arena-mib-per-uid)"),
        "{lines:?}"
    );
    // Another client of the same uid: the bound is the uid's, not the client's.
    let mut b = Reaped(spawn_role("arenas", &d.socket, "1,2"));
    let mut b_out = BufReader::new(b.0.stdout.take().unwrap());
    let lines = arena_results(&mut b_out);
    assert!(
        lines[0].contains("arena bytes per uid is 6 MiB"),
        "{lines:?}"
    );
    drop(b.0.stdin.take());
    let _ = b.0.wait();
    // The first client goes: its bytes come back.
    drop(a.0.stdin.take());
    let _ = a.0.wait();
    d.settle();
    let mut c = Reaped(spawn_role("arenas", &d.socket, "3,2"));
    let mut c_out = BufReader::new(c.0.stdout.take().unwrap());
    let lines = arena_results(&mut c_out);
    assert_eq!(lines, ["arena 0 ok", "arena 1 ok", "arena 2 ok"]);
    drop(c.0.stdin.take());
    let _ = c.0.wait();
    d.settle();
    d.stop();

    let d = TestDaemon::start("arena-total", |c| {
        c.max_arena_bytes_total = 4 << 20;
    });
    let mut e = Reaped(spawn_role("arenas", &d.socket, "3,2"));
    let mut e_out = BufReader::new(e.0.stdout.take().unwrap());
    let lines = arena_results(&mut e_out);
    assert_eq!(&lines[..2], ["arena 0 ok", "arena 1 ok"]);
    assert!(
        lines[2].contains("arena bytes of all clients is 4 MiB (--max-arena-mib-total)"),
        "{lines:?}"
    );
    drop(e.0.stdin.take());
    let _ = e.0.wait();
    d.settle();
    d.stop();
}

#[test]
fn limits_refused_at_hello_name_their_flag() {
    // The client limits are taken at HELLO now; the message still names limit, value, flag.
    let d = TestDaemon::start("hello-limit", |c| {
        c.max_clients = 2;
        c.max_clients_per_uid = 1;
    });
    let first = DaemonClient::connect(&d.socket).unwrap();
    let second = DaemonClient::connect(&d.socket).err().expect("per uid");
    assert!(
        second
            .to_string()
            .contains("clients per uid is 1 (--max-clients-per-uid)"),
        "{second}"
    );
    first.goodbye().unwrap();
    drop(first);
    d.settle();
    d.stop();
}
