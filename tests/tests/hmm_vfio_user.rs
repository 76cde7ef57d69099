//! The hmm-tests port on the vfio-user backend: the emulated MXA-1 runs in another process (this
//! test binary re-executed in server mode, serving one connection with
//! `firmware_stubs::vfio_user_server`), driver buffers reach it by fd and the test's memory
//! through DMA_READ/DMA_WRITE served by the driver. Same cases as `hmm_conformance.rs`.
mod hmm;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

const SERVER_SOCKET: &str = "HMM_VFU_SERVER_SOCKET";
const READY: &str = "hmm vfio-user server listening";

fn socket_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "hmm-vfu-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Start a device server process (this binary in server mode) and connect a runtime to it. The
/// server serves this one client and exits when the runtime disconnects.
fn open(mode: ServiceMode) -> Arc<Runtime> {
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "device_server_mode",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(SERVER_SOCKET, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the device server");
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines
            .read_line(&mut line)
            .expect("read the server's stderr");
        assert!(n > 0, "the device server exited before listening");
        if line.contains(READY) {
            break;
        }
    }
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = lines.read_to_end(&mut sink);
        let _ = child.wait();
    });
    let options = RuntimeOptions {
        mode,
        ..Default::default()
    };
    Runtime::open(DeviceSpec::VfioUser(path), options).expect("open the vfio-user device")
}

/// Server mode (does nothing unless started by `open`): serve one client, then exit.
#[test]
fn device_server_mode() {
    let Some(path) = std::env::var_os(SERVER_SOCKET) else {
        return;
    };
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    eprintln!("{READY} on {}", PathBuf::from(&path).display());
    let (stream, _) = listener.accept().expect("accept");
    let _ = std::fs::remove_file(&path);
    let cfg = firmware_stubs::AcceleratorConfig::default();
    if let Err(e) = firmware_stubs::vfio_user_server::serve_connection(stream, &cfg) {
        eprintln!("device server: {e}");
    }
}

mod interrupt {
    use super::*;
    hmm_suite!(|| open(ServiceMode::Interrupt));
}

mod polling {
    use super::*;
    hmm_suite!(|| open(ServiceMode::Polling));
}
