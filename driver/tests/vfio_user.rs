//! The integration suite on the vfio-user backend, with the emulated device in a separate
//! process (`mirrorctl emulate --socket PATH`): driver buffers (page tables, rings) reach it
//! by fd (memfd), the test's anonymous memory through DMA_READ/DMA_WRITE. Plus the server's
//! life cycle: a killed server, SIGTERM, reconnection, a second client refused.
mod suite;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driver::backend::vfio_user::VfioUserBackend;
use driver::backend::{Backend, Config};
use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

/// A device server process.
struct Server {
    child: Option<Child>,
    path: PathBuf,
}

fn socket_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "mxa-vfu-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Server {
    /// Start `mirrorctl emulate` and wait until it listens (it says so on stderr).
    fn spawn(once: bool) -> Server {
        let path = socket_path();
        let _ = std::fs::remove_file(&path);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mirrorctl"));
        cmd.arg("emulate").arg("--socket").arg(&path);
        if once {
            cmd.arg("--once");
        }
        let mut child = cmd
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

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    /// Wait for the process to exit; returns its status.
    fn wait(&mut self) -> std::process::ExitStatus {
        self.child
            .take()
            .expect("not yet waited")
            .wait()
            .expect("wait")
    }

    /// Let a `--once` server live on until its client goes, reaped by a thread.
    fn detach(mut self) {
        if let Some(mut c) = self.child.take() {
            std::thread::spawn(move || c.wait());
        }
        // The server removes its socket when it exits.
        self.path = PathBuf::new();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn open(mode: ServiceMode) -> Arc<Runtime> {
    let server = Server::spawn(true);
    let options = RuntimeOptions {
        mode,
        ..Default::default()
    };
    // On failure the guard kills the server; on success it lives until the runtime disconnects.
    let rt = Runtime::open(DeviceSpec::VfioUser(server.path.clone()), options)
        .expect("open the vfio-user device");
    server.detach();
    rt
}

mod interrupt {
    use super::*;
    backend_suite!(|| open(ServiceMode::Interrupt));
}

mod polling {
    use super::*;
    backend_suite!(|| open(ServiceMode::Polling));
}

fn vendor_device(b: &dyn Backend) -> (u16, u16) {
    let c = Config(b);
    (c.read16(0).unwrap(), c.read16(2).unwrap())
}

const IDS: (u16, u16) = (accel_abi::config::VENDOR_ID, accel_abi::config::DEVICE_ID);

#[test]
fn killed_server_gives_a_clear_error() {
    let mut server = Server::spawn(false);
    let backend = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(vendor_device(&backend), IDS);
    server.signal(nix::sys::signal::Signal::SIGKILL);
    server.wait();
    let mut b = [0u8; 4];
    let err = backend
        .config_read(0, &mut b)
        .expect_err("the server is dead");
    let text = err.to_string();
    assert!(text.contains("vfio-user"), "{text}");
    assert!(
        text.contains("closed") || text.contains("lost") || text.contains("send"),
        "{text}"
    );
    // And it stays an error.
    assert!(backend.reset().is_err());
}

#[test]
fn killed_server_fails_the_runtime_without_hanging() {
    let mut server = Server::spawn(false);
    let options = RuntimeOptions {
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let rt = Runtime::open(DeviceSpec::VfioUser(server.path.clone()), options).unwrap();
    let ctx = rt.create_context().unwrap();
    let m =
        mirror::Mapping::anonymous(4 * suite::PAGE, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    suite::device_fill(&ctx, m.addr(), m.len() as u64, 0x55).unwrap();
    server.signal(nix::sys::signal::Signal::SIGKILL);
    server.wait();
    assert!(suite::device_fill(&ctx, m.addr(), m.len() as u64, 0x66).is_err());
    // The tear-down cannot be fenced on a dead device: its address space is retired, never
    // handed out again, and the unmapped IOVAs stay reserved.
    let asid = ctx.asid();
    drop(ctx);
    assert_eq!(rt.quarantined_address_spaces(), 1);
    if let Ok(other) = rt.create_context() {
        assert_ne!(other.asid(), asid, "a retired address space was reused");
    }
}

#[test]
fn sigterm_shuts_the_server_down_cleanly() {
    let mut server = Server::spawn(false);
    let backend = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(vendor_device(&backend), IDS);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.wait();
    assert!(status.success(), "{status:?}");
    assert!(!server.path.exists(), "the socket file is removed");
    let mut b = [0u8; 4];
    assert!(backend.config_read(0, &mut b).is_err());
}

#[test]
fn a_client_can_reconnect_and_a_second_client_is_refused() {
    let server = Server::spawn(false);
    let first = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(vendor_device(&first), IDS);
    // While the first is served, another connection is closed by the server.
    assert!(VfioUserBackend::connect(&server.path).is_err());
    drop(first);
    let second = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(vendor_device(&second), IDS);
}

#[test]
fn unmap_all_and_error_replies() {
    let server = Server::spawn(false);
    let backend = VfioUserBackend::connect(&server.path).unwrap();
    let m =
        mirror::Mapping::anonymous(2 * suite::PAGE, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    let src = driver::backend::DmaSource::ProcessVa { va: m.addr() };
    let rw = driver::backend::DmaAccess::READ_WRITE;
    backend
        .dma_map(0x10_0000, suite::PAGE as u64, src, rw)
        .unwrap();
    // Overlap: the server answers with a (header-only) error reply, the stream stays usable.
    let err = backend
        .dma_map(0x10_0000, suite::PAGE as u64, src, rw)
        .unwrap_err();
    assert!(err.to_string().contains("dma_map"), "{err}");
    // Unmapping something never mapped.
    assert!(backend.dma_unmap(0x80_0000, suite::PAGE as u64).is_err());
    backend.dma_unmap_all().unwrap();
    // The range is free again.
    backend
        .dma_map(0x10_0000, suite::PAGE as u64, src, rw)
        .unwrap();
    backend.dma_unmap(0x10_0000, suite::PAGE as u64).unwrap();
    // A register outside BAR0 is refused before anything is sent; the connection still works.
    let mut b = [0u8; 4];
    assert!(backend
        .bar_read(0, accel_abi::regs::BAR0_SIZE, &mut b)
        .is_err());
    assert_eq!(vendor_device(&backend), IDS);
}

#[test]
fn garbage_from_a_client_gets_error_replies_not_a_crash() {
    use vfio_user_protocol::{command, Connection, Header, Limits, MessageType};
    let server = Server::spawn(false);
    let raw = UnixStream::connect(&server.path).unwrap();
    let conn = Connection::new(raw, Limits::default());
    // A command before VERSION is refused.
    conn.send(Header::command(1, command::DEVICE_RESET, 0), &[], &[])
        .unwrap();
    let r = conn.recv().unwrap();
    assert!(r.header.is_error() && r.header.id == 1);
    // VERSION without capabilities (a 0.1 peer).
    conn.send(Header::command(2, command::VERSION, 4), &[0, 0, 1, 0], &[])
        .unwrap();
    let r = conn.recv().unwrap();
    assert!(!r.header.is_error());
    let v = vfio_user_protocol::version::Version::decode(&r.payload).unwrap();
    assert_eq!((v.major, v.minor), (0, 1));
    // An unknown command with a payload: ENOSYS, payload drained.
    conn.send(Header::command(3, 999, 100), &[0xaa; 100], &[])
        .unwrap();
    let r = conn.recv().unwrap();
    assert_eq!(r.header.message_type(), MessageType::Reply);
    assert_eq!((r.header.id, r.header.error), (3, libc::ENOSYS as u32));
    // A truncated region read request: EINVAL.
    conn.send(Header::command(4, command::REGION_READ, 3), &[1, 2, 3], &[])
        .unwrap();
    let r = conn.recv().unwrap();
    assert_eq!((r.header.id, r.header.error), (4, libc::EINVAL as u32));
    // Still in step: a valid request works.
    let req = vfio_user_protocol::payload::RegionAccess {
        offset: 0,
        region: vfio_user_protocol::payload::region::CONFIG,
        count: 2,
        data: Vec::new(),
    };
    conn.send(
        Header::command(5, command::REGION_READ, 0),
        &req.encode(),
        &[],
    )
    .unwrap();
    let r = conn.recv().unwrap();
    assert!(!r.header.is_error());
    let got = vfio_user_protocol::payload::RegionAccess::decode(&r.payload, true).unwrap();
    assert_eq!(got.data, accel_abi::config::VENDOR_ID.to_le_bytes());
}

#[test]
fn a_client_dying_mid_message_leaves_the_server_ready_for_the_next() {
    use std::io::Write;
    use vfio_user_protocol::{command, Header};
    let server = Server::spawn(false);
    let mut raw = UnixStream::connect(&server.path).unwrap();
    let h = Header {
        size: 64,
        ..Header::command(1, command::VERSION, 0)
    };
    raw.write_all(&h.encode()).unwrap();
    raw.write_all(&[0, 0, 2, 0]).unwrap();
    drop(raw);
    let next = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(vendor_device(&next), IDS);
}

/// A runtime on `server`'s device and a context.
fn open_on(server: &Server) -> (Arc<Runtime>, driver::Context) {
    let rt = Runtime::open(
        DeviceSpec::VfioUser(server.path.clone()),
        RuntimeOptions::default(),
    )
    .expect("open the vfio-user device");
    let ctx = rt.create_context().unwrap();
    (rt, ctx)
}

/// The device process maps a file whose /proc/PID/maps name contains `name` (memory it reaches
/// by fd, not by DMA_READ/DMA_WRITE).
fn assert_server_maps(server: &Server, name: &str) {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid())).unwrap();
    assert!(
        maps.contains(name),
        "the server did not map {name}:\n{maps}"
    );
}

#[test]
fn memfd_memory_is_mapped_by_the_server_itself() {
    let server = Server::spawn(false);
    let (rt, ctx) = open_on(&server);
    let (_file, m) = suite::memfd_arena("vfu-user-arena", 16 * suite::PAGE);
    suite::device_fill(
        &ctx,
        m.addr(),
        4 * suite::PAGE as u64,
        0x5151_5151_5151_5151,
    )
    .unwrap();
    assert_eq!(m.read_byte(4 * suite::PAGE - 1), 0x51);
    // Shared file memory goes by fd: the device process maps the arena itself instead of
    // asking for every access with DMA_READ/DMA_WRITE.
    assert_server_maps(&server, "memfd:vfu-user-arena");
    drop(ctx);
    drop(rt);
}

#[test]
fn memfd_memory_straddling_a_2mib_boundary_goes_by_fd_too() {
    // Registering the run for events splits such a VMA at the boundary; the fd lookup must use
    // the VMA as it is after that (it used the bounds from before and fell back to DMA_READ and
    // DMA_WRITE whenever a mapping happened to straddle one).
    let server = Server::spawn(false);
    let (rt, ctx) = open_on(&server);
    let len = 16 * suite::PAGE;
    let (file, _elsewhere) = suite::memfd_arena("vfu-straddle", len);
    let reserve = mirror::Mapping::anonymous(4 << 20, libc::PROT_NONE).unwrap();
    let boundary = (reserve.addr() + (2 << 20)) & !((2 << 20) - 1);
    let at = boundary - (len as u64) / 2;
    // SAFETY: `at..at+len` lies inside `reserve`, which this test owns and nothing references;
    // `reserve` unmaps it all when dropped.
    let mapped = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    assert_eq!(mapped as u64, at);
    suite::device_fill(&ctx, at, len as u64, 0x6262_6262_6262_6262).unwrap();
    use std::os::unix::fs::FileExt;
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len as u64 - 1).unwrap();
    assert_eq!(last[0], 0x62);
    assert_server_maps(&server, "memfd:vfu-straddle");
    drop(ctx);
    drop(rt);
    drop(reserve);
}
