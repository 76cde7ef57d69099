//! The integration suite on the vfio-user backend, with the emulated device in a separate
//! process (`mirrorctl emulate --socket PATH`): driver buffers (page tables, rings) reach it
//! by fd (memfd), the test's anonymous memory through DMA_READ/DMA_WRITE, in twin-socket mode
//! (the server's requests on their own socket). Plus the server's life cycle: a killed server,
//! SIGTERM, reconnection to a device that keeps its state, a second client told the server is
//! busy, hostile clients (a stalled half message, refused BAR0 widths) and scripted servers.
//!
//! It lives beside the `mirrorctl` binary it runs; the suite is the driver's own, shared with
//! driver/tests/emulated.rs.
#[path = "../../tests/suite/mod.rs"]
mod suite;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use driver::backend::vfio_user::VfioUserBackend;
use driver::backend::{Backend, Config};
use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};

/// A device server process.
struct Server {
    child: Option<Child>,
    path: PathBuf,
    /// What the server wrote to stderr so far.
    log: Arc<Mutex<String>>,
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
        // Keep draining its stderr so it never blocks on a full pipe, and keep it for tests.
        let log = Arc::new(Mutex::new(String::new()));
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut line = String::new();
                while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
                    log.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
        }
        Server {
            child: Some(child),
            path,
            log,
        }
    }

    /// Lines of the server's stderr containing `text`, waiting up to 10 s for at least one.
    fn log_lines(&self, text: &str) -> Vec<String> {
        let started = std::time::Instant::now();
        loop {
            let found: Vec<String> = self
                .log
                .lock()
                .unwrap()
                .lines()
                .filter(|l| l.contains(text))
                .map(str::to_owned)
                .collect();
            if !found.is_empty() || started.elapsed() > Duration::from_secs(10) {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
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
    // A lost device uses no translation any more: the context's host side is released at
    // once, with no fence and no quarantine.
    let asid = ctx.asid();
    drop(ctx);
    assert_eq!(rt.quarantined_address_spaces(), 0);
    assert_eq!(rt.contexts_released_on_lost_device(), 1);
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
fn a_client_can_reconnect_and_a_second_client_is_told_the_server_is_busy() {
    let server = Server::spawn(false);
    let first = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(vendor_device(&first), IDS);
    // While the first is served, another is answered EBUSY, which the client explains.
    let err = VfioUserBackend::connect(&server.path)
        .unwrap_err()
        .to_string();
    let expected = format!(
        "the server at {} is serving another client",
        server.path.display()
    );
    assert!(err.contains(&expected), "{err}");
    // The server says why too.
    let why = server.log_lines("second client is refused with EBUSY");
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].contains("one client at a time"), "{}", why[0]);
    // The first client is unaffected.
    assert_eq!(vendor_device(&first), IDS);
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
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    unsafe { backend.dma_map(0x10_0000, suite::PAGE as u64, src, rw) }.unwrap();
    // Overlap: the server answers with a (header-only) error reply, the stream stays usable.
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    let err = unsafe { backend.dma_map(0x10_0000, suite::PAGE as u64, src, rw) }.unwrap_err();
    assert!(err.to_string().contains("dma_map"), "{err}");
    // Unmapping something never mapped.
    assert!(backend.dma_unmap(0x80_0000, suite::PAGE as u64).is_err());
    backend.dma_unmap_all().unwrap();
    // The range is free again.
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    unsafe { backend.dma_map(0x10_0000, suite::PAGE as u64, src, rw) }.unwrap();
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

/// Start the device on a one-command ring at `ring` (already mapped): memory decoding and bus
/// mastering on, the queue programmed and enabled, the tail moved past the command.
fn start_ring(b: &dyn Backend, ring: u64) {
    use accel_abi::config::{command as cmd, off};
    use accel_abi::regs;
    let bits = cmd::MEMORY | cmd::BUS_MASTER;
    b.config_write(off::COMMAND as u64, &bits.to_le_bytes())
        .unwrap();
    b.bar_write(0, regs::CMDQ_BASE, &ring.to_le_bytes())
        .unwrap();
    b.bar_write(0, regs::CMDQ_ENTRIES, &64u32.to_le_bytes())
        .unwrap();
    b.bar_write(0, regs::CMDQ_CTRL, &regs::cmdq_ctrl::ENABLE.to_le_bytes())
        .unwrap();
    b.bar_write(0, regs::CONTROL, &regs::control::ENABLE.to_le_bytes())
        .unwrap();
    b.bar_write(0, regs::CMDQ_TAIL, &1u32.to_le_bytes())
        .unwrap();
}

fn bar_read64(b: &dyn Backend, offset: u64) -> u64 {
    let mut v = [0u8; 8];
    b.bar_read(0, offset, &mut v).unwrap();
    u64::from_le_bytes(v)
}

/// Twin-socket mode with `mirrorctl emulate`: negotiated, and the device's DMA to memory mapped
/// without an fd (a FENCE fetched from the ring, its completion written back) travels as
/// DMA_READ/DMA_WRITE on the twin socket, none on the main one.
#[test]
fn twin_socket_carries_the_devices_dma_requests() {
    use accel_abi::{regs, Command};
    let server = Server::spawn(false);
    let backend = VfioUserBackend::connect(&server.path).unwrap();
    assert!(backend.twin_socket(), "twin-socket mode was not negotiated");
    const RING: u64 = 0x40_0000;
    let m = mirror::Mapping::anonymous(suite::PAGE, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    let value = 0x7a1e_0000_0000_0002u64;
    for (i, byte) in Command::fence(value)
        .with_completion(RING + 0x100)
        .encode()
        .iter()
        .enumerate()
    {
        m.write_byte(i, *byte);
    }
    let src = driver::backend::DmaSource::ProcessVa { va: m.addr() };
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    unsafe {
        backend.dma_map(
            RING,
            suite::PAGE as u64,
            src,
            driver::backend::DmaAccess::READ_WRITE,
        )
    }
    .unwrap();
    start_ring(&backend, RING);
    let started = std::time::Instant::now();
    while bar_read64(&backend, regs::FENCE_DONE) != value {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the FENCE never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let record: Vec<u8> = (0x100..0x110).map(|i| m.read_byte(i)).collect();
    let done = accel_abi::Completion::decode(&record.try_into().unwrap())
        .unwrap()
        .expect("the completion record was written");
    assert_eq!(done.status, accel_abi::Status::Ok);
    let (main, twin) = backend.server_requests_served();
    assert_eq!(main, 0, "server requests on the main socket");
    assert!(twin >= 2, "{twin} requests on the twin socket");
}

/// Eventfds open in process `pid`.
fn eventfds_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("eventfd"))
        .count()
}

/// A reconnect finds the device state the last client left (config space, BAR0 registers),
/// not its DMA maps nor its interrupt eventfds; a runtime then brings the retained device up
/// (it resets it) and uses it.
#[test]
fn a_reconnect_keeps_the_device_state_but_not_maps_or_interrupts() {
    use accel_abi::config::{command as cmd, off};
    use accel_abi::regs;
    let server = Server::spawn(false);
    let m = mirror::Mapping::anonymous(suite::PAGE, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    let src = driver::backend::DmaSource::ProcessVa { va: m.addr() };
    let rw = driver::backend::DmaAccess::READ_WRITE;
    let first = VfioUserBackend::connect(&server.path).unwrap();
    let bits = cmd::MEMORY | cmd::BUS_MASTER;
    first
        .config_write(off::COMMAND as u64, &bits.to_le_bytes())
        .unwrap();
    first
        .bar_write(0, regs::CMDQ_BASE, &0x7000_0000u64.to_le_bytes())
        .unwrap();
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    unsafe { first.dma_map(0x10_0000, suite::PAGE as u64, src, rw) }.unwrap();
    let eventfd =
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC).unwrap();
    first
        .set_irqs(vec![Some(std::os::fd::OwnedFd::from(eventfd))])
        .unwrap();
    assert_eq!(eventfds_of(server.pid()), 1, "the server holds the eventfd");
    drop(first);

    let second = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(
        eventfds_of(server.pid()),
        0,
        "the eventfd outlived its client"
    );
    let mut command = [0u8; 2];
    second
        .config_read(off::COMMAND as u64, &mut command)
        .unwrap();
    assert_eq!(u16::from_le_bytes(command) & bits, bits);
    assert_eq!(bar_read64(&second, regs::CMDQ_BASE), 0x7000_0000);
    // The old map is gone: the same IOVA maps again.
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    unsafe { second.dma_map(0x10_0000, suite::PAGE as u64, src, rw) }.unwrap();
    drop(second);

    // The driver brings the retained device up (bring-up resets it) and works.
    let (rt, ctx) = open_on(&server);
    let data =
        mirror::Mapping::anonymous(4 * suite::PAGE, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    suite::device_fill(&ctx, data.addr(), data.len() as u64, 0x4343_4343_4343_4343).unwrap();
    assert_eq!(data.read_byte(4 * suite::PAGE - 1), 0x43);
    drop(ctx);
    drop(rt);
}

/// A raw protocol connection that has negotiated (no twin socket).
fn raw_client(server: &Server) -> vfio_user_protocol::Connection {
    use vfio_user_protocol::{command, Connection, Header, Limits};
    let conn = Connection::new(
        UnixStream::connect(&server.path).unwrap(),
        Limits::default(),
    );
    conn.send(Header::command(1, command::VERSION, 4), &[0, 0, 2, 0], &[])
        .unwrap();
    assert!(!conn.recv().unwrap().header.is_error());
    conn
}

/// BAR0 refuses other widths than 4 and 8 bytes with a header-only EINVAL; the server logs the
/// first refusal of a connection with the widths allowed, and only that one.
#[test]
fn bar0_width_refusals_are_logged_once_with_the_widths_allowed() {
    use vfio_user_protocol::payload::{region, RegionAccess};
    use vfio_user_protocol::{command, Header};
    let server = Server::spawn(false);
    let conn = raw_client(&server);
    for (id, count) in [(2u16, 2u32), (3, 1), (4, 2)] {
        let req = RegionAccess {
            offset: 0,
            region: region::BAR0,
            count,
            data: Vec::new(),
        };
        conn.send(
            Header::command(id, command::REGION_READ, 0),
            &req.encode(),
            &[],
        )
        .unwrap();
        let r = conn.recv().unwrap();
        assert_eq!((r.header.id, r.header.error), (id, libc::EINVAL as u32));
    }
    let lines = server.log_lines("BAR0 takes 4- or 8-byte accesses only");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("2 bytes at 0x0") && lines[0].contains("REGION_READ"),
        "{}",
        lines[0]
    );
}

/// A client that sends a header and part of its body, then nothing, with the connection open:
/// dropped after the message timeout (logged, naming it), and the next client is served.
#[test]
fn a_stalled_half_message_is_dropped_after_the_message_timeout() {
    use std::io::Write;
    use vfio_user_protocol::{command, Header};
    let server = Server::spawn(false);
    let conn = raw_client(&server);
    let h = Header {
        size: 64,
        ..Header::command(2, command::REGION_WRITE, 0)
    };
    let mut raw = conn.stream();
    raw.write_all(&h.encode()).unwrap();
    raw.write_all(&[0; 8]).unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // The server hangs up (end of file) instead of waiting forever (the read timeout only
    // keeps a broken server from hanging the test).
    raw.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = (&mut raw).read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    // The drop itself, logged once (the server's "client connection ended" line names the same
    // cause, and comes after the hang-up: it may or may not be read yet).
    let lines = server.log_lines("dropping the connection: message stalled");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("MESSAGE_TIMEOUT"), "{}", lines[0]);
    eprintln!("dropped after {waited:?}: {}", lines[0]);
    let next = VfioUserBackend::connect(&server.path).unwrap();
    assert_eq!(vendor_device(&next), IDS);
}

/// A scripted server: answers the client's bring-up with a minimal PCI device (whatever it
/// asks, in any order), its VERSION with `version_reply` (body and descriptors), and its
/// DMA_UNMAP with `unmap_reply(request)`. Runs until the client hangs up.
fn scripted_server(
    version_reply: impl Fn() -> (Vec<u8>, Vec<std::os::fd::OwnedFd>) + Send + 'static,
    unmap_reply: impl Fn(vfio_user_protocol::payload::DmaUnmap) -> Vec<u8> + Send + 'static,
) -> UnixStream {
    use std::os::fd::AsFd;
    use vfio_user_protocol::payload::{self, irq, region};
    use vfio_user_protocol::{command, Connection, Limits};
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let c = Connection::new(theirs, Limits::default());
        c.set_peer_max_fds(8);
        while let Ok(m) = c.recv() {
            let h = m.header;
            let body = match h.command {
                command::VERSION => {
                    let (body, fds) = version_reply();
                    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                    let _ = c.reply(&h, &body, &fds);
                    continue;
                }
                command::DEVICE_GET_INFO => payload::DeviceInfo {
                    argsz: payload::DeviceInfo::SIZE as u32,
                    flags: payload::DEVICE_FLAGS_PCI | payload::DEVICE_FLAGS_RESET,
                    num_regions: region::COUNT,
                    num_irqs: irq::COUNT,
                }
                .encode(),
                command::DEVICE_GET_REGION_INFO => {
                    let r = payload::RegionInfo::decode(&m.payload).unwrap();
                    let size = match r.index {
                        region::BAR0 => accel_abi::regs::BAR0_SIZE,
                        region::CONFIG => 256,
                        _ => 0,
                    };
                    payload::RegionInfo {
                        argsz: payload::RegionInfo::SIZE as u32,
                        flags: if size > 0 {
                            region::FLAG_READ | region::FLAG_WRITE
                        } else {
                            0
                        },
                        cap_offset: 0,
                        size,
                        offset: 0,
                        ..r
                    }
                    .encode()
                }
                command::DEVICE_GET_IRQ_INFO => {
                    let r = payload::IrqInfo::decode(&m.payload).unwrap();
                    payload::IrqInfo {
                        argsz: payload::IrqInfo::SIZE as u32,
                        flags: irq::INFO_EVENTFD,
                        count: if r.index == irq::MSI { 4 } else { 1 },
                        ..r
                    }
                    .encode()
                }
                command::DMA_MAP => Vec::new(),
                command::DMA_UNMAP => unmap_reply(payload::DmaUnmap::decode(&m.payload).unwrap()),
                _ => {
                    let _ = c.reply_error(&h, libc::ENOSYS);
                    continue;
                }
            };
            let _ = c.reply(&h, &body, &[]);
        }
    });
    ours
}

fn plain_version() -> (Vec<u8>, Vec<std::os::fd::OwnedFd>) {
    use vfio_user_protocol::version::{Capabilities, Version};
    let v = Version::ours(Capabilities {
        max_msg_fds: 8,
        ..Default::default()
    });
    (v.encode(), Vec::new())
}

/// DMA_UNMAP: a reply echoing the request (the spec) is accepted; one that does not (another
/// range, or the bytes unmapped as an older server of ours sent) is an error saying so.
#[test]
fn dma_unmap_accepts_the_echo_and_refuses_another_answer() {
    let echo = |req: vfio_user_protocol::payload::DmaUnmap| req.encode();
    let backend = VfioUserBackend::from_stream(scripted_server(plain_version, echo)).unwrap();
    let src = driver::backend::DmaSource::ProcessVa { va: 0x1000_0000 };
    let rw = driver::backend::DmaAccess::READ_WRITE;
    let page = suite::PAGE as u64;
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    unsafe { backend.dma_map(0x10_0000, page, src, rw) }.unwrap();
    backend.dma_unmap(0x10_0000, page).unwrap();
    backend.dma_unmap_all().unwrap();

    let other_address = |req: vfio_user_protocol::payload::DmaUnmap| {
        vfio_user_protocol::payload::DmaUnmap {
            address: req.address + 0x1000,
            ..req
        }
        .encode()
    };
    let backend =
        VfioUserBackend::from_stream(scripted_server(plain_version, other_address)).unwrap();
    // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
    unsafe { backend.dma_map(0x10_0000, page, src, rw) }.unwrap();
    let err = backend.dma_unmap(0x10_0000, page).unwrap_err().to_string();
    assert!(err.contains("does not echo the request"), "{err}");
}

/// Twin-socket mode "supported" in the reply without a valid descriptor: the client aborts
/// (the spec), saying why; without the proposal-matching reply nothing else is tried.
#[test]
fn a_twin_socket_reply_without_its_descriptor_is_refused() {
    use vfio_user_protocol::version::{Capabilities, Version};
    let bad = || {
        let v = Version::ours(Capabilities {
            max_msg_fds: 8,
            twin_socket: true,
            twin_socket_fd_index: Some(0),
            ..Default::default()
        });
        (v.encode(), Vec::new())
    };
    let err = VfioUserBackend::from_stream(scripted_server(bad, |r| r.encode()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("twin-socket"), "{err}");
    assert!(err.contains("without a valid descriptor"), "{err}");
    // A descriptor that is not a socket is refused as well.
    let not_a_socket = move || {
        let (v, _) = bad();
        let f = std::fs::File::open("/dev/null").unwrap();
        (v, vec![std::os::fd::OwnedFd::from(f)])
    };
    let err = VfioUserBackend::from_stream(scripted_server(not_a_socket, |r| r.encode()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a socket"), "{err}");
}

/// A server that does not take up the proposal: single-socket mode.
#[test]
fn a_server_without_twin_socket_mode_is_used_on_one_socket() {
    let backend =
        VfioUserBackend::from_stream(scripted_server(plain_version, |r| r.encode())).unwrap();
    assert!(!backend.twin_socket());
    assert_eq!(backend.server_requests_served(), (0, 0));
}
