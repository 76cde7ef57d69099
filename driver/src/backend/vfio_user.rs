//! vfio-user client backend: the device is a vfio-user server in another process, reached over
//! a UNIX socket (protocol in the `vfio-user-protocol` crate, documented in docs/vfio-user.md).
//!
//! One reader thread per connection receives every message: replies are handed to the caller
//! waiting for that message id; the server's DMA_READ/DMA_WRITE requests are served on the spot
//! from the mapped memory, so a server request arriving while a caller waits for its own reply
//! never deadlocks. Memory with a file behind it (driver buffers, memfd arenas) is mapped with
//! its fd and the server reaches it directly; other process memory is mapped without an fd and
//! reached through DMA_READ/DMA_WRITE, copied with process_vm_readv/writev on our own pid so an
//! unmapped page becomes an error reply, never a SIGSEGV.
//!
//! Twin-socket mode (spec, VERSION): we propose it; a server that enables it passes a second
//! socket in its VERSION reply and sends its DMA_READ/DMA_WRITE requests there, served by a
//! second reader thread, so its requests and our commands never share a stream. A server that
//! does not keep sending them on the main socket, served by the main reader.
//!
//! When the server goes away (EOF, a broken or desynchronised stream) every waiting and later
//! operation fails with a transport error naming the cause.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use firmware_stubs::{DmaMemory, ProcessMemory};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vfio_user_protocol::payload::{self, irq, region};
use vfio_user_protocol::version::{self, Capabilities, Version};
use vfio_user_protocol::{
    command, CallError, Calls, Connection, Limits, Message, MessageType, RecvError,
};

use super::{
    Backend, BackendError, BackendKind, DeviceLost, DmaAccess, DmaSource, MsiSet, MsiState,
};
use crate::sys::vfio::MappedBar;

const NAME: &str = "vfio-user";

/// How long a request waits for its reply from a live server (a dead one fails at once).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

fn transport(op: &'static str, detail: impl std::fmt::Display) -> BackendError {
    BackendError::Transport {
        backend: NAME,
        op,
        detail: detail.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A mapping the server reaches through DMA_READ/DMA_WRITE.
#[derive(Debug, Clone, Copy)]
struct LocalMap {
    len: u64,
    va: u64,
    access: DmaAccess,
}

struct Shared {
    conn: Connection,
    calls: Calls,
    /// The socket path (or "a connected socket"), for errors and [`DeviceLost`].
    device: String,
    close_reason: Mutex<Option<String>>,
    /// Set when the connection ended by itself (not by our own close): the device is lost.
    lost: Mutex<Option<DeviceLost>>,
    /// Readable once `lost` is set ([`Backend::lost_event`]).
    lost_event: EventFd,
    max_xfer: AtomicUsize,
    maps: RwLock<BTreeMap<u64, LocalMap>>,
    /// Twin-socket mode: the socket the server sends its requests on.
    twin: OnceLock<Arc<Connection>>,
    /// The thread reading `twin` (joined by the main reader when it ends).
    twin_reader: Mutex<Option<JoinHandle<()>>>,
    /// Server requests served from the main socket and from the twin socket.
    requests_main: AtomicU64,
    requests_twin: AtomicU64,
}

impl Shared {
    fn dead(&self) -> String {
        lock(&self.close_reason)
            .clone()
            .unwrap_or_else(|| "server disconnected".into())
    }

    /// Record why the connection ended (the first reason wins), fail every waiting call. A
    /// close we did not ask for (`deliberate` false: EOF, a broken stream) loses the device.
    fn close(&self, reason: String, deliberate: bool) {
        let first = {
            let mut r = lock(&self.close_reason);
            let first = r.is_none();
            if first {
                *r = Some(reason.clone());
            }
            first
        };
        if first && !deliberate {
            tracing::error!(device = %self.device, "vfio-user device lost: {reason}");
            *lock(&self.lost) = Some(DeviceLost {
                backend: NAME,
                device: self.device.clone(),
                reason,
            });
            // The counter stays non-zero (nobody reads it): the descriptor stays readable.
            if let Err(e) = self.lost_event.write(1) {
                tracing::error!("signalling the device loss: {e}");
            }
        }
        self.calls.close();
        self.conn.shutdown();
    }

    /// Send a command and wait for its reply; an error reply is an error.
    fn request(
        &self,
        op: &'static str,
        cmd: u16,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, BackendError> {
        let reply = self
            .calls
            .call(&self.conn, cmd, body, fds, REPLY_TIMEOUT)
            .map_err(|e| match e {
                CallError::Closed => transport(op, self.dead()),
                other => transport(op, other),
            })?;
        if reply.header.is_error() {
            let errno = nix::errno::Errno::from_raw(reply.header.error as i32);
            return Err(transport(op, format!("server answered error {errno}")));
        }
        if reply.header.command != cmd {
            return Err(transport(op, "reply for another command"));
        }
        Ok(reply)
    }
}

/// What DEVICE_GET_INFO and the region/IRQ queries told us.
#[derive(Debug, Clone, Copy)]
struct Layout {
    bar0_size: u64,
    config_size: u64,
    msi_vectors: u32,
}

/// A part of BAR0 the server let us mmap (the whole region, or one sparse-mmap area):
/// register accesses inside it are single loads and stores instead of messages.
struct BarWindow {
    start: u64,
    len: u64,
    map: MappedBar,
}

impl BarWindow {
    fn find(windows: &[BarWindow], offset: u64, len: usize) -> Option<(&MappedBar, u64)> {
        let end = offset.checked_add(len as u64)?;
        windows
            .iter()
            .find(|w| offset >= w.start && end <= w.start.saturating_add(w.len))
            .map(|w| (&w.map, offset - w.start))
    }
}

/// The BAR0 windows a DEVICE_GET_REGION_INFO reply offers: with the mmap flag and a region fd,
/// the sparse-mmap areas if the reply has that capability, else the whole region.
fn bar_windows(reply: &Message, ri: &payload::RegionInfo) -> Result<Vec<BarWindow>, BackendError> {
    const OP: &str = "region info (mmap)";
    if ri.flags & region::FLAG_MMAP == 0 {
        return Ok(Vec::new());
    }
    let fd = match reply.fds.as_slice() {
        [] => {
            tracing::warn!("BAR0 is mmap-able but the server sent no fd: using messages");
            return Ok(Vec::new());
        }
        [fd] => fd,
        _ => return Err(transport(OP, "more than one region fd")),
    };
    let areas = if ri.flags & region::FLAG_CAPS != 0 {
        payload::sparse_mmap_areas(&reply.payload).map_err(|e| transport(OP, e))?
    } else {
        vec![(0, ri.size)]
    };
    let mut windows = Vec::new();
    for (start, len) in areas.into_iter().filter(|a| a.1 > 0) {
        let file_offset = ri
            .offset
            .checked_add(start)
            .ok_or_else(|| transport(OP, "area offset overflows"))?;
        let map = MappedBar::map(fd.as_fd(), file_offset, len)
            .map_err(|e| transport(OP, format!("mmap of {start:#x}+{len:#x}: {e}")))?;
        windows.push(BarWindow { start, len, map });
    }
    Ok(windows)
}

/// A vfio-user server's device.
pub struct VfioUserBackend {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    layout: Layout,
    bar0_windows: Vec<BarWindow>,
    /// The server's MSI state as vfio-pci's rule has it (the count MSI was enabled with).
    msi: Mutex<MsiState>,
}

impl std::fmt::Debug for VfioUserBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserBackend")
            .field("layout", &self.layout)
            .field("bar0_windows", &self.bar0_windows.len())
            .finish_non_exhaustive()
    }
}

impl VfioUserBackend {
    /// Connect to the server at `path`, negotiate the version and read the device layout.
    pub fn connect(path: &Path) -> Result<VfioUserBackend, BackendError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| transport("connect", format!("{}: {e}", path.display())))?;
        Self::with_name(stream, path.display().to_string())
    }

    /// Use an already connected socket.
    pub fn from_stream(stream: UnixStream) -> Result<VfioUserBackend, BackendError> {
        Self::with_name(stream, "on a connected socket".into())
    }

    fn with_name(stream: UnixStream, device: String) -> Result<VfioUserBackend, BackendError> {
        let limits = Limits::default();
        let lost_event = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(|e| transport("connect", format!("eventfd: {e}")))?;
        let shared = Arc::new(Shared {
            conn: Connection::new(stream, limits),
            calls: Calls::new(),
            device,
            close_reason: Mutex::new(None),
            lost: Mutex::new(None),
            lost_event,
            max_xfer: AtomicUsize::new(version::DEFAULT_MAX_DATA_XFER as usize),
            maps: RwLock::new(BTreeMap::new()),
            twin: OnceLock::new(),
            twin_reader: Mutex::new(None),
            requests_main: AtomicU64::new(0),
            requests_twin: AtomicU64::new(0),
        });
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vfio-user-client".into())
                .spawn(move || reader_loop(&shared))
                .map_err(|e| transport("connect", format!("reader thread: {e}")))?
        };
        let mut backend = VfioUserBackend {
            shared,
            reader: Some(reader),
            layout: Layout {
                bar0_size: 0,
                config_size: 0,
                msi_vectors: 0,
            },
            bar0_windows: Vec::new(),
            msi: Mutex::new(MsiState::default()),
        };
        backend.negotiate(limits)?;
        let (layout, windows) = backend.query_layout()?;
        backend.layout = layout;
        backend.bar0_windows = windows;
        Ok(backend)
    }

    fn negotiate(&self, limits: Limits) -> Result<(), BackendError> {
        const OP: &str = "version";
        let ours = Version::ours(Capabilities {
            max_msg_fds: limits.max_fds as u32,
            max_data_xfer_size: version::DEFAULT_MAX_DATA_XFER,
            pgsizes: accel_abi::PAGE_SIZE,
            max_dma_maps: version::DEFAULT_MAX_DMA_MAPS,
            twin_socket: true,
            ..Capabilities::default()
        });
        let shared = &self.shared;
        let reply = shared
            .calls
            .call(
                &shared.conn,
                command::VERSION,
                &ours.encode(),
                &[],
                REPLY_TIMEOUT,
            )
            .map_err(|e| match e {
                CallError::Closed => transport(OP, shared.dead()),
                other => transport(OP, other),
            })?;
        if reply.header.is_error() {
            let errno = nix::errno::Errno::from_raw(reply.header.error as i32);
            if errno == nix::errno::Errno::EBUSY {
                return Err(transport(
                    OP,
                    format!(
                        "the server at {} is serving another client (it answered EBUSY); \
                         connect again once that client has disconnected",
                        shared.device
                    ),
                ));
            }
            return Err(transport(OP, format!("server answered error {errno}")));
        }
        let theirs = Version::decode(&reply.payload).map_err(|e| transport(OP, e))?;
        let twin_index =
            version::check_reply(&ours, &theirs, reply.fds.len()).map_err(|e| transport(OP, e))?;
        if theirs.caps.pgsizes & accel_abi::PAGE_SIZE == 0 {
            return Err(transport(OP, "server does not take 4 KiB DMA pages"));
        }
        shared
            .conn
            .set_peer_max_fds(theirs.caps.max_msg_fds as usize);
        let xfer = theirs
            .caps
            .max_data_xfer_size
            .clamp(8, version::DEFAULT_MAX_DATA_XFER);
        shared.max_xfer.store(xfer as usize, Ordering::Relaxed);
        if let Some(i) = twin_index {
            let mut fds = reply.fds;
            self.start_twin(fds.swap_remove(i), limits)?;
        }
        Ok(())
    }

    /// Twin-socket mode: serve the server's requests arriving on `fd` from a second reader.
    fn start_twin(&self, fd: OwnedFd, limits: Limits) -> Result<(), BackendError> {
        const OP: &str = "version (twin socket)";
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(|e| transport(OP, format!("fstat of the descriptor: {e}")))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(transport(
                OP,
                "the server's twin-socket descriptor is not a socket",
            ));
        }
        let twin = Arc::new(Connection::new(UnixStream::from(fd), limits));
        if self.shared.twin.set(Arc::clone(&twin)).is_err() {
            return Err(transport(OP, "twin socket set up twice"));
        }
        let reader = {
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name("vfio-user-twin".into())
                .spawn(move || twin_reader_loop(&shared, &twin))
                .map_err(|e| transport(OP, format!("reader thread: {e}")))?
        };
        *lock(&self.shared.twin_reader) = Some(reader);
        // The main reader may have ended meanwhile (it joins the twin reader when it ends):
        // then nobody would stop this one.
        if lock(&self.shared.close_reason).is_some() {
            if let Some(t) = self.shared.twin.get() {
                t.shutdown();
            }
        }
        Ok(())
    }

    /// True if twin-socket mode was negotiated (the server sends its requests on a second
    /// socket).
    pub fn twin_socket(&self) -> bool {
        self.shared.twin.get().is_some()
    }

    /// Server requests (DMA_READ/DMA_WRITE and any other) served so far: (from the main
    /// socket, from the twin socket).
    pub fn server_requests_served(&self) -> (u64, u64) {
        (
            self.shared.requests_main.load(Ordering::Relaxed),
            self.shared.requests_twin.load(Ordering::Relaxed),
        )
    }

    fn query_layout(&self) -> Result<(Layout, Vec<BarWindow>), BackendError> {
        let req = payload::DeviceInfo {
            argsz: payload::DeviceInfo::SIZE as u32,
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        };
        let r = self
            .shared
            .request("device info", command::DEVICE_GET_INFO, &req.encode(), &[])?;
        let info =
            payload::DeviceInfo::decode(&r.payload).map_err(|e| transport("device info", e))?;
        if info.flags & payload::DEVICE_FLAGS_PCI == 0
            || info.num_regions <= region::CONFIG
            || info.num_irqs <= irq::MSI
        {
            return Err(transport(
                "device info",
                format!("not a PCI device: {info:?}"),
            ));
        }
        let region_info = |index: u32| -> Result<(payload::RegionInfo, Message), BackendError> {
            let req = payload::RegionInfo {
                argsz: payload::RegionInfo::SIZE as u32,
                flags: 0,
                index,
                cap_offset: 0,
                size: 0,
                offset: 0,
            };
            let r = self.shared.request(
                "region info",
                command::DEVICE_GET_REGION_INFO,
                &req.encode(),
                &[],
            )?;
            let ri =
                payload::RegionInfo::decode(&r.payload).map_err(|e| transport("region info", e))?;
            let rw = region::FLAG_READ | region::FLAG_WRITE;
            if ri.index != index || ri.flags & rw != rw {
                return Err(transport("region info", format!("region {index}: {ri:?}")));
            }
            Ok((ri, r))
        };
        let (bar0, reply) = region_info(region::BAR0)?;
        let windows = bar_windows(&reply, &bar0)?;
        let (config, _) = region_info(region::CONFIG)?;
        let req = payload::IrqInfo {
            argsz: payload::IrqInfo::SIZE as u32,
            flags: 0,
            index: irq::MSI,
            count: 0,
        };
        let r =
            self.shared
                .request("irq info", command::DEVICE_GET_IRQ_INFO, &req.encode(), &[])?;
        let ii = payload::IrqInfo::decode(&r.payload).map_err(|e| transport("irq info", e))?;
        if ii.flags & irq::INFO_EVENTFD == 0 {
            return Err(transport("irq info", "MSI cannot signal eventfds"));
        }
        let layout = Layout {
            bar0_size: bar0.size,
            config_size: config.size,
            msi_vectors: ii.count,
        };
        Ok((layout, windows))
    }

    /// Unmap every DMA mapping (DMA_UNMAP with the ALL flag).
    pub fn dma_unmap_all(&self) -> Result<(), BackendError> {
        let req = payload::DmaUnmap {
            argsz: payload::DmaUnmap::SIZE as u32,
            flags: payload::DMA_UNMAP_ALL,
            address: 0,
            size: 0,
        };
        self.shared
            .request("dma_unmap (all)", command::DMA_UNMAP, &req.encode(), &[])?;
        self.shared
            .maps
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    fn region_read(
        &self,
        op: &'static str,
        index: u32,
        size: u64,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), BackendError> {
        check_range(op, offset, data.len(), size)?;
        let chunk = self.shared.max_xfer.load(Ordering::Relaxed).max(1);
        for (i, part) in data.chunks_mut(chunk).enumerate() {
            let at = offset + (i * chunk) as u64;
            let req = payload::RegionAccess {
                offset: at,
                region: index,
                count: part.len() as u32,
                data: Vec::new(),
            };
            let r = self
                .shared
                .request(op, command::REGION_READ, &req.encode(), &[])?;
            let got =
                payload::RegionAccess::decode(&r.payload, true).map_err(|e| transport(op, e))?;
            if got.offset != at || got.region != index || got.data.len() != part.len() {
                return Err(transport(op, "reply does not match the request"));
            }
            part.copy_from_slice(&got.data);
        }
        Ok(())
    }

    fn region_write(
        &self,
        op: &'static str,
        index: u32,
        size: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        check_range(op, offset, data.len(), size)?;
        let chunk = self.shared.max_xfer.load(Ordering::Relaxed).max(1);
        for (i, part) in data.chunks(chunk).enumerate() {
            let at = offset + (i * chunk) as u64;
            let req = payload::RegionAccess {
                offset: at,
                region: index,
                count: part.len() as u32,
                data: part.to_vec(),
            };
            let r = self
                .shared
                .request(op, command::REGION_WRITE, &req.encode(), &[])?;
            let got =
                payload::RegionAccess::decode(&r.payload, false).map_err(|e| transport(op, e))?;
            if got.offset != at || got.region != index || got.count as usize != part.len() {
                return Err(transport(op, "reply does not match the request"));
            }
        }
        Ok(())
    }
}

fn check_range(op: &'static str, offset: u64, len: usize, size: u64) -> Result<(), BackendError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(transport(
            op,
            format!("access {offset:#x}+{len:#x} outside the region of {size:#x} bytes"),
        )),
    }
}

impl Drop for VfioUserBackend {
    fn drop(&mut self) {
        self.shared.close("backend closed".into(), true);
        if let Some(r) = self.reader.take() {
            if r.join().is_err() {
                tracing::error!("the vfio-user reader thread panicked");
            }
        }
    }
}

fn reader_loop(shared: &Shared) {
    let reason = loop {
        match shared.conn.recv() {
            Ok(msg) => match msg.header.message_type() {
                MessageType::Reply => {
                    let id = msg.header.id;
                    if !shared.calls.complete(id, Ok(msg)) {
                        tracing::warn!(id, "unexpected reply dropped");
                    }
                }
                MessageType::Command => {
                    shared.requests_main.fetch_add(1, Ordering::Relaxed);
                    serve_request(shared, &shared.conn, msg)
                }
                MessageType::Other(t) => {
                    tracing::warn!(kind = t, "message of unknown type");
                    if !msg.header.no_reply() {
                        let _ = shared.conn.reply_error(&msg.header, libc::EINVAL);
                    }
                }
            },
            Err(RecvError::TooLarge(h)) | Err(RecvError::TooManyFds(h)) => {
                if h.message_type() == MessageType::Reply {
                    shared.calls.complete(h.id, Err(CallError::OverLimit));
                } else {
                    let _ = shared.conn.reply_error(&h, libc::E2BIG);
                }
            }
            Err(RecvError::Closed) => break "server closed the connection".to_string(),
            Err(e) => break format!("connection to the server lost: {e}"),
        }
    };
    shared.close(reason, false);
    // The twin reader (twin-socket mode) ends with the connection.
    if let Some(twin) = shared.twin.get() {
        twin.shutdown();
    }
    let twin_reader = lock(&shared.twin_reader).take();
    if let Some(t) = twin_reader {
        if t.join().is_err() {
            tracing::error!("the vfio-user twin-socket reader panicked");
        }
    }
}

/// Twin-socket mode: serve the server's requests arriving on `twin`. When it ends by itself,
/// the device is lost as when the main socket ends.
fn twin_reader_loop(shared: &Shared, twin: &Connection) {
    let reason = loop {
        match twin.recv() {
            Ok(msg) => match msg.header.message_type() {
                MessageType::Command => {
                    shared.requests_twin.fetch_add(1, Ordering::Relaxed);
                    serve_request(shared, twin, msg)
                }
                MessageType::Reply => {
                    // We send no commands on this socket.
                    tracing::warn!(id = msg.header.id, "reply on the twin socket: dropped");
                }
                MessageType::Other(t) => {
                    tracing::warn!(kind = t, "message of unknown type on the twin socket");
                    if !msg.header.no_reply() {
                        let _ = twin.reply_error(&msg.header, libc::EINVAL);
                    }
                }
            },
            Err(RecvError::TooLarge(h)) | Err(RecvError::TooManyFds(h)) => {
                if h.message_type() != MessageType::Reply {
                    let _ = twin.reply_error(&h, libc::E2BIG);
                }
            }
            Err(RecvError::Closed) => break "server closed the twin socket".to_string(),
            Err(e) => break format!("twin socket to the server lost: {e}"),
        }
    };
    // After our own close the close reason is already set and this changes nothing.
    shared.close(reason, false);
}

/// Serve a server-to-client command (DMA_READ/DMA_WRITE; anything else is ENOSYS), replying
/// on `conn`, the socket it came on.
fn serve_request(shared: &Shared, conn: &Connection, msg: Message) {
    let h = msg.header;
    let result = match h.command {
        command::DMA_READ if msg.fds.is_empty() => dma_access(shared, &msg.payload, false),
        command::DMA_WRITE if msg.fds.is_empty() => dma_access(shared, &msg.payload, true),
        command::DMA_READ | command::DMA_WRITE => Err(libc::EINVAL),
        _ => Err(libc::ENOSYS),
    };
    if h.no_reply() {
        return;
    }
    let sent = match result {
        Ok(body) => conn.reply(&h, &body, &[]),
        Err(errno) => conn.reply_error(&h, errno),
    };
    if let Err(e) = sent {
        tracing::debug!("DMA reply failed: {e}");
    }
}

fn dma_access(shared: &Shared, body: &[u8], write: bool) -> Result<Vec<u8>, i32> {
    let req = payload::DmaAccess::decode(body, write).map_err(|_| libc::EINVAL)?;
    let count = usize::try_from(req.count).map_err(|_| libc::EINVAL)?;
    if count > shared.max_xfer.load(Ordering::Relaxed) {
        return Err(libc::E2BIG);
    }
    let end = req.address.checked_add(req.count).ok_or(libc::EFAULT)?;
    let (va, access) = {
        let maps = shared.maps.read().unwrap_or_else(|p| p.into_inner());
        let (&start, m) = maps.range(..=req.address).next_back().ok_or(libc::EFAULT)?;
        if end > start.saturating_add(m.len) {
            return Err(libc::EFAULT);
        }
        (m.va + (req.address - start), m.access)
    };
    let memory = ProcessMemory::current(va, req.count);
    if write {
        if !access.write {
            return Err(libc::EPERM);
        }
        memory.write(0, &req.data).map_err(|_| libc::EFAULT)?;
        Ok(payload::DmaAccess {
            address: req.address,
            count: req.count,
            data: Vec::new(),
        }
        .encode())
    } else {
        if !access.read {
            return Err(libc::EPERM);
        }
        let mut data = vec![0u8; count];
        memory.read(0, &mut data).map_err(|_| libc::EFAULT)?;
        Ok(payload::DmaAccess {
            address: req.address,
            count: req.count,
            data,
        }
        .encode())
    }
}

impl Backend for VfioUserBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::VfioUser
    }

    fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        self.region_read(
            "config_read",
            region::CONFIG,
            self.layout.config_size,
            offset,
            data,
        )
    }

    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.region_write(
            "config_write",
            region::CONFIG,
            self.layout.config_size,
            offset,
            data,
        )
    }

    fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        if bar != 0 {
            return Err(transport("bar_read", format!("no BAR{bar}")));
        }
        if let Some((map, at)) = BarWindow::find(&self.bar0_windows, offset, data.len()) {
            return map.read(at, data).map_err(|e| transport("bar_read", e));
        }
        self.region_read(
            "bar_read",
            region::BAR0,
            self.layout.bar0_size,
            offset,
            data,
        )
    }

    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if bar != 0 {
            return Err(transport("bar_write", format!("no BAR{bar}")));
        }
        if let Some((map, at)) = BarWindow::find(&self.bar0_windows, offset, data.len()) {
            return map.write(at, data).map_err(|e| transport("bar_write", e));
        }
        self.region_write(
            "bar_write",
            region::BAR0,
            self.layout.bar0_size,
            offset,
            data,
        )
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        // vfio-user has no IOVA-range query; the server maps any page-aligned range. Page 0
        // stays unmapped so a zero IOVA is always a fault.
        vec![Range {
            start: accel_abi::PAGE_SIZE,
            end: 1u64 << accel_abi::VA_BITS,
        }]
    }

    fn dma_map(
        &self,
        iova: u64,
        len: u64,
        source: DmaSource<'_>,
        access: DmaAccess,
    ) -> Result<(), BackendError> {
        let mut flags = 0;
        if access.read {
            flags |= payload::DMA_MAP_READ;
        }
        if access.write {
            flags |= payload::DMA_MAP_WRITE;
        }
        let (offset, fd, local) = match source {
            DmaSource::Buffer { buffer, offset } => (offset as u64, Some(buffer.fd()), None),
            DmaSource::SharedFd { fd, offset, .. } => (offset, Some(fd), None),
            DmaSource::ProcessVa { va } => (0, None, Some(LocalMap { len, va, access })),
        };
        if let Some(m) = local {
            // Registered before the server can use it (it may DMA as soon as it has the map).
            let mut maps = self.shared.maps.write().unwrap_or_else(|p| p.into_inner());
            let end = iova
                .checked_add(len)
                .ok_or_else(|| transport("dma_map", "range wraps"))?;
            let overlaps = maps
                .range(..end)
                .next_back()
                .is_some_and(|(&s, o)| s.saturating_add(o.len) > iova);
            if overlaps {
                return Err(transport("dma_map", format!("{iova:#x}+{len:#x} overlaps")));
            }
            maps.insert(iova, m);
        }
        let req = payload::DmaMap {
            argsz: payload::DmaMap::SIZE as u32,
            flags,
            offset,
            address: iova,
            size: len,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let r = self
            .shared
            .request("dma_map", command::DMA_MAP, &req.encode(), &fds);
        if r.is_err() && local.is_some() {
            self.shared
                .maps
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&iova);
        }
        r.map(|_| ())
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), BackendError> {
        let req = payload::DmaUnmap {
            argsz: payload::DmaUnmap::SIZE as u32,
            flags: 0,
            address: iova,
            size: len,
        };
        let r = self
            .shared
            .request("dma_unmap", command::DMA_UNMAP, &req.encode(), &[])?;
        // The server no longer reaches the range: forget our side of it.
        {
            let mut maps = self.shared.maps.write().unwrap_or_else(|p| p.into_inner());
            let end = iova.saturating_add(len);
            let inside: Vec<u64> = maps.range(iova..end).map(|(&s, _)| s).collect();
            for s in inside {
                maps.remove(&s);
            }
        }
        // The spec: the reply is "the original DMA entry in the request".
        let got = payload::DmaUnmap::decode(&r.payload).map_err(|e| transport("dma_unmap", e))?;
        if (got.address, got.size) != (iova, len) {
            return Err(transport(
                "dma_unmap",
                format!(
                    "the reply does not echo the request: {:#x}+{:#x} for {iova:#x}+{len:#x} \
                     (the server may not have unmapped it all)",
                    got.address, got.size
                ),
            ));
        }
        Ok(())
    }

    fn set_irqs(&self, mut eventfds: Vec<Option<OwnedFd>>) -> Result<(), BackendError> {
        // Eventfds travel by SCM_RIGHTS, which has no -1: unset vectors at the end are left
        // out of the count, and one between set vectors cannot be expressed.
        while eventfds.last().is_some_and(Option::is_none) {
            eventfds.pop();
        }
        if let Some(v) = eventfds.iter().position(Option::is_none) {
            return Err(transport(
                "set_irqs",
                format!(
                    "MSI vector {v} is unset between set vectors: vfio-user passes eventfds by \
                     SCM_RIGHTS, which cannot carry a -1; connect vectors 0..n without gaps"
                ),
            ));
        }
        let mut msi = lock(&self.msi);
        let set = msi
            .plan(self.layout.msi_vectors, &eventfds)
            .map_err(|d| transport("set_irqs", d))?;
        let (flags, count) = match set {
            MsiSet::Nothing => return Ok(()),
            MsiSet::Disable => (irq::DATA_NONE | irq::ACTION_TRIGGER, 0),
            MsiSet::Route { count } => (irq::DATA_EVENTFD | irq::ACTION_TRIGGER, count),
        };
        let req = payload::SetIrqs {
            argsz: payload::SetIrqs::SIZE as u32,
            flags,
            index: irq::MSI,
            start: 0,
            count,
        };
        let fds: Vec<BorrowedFd<'_>> = eventfds.iter().flatten().map(|f| f.as_fd()).collect();
        self.shared
            .request("set_irqs", command::DEVICE_SET_IRQS, &req.encode(), &fds)?;
        msi.done(set);
        Ok(())
    }

    fn reset(&self) -> Result<(), BackendError> {
        self.shared
            .request("reset", command::DEVICE_RESET, &[], &[])
            .map(|_| ())
    }

    fn pins_memory(&self) -> bool {
        false
    }

    fn lost(&self) -> Option<DeviceLost> {
        lock(&self.shared.lost).clone()
    }

    fn lost_event(&self) -> Option<BorrowedFd<'_>> {
        Some(self.shared.lost_event.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_user_protocol::Header;

    /// Answer the client's bring-up queries like a minimal server.
    fn handshake(c: &Connection) {
        handshake_with(c, None)
    }

    /// The sparse-mmap capability with one area.
    fn sparse_cap(start: u64, len: u64) -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&payload::CAP_SPARSE_MMAP.to_ne_bytes());
        c.extend_from_slice(&1u16.to_ne_bytes());
        c.extend_from_slice(&0u32.to_ne_bytes());
        c.extend_from_slice(&1u32.to_ne_bytes());
        c.extend_from_slice(&0u32.to_ne_bytes());
        c.extend_from_slice(&start.to_ne_bytes());
        c.extend_from_slice(&len.to_ne_bytes());
        c
    }

    /// As `handshake`; with `bar0`, BAR0 is offered mmap-able through that fd with one sparse
    /// area, `[0x1000, 0x2000)`.
    fn handshake_with(c: &Connection, bar0: Option<BorrowedFd<'_>>) {
        handshake_full(c, bar0, 3)
    }

    /// As `handshake_with`, with IRQ_INFO offering `msi_vectors` MSI vectors.
    fn handshake_full(c: &Connection, bar0: Option<BorrowedFd<'_>>, msi_vectors: u32) {
        loop {
            let m = c.recv().expect("bring-up request");
            let h = m.header;
            let body = match h.command {
                command::VERSION => Version::ours(Capabilities {
                    max_msg_fds: 8,
                    ..Default::default()
                })
                .encode(),
                command::DEVICE_GET_INFO => payload::DeviceInfo {
                    argsz: 16,
                    flags: payload::DEVICE_FLAGS_PCI | payload::DEVICE_FLAGS_RESET,
                    num_regions: 9,
                    num_irqs: 5,
                }
                .encode(),
                command::DEVICE_GET_REGION_INFO => {
                    let r = payload::RegionInfo::decode(&m.payload).unwrap();
                    if let (region::BAR0, Some(fd)) = (r.index, bar0) {
                        let mut body = payload::RegionInfo {
                            argsz: 64,
                            flags: region::FLAG_READ
                                | region::FLAG_WRITE
                                | region::FLAG_MMAP
                                | region::FLAG_CAPS,
                            cap_offset: 32,
                            size: 0x4000,
                            offset: 0,
                            ..r
                        }
                        .encode();
                        body.extend_from_slice(&sparse_cap(0x1000, 0x1000));
                        c.reply(&h, &body, &[fd]).unwrap();
                        continue;
                    }
                    payload::RegionInfo {
                        flags: region::FLAG_READ | region::FLAG_WRITE,
                        size: 0x1000,
                        ..r
                    }
                    .encode()
                }
                command::DEVICE_GET_IRQ_INFO => {
                    c.reply(
                        &h,
                        &payload::IrqInfo {
                            argsz: 16,
                            flags: irq::INFO_EVENTFD,
                            index: irq::MSI,
                            count: msi_vectors,
                        }
                        .encode(),
                        &[],
                    )
                    .unwrap();
                    return;
                }
                other => panic!("unexpected command {other} during bring-up"),
            };
            c.reply(&h, &body, &[]).unwrap();
        }
    }

    fn fake() -> (VfioUserBackend, Connection) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let c = Connection::new(b, Limits::default());
            handshake(&c);
            c
        });
        let backend = VfioUserBackend::from_stream(a).unwrap();
        (backend, server.join().unwrap())
    }

    /// Send a server-to-client command and return the client's reply.
    fn server_request(c: &Connection, id: u16, cmd: u16, body: &[u8]) -> Message {
        c.send(Header::command(id, cmd, 0), body, &[]).unwrap();
        let m = c.recv().unwrap();
        assert_eq!(m.header.message_type(), MessageType::Reply);
        assert_eq!(m.header.id, id);
        m
    }

    #[test]
    fn sparse_mmap_areas_of_bar0_are_mapped_the_rest_uses_messages() {
        use std::os::unix::fs::FileExt;
        let fd =
            nix::sys::memfd::memfd_create(c"bar0", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(0x4000).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let bar_fd = file.try_clone().unwrap();
        let server = std::thread::spawn(move || {
            let c = Connection::new(b, Limits::default());
            c.set_peer_max_fds(8);
            handshake_with(&c, Some(bar_fd.as_fd()));
            c
        });
        let backend = VfioUserBackend::from_stream(a).unwrap();
        let server = server.join().unwrap();
        // Inside the area: straight to the mapping, no message.
        backend
            .bar_write(0, 0x1008, &0x1122_3344_5566_7788u64.to_le_bytes())
            .unwrap();
        let mut w = [0u8; 8];
        file.read_exact_at(&mut w, 0x1008).unwrap();
        assert_eq!(u64::from_le_bytes(w), 0x1122_3344_5566_7788);
        file.write_all_at(&0xabcd_u32.to_le_bytes(), 0x1ffc)
            .unwrap();
        let mut r = [0u8; 4];
        backend.bar_read(0, 0x1ffc, &mut r).unwrap();
        assert_eq!(u32::from_le_bytes(r), 0xabcd);
        // Outside it: a REGION_READ message.
        let t = std::thread::spawn(move || {
            let m = server.recv().unwrap();
            assert_eq!(m.header.command, command::REGION_READ);
            let req = payload::RegionAccess::decode(&m.payload, false).unwrap();
            assert_eq!(req.offset, 0x2000);
            let reply = payload::RegionAccess {
                data: vec![7, 0, 0, 0],
                ..req
            };
            server.reply(&m.header, &reply.encode(), &[]).unwrap();
            server
        });
        backend.bar_read(0, 0x2000, &mut r).unwrap();
        assert_eq!(r, [7, 0, 0, 0]);
        drop(t.join().unwrap());
    }

    fn eventfd() -> Option<OwnedFd> {
        let e = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
            .unwrap();
        Some(e.as_fd().try_clone_to_owned().unwrap())
    }

    #[test]
    fn msi_vectors_go_in_one_set_irqs_whether_irq_info_offers_3_or_4() {
        for offered in [3, 4] {
            let (a, b) = UnixStream::pair().unwrap();
            let server = std::thread::spawn(move || {
                let c = Connection::new(b, Limits::default());
                handshake_full(&c, None, offered);
                c
            });
            let backend = VfioUserBackend::from_stream(a).unwrap();
            let server = server.join().unwrap();
            let t = std::thread::spawn(move || {
                let m = server.recv().unwrap();
                assert_eq!(m.header.command, command::DEVICE_SET_IRQS);
                let req = payload::SetIrqs::decode(&m.payload).unwrap();
                let route = irq::DATA_EVENTFD | irq::ACTION_TRIGGER;
                assert_eq!(
                    (req.flags, req.index, req.start, req.count),
                    (route, irq::MSI, 0, 3)
                );
                assert_eq!(m.fds.len(), 3);
                server.reply(&m.header, &[], &[]).unwrap();
                let m = server.recv().unwrap();
                let req = payload::SetIrqs::decode(&m.payload).unwrap();
                let disable = irq::DATA_NONE | irq::ACTION_TRIGGER;
                assert_eq!((req.flags, req.start, req.count), (disable, 0, 0));
                assert!(m.fds.is_empty());
                server.reply(&m.header, &[], &[]).unwrap();
                server
            });
            // The reserved fourth vector, unset, is left out of the count.
            backend
                .set_irqs(vec![eventfd(), eventfd(), eventfd(), None])
                .unwrap();
            // More vectors than MSI was enabled with: refused before anything is sent.
            let e = backend
                .set_irqs((0..4).map(|_| eventfd()).collect())
                .unwrap_err()
                .to_string();
            let why = if offered == 4 {
                "EINVAL: MSI is enabled with 3 vector"
            } else {
                "4 MSI vectors asked, the device offers 3"
            };
            assert!(e.contains(why), "{e}");
            let e = backend
                .set_irqs(vec![eventfd(), None, eventfd()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("vector 1 is unset"), "{e}");
            backend.set_irqs(Vec::new()).unwrap();
            // Already disabled: nothing to send (the server thread has stopped reading).
            backend.set_irqs(vec![None, None, None]).unwrap();
            drop(t.join().unwrap());
        }
    }

    #[test]
    fn error_replies_with_and_without_payload_are_errors_and_keep_the_stream() {
        let (backend, server) = fake();
        let t = std::thread::spawn(move || {
            // Header-only error reply (the spec).
            let m = server.recv().unwrap();
            server.reply_error(&m.header, libc::EINVAL).unwrap();
            // Error reply that carries a payload (libvfio-user does that).
            let m = server.recv().unwrap();
            let mut h = Header::reply(&m.header, 16);
            h.flags |= vfio_user_protocol::flags::ERROR;
            h.error = libc::EFAULT as u32;
            server.send(h, &[0xee; 16], &[]).unwrap();
            // A good reply next: the stream is in step.
            let m = server.recv().unwrap();
            let req = payload::RegionAccess::decode(&m.payload, false).unwrap();
            let reply = payload::RegionAccess {
                data: vec![0x34, 0x12],
                ..req
            };
            server.reply(&m.header, &reply.encode(), &[]).unwrap();
            server
        });
        let mut b = [0u8; 2];
        let e = backend.config_read(0, &mut b).unwrap_err().to_string();
        assert!(e.contains("EINVAL"), "{e}");
        let e = backend.config_read(0, &mut b).unwrap_err().to_string();
        assert!(e.contains("EFAULT"), "{e}");
        backend.config_read(0, &mut b).unwrap();
        assert_eq!(b, [0x34, 0x12]);
        drop(t.join().unwrap());
    }

    #[test]
    fn server_requests_are_served_while_a_client_request_waits() {
        let (backend, server) = fake();
        let mut local = vec![0u8; 2 * 4096];
        local[..8].copy_from_slice(b"abcdefgh");
        let va = local.as_ptr() as u64 & !4095;
        let base = local.as_ptr() as u64;
        // Map the page holding `local` without an fd at IOVA 0x10000.
        let t = std::thread::spawn(move || {
            let m = server.recv().unwrap();
            assert_eq!(m.header.command, command::DMA_MAP);
            assert!(m.fds.is_empty());
            server.reply(&m.header, &[], &[]).unwrap();
            // The reset request arrives; before answering it, use DMA.
            let reset = server.recv().unwrap();
            assert_eq!(reset.header.command, command::DEVICE_RESET);
            let iova = 0x10000 + (base - va);
            let read = payload::DmaAccess {
                address: iova,
                count: 8,
                data: Vec::new(),
            };
            let r = server_request(&server, 1, command::DMA_READ, &read.encode());
            let got = payload::DmaAccess::decode(&r.payload, true).unwrap();
            assert_eq!(got.data, b"abcdefgh");
            let write = payload::DmaAccess {
                address: iova,
                count: 3,
                data: b"XYZ".to_vec(),
            };
            let r = server_request(&server, 2, command::DMA_WRITE, &write.encode());
            assert!(!r.header.is_error());
            // Outside every mapping: an error reply.
            let outside = payload::DmaAccess {
                address: 0x9_0000,
                count: 8,
                data: Vec::new(),
            };
            let r = server_request(&server, 3, command::DMA_READ, &outside.encode());
            assert!(r.header.is_error());
            assert_eq!(r.header.error, libc::EFAULT as u32);
            // An unknown server command with a payload: ENOSYS, payload drained.
            let r = server_request(&server, 4, 77, &[1; 40]);
            assert_eq!(r.header.error, libc::ENOSYS as u32);
            // A stray reply with an id nobody waits for is dropped.
            server
                .send(Header::reply(&Header::command(999, 5, 0), 0), &[], &[])
                .unwrap();
            server.reply(&reset.header, &[], &[]).unwrap();
            server
        });
        backend
            .dma_map(
                0x10000,
                8192,
                DmaSource::ProcessVa { va },
                DmaAccess::READ_WRITE,
            )
            .unwrap();
        backend.reset().unwrap();
        let server = t.join().unwrap();
        assert_eq!(&local[..8], b"XYZdefgh");
        drop(server);
    }

    #[test]
    fn an_inaccessible_page_is_an_error_reply_not_a_crash() {
        let (backend, server) = fake();
        let none = mirror::Mapping::anonymous(4096, libc::PROT_NONE).unwrap();
        let va = none.addr();
        let t = std::thread::spawn(move || {
            let m = server.recv().unwrap();
            server.reply(&m.header, &[], &[]).unwrap();
            let read = payload::DmaAccess {
                address: 0x20000,
                count: 8,
                data: Vec::new(),
            };
            let r = server_request(&server, 1, command::DMA_READ, &read.encode());
            assert_eq!(r.header.error, libc::EFAULT as u32);
            server
        });
        backend
            .dma_map(
                0x20000,
                4096,
                DmaSource::ProcessVa { va },
                DmaAccess::READ_WRITE,
            )
            .unwrap();
        drop(t.join().unwrap());
    }

    #[test]
    fn a_server_dying_mid_reply_fails_the_request() {
        let (backend, server) = fake();
        let t = std::thread::spawn(move || {
            let m = server.recv().unwrap();
            let h = Header::reply(&m.header, 100);
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(&[0; 10]);
            use std::io::Write;
            server.stream().write_all(&bytes).unwrap();
        });
        let mut b = [0u8; 4];
        let e = backend.config_read(0, &mut b).unwrap_err().to_string();
        assert!(e.contains("mid-message") || e.contains("lost"), "{e}");
        t.join().unwrap();
        assert!(backend.reset().is_err());
    }

    /// POLLIN on `fd` within `ms` milliseconds.
    fn readable(fd: BorrowedFd<'_>, ms: u16) -> bool {
        use nix::poll::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut fds, ms).unwrap() == 1
    }

    #[test]
    fn a_server_hanging_up_loses_the_device_and_signals_it() {
        let (backend, server) = fake();
        let event = backend.lost_event().expect("vfio-user can lose its device");
        assert!(backend.lost().is_none());
        assert!(!readable(event, 0), "signalled while the server is there");
        drop(server);
        assert!(readable(event, 5000), "no signal within 5 s of the hang-up");
        let lost = backend.lost().expect("lost after the hang-up");
        assert_eq!(lost.backend, "vfio-user");
        assert!(lost.reason.contains("closed"), "{lost}");
        // It stays readable for every later poller.
        assert!(readable(event, 0));
    }

    #[test]
    fn closing_the_backend_ourselves_is_no_device_loss() {
        let (backend, _server) = fake();
        backend.shared.close("backend closed".into(), true);
        assert!(backend.lost().is_none());
        assert!(!readable(backend.lost_event().unwrap(), 0));
    }
}
