//! docs/semantics.md section 1, "a device never reads or writes memory that was freed", through
//! the daemon: a daemon client's wait that times out returns only once the device can no longer
//! touch the arena it borrowed. The client is a separate process (this test binary re-run as the
//! ignored `daemon_client_role`); the daemon and its emulated device run here. (The in-process
//! half is driver/tests/safety.rs.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::backend::emulated::EmulatedBackend;
use driver::{Runtime, RuntimeOptions};
use firmware_stubs::{Accelerator, AcceleratorConfig};

mod daemon_support;
use daemon_support::{serve_on_a_thread, wait_for_socket, TempDir};

const LEN: usize = 256 << 10;
const REUSED: u8 = 0x11;

const SOCKET_ENV: &str = "MIRROR_SAFETY_TEST_SOCKET";
/// How long the client waits for any one daemon reply (`DaemonClient::connect_with`).
const CLIENT_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads one line the client printed, skipping libtest's noise.
fn client_line(out: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the client exited early"
        );
        if let Some(at) = line.find("SAFETY ") {
            return line[at + 7..].trim().to_string();
        }
    }
}

/// A daemon client's `fill` whose reply does not come within its timeout returns only after
/// the daemon released the session (device view torn down and fenced); the stuck command then
/// writes nothing into the arena the client has reused. It used to return `Timeout` with the
/// command still queued on the device, which then filled the reused arena.
#[test]
fn a_daemon_client_wait_that_times_out_returns_only_after_the_daemon_released_it() {
    use std::io::Write;
    let device = Arc::new(Accelerator::new(AcceleratorConfig::default()).unwrap());
    let options = RuntimeOptions {
        timeout: Duration::from_secs(30),
        ..RuntimeOptions::default()
    };
    let backend = EmulatedBackend::from_device(device.clone());
    let rt = Runtime::open_backend(Box::new(backend), options).unwrap();
    let dir = TempDir::new("safety");
    let socket = dir.0.join("mirrord.sock");
    let daemon = Arc::new(mirrord::Daemon::new(rt, mirrord::DaemonConfig::new(&socket)).unwrap());
    let (stop, server) = serve_on_a_thread(daemon.clone());
    wait_for_socket(&socket, "the daemon");

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "daemon_client_role",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SOCKET_ENV, &socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_client = child.stdin.take().unwrap();
    let mut from_client = std::io::BufReader::new(child.stdout.take().unwrap());
    assert_eq!(client_line(&mut from_client), "warm");
    device.hold_work(true);
    writeln!(to_client, "go").unwrap();
    let returned = client_line(&mut from_client);
    eprintln!("client: {returned}");
    assert!(returned.starts_with("returned "), "{returned}");
    // The client has reused its arena by now. Let the stuck command go on.
    device.hold_work(false);
    assert!(
        device.wait_idle(Duration::from_secs(20)),
        "the device never went idle"
    );
    writeln!(to_client, "check").unwrap();
    let checked = client_line(&mut from_client);
    assert_eq!(
        checked, "untouched",
        "the device wrote the client's arena after its wait returned"
    );
    assert!(child.wait().unwrap().success());
    let _ = stop.send(());
    let _ = server.join();
}

/// The client process of the daemon test (does nothing when run directly).
#[test]
#[ignore]
fn daemon_client_role() {
    use std::io::BufRead;
    let Ok(socket) = std::env::var(SOCKET_ENV) else {
        return;
    };
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    let client =
        mirrord_client::DaemonClient::connect_with(socket.as_ref(), CLIENT_REPLY_TIMEOUT).unwrap();
    let mut arena = client.alloc_arena(LEN).unwrap();
    driver::DeviceOps::fill(&*client, &mut arena[..], 0x0101_0101_0101_0101).unwrap();
    println!("SAFETY warm");
    stdin.read_line(&mut line).unwrap();
    let started = Instant::now();
    let err = driver::DeviceOps::fill(&*client, &mut arena[..], 0x5a5a_5a5a_5a5a_5a5a).unwrap_err();
    // The call returned: the arena is ours again.
    arena.fill(REUSED);
    println!("SAFETY returned after {:?}: {err}", started.elapsed());
    line.clear();
    stdin.read_line(&mut line).unwrap();
    let written = arena.iter().filter(|b| **b != REUSED).count();
    if written == 0 {
        println!("SAFETY untouched");
    } else {
        println!("SAFETY written {written}");
    }
}
