//! vfio-user conformance, written from the protocol specification (QEMU's
//! `docs/interop/vfio-user.rst`), run against both sides of this repository:
//!
//! - `server`: the test is a client speaking raw protocol (`vfio_user_protocol::Connection`, or
//!   raw bytes where the malformed input is the point) to
//!   `firmware_stubs::vfio_user_server::serve_connection` on one end of a socket pair;
//! - `client`: the test is a scripted server on the other end of
//!   `driver::backend::vfio_user::VfioUserBackend::from_stream`.
//!
//! Every test names the spec section it checks (its doc comment starts with it, in quotes).
//! Where the spec leaves the answer open (which errno, ENOSYS for an unknown command), the test
//! pins the answer docs/vfio-user.md documents and says so. No case is ignored: everything the
//! spec requires of the commands we implement, both sides do.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sys_util::sync::lock;
use vfio_user_protocol::json::{self, Value};
use vfio_user_protocol::payload::{self, irq, region};
use vfio_user_protocol::version::{Capabilities, Version};
use vfio_user_protocol::{
    command, flags, Connection, Header, Limits, Message, MessageType, RecvError, HEADER_SIZE,
};

/// How long a test waits for a message before calling it a hang (a bound, not a measurement).
const PATIENCE: Duration = Duration::from_secs(30);
const PAGE: u64 = 4096;
const RW: u32 = payload::DMA_MAP_READ | payload::DMA_MAP_WRITE;

/// A VERSION payload: major, minor, then `json` with its terminating NUL (spec "Version").
fn version_body(major: u16, minor: u16, json: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&major.to_ne_bytes());
    b.extend_from_slice(&minor.to_ne_bytes());
    if let Some(j) = json {
        b.extend_from_slice(j.as_bytes());
        b.push(0);
    }
    b
}

/// The JSON of a VERSION payload, parsed (None if the payload has none). The spec: optional,
/// UTF-8, "including terminating NUL".
fn version_json(payload: &[u8]) -> Option<Value> {
    assert!(
        payload.len() >= 4,
        "VERSION payload of {} bytes",
        payload.len()
    );
    let data = &payload[4..];
    if data.is_empty() {
        return None;
    }
    assert_eq!(data.last(), Some(&0), "version data must end with its NUL");
    let text = std::str::from_utf8(&data[..data.len() - 1]).expect("version data is UTF-8");
    Some(json::parse(text).unwrap_or_else(|e| panic!("version data is not JSON ({e}): {text}")))
}

/// Member names of an object.
fn keys(v: &Value) -> Vec<String> {
    match v {
        Value::Object(m) => m.iter().map(|(k, _)| k.clone()).collect(),
        other => panic!("not an object: {other:?}"),
    }
}

/// The header of a command with extra `flag` bits.
fn command_with(id: u16, cmd: u16, flag: u32) -> Header {
    let mut h = Header::command(id, cmd, 0);
    h.flags |= flag;
    h
}

/// A memfd of `len` bytes named `name`.
fn memfd(name: &str, len: u64) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .unwrap();
    nix::unistd::ftruncate(&fd, len as libc::off_t).unwrap();
    fd
}

/// (descriptors, mappings) of this process that are of the memfd `name`.
fn memfd_uses(name: &str) -> (usize, usize) {
    let target = format!("/memfd:{name} ");
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with(&target))
        .count();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&target))
        .count();
    (fds, maps)
}

/// A name unique to this test run.
fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "vfu-conf-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// (readable, hung up) of `fd` without waiting.
fn poll_state(fd: BorrowedFd<'_>) -> (bool, bool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap();
    let ev = fds[0].revents().unwrap();
    (
        ev.contains(PollFlags::POLLIN),
        ev.contains(PollFlags::POLLHUP),
    )
}

fn is_socket(fd: BorrowedFd<'_>) -> bool {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
    st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// Assert a successful reply to command `cmd` with message id `id` (spec "Header": the id is
/// echoed, the command "is also set in the reply header", the type is Reply, no Error bit).
fn assert_reply(m: &Message, id: u16, cmd: u16) {
    let h = m.header;
    assert_eq!(h.message_type(), MessageType::Reply, "{h:?}");
    assert_eq!((h.id, h.command), (id, cmd), "id and command echoed: {h:?}");
    assert!(
        !h.is_error(),
        "error reply {} to command {cmd}: {h:?}",
        h.error
    );
}

/// Assert an error reply to `cmd`/`id` carrying `errno`, header only (spec "Header": "If an
/// error occurs, the reply message must only include the reply header").
fn assert_error(m: &Message, id: u16, cmd: u16, errno: i32) {
    let h = m.header;
    assert_eq!(h.message_type(), MessageType::Reply, "{h:?}");
    assert_eq!((h.id, h.command), (id, cmd), "id and command echoed: {h:?}");
    assert!(h.is_error(), "expected an error reply, got {h:?}");
    assert_eq!(
        h.error, errno as u32,
        "errno of the reply to command {cmd}: {h:?}"
    );
    assert!(m.payload.is_empty(), "error reply with a payload: {h:?}");
    assert!(m.fds.is_empty(), "error reply with descriptors");
}

fn region_info_req(index: u32, argsz: u32) -> Vec<u8> {
    payload::RegionInfo {
        argsz,
        flags: 0,
        index,
        cap_offset: 0,
        size: 0,
        offset: 0,
    }
    .encode()
}

fn irq_info_req(index: u32) -> Vec<u8> {
    payload::IrqInfo {
        argsz: payload::IrqInfo::SIZE as u32,
        flags: 0,
        index,
        count: 0,
    }
    .encode()
}

fn device_info_req(argsz: u32) -> Vec<u8> {
    payload::DeviceInfo {
        argsz,
        flags: 0,
        num_regions: 0,
        num_irqs: 0,
    }
    .encode()
}

fn access(index: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    payload::RegionAccess {
        offset,
        region: index,
        count,
        data: data.to_vec(),
    }
    .encode()
}

fn map_req(iova: u64, offset: u64, size: u64, fl: u32) -> Vec<u8> {
    payload::DmaMap {
        argsz: payload::DmaMap::SIZE as u32,
        flags: fl,
        offset,
        address: iova,
        size,
    }
    .encode()
}

fn unmap_req(iova: u64, size: u64, fl: u32) -> Vec<u8> {
    payload::DmaUnmap {
        argsz: payload::DmaUnmap::SIZE as u32,
        flags: fl,
        address: iova,
        size,
    }
    .encode()
}

/// A DMA_READ/DMA_WRITE request or reply payload.
fn dma_req(address: u64, count: u64, data: &[u8]) -> Vec<u8> {
    payload::DmaAccess {
        address,
        count,
        data: data.to_vec(),
    }
    .encode()
}

fn set_irqs_req(fl: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    payload::SetIrqs {
        argsz: payload::SetIrqs::SIZE as u32,
        flags: fl,
        index,
        start,
        count,
    }
    .encode()
}

/// Client memory as the test serves it to the server's DMA_READ/DMA_WRITE: mappings by IOVA,
/// and every request the server sent.
#[derive(Default)]
struct ClientMemory {
    maps: BTreeMap<u64, Vec<u8>>,
    /// (command, address, count) of each request.
    requests: Vec<(u16, u64, u64)>,
    /// The negotiated `max_data_xfer_size` the server's counts must keep to.
    max_xfer: u64,
}

impl ClientMemory {
    /// Answer one DMA_READ/DMA_WRITE as the spec lays the replies out ("VFIO_USER_DMA_READ",
    /// "VFIO_USER_DMA_WRITE"); the checks on the request are asserted by the caller from
    /// `requests` (a panic here would leave the server waiting).
    fn serve(&mut self, conn: &Connection, m: &Message) {
        let write = m.header.command == command::DMA_WRITE;
        let req = match payload::DmaAccess::decode(&m.payload, write) {
            Ok(r) => r,
            Err(_) => {
                self.requests.push((m.header.command, u64::MAX, u64::MAX));
                let _ = conn.reply_error(&m.header, libc::EINVAL);
                return;
            }
        };
        self.requests
            .push((m.header.command, req.address, req.count));
        let found = self
            .maps
            .range_mut(..=req.address)
            .next_back()
            .and_then(|(base, mem)| {
                let at = usize::try_from(req.address - base).ok()?;
                let end = at.checked_add(usize::try_from(req.count).ok()?)?;
                (end <= mem.len()).then_some((mem, at, end))
            });
        let Some((mem, at, end)) = found else {
            let _ = conn.reply_error(&m.header, libc::EFAULT);
            return;
        };
        let reply = if write {
            mem[at..end].copy_from_slice(&req.data);
            payload::DmaAccess {
                data: Vec::new(),
                ..req
            }
        } else {
            payload::DmaAccess {
                data: mem[at..end].to_vec(),
                ..req
            }
        };
        if !m.header.no_reply() {
            let _ = conn.reply(&m.header, &reply.encode(), &[]);
        }
    }
}

// ====================================================================================== server

mod server {
    use super::*;
    use firmware_stubs::vfio_user_server::{serve, serve_connection, ServeError};
    use firmware_stubs::AcceleratorConfig;

    fn cfg() -> AcceleratorConfig {
        AcceleratorConfig {
            workers: 1,
            ..Default::default()
        }
    }

    /// A connection to our server, the test being the client.
    struct Served {
        c: Connection,
        server: Option<JoinHandle<Result<(), ServeError>>>,
        memory: Arc<Mutex<ClientMemory>>,
        /// Twin-socket mode: a server command on the main socket is a failure.
        twin: bool,
    }

    fn start() -> Served {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_connection(b, &cfg()));
        connected(a, Some(server))
    }

    fn connected(a: UnixStream, server: Option<JoinHandle<Result<(), ServeError>>>) -> Served {
        a.set_read_timeout(Some(PATIENCE)).unwrap();
        let c = Connection::new(a, Limits::default());
        // What the server announces (checked in `negotiate`); more only where a test says so.
        c.set_peer_max_fds(8);
        Served {
            c,
            server,
            memory: Arc::new(Mutex::new(ClientMemory {
                max_xfer: 1 << 20,
                ..Default::default()
            })),
            twin: false,
        }
    }

    impl Served {
        fn send(&self, id: u16, cmd: u16, body: &[u8], fds: &[BorrowedFd<'_>]) {
            self.c
                .send(Header::command(id, cmd, 0), body, fds)
                .expect("send to the server");
        }

        /// The next reply; server DMA requests met meanwhile are served from `memory`.
        fn next(&self) -> Message {
            loop {
                let m = self
                    .c
                    .recv()
                    .unwrap_or_else(|e| panic!("expected a reply from the server: {e}"));
                if m.header.message_type() == MessageType::Command {
                    assert!(
                        !self.twin,
                        "server command {} on the main socket in twin-socket mode",
                        m.header.command
                    );
                    lock(&self.memory).serve(&self.c, &m);
                    continue;
                }
                return m;
            }
        }

        fn call(&self, id: u16, cmd: u16, body: &[u8], fds: &[BorrowedFd<'_>]) -> Message {
            self.send(id, cmd, body, fds);
            self.next()
        }

        /// `call`, asserting a successful reply.
        fn ok(&self, id: u16, cmd: u16, body: &[u8], fds: &[BorrowedFd<'_>]) -> Message {
            let r = self.call(id, cmd, body, fds);
            assert_reply(&r, id, cmd);
            r
        }

        /// `call`, asserting a header-only error reply with `errno`.
        fn refused(&self, id: u16, cmd: u16, body: &[u8], fds: &[BorrowedFd<'_>], errno: i32) {
            assert_error(&self.call(id, cmd, body, fds), id, cmd, errno);
        }

        /// A config-space read is answered right: the stream is in step.
        fn assert_in_step(&self) {
            let vendor = self.read(region::CONFIG, 0, 2);
            assert_eq!(vendor, accel_abi::config::VENDOR_ID.to_le_bytes());
        }

        /// VERSION with `body`; the reply.
        fn version(&self, body: &[u8]) -> Message {
            self.call(0x4242, command::VERSION, body, &[])
        }

        /// Negotiate our standard proposal; the server's answer.
        fn negotiate(&self) -> Version {
            let r = self.version(&Version::ours(Capabilities::default()).encode());
            assert_reply(&r, 0x4242, command::VERSION);
            let v = Version::decode(&r.payload).expect("a VERSION reply in VERSION format");
            assert_eq!(v.caps.max_msg_fds, 8, "what `connected` assumed");
            v
        }

        fn read(&self, index: u32, offset: u64, count: u32) -> Vec<u8> {
            let r = self.ok(
                0x100,
                command::REGION_READ,
                &access(index, offset, count, &[]),
                &[],
            );
            payload::RegionAccess::decode(&r.payload, true)
                .expect("REGION_READ reply")
                .data
        }

        fn write(&self, index: u32, offset: u64, data: &[u8]) {
            self.ok(
                0x101,
                command::REGION_WRITE,
                &access(index, offset, data.len() as u32, data),
                &[],
            );
        }

        fn bar32(&self, offset: u64) -> u32 {
            u32::from_le_bytes(self.read(region::BAR0, offset, 4).try_into().unwrap())
        }

        fn bar64(&self, offset: u64) -> u64 {
            u64::from_le_bytes(self.read(region::BAR0, offset, 8).try_into().unwrap())
        }

        /// Memory decoding and bus mastering on.
        fn enable_pci(&self) {
            use accel_abi::config::{command as pci, off};
            let bits = pci::MEMORY | pci::BUS_MASTER;
            self.write(region::CONFIG, off::COMMAND as u64, &bits.to_le_bytes());
        }

        /// Hang up and wait for the server's verdict on the connection.
        fn end(mut self) -> Result<(), ServeError> {
            let server = self.server.take().expect("a server thread");
            drop(self);
            server.join().expect("the server thread panicked")
        }
    }

    // ------------------------------------------------------------------ header rules

    /// "Header" (message id echoed, command set in the reply, ids "can be re-used (even
    /// concurrently)") and "Command Concurrency" (pipelined commands are processed in order).
    #[test]
    fn header_ids_and_commands_are_echoed_and_pipelined_commands_answered_in_order() {
        let s = start();
        s.negotiate();
        let cfg_read = access(region::CONFIG, 0, 2, &[]);
        let pipeline: [(u16, u16, Vec<u8>); 6] = [
            (0xffff, command::DEVICE_GET_INFO, device_info_req(16)),
            (0, command::DEVICE_GET_IRQ_INFO, irq_info_req(irq::MSI)),
            (
                7,
                command::DEVICE_GET_REGION_INFO,
                region_info_req(region::CONFIG, 32),
            ),
            // The same id again while the first is outstanding.
            (7, command::REGION_READ, cfg_read.clone()),
            (0x8000, command::DEVICE_RESET, Vec::new()),
            (0x8000, command::REGION_READ, cfg_read),
        ];
        for (id, cmd, body) in &pipeline {
            s.send(*id, *cmd, body, &[]);
        }
        for (id, cmd, _) in &pipeline {
            let r = s.next();
            assert_reply(&r, *id, *cmd);
            if *cmd == command::REGION_READ {
                let got = payload::RegionAccess::decode(&r.payload, true).unwrap();
                assert_eq!(got.data, accel_abi::config::VENDOR_ID.to_le_bytes());
            }
        }
        s.end().unwrap();
    }

    /// "Header": "Each command message ... must be replied to with a reply message, unless the
    /// message sets the No_Reply bit", and "Command Concurrency": a No_reply command "will have
    /// been processed before the reply to the younger command is sent". A failing or unknown
    /// No_reply command gets no error reply either.
    #[test]
    fn no_reply_commands_get_no_reply_and_are_processed_in_order() {
        use accel_abi::config::{command as pci, off};
        let s = start();
        s.negotiate();
        let bits = pci::MEMORY | pci::BUS_MASTER;
        let write = access(region::CONFIG, off::COMMAND as u64, 2, &bits.to_le_bytes());
        let h = command_with(1, command::REGION_WRITE, flags::NO_REPLY);
        s.c.send(h, &write, &[]).unwrap();
        // A failing command (past the end of config space) and an unknown one, both No_reply.
        let bad = access(region::CONFIG, 0x1000, 4, &[]);
        s.c.send(
            command_with(2, command::REGION_READ, flags::NO_REPLY),
            &bad,
            &[],
        )
        .unwrap();
        s.c.send(command_with(3, 0x7777, flags::NO_REPLY), &[1; 24], &[])
            .unwrap();
        let r = s.ok(
            4,
            command::REGION_READ,
            &access(region::CONFIG, off::COMMAND as u64, 2, &[]),
            &[],
        );
        let got = payload::RegionAccess::decode(&r.payload, true).unwrap();
        assert_eq!(
            u16::from_le_bytes([got.data[0], got.data[1]]) & bits,
            bits,
            "the No_reply write was processed before the later read was answered"
        );
        s.end().unwrap();
    }

    /// "Header" (No_Reply) applied to a message refused for its size ("Message sizes", our
    /// limit): the sender asked for no reply, so none may come (a stray error reply would be
    /// matched to the sender's next command with that id, ids being re-usable).
    #[test]
    fn an_oversized_no_reply_command_gets_no_reply() {
        let s = start();
        s.negotiate();
        let big = vec![0u8; Limits::default().max_msg_size];
        s.c.send(
            command_with(9, command::REGION_WRITE, flags::NO_REPLY),
            &big,
            &[],
        )
        .unwrap();
        s.ok(10, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
        s.end().unwrap();
    }

    /// "Header": the Type bits are Command (0) or Reply (1); a message of another type is not a
    /// command we can run. Ours: answered EINVAL (the spec defines no other type).
    #[test]
    fn a_message_of_unknown_type_is_answered_einval() {
        let s = start();
        s.negotiate();
        let mut h = Header::command(5, command::DEVICE_GET_INFO, 0);
        h.flags = 0x2;
        s.c.send(h, &device_info_req(16), &[]).unwrap();
        assert_error(&s.next(), 5, command::DEVICE_GET_INFO, libc::EINVAL);
        s.ok(6, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
        s.end().unwrap();
    }

    /// "Header": a Reply acknowledges "a previous command with the same message ID"; a reply to
    /// nothing the server sent is dropped, and the stream stays in step.
    #[test]
    fn a_reply_to_no_server_command_is_dropped() {
        let s = start();
        s.negotiate();
        let stray = Header::reply(&Header::command(77, command::DMA_READ, 0), 16);
        s.c.send(stray, &[0; 16], &[]).unwrap();
        s.ok(78, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
        s.end().unwrap();
    }

    /// "Header": "If an error occurs, the reply message must only include the reply header",
    /// with the Error bit and the errno. Ours: EINVAL for a malformed or out-of-range request.
    #[test]
    fn error_replies_are_header_only_and_carry_the_errno() {
        let s = start();
        s.negotiate();
        let cases: [(u16, Vec<u8>, i32); 6] = [
            (command::DEVICE_GET_INFO, vec![16, 0, 0, 0], libc::EINVAL),
            (
                command::DEVICE_GET_REGION_INFO,
                region_info_req(99, 32),
                libc::EINVAL,
            ),
            (command::DEVICE_GET_IRQ_INFO, irq_info_req(99), libc::EINVAL),
            (
                command::REGION_READ,
                access(region::CONFIG, 0x1000, 4, &[]),
                libc::EINVAL,
            ),
            (command::DMA_MAP, map_req(0x10000, 0, 0, RW), libc::EINVAL),
            (
                command::DMA_UNMAP,
                unmap_req(0, 0, payload::DMA_UNMAP_GET_DIRTY_BITMAP),
                libc::ENOTSUP,
            ),
        ];
        for (i, (cmd, body, errno)) in cases.iter().enumerate() {
            let id = 0x300 + i as u16;
            s.refused(id, *cmd, body, &[], *errno);
        }
        s.end().unwrap();
    }

    /// "Commands": 6 and 15-18 are spec commands we do not implement (REGION_IO_FDS is "an
    /// optional feature", WRITE_MULTI needs `write_multiple`, which we never announce, 16-18
    /// are migration). Ours: ENOSYS, header only, their payload drained.
    #[test]
    fn unimplemented_spec_commands_are_answered_enosys_with_the_payload_drained() {
        let s = start();
        s.negotiate();
        let io_fds = {
            let mut b = Vec::new();
            for x in [16u32, 0, region::BAR0, 0] {
                b.extend_from_slice(&x.to_ne_bytes());
            }
            b
        };
        let mut write_multi = 1u64.to_ne_bytes().to_vec();
        write_multi.extend_from_slice(&access(region::CONFIG, 4, 2, &[0; 8]));
        let feature = [8u32.to_ne_bytes(), (1u32 | 1 << 16).to_ne_bytes()].concat();
        let mig = [8u32.to_ne_bytes(), 4096u32.to_ne_bytes()].concat();
        let cases: [(u16, Vec<u8>); 5] = [
            (6, io_fds),
            (15, write_multi),
            (16, feature),
            (17, mig.clone()),
            (18, [mig, vec![0xaa; 4096]].concat()),
        ];
        for (i, (cmd, body)) in cases.iter().enumerate() {
            let id = 0x400 + i as u16;
            s.refused(id, *cmd, body, &[], libc::ENOSYS);
        }
        s.assert_in_step();
        s.end().unwrap();
    }

    /// "Commands": numbers the spec does not define, and the server-to-client commands 11 and
    /// 12 sent the wrong way. Ours: ENOSYS, header only, their payload drained, the stream in
    /// step.
    #[test]
    fn undefined_and_wrong_direction_commands_are_answered_enosys() {
        let s = start();
        s.negotiate();
        let cases: [(u16, usize); 7] = [
            (0, 0),
            (14, 1),
            (19, 37),
            (command::DMA_READ, 16),
            (command::DMA_WRITE, 24),
            (0x7fff, 4099),
            (0xffff, 65536),
        ];
        for (i, (cmd, len)) in cases.iter().enumerate() {
            let id = 0x500 + i as u16;
            let body: Vec<u8> = (0..*len).map(|b| b as u8).collect();
            s.refused(id, *cmd, &body, &[], libc::ENOSYS);
        }
        s.assert_in_step();
        s.end().unwrap();
    }

    // ------------------------------------------------------------------ message size

    /// "Message sizes" and "Security Considerations" (validate input, prevent denial of
    /// service): a message over our limit (1 MiB + 4 KiB, from the 1 MiB default
    /// `max_data_xfer_size`) is drained by its declared size and answered E2BIG; the stream
    /// stays in step.
    #[test]
    fn an_oversized_message_is_answered_e2big_and_the_stream_stays_in_step() {
        let s = start();
        s.negotiate();
        let big = vec![0x5a; Limits::default().max_msg_size + 4096];
        s.send(0x600, command::REGION_WRITE, &big, &[]);
        assert_error(&s.next(), 0x600, command::REGION_WRITE, libc::E2BIG);
        s.assert_in_step();
        s.end().unwrap();
    }

    /// "Version" (`max_msg_fds`: the most descriptors the sender can receive in one message): a
    /// message with more than the server announced is answered E2BIG and its descriptors are
    /// closed, none kept.
    #[test]
    fn a_message_with_more_fds_than_announced_is_answered_e2big_and_its_fds_closed() {
        let s = start();
        let announced = s.negotiate().caps.max_msg_fds as usize;
        let name = unique("fds");
        let fd = memfd(&name, PAGE);
        s.c.set_peer_max_fds(announced + 1);
        let fds = vec![fd.as_fd(); announced + 1];
        s.send(
            0x610,
            command::DMA_MAP,
            &map_req(0x10000, 0, PAGE, RW),
            &fds,
        );
        assert_error(&s.next(), 0x610, command::DMA_MAP, libc::E2BIG);
        assert_eq!(memfd_uses(&name), (1, 0), "only our own descriptor is left");
        // Nothing was mapped: the same map with one descriptor succeeds.
        s.ok(
            0x611,
            command::DMA_MAP,
            &map_req(0x10000, 0, PAGE, RW),
            &[fd.as_fd()],
        );
        s.end().unwrap();
    }

    /// "Header" (message size "of the entire message, including the header") and "Socket
    /// Disconnection Behavior": EOF in the middle of a message ends the connection.
    #[test]
    fn eof_in_the_middle_of_a_message_ends_the_connection() {
        for sent in [7usize, 16, 26] {
            let s = start();
            s.negotiate();
            let h = Header {
                size: 64,
                ..Header::command(1, command::REGION_WRITE, 0)
            };
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(&[0; 48]);
            s.c.stream().write_all(&bytes[..sent]).unwrap();
            s.c.stream().shutdown(std::net::Shutdown::Write).unwrap();
            assert!(
                matches!(s.c.recv(), Err(RecvError::Closed)),
                "the server closed its end ({sent} bytes sent)"
            );
            let r = s.end();
            assert!(
                matches!(r, Err(ServeError::Recv(RecvError::Truncated { .. }))),
                "{sent} bytes sent: {r:?}"
            );
        }
    }

    /// "Header": the message size includes the 16-byte header, so a size below 16 cannot be
    /// followed: the connection is dropped, with no reply.
    #[test]
    fn a_header_declaring_fewer_than_16_bytes_drops_the_connection() {
        for size in [0u32, 8, 15] {
            let s = start();
            s.negotiate();
            let h = Header {
                size,
                ..Header::command(1, command::DEVICE_GET_INFO, 0)
            };
            s.c.stream().write_all(&h.encode()).unwrap();
            assert!(
                matches!(s.c.recv(), Err(RecvError::Closed)),
                "size {size}: the server hung up without replying"
            );
            let r = s.end();
            assert!(
                matches!(r, Err(ServeError::Recv(RecvError::Desync(_)))),
                "size {size}: {r:?}"
            );
        }
    }

    /// "Socket Disconnection Behavior" / "Security Considerations": a client that stops in the
    /// middle of a message but keeps the socket open must not hold the server forever.
    #[test]
    fn a_stalled_half_message_times_out() {
        let s = start();
        s.negotiate();
        s.c.stream()
            .set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        let h = Header {
            size: 64,
            ..Header::command(1, command::REGION_WRITE, 0)
        };
        s.c.stream().write_all(&h.encode()).unwrap();
        s.c.stream().write_all(&[0; 10]).unwrap();
        let started = Instant::now();
        let r = s.c.recv();
        assert!(
            matches!(r, Err(RecvError::Closed)) || matches!(&r, Ok(m) if m.header.is_error()),
            "the server neither gave up nor answered within {:?}: {r:?}",
            started.elapsed()
        );
        assert!(s.end().is_err(), "a stalled client is an error");
    }

    // ------------------------------------------------------------------ VERSION

    /// "Version": the reply's major is the proposed one, its minor "equal to or less than the
    /// minor version proposed", in the same format (JSON with its NUL).
    #[test]
    fn version_reply_keeps_the_major_and_never_raises_the_minor() {
        for minor in [0u16, 1, 2, 3, 0xffff] {
            let s = start();
            let caps = r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096}}"#;
            let r = s.version(&version_body(0, minor, Some(caps)));
            assert_reply(&r, 0x4242, command::VERSION);
            let v = Version::decode(&r.payload).unwrap();
            assert_eq!(v.major, 0);
            assert!(
                v.minor <= minor,
                "proposed 0.{minor}, answered 0.{}",
                v.minor
            );
            if let Some(j) = version_json(&r.payload) {
                assert!(keys(&j).iter().all(|k| k == "capabilities"), "{j:?}");
            }
            s.end().unwrap();
        }
    }

    /// "Version": the version data is optional; a proposal without it is negotiated (with the
    /// defaults the spec gives each capability).
    #[test]
    fn version_without_json_is_negotiated() {
        for body in [version_body(0, 1, None), version_body(0, 1, Some(""))] {
            let s = start();
            let r = s.version(&body);
            assert_reply(&r, 0x4242, command::VERSION);
            assert_eq!(Version::decode(&r.payload).unwrap().major, 0);
            s.end().unwrap();
        }
    }

    /// "Version": "The capability list must be a subset of those proposed."
    #[test]
    fn version_reply_capabilities_are_a_subset_of_the_proposal() {
        let proposals: [(Option<&str>, &[&str]); 3] = [
            (
                Some(r#"{"capabilities":{"max_msg_fds":8}}"#),
                &["max_msg_fds"],
            ),
            (Some(r#"{"capabilities":{}}"#), &[]),
            (None, &[]),
        ];
        for (json, allowed) in proposals {
            let s = start();
            let r = s.version(&version_body(0, 2, json));
            assert_reply(&r, 0x4242, command::VERSION);
            if let Some(caps) =
                version_json(&r.payload).and_then(|j| j.get("capabilities").cloned())
            {
                for k in keys(&caps) {
                    assert!(
                        allowed.contains(&k.as_str()),
                        "proposal {json:?}: the reply announces `{k}`"
                    );
                }
            }
            s.end().unwrap();
        }
    }

    /// "Version": the server "closes the connection if it cannot support the advertised
    /// version" (another major). An error reply before closing is tolerated.
    #[test]
    fn version_of_another_major_closes_the_connection() {
        let s = start();
        s.c.stream()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        s.send(1, command::VERSION, &version_body(1, 0, None), &[]);
        let mut r = s.c.recv();
        if let Ok(m) = &r {
            assert_error(m, 1, command::VERSION, libc::ENOTSUP);
            r = s.c.recv();
        }
        assert!(
            matches!(r, Err(RecvError::Closed)),
            "the connection is still open: {r:?}"
        );
        let _ = s.end();
    }

    /// "Version": "the initial client message is VFIO_USER_VERSION". Ours: a command before it
    /// is refused EINVAL (header only) and VERSION can still follow.
    #[test]
    fn commands_before_version_are_refused() {
        let s = start();
        for (id, cmd, body) in [
            (1, command::DEVICE_GET_INFO, device_info_req(16)),
            (2, command::REGION_READ, access(region::CONFIG, 0, 2, &[])),
            (3, command::DEVICE_RESET, Vec::new()),
        ] {
            s.refused(id, cmd, &body, &[], libc::EINVAL);
        }
        s.negotiate();
        s.ok(4, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
        s.end().unwrap();
    }

    /// "Version": VERSION is the initial message, negotiated once. Ours: a second one is
    /// refused EINVAL and the session goes on as negotiated.
    #[test]
    fn a_second_version_is_refused() {
        let s = start();
        s.negotiate();
        let r = s.version(&Version::ours(Capabilities::default()).encode());
        assert_error(&r, 0x4242, command::VERSION, libc::EINVAL);
        s.ok(5, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
        s.end().unwrap();
    }

    /// "Version": the version data is "UTF-8 encoded JSON"; anything else is refused (ours:
    /// EINVAL) and VERSION can be tried again.
    #[test]
    fn malformed_version_data_is_refused() {
        let s = start();
        for (i, data) in [&b"{not json"[..], b"\xff\xfe", br#"{"capabilities":7}"#]
            .iter()
            .enumerate()
        {
            let mut body = version_body(0, 2, None);
            body.extend_from_slice(data);
            body.push(0);
            let id = 0x700 + i as u16;
            s.refused(id, command::VERSION, &body, &[], libc::EINVAL);
        }
        s.refused(0x710, command::VERSION, &[0, 0], &[], libc::EINVAL);
        s.negotiate();
        s.end().unwrap();
    }

    /// "Version" / twin-socket Reply: the server may enable it "if and only if the client has
    /// indicated support"; if it does, `fd_index` names a socket among the reply's descriptors.
    #[test]
    fn twin_socket_is_offered_only_when_proposed_and_then_consistently() {
        // Not proposed: not enabled, no descriptor.
        let s = start();
        let r = s.version(&Version::ours(Capabilities::default()).encode());
        assert_reply(&r, 0x4242, command::VERSION);
        assert!(!Version::decode(&r.payload).unwrap().caps.twin_socket);
        assert!(r.fds.is_empty());
        s.end().unwrap();
        // Proposed: either not enabled, or enabled with a valid socket.
        let s = start();
        let r = s.version(&version_body(0, 2, Some(TWIN_PROPOSAL)));
        assert_reply(&r, 0x4242, command::VERSION);
        if let Some(twin) = twin_reply(&r) {
            assert!(is_socket(twin.as_fd()));
        }
        s.end().unwrap();
    }

    const TWIN_PROPOSAL: &str = r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096,"max_data_xfer_size":16,"twin_socket":{"supported":true}}}"#;

    /// The twin socket a VERSION reply enables (None if it does not), checked as the spec's
    /// client must check it.
    fn twin_reply(r: &Message) -> Option<&OwnedFd> {
        let j = version_json(&r.payload)?;
        let twin = j.get("capabilities")?.get("twin_socket")?;
        if twin.get("supported").and_then(Value::as_bool) != Some(true) {
            return None;
        }
        let index = twin
            .get("fd_index")
            .and_then(Value::as_u64)
            .expect("twin_socket.supported without fd_index: inconsistent reply");
        Some(
            r.fds
                .get(index as usize)
                .expect("twin_socket.fd_index names no descriptor of the reply"),
        )
    }

    // ------------------------------------------------------------------ DMA_MAP / DMA_UNMAP

    /// "VFIO_USER_DMA_MAP": "There is no payload in the reply message"; "A command to map over
    /// an existing region must be failed by the server with EEXIST".
    #[test]
    fn dma_map_replies_carry_no_payload_and_a_map_over_an_existing_one_is_eexist() {
        let s = start();
        s.negotiate();
        let name = unique("map");
        let fd = memfd(&name, 4 * PAGE);
        let ok = |id: u16, body: Vec<u8>, fds: &[BorrowedFd<'_>]| {
            let r = s.ok(id, command::DMA_MAP, &body, fds);
            assert!(r.payload.is_empty(), "DMA_MAP reply with a payload");
        };
        ok(1, map_req(0x10000, 0, 2 * PAGE, RW), &[]);
        ok(2, map_req(0x20000, 0, 2 * PAGE, RW), &[fd.as_fd()]);
        // Over an existing region: the same, a part, a superset, without and with an fd.
        let over: [(u64, u64, bool); 5] = [
            (0x10000, 2 * PAGE, false),
            (0x11000, 2 * PAGE, false),
            (0xf000, 4 * PAGE, false),
            (0x20000, PAGE, true),
            (0x1f000, 2 * PAGE, false),
        ];
        for (i, (iova, size, with_fd)) in over.iter().enumerate() {
            let id = 10 + i as u16;
            let fds: Vec<BorrowedFd<'_>> = with_fd.then(|| fd.as_fd()).into_iter().collect();
            let r = s.call(id, command::DMA_MAP, &map_req(*iova, 0, *size, RW), &fds);
            assert_error(&r, id, command::DMA_MAP, libc::EEXIST);
        }
        // Next to them: fine.
        ok(20, map_req(0x12000, 0, PAGE, payload::DMA_MAP_READ), &[]);
        ok(21, map_req(0x22000, 2 * PAGE, PAGE, RW), &[fd.as_fd()]);
        s.end().unwrap();
    }

    /// "VFIO_USER_DMA_UNMAP" Reply: "the server must release all references to that DMA region
    /// before replying" and "responds with the original DMA entry in the request".
    #[test]
    fn dma_unmap_of_a_mapping_echoes_the_request_and_releases_the_file_first() {
        let s = start();
        s.negotiate();
        let name = unique("unmap");
        let fd = memfd(&name, 2 * PAGE);
        s.ok(
            1,
            command::DMA_MAP,
            &map_req(0x40000, 0, 2 * PAGE, RW),
            &[fd.as_fd()],
        );
        assert_eq!(memfd_uses(&name), (1, 1), "the server mapped the file");
        let req = unmap_req(0x40000, 2 * PAGE, 0);
        let r = s.ok(2, command::DMA_UNMAP, &req, &[]);
        assert_eq!(r.payload, req, "the reply is the request's DMA entry");
        assert_eq!(memfd_uses(&name), (1, 0), "released before the reply");
        // Gone: mapping it again is no overlap.
        s.ok(3, command::DMA_MAP, &map_req(0x40000, 0, PAGE, RW), &[]);
        s.end().unwrap();
    }

    /// "VFIO_USER_DMA_UNMAP": the reply is "the original DMA entry in the request", also for the
    /// unmap-all flag (bit 1, address and size 0; the kernel VFIO flag we also take) and for a
    /// range that covers whole mappings (which we take too).
    #[test]
    fn dma_unmap_reply_echoes_the_request_for_the_all_flag_and_ranges() {
        let s = start();
        s.negotiate();
        for (i, iova) in [0x10000u64, 0x20000, 0x30000].iter().enumerate() {
            s.ok(
                i as u16,
                command::DMA_MAP,
                &map_req(*iova, 0, PAGE, RW),
                &[],
            );
        }
        let range = unmap_req(0x10000, 0x20000, 0);
        let r = s.ok(10, command::DMA_UNMAP, &range, &[]);
        assert_eq!(r.payload, range);
        let all = unmap_req(0, 0, payload::DMA_UNMAP_ALL);
        let r = s.ok(11, command::DMA_UNMAP, &all, &[]);
        assert_eq!(r.payload, all);
        s.end().unwrap();
    }

    /// "VFIO_USER_DMA_UNMAP" with the unmap-all flag (ours, as in kernel VFIO): every mapping
    /// goes; address and size must then be 0 (else EINVAL); a range cutting through a mapping
    /// is EINVAL ("must match exactly a previous mapping").
    #[test]
    fn dma_unmap_all_removes_every_mapping_and_partial_unmaps_are_refused() {
        let s = start();
        s.negotiate();
        let name = unique("unmap-all");
        let fd = memfd(&name, 4 * PAGE);
        let maps = [(0x10000u64, false), (0x20000, true), (0x30000, false)];
        for (i, (iova, with_fd)) in maps.iter().enumerate() {
            let fds: Vec<BorrowedFd<'_>> = with_fd.then(|| fd.as_fd()).into_iter().collect();
            s.ok(
                i as u16,
                command::DMA_MAP,
                &map_req(*iova, 0, 2 * PAGE, RW),
                &fds,
            );
        }
        let r = s.call(5, command::DMA_UNMAP, &unmap_req(0x10000, PAGE, 0), &[]);
        assert_error(&r, 5, command::DMA_UNMAP, libc::EINVAL);
        let r = s.call(
            6,
            command::DMA_UNMAP,
            &unmap_req(0x10000, PAGE, payload::DMA_UNMAP_ALL),
            &[],
        );
        assert_error(&r, 6, command::DMA_UNMAP, libc::EINVAL);
        s.ok(
            7,
            command::DMA_UNMAP,
            &unmap_req(0, 0, payload::DMA_UNMAP_ALL),
            &[],
        );
        assert_eq!(memfd_uses(&name), (1, 0), "the file's mapping is released");
        for (i, (iova, _)) in maps.iter().enumerate() {
            let id = 20 + i as u16;
            s.ok(id, command::DMA_MAP, &map_req(*iova, 0, 2 * PAGE, RW), &[]);
        }
        s.end().unwrap();
    }

    // ------------------------------------------------------------------ device, regions, IRQs

    /// "VFIO_USER_DEVICE_GET_INFO": reply argsz is "the size required for the full reply payload
    /// (16 bytes today)", a PCI device ("This version of the protocol only supports PCI
    /// devices") with at least the 9 PCI regions ("Device-Specific Regions"); "Message sizes": a
    /// larger argsz in the request is a maximum, the reply may be smaller.
    #[test]
    fn device_get_info_reply() {
        let s = start();
        s.negotiate();
        for (id, argsz) in [(1u16, 16u32), (2, 4096)] {
            let r = s.ok(id, command::DEVICE_GET_INFO, &device_info_req(argsz), &[]);
            assert_eq!(r.payload.len(), 16, "request argsz {argsz}");
            let info = payload::DeviceInfo::decode(&r.payload).unwrap();
            assert_eq!(info.argsz, 16);
            assert_ne!(info.flags & payload::DEVICE_FLAGS_PCI, 0, "{info:?}");
            assert_ne!(
                info.flags & payload::DEVICE_FLAGS_RESET,
                0,
                "we answer RESET"
            );
            assert!(info.num_regions >= region::COUNT, "{info:?}");
            assert!(info.num_irqs >= irq::COUNT, "{info:?}");
        }
        // An argsz below the fixed reply (ours: EINVAL).
        let r = s.call(3, command::DEVICE_GET_INFO, &device_info_req(8), &[]);
        assert_error(&r, 3, command::DEVICE_GET_INFO, libc::EINVAL);
        s.end().unwrap();
    }

    /// "VFIO_USER_DEVICE_GET_REGION_INFO": index echoed, argsz the full size, a payload no
    /// longer than either argsz, the MMAP flag exactly when a descriptor comes with the reply,
    /// CAPS with a cap_offset past the structure; BAR0 (16 KiB) and config space (256 bytes)
    /// read/write; an index past num_regions refused (ours: EINVAL).
    #[test]
    fn device_get_region_info_replies() {
        let s = start();
        s.negotiate();
        let r = s.call(1, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
        let num_regions = payload::DeviceInfo::decode(&r.payload).unwrap().num_regions;
        for index in 0..num_regions {
            for argsz in [32u32, 4096] {
                let id = (index * 10 + argsz % 7) as u16;
                let r = s.ok(
                    id,
                    command::DEVICE_GET_REGION_INFO,
                    &region_info_req(index, argsz),
                    &[],
                );
                let ri = payload::RegionInfo::decode(&r.payload).unwrap();
                assert_eq!(ri.index, index);
                assert!(ri.argsz >= 32, "{ri:?}");
                assert_eq!(
                    r.payload.len(),
                    ri.argsz.min(argsz) as usize,
                    "region {index}, request argsz {argsz}: {ri:?}"
                );
                assert_eq!(
                    ri.flags & region::FLAG_MMAP != 0,
                    !r.fds.is_empty(),
                    "MMAP flag and descriptor: {ri:?}"
                );
                if ri.flags & region::FLAG_CAPS != 0 {
                    assert!(ri.cap_offset >= 32, "{ri:?}");
                }
                let rw = region::FLAG_READ | region::FLAG_WRITE;
                match index {
                    region::BAR0 => {
                        assert_eq!((ri.size, ri.flags & rw), (accel_abi::regs::BAR0_SIZE, rw))
                    }
                    region::CONFIG => assert_eq!((ri.size, ri.flags & rw), (256, rw)),
                    _ => {}
                }
            }
        }
        let r = s.call(
            2,
            command::DEVICE_GET_REGION_INFO,
            &region_info_req(num_regions, 32),
            &[],
        );
        assert_error(&r, 2, command::DEVICE_GET_REGION_INFO, libc::EINVAL);
        s.end().unwrap();
    }

    /// "VFIO_USER_DEVICE_GET_IRQ_INFO": index echoed, argsz 16, MSI eventfd-capable with the
    /// vector count the MSI capability advertises (4); an index past num_irqs refused (ours:
    /// EINVAL).
    #[test]
    fn device_get_irq_info_replies() {
        let s = start();
        s.negotiate();
        let r = s.call(1, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
        let num_irqs = payload::DeviceInfo::decode(&r.payload).unwrap().num_irqs;
        for index in 0..num_irqs {
            let id = 10 + index as u16;
            let r = s.ok(id, command::DEVICE_GET_IRQ_INFO, &irq_info_req(index), &[]);
            assert_eq!(r.payload.len(), 16);
            let ii = payload::IrqInfo::decode(&r.payload).unwrap();
            assert_eq!((ii.argsz, ii.index), (16, index));
            if index == irq::MSI {
                assert_ne!(ii.flags & irq::INFO_EVENTFD, 0, "{ii:?}");
                assert_eq!(ii.count, accel_abi::config::MSI_ADVERTISED_VECTORS);
            }
        }
        let r = s.call(
            2,
            command::DEVICE_GET_IRQ_INFO,
            &irq_info_req(num_irqs),
            &[],
        );
        assert_error(&r, 2, command::DEVICE_GET_IRQ_INFO, libc::EINVAL);
        s.end().unwrap();
    }

    /// Make the device raise its error vector: clear the status bit and ERROR_CODE, then read an
    /// offset that is no register.
    fn raise_error_vector(s: &Served) {
        use accel_abi::regs;
        s.write(
            region::BAR0,
            regs::INTR_STATUS,
            &regs::intr::ERROR.to_le_bytes(),
        );
        s.write(region::BAR0, regs::ERROR_CODE, &0u32.to_le_bytes());
        s.read(region::BAR0, 0x108, 4);
        assert_ne!(s.bar32(regs::ERROR_CODE), 0, "the bad access was recorded");
    }

    /// "VFIO_USER_DEVICE_SET_IRQS": DATA_EVENTFD|ACTION_TRIGGER associates eventfds (by
    /// SCM_RIGHTS) that the server signals; "If no file descriptors are provided, this
    /// de-assigns"; "a count (and start) of 0, with data flags of VFIO_IRQ_SET_DATA_NONE
    /// disables all interrupts of the index"; "There is no payload in the reply".
    #[test]
    fn set_irqs_routes_deassigns_and_disables() {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let s = start();
        s.negotiate();
        s.enable_pci();
        let error = accel_abi::vector::ERROR as usize;
        let route = |id: u16, events: &[EventFd]| {
            let fds: Vec<BorrowedFd<'_>> = events.iter().map(|e| e.as_fd()).collect();
            let body = set_irqs_req(
                irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
                irq::MSI,
                0,
                fds.len() as u32,
            );
            let r = s.ok(id, command::DEVICE_SET_IRQS, &body, &fds);
            assert!(r.payload.is_empty(), "SET_IRQS reply with a payload");
        };
        let events: Vec<EventFd> = (0..3)
            .map(|_| EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap())
            .collect();
        route(1, &events);
        raise_error_vector(&s);
        assert_eq!(
            events[error].read().unwrap(),
            1,
            "the error vector was signalled"
        );
        // De-assign the error vector alone: DATA_EVENTFD without descriptors.
        let body = set_irqs_req(
            irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
            irq::MSI,
            error as u32,
            1,
        );
        s.ok(2, command::DEVICE_SET_IRQS, &body, &[]);
        raise_error_vector(&s);
        assert_eq!(events[error].read().err(), Some(nix::errno::Errno::EAGAIN));
        // Route again, then disable the whole index.
        route(3, &events);
        let body = set_irqs_req(irq::DATA_NONE | irq::ACTION_TRIGGER, irq::MSI, 0, 0);
        let r = s.ok(4, command::DEVICE_SET_IRQS, &body, &[]);
        assert!(r.payload.is_empty());
        raise_error_vector(&s);
        assert_eq!(events[error].read().err(), Some(nix::errno::Errno::EAGAIN));
        s.end().unwrap();
    }

    /// "VFIO_USER_DEVICE_SET_IRQS": "Not all interrupt types support every combination of data
    /// and action flags"; what IRQ_INFO does not offer is refused with an error reply: vectors
    /// past its count, MASK on an index without MASKABLE, a descriptor count that is not
    /// `count`, two data flags at once ("mutually exclusive"). Ours: EINVAL.
    #[test]
    fn set_irqs_refuses_what_irq_info_does_not_offer() {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let s = start();
        s.negotiate();
        let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let trigger = irq::DATA_EVENTFD | irq::ACTION_TRIGGER;
        let cases: [(u32, u32, u32, usize); 5] = [
            (trigger, 0, 5, 5),
            (trigger, 4, 1, 1),
            (irq::DATA_EVENTFD | irq::ACTION_MASK, 0, 1, 1),
            (trigger, 0, 2, 1),
            (
                irq::DATA_NONE | irq::DATA_BOOL | irq::ACTION_TRIGGER,
                0,
                1,
                0,
            ),
        ];
        s.c.set_peer_max_fds(8);
        for (i, (fl, start, count, nfds)) in cases.iter().enumerate() {
            let id = 0x800 + i as u16;
            let fds = vec![e.as_fd(); *nfds];
            let r = s.call(
                id,
                command::DEVICE_SET_IRQS,
                &set_irqs_req(*fl, irq::MSI, *start, *count),
                &fds,
            );
            assert_error(&r, id, command::DEVICE_SET_IRQS, libc::EINVAL);
        }
        s.end().unwrap();
    }

    /// "VFIO_USER_REGION_READ" / "VFIO_USER_REGION_WRITE": the read reply echoes offset, region
    /// and count and carries `count` bytes; the write reply echoes them with no data.
    #[test]
    fn region_read_and_write_replies_echo_the_request() {
        use accel_abi::config::{command as pci, off};
        let s = start();
        s.negotiate();
        let r = s.ok(
            1,
            command::REGION_READ,
            &access(region::CONFIG, 0, 4, &[]),
            &[],
        );
        let got = payload::RegionAccess::decode(&r.payload, true).expect("count bytes of data");
        assert_eq!((got.offset, got.region, got.count), (0, region::CONFIG, 4));
        let ids = (u32::from(accel_abi::config::DEVICE_ID) << 16)
            | u32::from(accel_abi::config::VENDOR_ID);
        assert_eq!(got.data, ids.to_le_bytes());
        let bits = (pci::MEMORY | pci::BUS_MASTER).to_le_bytes();
        let r = s.ok(
            2,
            command::REGION_WRITE,
            &access(region::CONFIG, off::COMMAND as u64, 2, &bits),
            &[],
        );
        assert_eq!(
            r.payload.len(),
            payload::RegionAccess::SIZE,
            "no data in a write reply"
        );
        let got = payload::RegionAccess::decode(&r.payload, false).unwrap();
        assert_eq!(
            (got.offset, got.region, got.count),
            (off::COMMAND as u64, region::CONFIG, 2)
        );
        let back = s.read(region::CONFIG, off::COMMAND as u64, 2);
        assert_eq!(u16::from_le_bytes([back[0], back[1]]) & 6, 6);
        // BAR0.
        let r = s.ok(
            3,
            command::REGION_READ,
            &access(region::BAR0, accel_abi::regs::ID, 4, &[]),
            &[],
        );
        let got = payload::RegionAccess::decode(&r.payload, true).unwrap();
        assert_eq!(
            (got.offset, got.region, got.count),
            (accel_abi::regs::ID, region::BAR0, 4)
        );
        assert_eq!(got.data, accel_abi::regs::ID_VALUE.to_le_bytes());
        s.end().unwrap();
    }

    /// "VFIO_USER_REGION_READ/WRITE": `offset` into the region, `count` the size; an access past
    /// the region's end (or wrapping), to a region of size 0 or past num_regions, or a write
    /// whose data is not `count` bytes, is refused (ours: EINVAL, header only).
    #[test]
    fn region_accesses_outside_a_region_are_refused() {
        let s = start();
        s.negotiate();
        let cases: [(u16, Vec<u8>); 8] = [
            (command::REGION_READ, access(region::CONFIG, 254, 4, &[])),
            (
                command::REGION_READ,
                access(region::CONFIG, u64::MAX - 1, 4, &[]),
            ),
            (
                command::REGION_READ,
                access(region::BAR0, accel_abi::regs::BAR0_SIZE, 4, &[]),
            ),
            (command::REGION_READ, access(5, 0, 4, &[])),
            (command::REGION_READ, access(99, 0, 4, &[])),
            (
                command::REGION_WRITE,
                access(region::CONFIG, 255, 2, &[0, 0]),
            ),
            (command::REGION_WRITE, access(region::CONFIG, 4, 2, &[0])),
            (
                command::REGION_WRITE,
                access(region::CONFIG, 4, 2, &[0, 0, 0]),
            ),
        ];
        for (i, (cmd, body)) in cases.iter().enumerate() {
            let id = 0x900 + i as u16;
            s.refused(id, *cmd, body, &[], libc::EINVAL);
        }
        s.end().unwrap();
    }

    /// "VFIO_USER_DEVICE_RESET": "Neither the request or reply have a payload"; the device
    /// returns to its power-on state (INTR_MASK 0).
    #[test]
    fn device_reset_has_no_payload_and_resets_the_device() {
        use accel_abi::regs;
        let s = start();
        s.negotiate();
        s.enable_pci();
        s.write(region::BAR0, regs::INTR_MASK, &5u32.to_le_bytes());
        assert_eq!(s.bar32(regs::INTR_MASK), 5);
        let r = s.ok(1, command::DEVICE_RESET, &[], &[]);
        assert!(r.payload.is_empty(), "DEVICE_RESET reply with a payload");
        assert_eq!(s.bar32(regs::INTR_MASK), 0, "reset to power-on state");
        s.end().unwrap();
    }

    // ------------------------------------------------------------------ server DMA requests

    /// Have the device run one FENCE whose command and completion record live in client memory
    /// mapped without a descriptor, so that it reaches both through DMA_READ/DMA_WRITE.
    fn run_fence(s: &Served) {
        use accel_abi::{regs, Command, Completion};
        const RING: u64 = 0x10_0000;
        const RECORD: u64 = 0x20_0000;
        let value = 0xfe4c_e000_0000_0001u64;
        let cmd = Command::fence(value).with_completion(RECORD + 0x100);
        {
            let mut mem = lock(&s.memory);
            let mut ring = vec![0u8; PAGE as usize];
            ring[..64].copy_from_slice(&cmd.encode());
            mem.maps.insert(RING, ring);
            mem.maps.insert(RECORD, vec![0u8; PAGE as usize]);
        }
        for (id, iova) in [(1u16, RING), (2, RECORD)] {
            s.ok(id, command::DMA_MAP, &map_req(iova, 0, PAGE, RW), &[]);
        }
        s.enable_pci();
        s.write(region::BAR0, regs::CMDQ_BASE, &RING.to_le_bytes());
        s.write(region::BAR0, regs::CMDQ_ENTRIES, &64u32.to_le_bytes());
        s.write(
            region::BAR0,
            regs::CMDQ_CTRL,
            &regs::cmdq_ctrl::ENABLE.to_le_bytes(),
        );
        s.write(
            region::BAR0,
            regs::CONTROL,
            &regs::control::ENABLE.to_le_bytes(),
        );
        s.write(region::BAR0, regs::CMDQ_TAIL, &1u32.to_le_bytes());
        let started = Instant::now();
        while s.bar64(regs::FENCE_DONE) != value {
            assert!(started.elapsed() < PATIENCE, "the FENCE never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mem = lock(&s.memory);
        let rec = &mem.maps[&RECORD][0x100..0x110];
        let done = Completion::decode(rec.try_into().unwrap())
            .unwrap()
            .expect("the completion was written");
        assert_eq!(done.status, accel_abi::Status::Ok);
    }

    /// Negotiate with `max_data_xfer_size` = `max_xfer`, run a FENCE through client memory and
    /// check every DMA request the server sent: inside a mapping, count within `max_xfer`.
    /// Returns (reads, writes).
    fn fence_within(max_xfer: u64) -> (usize, usize) {
        let s = start();
        let caps = format!(
            r#"{{"capabilities":{{"max_msg_fds":8,"pgsizes":4096,"max_data_xfer_size":{max_xfer}}}}}"#
        );
        let r = s.version(&version_body(0, 2, Some(&caps)));
        assert_reply(&r, 0x4242, command::VERSION);
        lock(&s.memory).max_xfer = max_xfer;
        run_fence(&s);
        let mem = lock(&s.memory);
        for &(cmd, address, count) in &mem.requests {
            assert!(
                count >= 1 && count <= max_xfer,
                "command {cmd}: count {count}, max_data_xfer_size {max_xfer}"
            );
            let inside = mem
                .maps
                .range(..=address)
                .next_back()
                .is_some_and(|(base, m)| address + count <= base + m.len() as u64);
            assert!(
                inside,
                "{cmd} at {address:#x}+{count} is outside every mapping"
            );
        }
        let of = |c: u16| mem.requests.iter().filter(|r| r.0 == c).count();
        let counts = (of(command::DMA_READ), of(command::DMA_WRITE));
        drop(mem);
        s.end().unwrap();
        counts
    }

    /// "VFIO_USER_DMA_READ" / "VFIO_USER_DMA_WRITE" sent by the server for memory mapped without
    /// a descriptor: addresses inside a mapping ("must have been previously exported ... with a
    /// VFIO_USER_DMA_MAP"), and "Read and Write Operations": "The count field must not exceed
    /// the value of max_data_xfer_size of the peer" (we propose 16 bytes).
    #[test]
    fn server_dma_requests_stay_inside_mappings_and_the_transfer_size() {
        let (reads, writes) = fence_within(16);
        assert!(reads >= 4, "a 64-byte command in 16-byte reads: {reads}");
        assert!(writes >= 1, "the completion record");
    }

    /// "Read and Write Operations" with a `max_data_xfer_size` below 8: the spec sets no
    /// minimum, so 4 bytes is a valid proposal and no request may carry more.
    #[test]
    fn server_dma_requests_keep_to_a_transfer_size_below_8() {
        fence_within(4);
    }

    /// "Socket" / twin-socket Reply: once the server enabled twin-socket mode its DMA_READ and
    /// DMA_WRITE "are passed over the separate server-to-client socket", none on the main one.
    #[test]
    fn twin_socket_carries_the_server_dma_requests() {
        let mut s = start();
        let r = s.version(&version_body(0, 2, Some(TWIN_PROPOSAL)));
        assert_reply(&r, 0x4242, command::VERSION);
        let twin = twin_reply(&r).expect("the server enables twin-socket mode when proposed");
        let twin = Connection::new(
            UnixStream::from(twin.try_clone().unwrap()),
            Limits::default(),
        );
        drop(r);
        s.twin = true;
        lock(&s.memory).max_xfer = 16;
        let served = {
            let memory = Arc::clone(&s.memory);
            std::thread::spawn(move || {
                while let Ok(m) = twin.recv() {
                    lock(&memory).serve(&twin, &m);
                }
            })
        };
        run_fence(&s);
        assert!(
            !lock(&s.memory).requests.is_empty(),
            "DMA went over the twin socket"
        );
        let memory = Arc::clone(&s.memory);
        s.end().unwrap();
        served.join().unwrap();
        assert!(lock(&memory).requests.iter().all(|r| r.2 <= 16));
    }

    // ------------------------------------------------------------------ disconnection

    /// "Client Disconnection": "all client memory regions are unmapped and cleaned up
    /// (including closing any passed file descriptors)" and "all IRQ file descriptors passed
    /// from the old client are closed".
    #[test]
    fn client_disconnection_unmaps_memory_and_closes_irq_fds() {
        let s = start();
        s.negotiate();
        let name = unique("disconnect");
        let fd = memfd(&name, 2 * PAGE);
        s.ok(
            1,
            command::DMA_MAP,
            &map_req(0x10000, 0, 2 * PAGE, RW),
            &[fd.as_fd()],
        );
        // Pipes stand in for eventfds: a read end reports a hang-up once every write end is
        // closed, ours included.
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..4).map(|_| nix::unistd::pipe().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        let body = set_irqs_req(irq::DATA_EVENTFD | irq::ACTION_TRIGGER, irq::MSI, 0, 4);
        s.ok(2, command::DEVICE_SET_IRQS, &body, &fds);
        drop(fds);
        let reads: Vec<OwnedFd> = pipes.into_iter().map(|(r, _)| r).collect();
        assert!(
            reads.iter().all(|r| !poll_state(r.as_fd()).1),
            "the server holds them"
        );
        assert_eq!(memfd_uses(&name).1, 1, "the server maps the file");
        s.end().unwrap();
        assert_eq!(
            memfd_uses(&name),
            (1, 0),
            "only our descriptor is left, no mapping"
        );
        for (v, r) in reads.iter().enumerate() {
            assert!(
                poll_state(r.as_fd()).1,
                "vector {v}'s descriptor is still open"
            );
        }
    }

    /// A listening server (`serve`) on a fresh socket path, stopped on drop.
    struct Listening {
        path: std::path::PathBuf,
        stop: OwnedFd,
        thread: Option<JoinHandle<std::io::Result<()>>>,
    }

    impl Listening {
        fn start() -> Listening {
            let path = std::env::temp_dir().join(format!("{}.sock", unique("listen")));
            let _ = std::fs::remove_file(&path);
            let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let (stop_r, stop_w) = nix::unistd::pipe().unwrap();
            let thread =
                std::thread::spawn(move || serve(&listener, &cfg(), stop_r.as_fd(), false));
            Listening {
                path,
                stop: stop_w,
                thread: Some(thread),
            }
        }

        fn connect(&self) -> Served {
            connected(UnixStream::connect(&self.path).unwrap(), None)
        }
    }

    impl Drop for Listening {
        fn drop(&mut self) {
            let _ = nix::unistd::write(&self.stop, &[1]);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// "Client Disconnection": "the device state should otherwise be retained"; a client that
    /// reconnects finds the device as it left it.
    #[test]
    fn device_state_is_retained_across_a_reconnect() {
        use accel_abi::regs;
        let server = Listening::start();
        let first = server.connect();
        first.negotiate();
        first.enable_pci();
        first.write(region::BAR0, regs::INTR_MASK, &5u32.to_le_bytes());
        drop(first);
        let second = server.connect();
        second.negotiate();
        assert_eq!(second.bar32(regs::INTR_MASK), 5, "a fresh device");
    }

    /// "Socket": "A server can serve one or more clients"; ours serves one at a time and
    /// refuses another with an error reply (EBUSY) to its first message, not a bare EOF.
    #[test]
    fn a_second_concurrent_client_gets_an_ebusy_reply() {
        let server = Listening::start();
        let first = server.connect();
        first.negotiate();
        let second = server.connect();
        let r = second.version(&Version::ours(Capabilities::default()).encode());
        assert_error(&r, 0x4242, command::VERSION, libc::EBUSY);
        // The first is still served.
        first.ok(1, command::DEVICE_GET_INFO, &device_info_req(16), &[]);
    }
}

// ====================================================================================== client

mod client {
    use super::*;
    use driver::backend::vfio_user::VfioUserBackend;
    use driver::backend::{Backend, BackendError, DmaAccess, DmaSource};

    /// A command the scripted server received.
    #[derive(Debug)]
    struct Logged {
        header: Header,
        payload: Vec<u8>,
        fds: usize,
    }

    /// Answers a command itself (true) or leaves it to the standard answers (false).
    type Hook = Box<dyn FnMut(&Connection, &Message) -> bool + Send>;

    /// The scripted server: a thread answers the client's commands (the hook first, then the
    /// standard device: PCI, 9 regions, BAR0 16 KiB, config 256 bytes, MSI with 4 vectors),
    /// logs them, and hands the client's replies to the test.
    struct Peer {
        conn: Arc<Connection>,
        log: mpsc::Receiver<Logged>,
        replies: mpsc::Receiver<Message>,
        thread: Option<JoinHandle<RecvError>>,
    }

    fn open() -> (VfioUserBackend, Peer) {
        let (b, p) = open_with(Box::new(|_, _| false));
        (b.expect("bring-up against the standard answers"), p)
    }

    fn open_with(mut hook: Hook) -> (Result<VfioUserBackend, BackendError>, Peer) {
        let (a, b) = UnixStream::pair().unwrap();
        let conn = Arc::new(Connection::new(b, Limits::default()));
        conn.set_peer_max_fds(8);
        let (log_tx, log) = mpsc::channel();
        let (reply_tx, replies) = mpsc::channel();
        let thread = {
            let conn = Arc::clone(&conn);
            std::thread::spawn(move || loop {
                let m = match conn.recv() {
                    Ok(m) => m,
                    Err(e) => return e,
                };
                if m.header.message_type() == MessageType::Reply {
                    let _ = reply_tx.send(m);
                    continue;
                }
                let _ = log_tx.send(Logged {
                    header: m.header,
                    payload: m.payload.clone(),
                    fds: m.fds.len(),
                });
                if !hook(&conn, &m) {
                    standard_answer(&conn, &m);
                }
            })
        };
        let backend = VfioUserBackend::from_stream(a);
        (
            backend,
            Peer {
                conn,
                log,
                replies,
                thread: Some(thread),
            },
        )
    }

    /// The standard device's answer to `m`.
    fn standard_answer(c: &Connection, m: &Message) {
        let h = m.header;
        if h.no_reply() {
            return;
        }
        let body = match h.command {
            command::VERSION => Version::ours(Capabilities {
                max_msg_fds: 8,
                ..Default::default()
            })
            .encode(),
            command::DEVICE_GET_INFO => payload::DeviceInfo {
                argsz: 16,
                flags: payload::DEVICE_FLAGS_PCI | payload::DEVICE_FLAGS_RESET,
                num_regions: region::COUNT,
                num_irqs: irq::COUNT,
            }
            .encode(),
            command::DEVICE_GET_REGION_INFO => {
                let Ok(r) = payload::RegionInfo::decode(&m.payload) else {
                    let _ = c.reply_error(&h, libc::EINVAL);
                    return;
                };
                let (size, fl) = match r.index {
                    region::BAR0 => (0x4000, region::FLAG_READ | region::FLAG_WRITE),
                    region::CONFIG => (256, region::FLAG_READ | region::FLAG_WRITE),
                    _ => (0, 0),
                };
                payload::RegionInfo {
                    argsz: 32,
                    flags: fl,
                    index: r.index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                }
                .encode()
            }
            command::DEVICE_GET_IRQ_INFO => {
                let Ok(r) = payload::IrqInfo::decode(&m.payload) else {
                    let _ = c.reply_error(&h, libc::EINVAL);
                    return;
                };
                let (fl, count) = if r.index == irq::MSI {
                    (irq::INFO_EVENTFD | irq::INFO_NORESIZE, 4)
                } else {
                    (0, 0)
                };
                payload::IrqInfo {
                    argsz: 16,
                    flags: fl,
                    index: r.index,
                    count,
                }
                .encode()
            }
            command::DMA_MAP | command::DEVICE_SET_IRQS | command::DEVICE_RESET => Vec::new(),
            // The spec's reply: the request's DMA entry.
            command::DMA_UNMAP => m.payload.clone(),
            command::REGION_READ => match payload::RegionAccess::decode(&m.payload, false) {
                Ok(r) => payload::RegionAccess {
                    data: (0..r.count).map(|i| (r.offset as u32 + i) as u8).collect(),
                    ..r
                }
                .encode(),
                Err(_) => {
                    let _ = c.reply_error(&h, libc::EINVAL);
                    return;
                }
            },
            command::REGION_WRITE => m.payload.get(..16).unwrap_or_default().to_vec(),
            _ => {
                let _ = c.reply_error(&h, libc::ENOSYS);
                return;
            }
        };
        let _ = c.reply(&h, &body, &[]);
    }

    impl Peer {
        /// Every command received so far.
        fn commands(&self) -> Vec<Logged> {
            self.log.try_iter().collect()
        }

        /// Send a server-to-client command.
        fn send(&self, header: Header, body: &[u8]) {
            self.conn
                .send(header, body, &[])
                .expect("send to the client");
        }

        /// The client's next reply to a server command.
        fn reply(&self) -> Message {
            self.replies
                .recv_timeout(PATIENCE)
                .expect("the client answered")
        }

        /// Stop and tell how the connection ended for the server side.
        fn end(mut self) -> RecvError {
            let t = self.thread.take().unwrap();
            t.join().expect("the scripted server panicked")
        }
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            if let Some(t) = self.thread.take() {
                self.conn.shutdown();
                let _ = t.join();
            }
        }
    }

    /// Memory of this process that the client maps without a descriptor (ProcessVa), page
    /// aligned.
    struct Local {
        map: mirror::Mapping,
    }

    impl Local {
        fn new(pages: usize) -> Local {
            let map = mirror::Mapping::anonymous(
                pages * PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
            .unwrap();
            Local { map }
        }
        fn va(&self) -> u64 {
            self.map.addr()
        }
        /// Map it at `iova` without a descriptor.
        fn map(&self, backend: &VfioUserBackend, iova: u64, len: u64, access: DmaAccess) {
            let source = DmaSource::ProcessVa { va: self.va() };
            // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
            unsafe { backend.dma_map(iova, len, source, access) }.unwrap();
        }
        fn write(&self, offset: usize, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                self.map.write_byte(offset + i, *b);
            }
        }
        fn read(&self, offset: usize, len: usize) -> Vec<u8> {
            (offset..offset + len)
                .map(|i| self.map.read_byte(i))
                .collect()
        }
    }

    // ------------------------------------------------------------------ VERSION

    /// "Version": the client's first message is VERSION, a command wanting a reply, with
    /// major 0, and version data that is NUL-terminated UTF-8 JSON whose capabilities have the
    /// spec's types (numbers, `twin_socket` an object with a boolean `supported`,
    /// `write_multiple` a boolean).
    #[test]
    fn client_version_proposal_is_well_formed() {
        let (backend, peer) = open();
        let first = peer.commands().into_iter().next().expect("a first message");
        assert_eq!(first.header.command, command::VERSION);
        assert_eq!(first.header.message_type(), MessageType::Command);
        assert!(!first.header.no_reply() && !first.header.is_error());
        assert_eq!(first.header.error, 0, "reserved in a command");
        assert_eq!(first.fds, 0);
        let v = Version::decode(&first.payload).unwrap();
        assert_eq!(v.major, 0);
        let j = version_json(&first.payload).expect("we propose capabilities");
        let caps = j.get("capabilities").expect("a capabilities object");
        for k in keys(caps) {
            let value = caps.get(&k).unwrap();
            match k.as_str() {
                "max_msg_fds" | "max_data_xfer_size" | "max_dma_maps" | "pgsizes" => {
                    assert!(value.as_u64().is_some(), "{k} is not a number: {value:?}")
                }
                "write_multiple" => assert!(value.as_bool().is_some(), "{value:?}"),
                "twin_socket" => {
                    let supported = value.get("supported");
                    assert!(supported.is_none_or(|s| s.as_bool().is_some()), "{value:?}");
                    assert!(
                        value.get("fd_index").is_none(),
                        "fd_index is only valid in the reply"
                    );
                }
                other => panic!("capability `{other}` is not in the spec"),
            }
        }
        assert!(caps.get("pgsizes").and_then(Value::as_u64).unwrap() & PAGE != 0);
        drop(backend);
        assert!(matches!(peer.end(), RecvError::Closed));
    }

    fn version_hook(reply: Vec<u8>) -> Hook {
        Box::new(move |c, m| {
            if m.header.command != command::VERSION {
                return false;
            }
            let _ = c.reply(&m.header, &reply, &[]);
            true
        })
    }

    /// "Version": "The minor version in the reply must be equal to or less than the minor
    /// version proposed", and both sides "must support all minor versions less than the
    /// maximum"; a reply without version data is fine (it is optional).
    #[test]
    fn client_accepts_a_version_reply_of_lower_minor() {
        let caps = r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096}}"#;
        for reply in [
            version_body(0, 0, Some(caps)),
            version_body(0, 1, Some(caps)),
            version_body(0, 1, None),
        ] {
            let (backend, peer) = open_with(version_hook(reply));
            let backend = backend.expect("a lower minor is accepted");
            let mut b = [0u8; 2];
            backend.config_read(0, &mut b).unwrap();
            drop(backend);
            drop(peer);
        }
    }

    /// "Version": "If the client does not support the proposed major, it closes the
    /// connection"; a minor above the proposal breaks the rule too.
    #[test]
    fn client_refuses_another_major_or_a_higher_minor_and_closes() {
        for (major, minor) in [(1u16, 0u16), (0xffff, 2), (0, 0xffff)] {
            let (backend, peer) = open_with(version_hook(version_body(major, minor, None)));
            let e = backend.expect_err("refused").to_string();
            assert!(e.contains("version"), "{major}.{minor}: {e}");
            assert!(
                matches!(peer.end(), RecvError::Closed),
                "the client closed the connection"
            );
        }
    }

    /// "Version" / twin-socket Reply: "If twin_socket.supported is true and
    /// twin_socket.fd_index is present and refers to a valid file descriptor, ... succeeded.
    /// Otherwise, the reply from the server is inconsistent. The client must abort and close
    /// the connection".
    #[test]
    fn client_refuses_an_inconsistent_twin_socket_reply() {
        let bad = [
            r#"{"capabilities":{"max_msg_fds":8,"twin_socket":{"supported":true}}}"#,
            r#"{"capabilities":{"max_msg_fds":8,"twin_socket":{"supported":true,"fd_index":3}}}"#,
        ];
        for json in bad {
            let (backend, peer) = open_with(version_hook(version_body(0, 2, Some(json))));
            assert!(backend.is_err(), "accepted {json}");
            assert!(matches!(peer.end(), RecvError::Closed), "{json}");
        }
    }

    /// "Socket" / twin-socket Reply: a client that proposed twin-socket mode and got it serves
    /// the server's DMA_READ on the socket the reply passed (`fd_index`).
    #[test]
    fn client_serves_dma_on_the_twin_socket() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let theirs = Mutex::new(Some(theirs));
        let proposed = Arc::new(Mutex::new(None));
        let hook: Hook = {
            let proposed = Arc::clone(&proposed);
            Box::new(move |c, m| {
                if m.header.command != command::VERSION {
                    return false;
                }
                *lock(&proposed) = Some(Version::decode(&m.payload).map(|v| v.caps.twin_socket));
                let json = r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096,"twin_socket":{"supported":true,"fd_index":0}}}"#;
                let end = lock(&theirs).take().unwrap();
                let _ = c.reply(&m.header, &version_body(0, 2, Some(json)), &[end.as_fd()]);
                true
            })
        };
        let (backend, peer) = open_with(hook);
        assert_eq!(
            *lock(&proposed),
            Some(Ok(true)),
            "the client proposes twin-socket mode"
        );
        let backend = backend.expect("twin-socket negotiated");
        let local = Local::new(1);
        local.write(0, b"twin");
        local.map(&backend, 0x10000, PAGE, DmaAccess::READ_WRITE);
        let twin = Connection::new(ours, Limits::default());
        let read = dma_req(0x10000, 4, &[]);
        twin.send(Header::command(9, command::DMA_READ, 0), &read, &[])
            .unwrap();
        let r = twin.recv().unwrap();
        assert_reply(&r, 9, command::DMA_READ);
        assert_eq!(
            payload::DmaAccess::decode(&r.payload, true).unwrap().data,
            b"twin"
        );
        drop(backend);
        drop(peer);
    }

    // ------------------------------------------------------------------ replies

    /// "Header": an error reply has the Error bit; its errno "may be zero even if the Error bit
    /// is set"; the spec sends it header-only, other servers add a payload: each is an error for
    /// the caller, and the stream stays in step.
    #[test]
    fn client_takes_error_replies_with_and_without_payload_and_with_errno_zero() {
        let n = Arc::new(Mutex::new(0));
        let hook: Hook = {
            let n = Arc::clone(&n);
            Box::new(move |c, m| {
                if m.header.command != command::DEVICE_RESET {
                    return false;
                }
                let mut k = lock(&n);
                *k += 1;
                let mut h = Header::error_reply(&m.header, libc::EIO);
                let body: &[u8] = match *k {
                    1 => &[],
                    2 => &[0xee; 24],
                    3 => {
                        h.error = 0;
                        &[]
                    }
                    _ => {
                        let _ = c.reply(&m.header, &[], &[]);
                        return true;
                    }
                };
                let _ = c.send(h, body, &[]);
                true
            })
        };
        let (backend, peer) = open_with(hook);
        let backend = backend.unwrap();
        let e = backend
            .reset()
            .expect_err("header-only error reply")
            .to_string();
        assert!(e.contains("EIO"), "{e}");
        let e = backend
            .reset()
            .expect_err("error reply with a payload")
            .to_string();
        assert!(e.contains("EIO"), "{e}");
        backend
            .reset()
            .expect_err("error bit with errno 0 is still an error");
        backend.reset().expect("the stream is in step");
        assert!(backend.lost().is_none());
        drop(backend);
        drop(peer);
    }

    /// "Header": the reply's command is the command's ("It is also set in the reply header");
    /// a reply naming another is refused.
    #[test]
    fn client_refuses_a_reply_for_another_command() {
        let hook: Hook = Box::new(|c, m| {
            if m.header.command != command::DEVICE_RESET {
                return false;
            }
            let mut h = Header::reply(&m.header, 0);
            h.command = command::DEVICE_GET_INFO;
            let _ = c.send(h, &[], &[]);
            true
        });
        let (backend, peer) = open_with(hook);
        let backend = backend.unwrap();
        let e = backend.reset().expect_err("refused").to_string();
        assert!(e.contains("another command"), "{e}");
        drop(backend);
        drop(peer);
    }

    /// "Header": replies are matched to commands by message id; a reply with an id nobody waits
    /// for is dropped, the connection goes on.
    #[test]
    fn client_drops_a_reply_nobody_waits_for() {
        let (backend, peer) = open();
        peer.send(
            Header::reply(&Header::command(0xabcd, command::DEVICE_RESET, 0), 16),
            &[7; 16],
        );
        peer.send(
            Header::reply(&Header::command(0xabce, command::REGION_READ, 0), 0),
            &[],
        );
        backend.reset().unwrap();
        let mut b = [0u8; 4];
        backend.config_read(8, &mut b).unwrap();
        assert_eq!(b, [8, 9, 10, 11]);
        assert!(backend.lost().is_none());
        drop(backend);
        drop(peer);
    }

    /// "Message sizes" and "Security Considerations": a reply over our limit (1 MiB + 4 KiB) is
    /// drained and fails only its own request; the stream stays in step.
    #[test]
    fn client_survives_an_oversized_reply() {
        let once = Arc::new(Mutex::new(true));
        let hook: Hook = {
            let once = Arc::clone(&once);
            Box::new(move |c, m| {
                if m.header.command != command::REGION_READ || !std::mem::take(&mut *lock(&once)) {
                    return false;
                }
                let _ = c.reply(&m.header, &vec![0; Limits::default().max_msg_size + 1], &[]);
                true
            })
        };
        let (backend, peer) = open_with(hook);
        let backend = backend.unwrap();
        let mut b = [0u8; 4];
        backend
            .config_read(0, &mut b)
            .expect_err("an oversized reply fails its request");
        backend
            .config_read(4, &mut b)
            .expect("the next request is answered");
        assert_eq!(b, [4, 5, 6, 7]);
        assert!(backend.lost().is_none());
        drop(backend);
        drop(peer);
    }

    /// "Socket Disconnection Behavior" / "Server Disconnection": a server that dies in the
    /// middle of a reply fails the request, the device is lost, later requests fail at once.
    #[test]
    fn client_fails_cleanly_on_a_truncated_reply() {
        let hook: Hook = Box::new(|c, m| {
            if m.header.command != command::DEVICE_RESET {
                return false;
            }
            let h = Header::reply(&m.header, 100);
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(&[0; 10]);
            let _ = c.stream().write_all(&bytes);
            c.shutdown();
            true
        });
        let (backend, peer) = open_with(hook);
        let backend = backend.unwrap();
        let e = backend.reset().expect_err("truncated").to_string();
        assert!(e.contains("mid-message") || e.contains("lost"), "{e}");
        let lost = backend.lost().expect("the device is lost");
        assert!(lost.reason.contains("mid-message"), "{lost}");
        let started = Instant::now();
        backend.reset().expect_err("later requests fail");
        assert!(started.elapsed() < PATIENCE, "at once, not by a timeout");
        drop(backend);
        drop(peer);
    }

    /// "Header": a message size below the header's 16 bytes cannot be followed: the client drops
    /// the connection and the device is lost.
    #[test]
    fn client_drops_a_connection_whose_header_is_shorter_than_16() {
        let hook: Hook = Box::new(|c, m| {
            if m.header.command != command::DEVICE_RESET {
                return false;
            }
            let h = Header {
                size: 4,
                ..Header::reply(&m.header, 0)
            };
            let _ = c.stream().write_all(&h.encode());
            true
        });
        let (backend, peer) = open_with(hook);
        let backend = backend.unwrap();
        backend.reset().expect_err("desynchronised");
        assert!(backend.lost().is_some());
        drop(backend);
        assert!(
            matches!(peer.end(), RecvError::Closed),
            "the client hung up"
        );
    }

    // ------------------------------------------------------------------ requests

    /// The requests the client sends, field by field: "VFIO_USER_DEVICE_GET_INFO" (argsz the
    /// maximum reply, "all other fields must be zero"), "..._GET_REGION_INFO" (index "the only
    /// field that is required", "all other fields must be zero"), "..._GET_IRQ_INFO",
    /// "VFIO_USER_DMA_MAP" (argsz 32, "16 + 32 bytes", a descriptor only for mappable memory),
    /// "VFIO_USER_DMA_UNMAP", "VFIO_USER_DEVICE_SET_IRQS" (argsz the request payload size, one
    /// descriptor per vector), "VFIO_USER_DEVICE_RESET" (no payload), and "Read and Write
    /// Operations": counts within the server's `max_data_xfer_size` (it announces 8).
    #[test]
    fn client_requests_are_well_formed() {
        let caps = r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096,"max_data_xfer_size":8}}"#;
        let (backend, peer) = open_with(version_hook(version_body(0, 2, Some(caps))));
        let backend = backend.unwrap();
        for m in peer.commands() {
            let p = &m.payload;
            match m.header.command {
                command::VERSION => {}
                command::DEVICE_GET_INFO => {
                    let r = payload::DeviceInfo::decode(p).unwrap();
                    assert!(
                        r.argsz >= 16 && (r.flags, r.num_regions, r.num_irqs) == (0, 0, 0),
                        "{r:?}"
                    );
                }
                command::DEVICE_GET_REGION_INFO => {
                    let r = payload::RegionInfo::decode(p).unwrap();
                    assert!(r.argsz >= 32, "{r:?}");
                    assert_eq!(
                        (r.flags, r.cap_offset, r.size, r.offset),
                        (0, 0, 0, 0),
                        "{r:?}"
                    );
                }
                command::DEVICE_GET_IRQ_INFO => {
                    let r = payload::IrqInfo::decode(p).unwrap();
                    assert!(r.argsz >= 16 && (r.flags, r.count) == (0, 0), "{r:?}");
                }
                other => panic!("unexpected bring-up command {other}"),
            }
            assert_eq!(m.fds, 0);
        }
        let local = Local::new(2);
        local.map(&backend, 0x10000, 2 * PAGE, DmaAccess::READ_ONLY);
        let name = unique("client-map");
        let fd = memfd(&name, PAGE);
        let addr = local.va(); // any page-aligned address: the client only passes it on
                               // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
        unsafe {
            backend.dma_map(
                0x20000,
                PAGE,
                DmaSource::SharedFd {
                    va: addr,
                    fd: fd.as_fd(),
                    offset: 0,
                },
                DmaAccess::READ_WRITE,
            )
        }
        .unwrap();
        backend.dma_unmap(0x20000, PAGE).unwrap();
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let events: Vec<Option<OwnedFd>> = (0..3)
            .map(|_| {
                Some(OwnedFd::from(
                    EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap(),
                ))
            })
            .collect();
        backend.set_irqs(events).unwrap();
        let mut cfg = [0u8; 32];
        backend.config_read(0, &mut cfg).unwrap();
        assert_eq!(cfg.to_vec(), (0..32).collect::<Vec<u8>>());
        backend.config_write(16, &[1; 20]).unwrap();
        backend.reset().unwrap();
        let log = peer.commands();
        let of = |cmd: u16| log.iter().filter(move |m| m.header.command == cmd);
        let maps: Vec<&Logged> = of(command::DMA_MAP).collect();
        assert_eq!(maps.len(), 2);
        for (m, (iova, size, fl, fds)) in maps.iter().zip([
            (0x10000, 2 * PAGE, payload::DMA_MAP_READ, 0),
            (0x20000, PAGE, RW, 1),
        ]) {
            assert_eq!(m.header.size as usize, HEADER_SIZE + 32, "16 + 32 bytes");
            let r = payload::DmaMap::decode(&m.payload).unwrap();
            assert_eq!(
                (r.argsz, r.address, r.size, r.flags, r.offset),
                (32, iova, size, fl, 0)
            );
            assert_eq!(m.fds, fds);
        }
        let unmaps: Vec<&Logged> = of(command::DMA_UNMAP).collect();
        assert_eq!(unmaps.len(), 1);
        let r = payload::DmaUnmap::decode(&unmaps[0].payload).unwrap();
        assert!(r.argsz >= 24);
        assert_eq!((r.flags, r.address, r.size), (0, 0x20000, PAGE));
        let set: Vec<&Logged> = of(command::DEVICE_SET_IRQS).collect();
        assert_eq!(set.len(), 1);
        let r = payload::SetIrqs::decode(&set[0].payload).unwrap();
        assert_eq!(
            r.argsz as usize,
            set[0].payload.len(),
            "argsz is the request payload size"
        );
        assert_eq!(
            (r.flags, r.index, r.start, r.count, set[0].fds),
            (irq::DATA_EVENTFD | irq::ACTION_TRIGGER, irq::MSI, 0, 3, 3)
        );
        let reads: Vec<&Logged> = of(command::REGION_READ).collect();
        assert_eq!(reads.len(), 4, "32 bytes in 8-byte reads");
        let writes: Vec<&Logged> = of(command::REGION_WRITE).collect();
        assert_eq!(writes.len(), 3, "20 bytes in 8-byte writes");
        for m in reads.iter().chain(&writes) {
            let with_data = m.header.command == command::REGION_WRITE;
            let r = payload::RegionAccess::decode(&m.payload, with_data).unwrap();
            assert!(r.count >= 1 && r.count <= 8, "{r:?}");
            assert_eq!(r.region, region::CONFIG);
        }
        let resets: Vec<&Logged> = of(command::DEVICE_RESET).collect();
        assert_eq!(resets.len(), 1);
        assert!(resets[0].payload.is_empty());
        drop(backend);
        drop(peer);
    }

    /// "Version": `max_msg_fds` is the most descriptors the receiver takes in one message,
    /// "If not specified then the receiver must assume a value of 1": against a server that
    /// announces none, no message of the client carries more than one.
    #[test]
    fn client_keeps_to_the_default_max_msg_fds_of_one() {
        let caps = r#"{"capabilities":{"pgsizes":4096}}"#;
        let (backend, peer) = open_with(version_hook(version_body(0, 2, Some(caps))));
        let backend = backend.unwrap();
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let events: Vec<Option<OwnedFd>> = (0..3)
            .map(|_| {
                Some(OwnedFd::from(
                    EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap(),
                ))
            })
            .collect();
        // Refused or split: either way no message with more than one descriptor.
        let _ = backend.set_irqs(events);
        let name = unique("one-fd");
        let fd = memfd(&name, PAGE);
        let source = DmaSource::SharedFd {
            va: 0x7000_0000_0000,
            fd: fd.as_fd(),
            offset: 0,
        };
        // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
        unsafe { backend.dma_map(0x10000, PAGE, source, DmaAccess::READ_WRITE) }
            .expect("one descriptor is allowed");
        let log = peer.commands();
        assert!(log.iter().any(|m| m.header.command == command::DMA_MAP));
        for m in &log {
            assert!(
                m.fds <= 1,
                "command {} carried {} descriptors",
                m.header.command,
                m.fds
            );
        }
        drop(backend);
        drop(peer);
    }

    /// "Read and Write Operations": "The count field must not exceed the value of
    /// max_data_xfer_size of the peer"; the spec sets no minimum, so a server announcing 4
    /// gets no REGION_READ/WRITE of more.
    #[test]
    fn client_keeps_to_a_transfer_size_below_8() {
        let caps = r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096,"max_data_xfer_size":4}}"#;
        let (backend, peer) = open_with(version_hook(version_body(0, 2, Some(caps))));
        let backend = backend.unwrap();
        let mut b = [0u8; 8];
        backend.config_read(0, &mut b).unwrap();
        backend.config_write(8, &b).unwrap();
        // A register access is never split into halves the device would see as two accesses.
        let e = backend.bar_read(0, 0, &mut b).unwrap_err().to_string();
        assert!(
            e.contains("max_data_xfer_size") && e.contains("4 bytes"),
            "{e}"
        );
        for m in peer.commands() {
            if let command::REGION_READ | command::REGION_WRITE = m.header.command {
                let with_data = m.header.command == command::REGION_WRITE;
                let r = payload::RegionAccess::decode(&m.payload, with_data).unwrap();
                assert!(r.count <= 4, "{r:?}");
            }
        }
        drop(backend);
        drop(peer);
    }

    /// "Version": `max_dma_maps` is the "Maximum number DMA map windows that can be valid
    /// simultaneously"; a client told 2 does not send a third DMA_MAP while two are valid.
    #[test]
    fn client_keeps_to_the_servers_max_dma_maps() {
        let caps = r#"{"capabilities":{"max_msg_fds":8,"pgsizes":4096,"max_dma_maps":2}}"#;
        let (backend, peer) = open_with(version_hook(version_body(0, 2, Some(caps))));
        let backend = backend.unwrap();
        let local = Local::new(3);
        for i in 0..3 {
            let iova = 0x10000 + i * PAGE;
            let source = DmaSource::ProcessVa {
                va: local.va() + i * PAGE,
            };
            // SAFETY: the test's memory stays mapped for as long as the backend may reach it, and the test holds no Rust reference into it.
            let r = unsafe { backend.dma_map(iova, PAGE, source, DmaAccess::READ_WRITE) };
            assert_eq!(r.is_ok(), i < 2, "map {i}: {r:?}");
        }
        let maps = peer
            .commands()
            .iter()
            .filter(|m| m.header.command == command::DMA_MAP)
            .count();
        assert_eq!(maps, 2, "DMA_MAPs sent");
        drop(backend);
        drop(peer);
    }

    /// "VFIO_USER_DMA_UNMAP": "The server responds with the original DMA entry in the request";
    /// the client takes that reply for a range and for the unmap-all flag.
    #[test]
    fn client_takes_the_spec_dma_unmap_reply() {
        let (backend, peer) = open();
        let local = Local::new(1);
        local.map(&backend, 0x10000, PAGE, DmaAccess::READ_WRITE);
        backend.dma_unmap(0x10000, PAGE).unwrap();
        local.map(&backend, 0x10000, PAGE, DmaAccess::READ_WRITE);
        backend.dma_unmap_all().unwrap();
        let all = peer
            .commands()
            .into_iter()
            .rfind(|m| m.header.command == command::DMA_UNMAP)
            .unwrap();
        let r = payload::DmaUnmap::decode(&all.payload).unwrap();
        assert_eq!((r.flags, r.address, r.size), (payload::DMA_UNMAP_ALL, 0, 0));
        drop(backend);
        drop(peer);
    }

    // ------------------------------------------------------------------ server commands

    /// "VFIO_USER_DMA_READ" / "VFIO_USER_DMA_WRITE" served by the client from memory it mapped
    /// without a descriptor: the read reply is address, count, data; the write reply address
    /// and count (the spec's table gives that count 4 bytes, the read's 8: we take either, the
    /// value must be the count); the reply echoes the id and the command.
    #[test]
    fn client_answers_dma_read_and_dma_write() {
        let (backend, peer) = open();
        let local = Local::new(2);
        local.write(PAGE as usize - 4, b"abcdefgh");
        local.map(&backend, 0x40000, 2 * PAGE, DmaAccess::READ_WRITE);
        let at = 0x40000 + PAGE - 4;
        let read = dma_req(at, 8, &[]);
        peer.send(Header::command(0xd00d, command::DMA_READ, 0), &read);
        let r = peer.reply();
        assert_reply(&r, 0xd00d, command::DMA_READ);
        let got = payload::DmaAccess::decode(&r.payload, true).unwrap();
        assert_eq!(
            (got.address, got.count, got.data.as_slice()),
            (at, 8, &b"abcdefgh"[..])
        );
        let write = dma_req(at + 2, 3, b"XYZ");
        peer.send(Header::command(0, command::DMA_WRITE, 0), &write);
        let r = peer.reply();
        assert_reply(&r, 0, command::DMA_WRITE);
        assert!(
            matches!(r.payload.len(), 12 | 16),
            "{} bytes",
            r.payload.len()
        );
        assert_eq!(
            u64::from_ne_bytes(r.payload[..8].try_into().unwrap()),
            at + 2
        );
        assert_eq!(u32::from_ne_bytes(r.payload[8..12].try_into().unwrap()), 3);
        assert_eq!(local.read(PAGE as usize - 4, 8), b"abXYZfgh");
        drop(backend);
        drop(peer);
    }

    /// "VFIO_USER_DMA_READ/WRITE": the address "must have been previously exported ... with a
    /// VFIO_USER_DMA_MAP", the access must be one the map allows, and "The count field must not
    /// exceed the value of max_data_xfer_size of the peer"; each violation is a header-only
    /// error reply (ours: EFAULT, EPERM, E2BIG; EINVAL for a data length that is not count).
    #[test]
    fn client_refuses_dma_outside_its_mappings_and_limits() {
        let (backend, peer) = open();
        let local = Local::new(1);
        local.map(&backend, 0x40000, PAGE, DmaAccess::READ_ONLY);
        let read = |address, count| {
            payload::DmaAccess {
                address,
                count,
                data: Vec::new(),
            }
            .encode()
        };
        let cases: [(u16, Vec<u8>, i32); 6] = [
            (command::DMA_READ, read(0x90000, 8), libc::EFAULT),
            (command::DMA_READ, read(0x40000 + PAGE - 4, 8), libc::EFAULT),
            (command::DMA_READ, read(u64::MAX - 3, 8), libc::EFAULT),
            (command::DMA_READ, read(0x40000, 2 << 20), libc::E2BIG),
            (
                command::DMA_WRITE,
                dma_req(0x40000, 2, &[1, 2]),
                libc::EPERM,
            ),
            (
                command::DMA_WRITE,
                [read(0x40000, 4), vec![1, 2]].concat(),
                libc::EINVAL,
            ),
        ];
        for (i, (cmd, body, errno)) in cases.iter().enumerate() {
            let id = 0x60 + i as u16;
            peer.send(Header::command(id, *cmd, 0), body);
            assert_error(&peer.reply(), id, *cmd, *errno);
        }
        assert_eq!(
            local.read(0, 2),
            [0, 0],
            "the read-only map was not written"
        );
        drop(backend);
        drop(peer);
    }

    /// "Header" (No_reply) for server commands: a DMA_WRITE with No_reply is performed with no
    /// reply; the following DMA_READ's reply comes next and sees the write.
    #[test]
    fn client_performs_no_reply_server_commands_without_replying() {
        let (backend, peer) = open();
        let local = Local::new(1);
        local.map(&backend, 0x40000, PAGE, DmaAccess::READ_WRITE);
        let write = dma_req(0x40010, 4, b"quid");
        peer.send(command_with(1, command::DMA_WRITE, flags::NO_REPLY), &write);
        let bad = dma_req(0x90000, 4, &[]);
        peer.send(command_with(2, command::DMA_READ, flags::NO_REPLY), &bad);
        peer.send(command_with(3, 0x7777, flags::NO_REPLY), &[0; 40]);
        let read = dma_req(0x40010, 4, &[]);
        peer.send(Header::command(4, command::DMA_READ, 0), &read);
        let r = peer.reply();
        assert_reply(&r, 4, command::DMA_READ);
        assert_eq!(
            payload::DmaAccess::decode(&r.payload, true).unwrap().data,
            b"quid"
        );
        drop(backend);
        drop(peer);
    }

    /// "Header" (No_Reply) for a server command refused for its size: none may come.
    #[test]
    fn client_does_not_answer_an_oversized_no_reply_command() {
        let (backend, peer) = open();
        let big = vec![0u8; Limits::default().max_msg_size];
        peer.send(command_with(1, command::DMA_WRITE, flags::NO_REPLY), &big);
        peer.send(Header::command(2, 0x7777, 0), &[]);
        let r = peer.reply();
        assert_eq!(
            r.header.id, 2,
            "a reply to the No_reply command came first: {:?}",
            r.header
        );
        drop(backend);
        drop(peer);
    }

    /// "Commands": the server sends only DMA_READ and DMA_WRITE; anything else it sends (a
    /// client-to-server command, an undefined number) is answered ENOSYS (ours), header only,
    /// its payload drained; an oversized one E2BIG; the stream stays in step.
    #[test]
    fn client_answers_other_server_commands_enosys_and_oversized_ones_e2big() {
        let (backend, peer) = open();
        let local = Local::new(1);
        local.write(0, b"step");
        local.map(&backend, 0x40000, PAGE, DmaAccess::READ_WRITE);
        for (i, (cmd, len)) in [
            (command::VERSION, 20usize),
            (command::DEVICE_RESET, 0),
            (0, 3),
            (77, 5000),
            (0xffff, 1),
        ]
        .iter()
        .enumerate()
        {
            let id = 0x70 + i as u16;
            peer.send(Header::command(id, *cmd, 0), &vec![0x11; *len]);
            assert_error(&peer.reply(), id, *cmd, libc::ENOSYS);
        }
        peer.send(
            Header::command(0x80, command::DMA_WRITE, 0),
            &vec![0; Limits::default().max_msg_size],
        );
        assert_error(&peer.reply(), 0x80, command::DMA_WRITE, libc::E2BIG);
        let read = dma_req(0x40000, 4, &[]);
        peer.send(Header::command(0x81, command::DMA_READ, 0), &read);
        let r = peer.reply();
        assert_reply(&r, 0x81, command::DMA_READ);
        assert_eq!(
            payload::DmaAccess::decode(&r.payload, true).unwrap().data,
            b"step"
        );
        drop(backend);
        drop(peer);
    }

    // ------------------------------------------------------------------ region info, devices

    /// "Message sizes": "In a reply, the server sets argsz field to the size needed for a full
    /// payload size ... This may be larger than the requested maximum size: in that case, the
    /// full payload is not included, but the argsz field in the reply indicates the needed
    /// size, allowing a client to allocate a larger buffer ... before trying again." A BAR0
    /// whose sparse-mmap capability comes only on the retry is mapped from its descriptor.
    #[test]
    fn client_retries_region_info_with_the_argsz_the_reply_asks_for() {
        use std::os::unix::fs::FileExt;
        let bar = std::fs::File::from(memfd(&unique("bar0"), 0x4000));
        bar.write_all_at(&0xfeed_f00du32.to_le_bytes(), 0x1008)
            .unwrap();
        let bar_fd = bar.try_clone().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let hook: Hook = {
            let asked = Arc::clone(&asked);
            Box::new(move |c, m| {
                if m.header.command != command::DEVICE_GET_REGION_INFO {
                    return false;
                }
                let Ok(r) = payload::RegionInfo::decode(&m.payload) else {
                    return false;
                };
                if r.index != region::BAR0 {
                    return false;
                }
                lock(&asked).push(r.argsz);
                let mut full = payload::RegionInfo {
                    argsz: 32 + 32,
                    flags: region::FLAG_READ
                        | region::FLAG_WRITE
                        | region::FLAG_MMAP
                        | region::FLAG_CAPS,
                    index: 0,
                    cap_offset: 32,
                    size: 0x4000,
                    offset: 0,
                }
                .encode();
                // The sparse-mmap capability: one area, [0x1000, 0x2000).
                full.extend_from_slice(&payload::CAP_SPARSE_MMAP.to_ne_bytes());
                full.extend_from_slice(&1u16.to_ne_bytes());
                full.extend_from_slice(&0u32.to_ne_bytes());
                full.extend_from_slice(&1u32.to_ne_bytes());
                full.extend_from_slice(&0u32.to_ne_bytes());
                full.extend_from_slice(&0x1000u64.to_ne_bytes());
                full.extend_from_slice(&0x1000u64.to_ne_bytes());
                full.truncate((r.argsz as usize).min(full.len()));
                let _ = c.reply(&m.header, &full, &[bar_fd.as_fd()]);
                true
            })
        };
        let (backend, peer) = open_with(hook);
        let backend = backend.expect("bring-up");
        let asked = lock(&asked).clone();
        assert!(
            asked.len() >= 2 && *asked.last().unwrap() >= 64,
            "argsz asked: {asked:?}"
        );
        let mut b = [0u8; 4];
        backend.bar_read(0, 0x1008, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xfeed_f00d);
        assert!(
            !peer
                .commands()
                .iter()
                .any(|m| m.header.command == command::REGION_READ),
            "the access went by message, not through the mapping"
        );
        drop(backend);
        drop(peer);
    }

    /// "Device Information" / "VFIO_USER_DEVICE_GET_INFO": the transport takes any PCI device;
    /// a device with no BAR0 (size 0, no flags) is opened and its config space reached.
    #[test]
    fn client_opens_a_device_without_bar0() {
        let hook: Hook = Box::new(|c, m| {
            if m.header.command != command::DEVICE_GET_REGION_INFO {
                return false;
            }
            let Ok(r) = payload::RegionInfo::decode(&m.payload) else {
                return false;
            };
            if r.index != region::BAR0 {
                return false;
            }
            let body = payload::RegionInfo {
                argsz: 32,
                flags: 0,
                size: 0,
                ..r
            }
            .encode();
            let _ = c.reply(&m.header, &body, &[]);
            true
        });
        let (backend, peer) = open_with(hook);
        let backend = backend.expect("a device without BAR0 opens");
        let mut b = [0u8; 2];
        backend.config_read(0, &mut b).unwrap();
        drop(backend);
        drop(peer);
    }

    /// "VFIO_USER_DEVICE_GET_IRQ_INFO" / "..._SET_IRQS": an INTx-only device (MSI count 0, INTx
    /// one eventfd-capable vector) opens, and `set_intx` routes its line on the INTx index.
    #[test]
    fn client_routes_an_intx_only_device() {
        let hook: Hook = Box::new(|c, m| {
            if m.header.command != command::DEVICE_GET_IRQ_INFO {
                return false;
            }
            let Ok(r) = payload::IrqInfo::decode(&m.payload) else {
                return false;
            };
            let (fl, count) = match r.index {
                irq::INTX => (irq::INFO_EVENTFD, 1),
                _ => (0, 0),
            };
            let body = payload::IrqInfo {
                argsz: 16,
                flags: fl,
                index: r.index,
                count,
            }
            .encode();
            let _ = c.reply(&m.header, &body, &[]);
            true
        });
        let (backend, peer) = open_with(hook);
        let backend = backend.expect("an INTx-only device opens");
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let e = OwnedFd::from(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap());
        backend.set_intx(Some(e)).expect("INTx routed");
        let set = peer
            .commands()
            .into_iter()
            .find(|m| m.header.command == command::DEVICE_SET_IRQS)
            .expect("a SET_IRQS");
        let r = payload::SetIrqs::decode(&set.payload).unwrap();
        assert_eq!(
            (r.flags, r.index, r.start, r.count, set.fds),
            (irq::DATA_EVENTFD | irq::ACTION_TRIGGER, irq::INTX, 0, 1, 1)
        );
        drop(backend);
        drop(peer);
    }
}
