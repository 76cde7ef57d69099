//! Several client processes computing on their own memory through one daemon.
//!
//! ```text
//! cargo run -p examples --example daemon_clients            # daemon + 3 clients
//! cargo run -p examples --example daemon_clients -- 6       # daemon + 6 clients
//! ```
//!
//! The program starts the daemon (the embedded emulated accelerator behind a UNIX socket, as
//! `mirrorctl serve` does) and then runs itself again as each client process. A client connects,
//! allocates an arena (memory the device can reach at its ordinary address), has the device fill
//! it, copy one half onto the other, checksum it and count with atomics, and checks every result
//! on the CPU. Each client gets its own device address space; none can reach another's memory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
use driver::{DeviceOps, Error};
use mirrord::{Daemon, DaemonConfig};
use mirrord_client::DaemonClient;

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(accel_abi::FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// One client process's work.
fn client(socket: &Path, n: u64) -> Result<String, Error> {
    let started = Instant::now();
    let session = DaemonClient::connect(socket)?;
    let mut arena = session.alloc_arena(4 << 20)?;
    let half = arena.len() / 2;

    // The device writes our memory; the CPU checks it.
    let pattern = 0x0101_0101_0101_0101 * (n + 1);
    session.fill(&mut arena[..half], pattern)?;
    assert!(arena[..half].iter().all(|b| *b == (n + 1) as u8));

    // The CPU writes, the device copies and checksums.
    for (i, b) in arena[..half].iter_mut().enumerate() {
        *b = (i as u64).wrapping_mul(n + 7) as u8;
    }
    let (src, dst) = arena.split_at_mut(half);
    session.copy(dst, src)?;
    assert_eq!(src, dst);
    let sum = session.checksum(&arena[..half])?;
    assert_eq!(sum, fnv(&arena[..half]));

    // Device atomics on a counter that lives in the arena.
    let counter = arena[half..].as_ptr() as *const AtomicU64;
    // SAFETY: 8 aligned bytes of the arena, which outlives this use; only atomics touch them.
    let counter = unsafe { &*counter };
    counter.store(0, Ordering::Relaxed);
    for _ in 0..1000 {
        session.atomic_add(counter, 1)?;
    }
    assert_eq!(counter.load(Ordering::Relaxed), 1000);

    let stats = session.stats()?;
    Ok(format!(
        "client {n} (pid {}, device address space {}): fill, copy, checksum {sum:#018x} and 1000 \
         atomics checked; {} device faults, {} pages mapped, {} commands, {:.1} ms",
        std::process::id(),
        session.asid(),
        stats.faults,
        stats.pages_mapped,
        stats.commands,
        started.elapsed().as_secs_f64() * 1e3
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        let socket = PathBuf::from(&args[2]);
        let n = args[3].parse().unwrap_or(0);
        return match client(&socket, n) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("client {n}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let clients: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    match serve_and_run(clients) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("daemon_clients: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve_and_run(clients: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("mirrord-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("mirrord.sock");
    let runtime = Runtime::open(DeviceSpec::emulated(), RuntimeOptions::default())?;
    let daemon = Daemon::new(runtime, DaemonConfig::new(&socket))?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let result = tokio.block_on(async {
        let server = daemon.serve(async {
            let _ = stop_rx.await;
        });
        let run = async {
            while !socket.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            println!(
                "daemon serving {}; starting {clients} client processes",
                socket.display()
            );
            let exe = std::env::current_exe()?;
            let socket = socket.clone();
            let outcome = tokio::task::spawn_blocking(move || run_clients(&exe, &socket, clients))
                .await
                .map_err(std::io::Error::other)?;
            let _ = stop_tx.send(());
            outcome
        };
        let (served, ran) = tokio::join!(server, run);
        served.map_err(|e| e.to_string())?;
        ran.map_err(|e| e.to_string())
    });
    let stats = daemon.stats();
    println!(
        "daemon: {} clients released, {} bytes still mapped, {} IOVA bytes in use (rings and \
         page-table pool)",
        stats.released, stats.mapped_bytes_total, stats.iova_bytes
    );
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(Into::into)
}

fn run_clients(exe: &Path, socket: &Path, clients: u64) -> std::io::Result<()> {
    let children: Vec<_> = (0..clients)
        .map(|n| {
            Command::new(exe)
                .arg("--client")
                .arg(socket)
                .arg(n.to_string())
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut failed = 0;
    for mut child in children {
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        print!("{out}");
        if !child.wait()?.success() {
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(std::io::Error::other(format!("{failed} clients failed")));
    }
    Ok(())
}
