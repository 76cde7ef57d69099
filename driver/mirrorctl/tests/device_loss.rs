//! A device that dies under the runtime: the vfio-user server (`mirrorctl emulate`, a separate
//! process) is SIGKILLed while large fills are in flight on two contexts. Every wait must end
//! promptly with `Error::DeviceLost` naming the socket (not the wait timeout), later submits
//! must fail at once, and dropping the contexts must release them at once, with no
//! quarantine.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Op, Runtime, RuntimeOptions};
use driver::Error;

/// A device server process (the pattern of tests/vfio_user.rs).
struct Server {
    child: Option<Child>,
    path: PathBuf,
}

fn socket_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "mxa-loss-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Server {
    /// Start `mirrorctl emulate` and wait until it listens (it says so on stderr).
    fn spawn() -> Server {
        let path = socket_path();
        let _ = std::fs::remove_file(&path);
        let mut child = Command::new(env!("CARGO_BIN_EXE_mirrorctl"))
            .arg("emulate")
            .arg("--socket")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mirrorctl emulate");
        let stderr = child.stderr.take().expect("stderr piped");
        let mut lines = BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            let n = lines.read_line(&mut line).expect("read server stderr");
            assert!(n > 0, "the server exited before listening");
            if line.contains("serving the MXA-1") {
                break;
            }
        }
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
        });
        Server {
            child: Some(child),
            path,
        }
    }

    /// SIGKILL it (no chance to say goodbye) and reap it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL the server");
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Far longer than any prompt failure: an error coming back after it is a timeout, not the
/// loss being noticed.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// The generous bound that proves "noticed, not timed out".
const PROMPT: Duration = Duration::from_secs(10);
/// Bytes each context fills: seconds of DMA_WRITE traffic, so the fills are still running
/// when the server dies. In commands of the device's largest transfer (64 MiB).
const FILL: usize = 128 << 20;
const CHUNK: usize = 64 << 20;

fn kill_mid_fill(mode: ServiceMode) {
    let mut server = Server::spawn();
    let socket = server.path.display().to_string();
    let rt = Runtime::open(
        DeviceSpec::VfioUser(server.path.clone()),
        RuntimeOptions {
            mode,
            timeout: WAIT_TIMEOUT,
            ..RuntimeOptions::default()
        },
    )
    .expect("open the vfio-user device");
    let contexts = 2;
    let ready = Arc::new(Barrier::new(contexts + 1));
    let waiters: Vec<_> = (0..contexts)
        .map(|i| {
            let (rt, ready) = (rt.clone(), ready.clone());
            std::thread::spawn(move || {
                let ctx = rt.create_context().expect("context");
                let mut buf = vec![0u8; FILL];
                let ops: Vec<Op> = buf
                    .chunks_mut(CHUNK)
                    .map(|chunk| Op::Fill {
                        dst: chunk.as_mut_ptr() as u64,
                        len: chunk.len() as u64,
                        pattern: 0x1111_1111_1111_1111 * (i as u64 + 1),
                    })
                    .collect();
                let tickets: Vec<_> = ops
                    .iter()
                    // SAFETY: `buf` is not touched until every wait below has returned.
                    .map(|op| unsafe { ctx.submit(*op) }.expect("submit a fill"))
                    .collect();
                ready.wait();
                let waited: Vec<_> = tickets.into_iter().map(|t| ctx.wait(t)).collect();
                let returned = Instant::now();
                let op = ops[0];
                // The next command fails at once.
                let t = Instant::now();
                // SAFETY: as above; the device is gone, nothing runs.
                let next = unsafe { ctx.submit(op) };
                let next_took = t.elapsed();
                let t = Instant::now();
                drop(ctx);
                let drop_took = t.elapsed();
                drop(buf);
                (waited, returned, next.err(), next_took, drop_took)
            })
        })
        .collect();
    ready.wait();
    // Let the fills get going (faults serviced, data flowing), then kill the device.
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    server.kill();
    for w in waiters {
        let (waited, returned, next, next_took, drop_took) = w.join().expect("waiter");
        let after = returned.saturating_duration_since(killed);
        assert!(
            waited.last().is_some_and(Result::is_err),
            "the fills completed before the kill: make FILL larger"
        );
        for w in &waited {
            match w {
                // Done before the kill.
                Ok(_) => {}
                Err(e @ Error::DeviceLost(lost)) => {
                    assert_eq!(lost.device, socket, "the error names the lost device");
                    let text = e.to_string();
                    assert!(text.contains(&socket) && text.contains("lost"), "{text}");
                }
                Err(e) => {
                    panic!("a wait failed {after:?} after the kill with {e}, not DeviceLost")
                }
            }
        }
        assert!(
            after < PROMPT,
            "the wait ended {after:?} after the kill (timeout {WAIT_TIMEOUT:?})"
        );
        assert!(
            matches!(next, Some(Error::DeviceLost(_))),
            "the next submit: {next:?}"
        );
        assert!(next_took < PROMPT, "the next submit took {next_took:?}");
        assert!(
            drop_took < PROMPT,
            "dropping the context took {drop_took:?}"
        );
        eprintln!(
            "{mode:?}: wait ended {after:?} after the kill, next submit failed in {next_took:?}, \
             drop took {drop_took:?}"
        );
    }
    assert_eq!(rt.quarantined_address_spaces(), 0, "no quarantine");
    assert_eq!(rt.contexts_released_on_lost_device(), contexts as u64);
    let stats = rt.service().stats();
    // Noted by the service thread, which may still be finishing the batch it was servicing
    // (the waiters see the loss by themselves).
    let noted = Instant::now();
    while stats.device_lost.load(Ordering::Relaxed) == 0 && noted.elapsed() < PROMPT {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stats.device_lost.load(Ordering::Relaxed), 1);
    eprintln!(
        "{mode:?}: the service noted the loss {:?} after the waits",
        noted.elapsed()
    );
    assert!(stats.lost_waits.load(Ordering::Relaxed) >= contexts as u64);
    assert!(rt.device_lost().is_some());
    // A new context is refused at once, naming the loss.
    assert!(matches!(rt.create_context(), Err(Error::DeviceLost(_))));
    let t = Instant::now();
    drop(rt);
    assert!(
        t.elapsed() < PROMPT,
        "closing the runtime took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_server_killed_mid_fill_fails_every_wait_promptly_interrupt_mode() {
    kill_mid_fill(ServiceMode::Interrupt);
}

#[test]
fn a_server_killed_mid_fill_fails_every_wait_promptly_polling_mode() {
    kill_mid_fill(ServiceMode::Polling);
}
