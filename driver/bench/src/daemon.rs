//! The daemon benchmark: aggregate device-fault throughput and per-command latency with 1..64
//! client processes served by one daemon, beside the same work done in-process.
//!
//! Each client (this executable again, `mirrorctl bench-client`) connects, allocates an arena,
//! says READY and waits for GO on stdin so every client starts together; then each round it
//! discards its arena's pages (MADV_REMOVE: the daemon sees the userfaultfd event and tears the
//! device entries down) and has the device fill the arena, which faults every page in again.
//! It reports each round's submit-to-completion time. Throughput is pages made device-accessible
//! per second over every client, from GO to the last client's end.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
use driver::{DeviceOps, Error};
use mirrord::{Daemon, DaemonConfig};
use mirrord_client::shared_mem::SharedMemory;
use mirrord_client::DaemonClient;

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct DaemonPoint {
    /// Client processes.
    pub clients: usize,
    /// Pages made device-accessible per second, all clients together.
    pub pages_per_s: f64,
    /// Median round (one fill of the arena) latency, µs.
    pub p50_us: f64,
    /// 99th percentile round latency, µs.
    pub p99_us: f64,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DaemonBenchSpec {
    /// Client counts to measure.
    pub clients: Vec<usize>,
    /// Rounds per client.
    pub rounds: usize,
    /// Arena pages per client (each round faults them all).
    pub pages: usize,
    /// The executable that runs `bench-client`.
    pub exe: PathBuf,
    /// Fault-service mode.
    pub mode: ServiceMode,
}

fn os(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}

/// The client process: connect, allocate, wait for GO, run the rounds, print one `ROUND <ns>`
/// line per round and `DONE`.
pub fn client_main(socket: &Path, rounds: usize, pages: usize) -> Result<(), Error> {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok(HEAVY) => return heavy_client(socket, rounds, pages),
        Ok(LIGHT) => return light_client(socket, rounds),
        _ => {}
    }
    let client = DaemonClient::connect(socket)?;
    let mut arena = client.alloc_arena(pages * 4096)?;
    // Warm: the first touch of fresh memory on this VM is far slower than the rest.
    client.fill(&mut arena[..], 1)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").map_err(os("stdout"))?;
    out.flush().map_err(os("stdout"))?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).map_err(os("read GO"))?;
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        arena.discard()?;
        let t = Instant::now();
        client.fill(&mut arena[..], round as u64)?;
        times.push(t.elapsed().as_nanos());
    }
    for ns in times {
        writeln!(out, "ROUND {ns}").map_err(os("stdout"))?;
    }
    writeln!(out, "DONE").map_err(os("stdout"))?;
    Ok(())
}

/// The same rounds in-process (the baseline): a context over this process and a memfd of the
/// same size, discarded and filled each round.
pub fn in_process(rounds: usize, pages: usize, mode: ServiceMode) -> Result<DaemonPoint, Error> {
    let rt = Runtime::open(
        DeviceSpec::emulated(),
        RuntimeOptions {
            mode,
            ..RuntimeOptions::default()
        },
    )?;
    let ctx = rt.create_context()?;
    let mut mem = SharedMemory::new(pages * 4096, "bench").map_err(os("memfd"))?;
    ctx.fill(mem.bytes_mut(), 1)?;
    let mut times = Vec::with_capacity(rounds);
    let start = Instant::now();
    for round in 0..rounds {
        mem.discard()
            .map_err(os("madvise(MADV_REMOVE) the memfd"))?;
        let t = Instant::now();
        ctx.fill(mem.bytes_mut(), round as u64)?;
        times.push(t.elapsed().as_nanos());
    }
    let wall = start.elapsed();
    Ok(point(1, rounds * pages, wall, times))
}

fn point(clients: usize, pages: usize, wall: Duration, mut times: Vec<u128>) -> DaemonPoint {
    times.sort_unstable();
    let at = |q: f64| {
        if times.is_empty() {
            return 0.0;
        }
        let i = ((times.len() - 1) as f64 * q).round() as usize;
        times[i] as f64 / 1e3
    };
    DaemonPoint {
        clients,
        pages_per_s: pages as f64 / wall.as_secs_f64().max(1e-9),
        p50_us: at(0.5),
        p99_us: at(0.99),
    }
}

/// How `measure_fairness` tells a `bench-client` process its part (the command line stays
/// that of the throughput clients): [`HEAVY`] or [`LIGHT`].
const ROLE_ENV: &str = "MIRRORD_BENCH_ROLE";
/// Keeps `rounds` checksums of its whole `pages`-page arena in flight until STOP on stdin.
const HEAVY: &str = "heavy";
/// `rounds` 4 KiB fills of a page already mapped on the device, one at a time, timed.
const LIGHT: &str = "light";

fn ready_then_go() -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").map_err(os("stdout"))?;
    out.flush().map_err(os("stdout"))?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).map_err(os("read GO"))?;
    Ok(())
}

fn heavy_client(socket: &Path, in_flight: usize, pages: usize) -> Result<(), Error> {
    let client = DaemonClient::connect(socket)?;
    let mut arena = client.alloc_arena(pages * 4096)?;
    client.fill(&mut arena[..], 1)?;
    ready_then_go()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let told = stop.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        told.store(true, std::sync::atomic::Ordering::Release);
    });
    let op = driver::runtime::Op::Checksum {
        src: arena.va(),
        len: arena.len() as u64,
    };
    let mut queue = std::collections::VecDeque::new();
    // SAFETY (both submits): checksums only read the arena, which outlives every ticket: the
    // queue is drained before the function returns.
    for _ in 0..in_flight {
        queue.push_back(unsafe { client.submit(op) }?);
    }
    while let Some(t) = queue.pop_front() {
        client.wait(t)?;
        if !stop.load(std::sync::atomic::Ordering::Acquire) {
            queue.push_back(unsafe { client.submit(op) }?);
        }
    }
    println!("DONE");
    Ok(())
}

fn light_client(socket: &Path, rounds: usize) -> Result<(), Error> {
    let client = DaemonClient::connect(socket)?;
    let mut arena = client.alloc_arena(4096)?;
    client.fill(&mut arena[..], 1)?;
    ready_then_go()?;
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let t = Instant::now();
        client.fill(&mut arena[..], round as u64)?;
        times.push(t.elapsed().as_nanos());
    }
    let mut out = std::io::stdout().lock();
    for ns in times {
        writeln!(out, "ROUND {ns}").map_err(os("stdout"))?;
    }
    writeln!(out, "DONE").map_err(os("stdout"))?;
    Ok(())
}

struct Spawned {
    child: Child,
    lines: BufReader<std::process::ChildStdout>,
}

fn read_until(s: &mut Spawned, word: &str) -> Result<Vec<String>, Error> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let n = s.lines.read_line(&mut line).map_err(os("read a client"))?;
        if n == 0 {
            return Err(Error::DaemonConnection(format!(
                "a benchmark client ended before {word}: {seen:?}"
            )));
        }
        if line.trim() == word {
            return Ok(seen);
        }
        seen.push(line.trim().to_string());
    }
}

/// Runs every client count against one daemon (serving on a fresh socket in this process).
pub fn measure(spec: &DaemonBenchSpec) -> Result<Vec<DaemonPoint>, Error> {
    with_daemon(spec.mode, |socket| {
        let mut points = Vec::new();
        for &n in &spec.clients {
            points.push(run_clients(spec, socket, n)?);
        }
        Ok(points)
    })
}

/// Latency figures over many operations, in µs.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Worst.
    pub max_us: f64,
}

/// Light 4 KiB op latency of 3 clients (`rounds` ops each), unloaded and then beside one
/// client that keeps `heavy_in_flight` checksums of `heavy_bytes` in flight (the report's
/// row uses 32 of 64 MiB, the shape of issue 15: 4.14 s at worst before the per-client
/// device share).
pub fn measure_fairness(
    exe: &Path,
    rounds: usize,
    heavy_in_flight: usize,
    heavy_bytes: usize,
    mode: ServiceMode,
) -> Result<(Latency, Latency), Error> {
    with_daemon(mode, |socket| {
        let unloaded = light_latency(exe, socket, 3, rounds, None)?;
        let heavy = Some((heavy_in_flight, heavy_bytes.div_ceil(4096)));
        let loaded = light_latency(exe, socket, 3, rounds, heavy)?;
        Ok((unloaded, loaded))
    })
}

/// Serves a daemon on the emulated device on a fresh socket in this process while `run`
/// runs with that socket.
fn with_daemon<T: Send>(
    mode: ServiceMode,
    run: impl FnOnce(&Path) -> Result<T, Error> + Send,
) -> Result<T, Error> {
    let dir = std::env::temp_dir().join(format!("mirrord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(os("create the bench socket directory"))?;
    let socket = dir.join("mirrord.sock");
    let runtime = Runtime::open(
        DeviceSpec::emulated(),
        RuntimeOptions {
            mode,
            ..RuntimeOptions::default()
        },
    )?;
    let daemon = Daemon::new(runtime, DaemonConfig::new(&socket))?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(os("start tokio"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let daemon = &daemon;
        async move {
            daemon
                .serve(async {
                    let _ = stopped.await;
                })
                .await
        }
    };
    let result = std::thread::scope(|scope| {
        let runner = scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if Instant::now() > deadline {
                    return Err(Error::Timeout("the benchmark daemon's socket"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            run(&socket)
        });
        let served = tokio.block_on(async {
            let run = async {
                while !runner.is_finished() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = stop.send(());
            };
            let (served, ()) = tokio::join!(server, run);
            served
        });
        let outcome = runner
            .join()
            .map_err(|_| Error::DaemonConnection("the benchmark runner panicked".into()))?;
        served.and(outcome)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn spawn(
    exe: &Path,
    socket: &Path,
    rounds: usize,
    pages: usize,
    role: Option<&str>,
) -> Result<Spawned, Error> {
    let mut cmd = Command::new(exe);
    cmd.arg("bench-client")
        .arg("--socket")
        .arg(socket)
        .arg("--rounds")
        .arg(rounds.to_string())
        .arg("--pages")
        .arg(pages.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(role) = role {
        cmd.env(ROLE_ENV, role);
    }
    let mut child = cmd.spawn().map_err(os("spawn a benchmark client"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or(Error::InvalidArgument("no stdout"))?;
    Ok(Spawned {
        child,
        lines: BufReader::new(stdout),
    })
}

fn tell(s: &mut Spawned, line: &str) -> Result<(), Error> {
    let stdin = s
        .child
        .stdin
        .as_mut()
        .ok_or(Error::InvalidArgument("no stdin"))?;
    writeln!(stdin, "{line}").map_err(os("tell a client"))?;
    stdin.flush().map_err(os("tell a client"))
}

/// 4 KiB op latency of `light` clients (`rounds` fills each), with or without one client
/// keeping checksums on the device meanwhile (`heavy`: how many in flight, of how many pages each), over every
/// light client's rounds.
fn light_latency(
    exe: &Path,
    socket: &Path,
    light: usize,
    rounds: usize,
    heavy: Option<(usize, usize)>,
) -> Result<Latency, Error> {
    let mut heavy = match heavy {
        Some((in_flight, pages)) => {
            let mut h = spawn(exe, socket, in_flight, pages, Some(HEAVY))?;
            read_until(&mut h, "READY")?;
            tell(&mut h, "GO")?;
            // Let its work fill the device before the light clients start.
            std::thread::sleep(Duration::from_millis(500));
            Some(h)
        }
        None => None,
    };
    let mut clients = Vec::new();
    let outcome = (|| {
        for _ in 0..light {
            clients.push(spawn(exe, socket, rounds, 1, Some(LIGHT))?);
        }
        for c in &mut clients {
            read_until(c, "READY")?;
        }
        for c in &mut clients {
            tell(c, "GO")?;
        }
        let mut times = Vec::new();
        for c in &mut clients {
            for line in read_until(c, "DONE")? {
                if let Some(ns) = line.strip_prefix("ROUND ").and_then(|v| v.parse().ok()) {
                    times.push(ns);
                }
            }
        }
        let p = point(light, 0, Duration::from_secs(1), times.clone());
        let max = times.iter().max().copied().unwrap_or(0) as f64 / 1e3;
        Ok(Latency {
            p50_us: p.p50_us,
            p99_us: p.p99_us,
            max_us: max,
        })
    })();
    if let Some(h) = heavy.as_mut() {
        let _ = tell(h, "STOP");
        if outcome.is_ok() {
            read_until(h, "DONE")?;
        }
    }
    for mut c in clients.into_iter().chain(heavy) {
        if outcome.is_err() {
            let _ = c.child.kill();
        }
        let _ = c.child.wait();
    }
    outcome
}

fn run_clients(spec: &DaemonBenchSpec, socket: &Path, n: usize) -> Result<DaemonPoint, Error> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(spawn(&spec.exe, socket, spec.rounds, spec.pages, None)?);
    }
    let outcome = (|| {
        for c in &mut clients {
            read_until(c, "READY")?;
        }
        let start = Instant::now();
        for c in &mut clients {
            if let Some(stdin) = c.child.stdin.as_mut() {
                stdin.write_all(b"GO\n").map_err(os("start a client"))?;
                stdin.flush().map_err(os("start a client"))?;
            }
        }
        let mut times = Vec::new();
        for c in &mut clients {
            for line in read_until(c, "DONE")? {
                if let Some(ns) = line.strip_prefix("ROUND ").and_then(|v| v.parse().ok()) {
                    times.push(ns);
                }
            }
        }
        let wall = start.elapsed();
        Ok(point(n, n * spec.rounds * spec.pages, wall, times))
    })();
    for mut c in clients {
        if outcome.is_err() {
            let _ = c.child.kill();
        }
        let _ = c.child.wait();
    }
    outcome
}

/// The daemon rows of the report: per client count, aggregate throughput (beside the 1-client
/// daemon figure, the scaling target) and round latency (beside the same rounds in-process).
pub(super) fn figures(
    quick: bool,
    exe: &Path,
) -> Result<(Vec<super::report::Figure>, super::report::Plot), Error> {
    use super::report::{Figure, Plot, Target};
    let mode = ServiceMode::Interrupt;
    let spec = DaemonBenchSpec {
        clients: if quick {
            vec![1, 4]
        } else {
            vec![1, 4, 16, 64]
        },
        rounds: if quick { 5 } else { 20 },
        pages: 256,
        exe: exe.to_path_buf(),
        mode,
    };
    let local = in_process(spec.rounds, spec.pages, mode)?;
    let points = measure(&spec)?;
    let one = points.first().map(|p| p.pages_per_s).unwrap_or(0.0);
    let mut figures = Vec::new();
    let mut line = Vec::new();
    let note = format!(
        "{} rounds per client of MADV_REMOVE + device FILL over a {}-page memfd arena; client \
         processes float over the CPUs; median round latency, p99 over every client's rounds",
        spec.rounds, spec.pages
    );
    for p in &points {
        line.push((p.clients as f64, p.pages_per_s));
        let ratio = (one > 0.0).then(|| p.pages_per_s / one);
        figures.push(Figure {
            group: "daemon".into(),
            name: format!("aggregate device-fault throughput, {} clients", p.clients),
            mode: "interrupt".into(),
            placement: "-".into(),
            value: p.pages_per_s,
            unit: "pages/s".into(),
            baseline_name: "1 client through the daemon".into(),
            baseline: Some(one),
            ratio,
            target: (p.clients == 64).then(|| Target {
                text: ">= 0.8x the 1-client aggregate".into(),
                met: ratio.is_some_and(|r| r >= 0.8),
            }),
            note: note.clone(),
            ..Default::default()
        });
        figures.push(Figure {
            group: "daemon".into(),
            name: format!("round latency (discard + fill), {} clients", p.clients),
            mode: "interrupt".into(),
            placement: "-".into(),
            value: p.p50_us,
            p99: Some(p.p99_us),
            unit: "µs".into(),
            baseline_name: "the same round in-process (no daemon)".into(),
            baseline: Some(local.p50_us),
            ratio: (local.p50_us > 0.0).then(|| p.p50_us / local.p50_us),
            note: note.clone(),
            ..Default::default()
        });
    }
    let fairness_rounds = if quick { 50 } else { 300 };
    let (unloaded, loaded) = measure_fairness(exe, fairness_rounds, 32, 64 << 20, mode)?;
    figures.push(Figure {
        group: "daemon".into(),
        name: "4 KiB op latency, 3 clients beside one with 32 x 64 MiB checksums in flight".into(),
        mode: "interrupt".into(),
        placement: "-".into(),
        value: loaded.p50_us,
        p99: Some(loaded.p99_us),
        unit: "µs".into(),
        baseline_name: "the same ops with the device otherwise idle (p50)".into(),
        baseline: Some(unloaded.p50_us),
        ratio: (unloaded.p50_us > 0.0).then(|| loaded.p50_us / unloaded.p50_us),
        target: Some(Target {
            text: "p99 <= 50 ms".into(),
            met: loaded.p99_us <= 50_000.0,
        }),
        note: format!(
            "{fairness_rounds} device fills of one mapped page per light client, one at a time; \
             unloaded p99 {:.0} µs max {:.0} µs, loaded max {:.0} µs; the daemon's per-client \
             device share ({} MiB) keeps the heavy client's commands out of the device queue \
             ahead of them",
            unloaded.p99_us,
            unloaded.max_us,
            loaded.max_us,
            mirrord::DEFAULT_DEVICE_BYTES_PER_CLIENT >> 20
        ),
    });
    let plot = Plot {
        file: "daemon_clients".into(),
        title: "Daemon: aggregate device-fault throughput vs client processes".into(),
        x_label: "client processes".into(),
        y_label: "pages/s".into(),
        log_x: true,
        log_y: false,
        lines: vec![
            ("through the daemon".into(), line),
            (
                "in-process, 1 context".into(),
                vec![(1.0, local.pages_per_s), (64.0, local.pages_per_s)],
            ),
        ],
    };
    Ok((figures, plot))
}
