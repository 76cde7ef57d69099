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
//! The transport is generic: it reads every standard PCI region and IRQ index the device
//! reports and insists on none of them (what the MXA-1 needs, its driver checks at bring-up).
//! An access to a region the device lacks, or lacks the right for, fails naming the region and
//! why; an access the server refuses fails naming region, offset, width and errno.
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

use nix::sys::eventfd::{EfdFlags, EventFd};
use vfio_user_protocol::payload::{self, irq, region};
use vfio_user_protocol::version::{self, Capabilities, Version};
use vfio_user_protocol::{
    command, CallError, Calls, Connection, Limits, Message, MessageType, RecvError,
};

use super::{
    irq_index, region_index, Backend, BackendError, BackendKind, DeviceLost, DmaAccess, DmaSource,
    IrqDesc, MsiSet, MsiState, RegionDesc,
};
use crate::sys::mapped_bar::MappedBar;
use crate::sys::own_memory;
use sys_util::sync::{lock, read, write};

const NAME: &str = "vfio-user";

/// How long a request waits for its reply from a live server (a dead one fails at once).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

fn transport(op: &'static str, detail: impl std::fmt::Display + 'static) -> BackendError {
    BackendError::transport(NAME, op, detail)
}

/// The OS error of a failed call: the errno of the send that failed.
fn call_errno(e: &CallError) -> Option<i32> {
    match e {
        CallError::Send(e) => e.raw_os_error(),
        CallError::Closed | CallError::Timeout(_) | CallError::OverLimit => None,
    }
}

/// What we propose as `max_dma_maps`: the client keeps no table of its own that would limit
/// it, so the server's answer (the smaller of its limit and this) is the limit.
const PROPOSED_MAX_DMA_MAPS: u32 = 1 << 20;

/// The DMA windows the server holds for us, and how many it takes at once (`max_dma_maps` of
/// its VERSION reply; the spec's default 65535 when it names none).
struct DmaWindows {
    live: BTreeMap<u64, u64>,
    max: usize,
}

impl DmaWindows {
    /// Forget the windows starting inside `[iova, end)`.
    fn forget(&mut self, iova: u64, end: u64) {
        let inside: Vec<u64> = self.live.range(iova..end).map(|(&s, _)| s).collect();
        for s in inside {
            self.live.remove(&s);
        }
    }
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
    /// Every DMA window the server has (or is being sent), IOVA -> length, counted against
    /// the server's `max_dma_maps`.
    windows: Mutex<DmaWindows>,
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
        self.exchange(op, cmd, body, fds)
            .map_err(|e| e.into_error(op))
    }

    /// As [`Shared::request`], keeping the server's refusal (an error reply) apart from the
    /// transport's own failures, for callers that explain a refusal.
    fn exchange(
        &self,
        op: &'static str,
        cmd: u16,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, Refusal> {
        let reply = self
            .calls
            .call(&self.conn, cmd, body, fds, REPLY_TIMEOUT)
            .map_err(|e| match e {
                CallError::Closed => Refusal::Failed(transport(op, self.dead())),
                CallError::Send(e) if peer_gone(&e) => {
                    // The server is gone though the reader may not have seen the EOF yet:
                    // the device is lost now, not at the reader's next wake-up, so that a
                    // caller that saw this error also sees `lost()`.
                    let reason = format!("connection to the server lost: send: {e}");
                    self.close(reason, false);
                    Refusal::Failed(transport(op, self.dead()).with_errno(e.raw_os_error()))
                }
                other => {
                    let errno = call_errno(&other);
                    Refusal::Failed(transport(op, other).with_errno(errno))
                }
            })?;
        if reply.header.is_error() {
            return Err(Refusal::Errno(nix::errno::Errno::from_raw(
                reply.header.error as i32,
            )));
        }
        if reply.header.command != cmd {
            return Err(Refusal::Failed(transport(op, "reply for another command")));
        }
        Ok(reply)
    }
}

/// True if a send failed because the peer is gone (not for a full buffer or a bad message).
fn peer_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ECONNREFUSED)
    )
}

/// Why [`Shared::exchange`] got no good reply.
#[derive(Debug)]
enum Refusal {
    /// The server answered with an error reply carrying this errno.
    Errno(nix::errno::Errno),
    /// No usable reply at all (the connection, a timeout, a reply out of step).
    Failed(BackendError),
}

impl Refusal {
    fn into_error(self, op: &'static str) -> BackendError {
        match self {
            Refusal::Errno(errno) => transport(op, format!("server answered error {errno}"))
                .with_errno(Some(errno as i32)),
            Refusal::Failed(e) => e,
        }
    }
}

/// The largest reply `argsz` a DEVICE_GET_REGION_INFO reply may ask us to take (the region
/// info and its capability chain). 64 KiB holds the most the sparse-mmap parser accepts (1024
/// areas, 16 KiB) with room for other capabilities; it is a constant of this file.
const MAX_REGION_INFO_ARGSZ: u32 = 64 * 1024;

/// A region as DEVICE_GET_REGION_INFO described it, with the parts we mapped.
#[derive(Debug)]
struct Region {
    desc: RegionDesc,
    /// `region::FLAG_*` as the server sent them (for errors).
    flags: u32,
    /// Why the device does not have it when the server refused its region info.
    refused: Option<String>,
    windows: Vec<BarWindow>,
}

/// What DEVICE_GET_INFO and the region/IRQ queries told us.
#[derive(Debug, Default)]
struct Layout {
    num_regions: u32,
    num_irqs: u32,
    /// The standard PCI regions the device reports, by index (`regions[i].desc.index == i`).
    regions: Vec<Region>,
    /// The interrupt indices the device reports, by index.
    irqs: Vec<IrqDesc>,
}

impl Layout {
    /// Region `index` if it can be read (`write` false) or written, else why not.
    fn region(&self, index: u32, write: bool) -> Result<&Region, String> {
        let name = region_index::name(index);
        let Some(r) = self.regions.get(index as usize) else {
            return Err(format!(
                "the device has no {name}: it reports {} regions",
                self.num_regions
            ));
        };
        if let Some(why) = &r.refused {
            return Err(format!("the device has no {name}: {why}"));
        }
        if r.desc.size == 0 {
            return Err(format!(
                "the device has no {name}: its region info gives size 0"
            ));
        }
        let (allowed, what) = if write {
            (r.desc.write, "writable")
        } else {
            (r.desc.read, "readable")
        };
        if !allowed {
            return Err(format!(
                "{name} is not {what} (region info flags {:#x})",
                r.flags
            ));
        }
        Ok(r)
    }

    /// Region `index` for an access of `len` bytes at `offset`, if it has the region, the
    /// access right and the range; else the error naming which it lacks.
    fn target(
        &self,
        op: &'static str,
        index: u32,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Result<&Region, BackendError> {
        let region = self
            .region(index, write)
            .map_err(|why| transport(op, why))?;
        let size = region.desc.size;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(region),
            _ => Err(transport(
                op,
                format!(
                    "access {offset:#x}+{len:#x} outside {} ({size:#x} bytes)",
                    region_index::name(index)
                ),
            )),
        }
    }

    /// The IRQ info of `index` (no vectors if the device does not report that index).
    fn irq(&self, index: u32) -> IrqDesc {
        self.irqs.get(index as usize).copied().unwrap_or(IrqDesc {
            index,
            count: 0,
            eventfd: false,
        })
    }
}

/// A part of a region the server let us mmap (the whole region, or one sparse-mmap area):
/// register accesses inside it are single loads and stores instead of messages.
struct BarWindow {
    start: u64,
    len: u64,
    map: MappedBar,
}

impl std::fmt::Debug for BarWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}+{:#x}", self.start, self.len)
    }
}

impl BarWindow {
    /// The window an access of `len` bytes at `offset` can use: one naturally aligned load or
    /// store of 4 or 8 bytes inside it. Any other access goes by message, where the server
    /// decides what it takes.
    fn find(windows: &[BarWindow], offset: u64, len: usize) -> Option<(&MappedBar, u64)> {
        if !(len == 4 || len == 8) || offset % len as u64 != 0 {
            return None;
        }
        let end = offset.checked_add(len as u64)?;
        windows
            .iter()
            .find(|w| offset >= w.start && end <= w.start.saturating_add(w.len))
            .filter(|w| (offset - w.start) % len as u64 == 0)
            .map(|w| (&w.map, offset - w.start))
    }
}

/// The windows a DEVICE_GET_REGION_INFO reply offers: with the mmap flag and a region fd,
/// the sparse-mmap areas if the reply has that capability, else the whole region.
fn region_windows(
    reply: &Message,
    ri: &payload::RegionInfo,
) -> Result<Vec<BarWindow>, BackendError> {
    const OP: &str = "region info (mmap)";
    let name = region_index::name(ri.index);
    if ri.flags & region::FLAG_MMAP == 0 {
        return Ok(Vec::new());
    }
    let fd = match reply.fds.as_slice() {
        [] => {
            tracing::warn!("{name} is mmap-able but the server sent no fd: using messages");
            return Ok(Vec::new());
        }
        [fd] => fd,
        _ => return Err(transport(OP, format!("{name}: more than one region fd"))),
    };
    let areas = if ri.flags & region::FLAG_CAPS != 0 {
        payload::sparse_mmap_areas(&reply.payload)
            .map_err(|e| transport(OP, format!("{name}: {e}")))?
    } else {
        vec![(0, ri.size)]
    };
    let mut windows = Vec::new();
    for (start, len) in areas.into_iter().filter(|a| a.1 > 0) {
        let file_offset = ri
            .offset
            .checked_add(start)
            .ok_or_else(|| transport(OP, format!("{name}: area offset overflows")))?;
        let map = MappedBar::map(fd.as_fd(), file_offset, len).map_err(|e| {
            transport(OP, format!("{name}: mmap of {start:#x}+{len:#x}: {e}"))
                .with_errno(e.raw_os_error())
        })?;
        windows.push(BarWindow { start, len, map });
    }
    Ok(windows)
}

/// A vfio-user server's device.
pub struct VfioUserBackend {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    layout: Layout,
    /// The server's MSI state as vfio-pci's rule has it (the count MSI was enabled with).
    msi: Mutex<MsiState>,
}

impl std::fmt::Debug for VfioUserBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserBackend")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl VfioUserBackend {
    /// Connect to the server at `path`, negotiate the version and read the device layout.
    pub fn connect(path: &Path) -> Result<VfioUserBackend, BackendError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            transport("connect", format!("{}: {e}", path.display())).with_errno(e.raw_os_error())
        })?;
        Self::with_name(stream, path.display().to_string())
    }

    /// Use an already connected socket.
    pub fn from_stream(stream: UnixStream) -> Result<VfioUserBackend, BackendError> {
        Self::with_name(stream, "on a connected socket".into())
    }

    fn with_name(stream: UnixStream, device: String) -> Result<VfioUserBackend, BackendError> {
        let limits = Limits::default();
        let lost_event = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).map_err(|e| {
            transport("connect", format!("eventfd: {e}")).with_errno(Some(e as i32))
        })?;
        let shared = Arc::new(Shared {
            conn: Connection::new(stream, limits),
            calls: Calls::new(),
            device,
            close_reason: Mutex::new(None),
            lost: Mutex::new(None),
            lost_event,
            max_xfer: AtomicUsize::new(version::DEFAULT_MAX_DATA_XFER as usize),
            maps: RwLock::new(BTreeMap::new()),
            windows: Mutex::new(DmaWindows {
                live: BTreeMap::new(),
                max: version::DEFAULT_MAX_DMA_MAPS as usize,
            }),
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
                .map_err(|e| {
                    transport("connect", format!("reader thread: {e}")).with_errno(e.raw_os_error())
                })?
        };
        let mut backend = VfioUserBackend {
            shared,
            reader: Some(reader),
            layout: Layout::default(),
            msi: Mutex::new(MsiState::default()),
        };
        backend.negotiate(limits)?;
        backend.layout = backend.query_layout()?;
        Ok(backend)
    }

    fn negotiate(&self, limits: Limits) -> Result<(), BackendError> {
        const OP: &str = "version";
        let ours = Version::ours(Capabilities {
            max_msg_fds: limits.max_fds as u32,
            max_data_xfer_size: version::DEFAULT_MAX_DATA_XFER,
            pgsizes: accel_abi::PAGE_SIZE,
            max_dma_maps: PROPOSED_MAX_DMA_MAPS,
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
                other => {
                    let errno = call_errno(&other);
                    transport(OP, other).with_errno(errno)
                }
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
                )
                .with_errno(Some(errno as i32)));
            }
            return Err(transport(OP, format!("server answered error {errno}"))
                .with_errno(Some(errno as i32)));
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
            .clamp(1, version::DEFAULT_MAX_DATA_XFER);
        shared.max_xfer.store(xfer as usize, Ordering::Relaxed);
        lock(&shared.windows).max = theirs.caps.max_dma_maps as usize;
        if let Some(i) = twin_index {
            let mut fds = reply.fds;
            self.start_twin(fds.swap_remove(i), limits)?;
        }
        Ok(())
    }

    /// Twin-socket mode: serve the server's requests arriving on `fd` from a second reader.
    fn start_twin(&self, fd: OwnedFd, limits: Limits) -> Result<(), BackendError> {
        const OP: &str = "version (twin socket)";
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(|e| {
            transport(OP, format!("fstat of the descriptor: {e}")).with_errno(Some(e as i32))
        })?;
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
                .map_err(|e| {
                    transport(OP, format!("reader thread: {e}")).with_errno(e.raw_os_error())
                })?
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

    /// Read what the device has: DEVICE_GET_INFO, then the info of every standard PCI region
    /// and every interrupt index it reports. Nothing here asks for a particular device: a
    /// region or interrupt it lacks is simply not there (what a driver needs is its own check).
    fn query_layout(&self) -> Result<Layout, BackendError> {
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
        if info.flags & payload::DEVICE_FLAGS_PCI == 0 {
            return Err(transport(
                "device info",
                format!(
                    "not a PCI device (flags {:#x} lack DEVICE_FLAGS_PCI): this backend reaches \
                     PCI regions and interrupts only",
                    info.flags
                ),
            ));
        }
        // Device-specific regions (past VGA) are not reachable through `Backend`: not asked.
        let regions = (0..info.num_regions.min(region_index::PCI_COUNT))
            .map(|index| self.query_region(index))
            .collect::<Result<Vec<_>, _>>()?;
        let irqs = (0..info.num_irqs.min(irq::COUNT))
            .map(|index| self.query_irq(index))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Layout {
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
            regions,
            irqs,
        })
    }

    /// DEVICE_GET_REGION_INFO of `index`, asked first with room for the fixed part only and,
    /// when the reply's `argsz` says the full reply (its capability chain) is larger, asked
    /// again with that `argsz` (the spec's "Message sizes": a reply larger than the request's
    /// `argsz` does not carry the full payload).
    fn region_info(&self, index: u32) -> Result<(payload::RegionInfo, Message), Refusal> {
        const OP: &str = "region info";
        let name = region_index::name(index);
        let mut argsz = payload::RegionInfo::SIZE as u32;
        loop {
            let req = payload::RegionInfo {
                argsz,
                flags: 0,
                index,
                cap_offset: 0,
                size: 0,
                offset: 0,
            };
            let r =
                self.shared
                    .exchange(OP, command::DEVICE_GET_REGION_INFO, &req.encode(), &[])?;
            let ri = payload::RegionInfo::decode(&r.payload)
                .map_err(|e| Refusal::Failed(transport(OP, format!("{name}: {e}"))))?;
            if ri.index != index {
                return Err(Refusal::Failed(transport(
                    OP,
                    format!("asked for {name}, the reply is for region {}", ri.index),
                )));
            }
            if ri.argsz <= argsz {
                return Ok((ri, r));
            }
            if argsz > payload::RegionInfo::SIZE as u32 {
                // We asked with the size the server named, and it wants more still.
                return Err(Refusal::Failed(transport(
                    OP,
                    format!(
                        "{name}: asked with the argsz {argsz} the server's reply named, the \
                         reply now names {}",
                        ri.argsz
                    ),
                )));
            }
            if ri.argsz > MAX_REGION_INFO_ARGSZ {
                return Err(Refusal::Failed(transport(
                    OP,
                    format!(
                        "{name}: the server needs argsz {} for the full reply, above the \
                         client's limit MAX_REGION_INFO_ARGSZ ({MAX_REGION_INFO_ARGSZ} bytes, a \
                         constant in driver/src/backend/vfio_user.rs)",
                        ri.argsz
                    ),
                )));
            }
            argsz = ri.argsz;
        }
    }

    fn query_region(&self, index: u32) -> Result<Region, BackendError> {
        let absent = |refused: Option<String>, flags: u32| Region {
            desc: RegionDesc {
                index,
                size: 0,
                read: false,
                write: false,
                mapped: Vec::new(),
            },
            flags,
            refused,
            windows: Vec::new(),
        };
        let (ri, reply) = match self.region_info(index) {
            Ok(got) => got,
            Err(Refusal::Errno(errno)) => {
                // Not fatal: the device just lacks that region (a driver needing it says so).
                let why = format!("the server refused its region info ({errno})");
                tracing::info!("{}: {why}", region_index::name(index));
                return Ok(absent(Some(why), 0));
            }
            Err(Refusal::Failed(e)) => return Err(e),
        };
        if ri.size == 0 {
            return Ok(absent(None, ri.flags));
        }
        let windows = region_windows(&reply, &ri)?;
        Ok(Region {
            desc: RegionDesc {
                index,
                size: ri.size,
                read: ri.flags & region::FLAG_READ != 0,
                write: ri.flags & region::FLAG_WRITE != 0,
                mapped: windows.iter().map(|w| (w.start, w.len)).collect(),
            },
            flags: ri.flags,
            refused: None,
            windows,
        })
    }

    fn query_irq(&self, index: u32) -> Result<IrqDesc, BackendError> {
        const OP: &str = "irq info";
        let req = payload::IrqInfo {
            argsz: payload::IrqInfo::SIZE as u32,
            flags: 0,
            index,
            count: 0,
        };
        let r = match self
            .shared
            .exchange(OP, command::DEVICE_GET_IRQ_INFO, &req.encode(), &[])
        {
            Ok(r) => r,
            Err(Refusal::Errno(errno)) => {
                tracing::info!(
                    "{}: the server refused its IRQ info ({errno}): taken as absent",
                    irq_index::name(index)
                );
                return Ok(IrqDesc {
                    index,
                    count: 0,
                    eventfd: false,
                });
            }
            Err(Refusal::Failed(e)) => return Err(e),
        };
        let ii = payload::IrqInfo::decode(&r.payload).map_err(|e| transport(OP, e))?;
        if ii.index != index {
            return Err(transport(
                OP,
                format!(
                    "asked for {}, the reply is for index {}",
                    irq_index::name(index),
                    ii.index
                ),
            ));
        }
        Ok(IrqDesc {
            index,
            count: ii.count,
            eventfd: ii.flags & irq::INFO_EVENTFD != 0,
        })
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
        write(&self.shared.maps).clear();
        lock(&self.shared.windows).live.clear();
        Ok(())
    }

    /// The largest piece a region access of `len` bytes goes in (the negotiated
    /// `max_data_xfer_size`). A BAR access of up to 8 bytes is a register access and is never
    /// split (two halves are not what the device would see from one load or store): over the
    /// limit, it is an error naming it.
    fn unsplit_register(
        &self,
        op: &'static str,
        index: u32,
        len: usize,
    ) -> Result<usize, BackendError> {
        let chunk = self.shared.max_xfer.load(Ordering::Relaxed).max(1);
        if index != region::CONFIG && len <= 8 && len > chunk {
            return Err(transport(
                op,
                format!(
                    "a {len}-byte access to region {index} does not fit one message: the \
                     server's max_data_xfer_size (VERSION) is {chunk} bytes, and a register \
                     access is not split"
                ),
            ));
        }
        Ok(chunk)
    }

    /// Read `data.len()` bytes of region `index` at `offset`: one load from a mapped window
    /// when the access fits one, else REGION_READ messages.
    fn region_read(
        &self,
        op: &'static str,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), BackendError> {
        let region = self.layout.target(op, index, offset, data.len(), false)?;
        if let Some((map, at)) = BarWindow::find(&region.windows, offset, data.len()) {
            return map.read(at, data).map_err(|e| transport(op, e));
        }
        let chunk = self.unsplit_register(op, index, data.len())?;
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
                .exchange(op, command::REGION_READ, &req.encode(), &[])
                .map_err(|e| access_error(op, e, index, "read", at, part.len()))?;
            let got =
                payload::RegionAccess::decode(&r.payload, true).map_err(|e| transport(op, e))?;
            if got.offset != at || got.region != index || got.data.len() != part.len() {
                return Err(transport(op, "reply does not match the request"));
            }
            part.copy_from_slice(&got.data);
        }
        Ok(())
    }

    /// Write `data` to region `index` at `offset`: one store to a mapped window when the
    /// access fits one, else REGION_WRITE messages.
    fn region_write(
        &self,
        op: &'static str,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let region = self.layout.target(op, index, offset, data.len(), true)?;
        if let Some((map, at)) = BarWindow::find(&region.windows, offset, data.len()) {
            return map.write(at, data).map_err(|e| transport(op, e));
        }
        let chunk = self.unsplit_register(op, index, data.len())?;
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
                .exchange(op, command::REGION_WRITE, &req.encode(), &[])
                .map_err(|e| access_error(op, e, index, "write", at, part.len()))?;
            let got =
                payload::RegionAccess::decode(&r.payload, false).map_err(|e| transport(op, e))?;
            if got.offset != at || got.region != index || got.count as usize != part.len() {
                return Err(transport(op, "reply does not match the request"));
            }
        }
        Ok(())
    }
}

/// A region access the server refused, named: which region, where, how wide, the errno. The
/// protocol leaves the access widths a region takes to the device, and a device that takes
/// only some answers the others with an error (often EINVAL); the access is not retried with
/// another width, which could have another effect on a register.
fn access_error(
    op: &'static str,
    e: Refusal,
    index: u32,
    what: &str,
    offset: u64,
    len: usize,
) -> BackendError {
    let errno = match e {
        Refusal::Errno(errno) => errno,
        Refusal::Failed(e) => return e,
    };
    let hint = if errno == nix::errno::Errno::EINVAL {
        "; the device may accept only other access widths or alignments there (the protocol \
         leaves widths to the device; not retried with another width)"
    } else {
        ""
    };
    transport(
        op,
        format!(
            "{} {what} of {len} bytes at {offset:#x}: server answered error {errno}{hint}",
            region_index::name(index)
        ),
    )
    .with_errno(Some(errno as i32))
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
                } else if !h.no_reply() {
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
                if h.message_type() != MessageType::Reply && !h.no_reply() {
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
        let maps = read(&shared.maps);
        let (&start, m) = maps.range(..=req.address).next_back().ok_or(libc::EFAULT)?;
        if end > start.saturating_add(m.len) {
            return Err(libc::EFAULT);
        }
        (m.va + (req.address - start), m.access)
    };
    if write {
        if !access.write {
            return Err(libc::EPERM);
        }
        own_memory::write(va, &req.data).map_err(|e| e as i32)?;
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
        own_memory::read(va, &mut data).map_err(|e| e as i32)?;
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
        self.region_read("config_read", region::CONFIG, offset, data)
    }

    fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.region_write("config_write", region::CONFIG, offset, data)
    }

    fn bar_read(&self, bar: u32, offset: u64, data: &mut [u8]) -> Result<(), BackendError> {
        if bar > region_index::BAR5 {
            return Err(transport("bar_read", format!("no BAR{bar}: BARs are 0-5")));
        }
        self.region_read("bar_read", bar, offset, data)
    }

    fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if bar > region_index::BAR5 {
            return Err(transport("bar_write", format!("no BAR{bar}: BARs are 0-5")));
        }
        self.region_write("bar_write", bar, offset, data)
    }

    fn iova_ranges(&self) -> Vec<Range<u64>> {
        // vfio-user has no IOVA-range query; the server maps any page-aligned range.
        super::device_iova_ranges()
    }

    unsafe fn dma_map(
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
        {
            // Counted before it is sent (and uncounted if refused), so that concurrent maps
            // never take the server past the number of windows it announced.
            let mut windows = lock(&self.shared.windows);
            if windows.live.len() >= windows.max {
                return Err(transport(
                    "dma_map",
                    format!(
                        "{iova:#x}+{len:#x}: the server takes at most {} DMA maps at once \
                         (max_dma_maps of its VERSION reply) and {} are live; unmap some, or \
                         raise the server's limit (mirrorctl emulate --max-dma-maps N)",
                        windows.max,
                        windows.live.len()
                    ),
                ));
            }
            windows.live.insert(iova, len);
        }
        let uncount = || {
            lock(&self.shared.windows).live.remove(&iova);
        };
        if let Some(m) = local {
            // Registered before the server can use it (it may DMA as soon as it has the map).
            let mut maps = write(&self.shared.maps);
            let end = iova
                .checked_add(len)
                .ok_or_else(|| transport("dma_map", "range wraps"))?;
            let overlaps = maps
                .range(..end)
                .next_back()
                .is_some_and(|(&s, o)| s.saturating_add(o.len) > iova);
            if overlaps {
                uncount();
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
        if r.is_err() {
            uncount();
            if local.is_some() {
                write(&self.shared.maps).remove(&iova);
            }
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
            let mut maps = write(&self.shared.maps);
            let end = iova.saturating_add(len);
            let inside: Vec<u64> = maps.range(iova..end).map(|(&s, _)| s).collect();
            for s in inside {
                maps.remove(&s);
            }
            lock(&self.shared.windows).forget(iova, end);
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
        let msi_info = self.layout.irq(irq::MSI);
        if msi_info.count > 0 && !msi_info.eventfd && eventfds.iter().any(Option::is_some) {
            return Err(transport(
                "set_irqs",
                "the device's MSI cannot signal eventfds (IRQ info lacks the EVENTFD flag)",
            ));
        }
        if msi_info.count == 0 && eventfds.iter().any(Option::is_some) {
            let intx = self.layout.irq(irq::INTX).count;
            return Err(transport(
                "set_irqs",
                format!(
                    "the device has no MSI (IRQ info of MSI: 0 vectors{}){}",
                    if self.layout.num_irqs <= irq::MSI {
                        format!("; it reports {} IRQ indices", self.layout.num_irqs)
                    } else {
                        String::new()
                    },
                    if intx > 0 {
                        "; it has INTx: connect that with set_intx"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let mut msi = lock(&self.msi);
        let set = msi
            .plan(msi_info.count, &eventfds)
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

    fn set_intx(&self, eventfd: Option<OwnedFd>) -> Result<(), BackendError> {
        const OP: &str = "set_intx";
        let intx = self.layout.irq(irq::INTX);
        if intx.count == 0 {
            return Err(transport(
                OP,
                "the device has no INTx (IRQ info of INTx: 0 vectors)",
            ));
        }
        if eventfd.is_some() && !intx.eventfd {
            return Err(transport(
                OP,
                "the device's INTx cannot signal eventfds (IRQ info lacks the EVENTFD flag)",
            ));
        }
        let (flags, count) = match eventfd {
            Some(_) => (irq::DATA_EVENTFD | irq::ACTION_TRIGGER, 1),
            None => (irq::DATA_NONE | irq::ACTION_TRIGGER, 0),
        };
        let req = payload::SetIrqs {
            argsz: payload::SetIrqs::SIZE as u32,
            flags,
            index: irq::INTX,
            start: 0,
            count,
        };
        let fds: Vec<BorrowedFd<'_>> = eventfd.iter().map(|f| f.as_fd()).collect();
        self.shared
            .request(OP, command::DEVICE_SET_IRQS, &req.encode(), &fds)
            .map(|_| ())
    }

    fn reset(&self) -> Result<(), BackendError> {
        self.shared
            .request("reset", command::DEVICE_RESET, &[], &[])
            .map(|_| ())
    }

    fn pins_memory(&self) -> bool {
        false
    }

    fn regions(&self) -> Option<Vec<RegionDesc>> {
        Some(self.layout.regions.iter().map(|r| r.desc.clone()).collect())
    }

    fn irqs(&self) -> Option<Vec<IrqDesc>> {
        Some(self.layout.irqs.clone())
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
        answer_bring_up(c, &FakeDevice::mxa(bar0, msi_vectors));
    }

    const RW: u32 = region::FLAG_READ | region::FLAG_WRITE;

    /// What a scripted server says its device has.
    struct FakeDevice<'a> {
        /// `(flags, size)` by region index (DEVICE_GET_INFO's region count is the length).
        regions: Vec<(u32, u64)>,
        /// `(flags, count)` by IRQ index.
        irqs: Vec<(u32, u32)>,
        /// BAR0 is mmap-able through this fd, with one sparse area `[0x1000, 0x2000)`.
        bar0_fd: Option<BorrowedFd<'a>>,
        /// The `argsz` the full BAR0 region info reply needs instead of its real size.
        bar0_argsz: Option<u32>,
        /// A hostile server: BAR0's full reply always needs 8 bytes more than asked.
        bar0_argsz_grows: bool,
    }

    impl<'a> FakeDevice<'a> {
        /// Like the MXA-1 server: BAR0 (16 KiB) and config space, INTx and MSI.
        fn mxa(bar0_fd: Option<BorrowedFd<'a>>, msi_vectors: u32) -> FakeDevice<'a> {
            let mut regions = vec![(0, 0); region::COUNT as usize];
            regions[0] = (RW, 0x4000);
            regions[region::CONFIG as usize] = (RW, 0x100);
            FakeDevice {
                regions,
                irqs: vec![
                    (irq::INFO_EVENTFD, 1),
                    (irq::INFO_EVENTFD | irq::INFO_NORESIZE, msi_vectors),
                    (0, 0),
                    (0, 0),
                    (0, 0),
                ],
                bar0_fd,
                bar0_argsz: None,
                bar0_argsz_grows: false,
            }
        }

        /// Like libvfio-user's gpio sample: no BAR0, a 256-byte BAR2, config space, INTx only.
        fn gpio() -> FakeDevice<'a> {
            let mut regions = vec![(0, 0); region::COUNT as usize];
            regions[2] = (RW, 0x100);
            regions[region::CONFIG as usize] = (RW, 0x100);
            FakeDevice {
                regions,
                irqs: vec![(irq::INFO_EVENTFD, 1), (0, 0), (0, 0), (0, 0), (0, 0)],
                bar0_fd: None,
                bar0_argsz: None,
                bar0_argsz_grows: false,
            }
        }
    }

    /// Answer the client's bring-up queries as a spec-conforming server would: a region info
    /// reply carries its capability chain only if the request's `argsz` has room for it, and
    /// otherwise names the `argsz` the full reply needs. Returns each region info request as
    /// `(index, argsz)`, also when the client gives up half-way.
    fn answer_bring_up(c: &Connection, dev: &FakeDevice<'_>) -> Vec<(u32, u32)> {
        let mut asked = Vec::new();
        loop {
            let Ok(m) = c.recv() else {
                return asked;
            };
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
                    num_regions: dev.regions.len() as u32,
                    num_irqs: dev.irqs.len() as u32,
                }
                .encode(),
                command::DEVICE_GET_REGION_INFO => {
                    let r = payload::RegionInfo::decode(&m.payload).unwrap();
                    asked.push((r.index, r.argsz));
                    let (flags, size) = dev.regions[r.index as usize];
                    let last = dev.irqs.is_empty() && r.index as usize + 1 == dev.regions.len();
                    if let (region::BAR0, Some(fd)) = (r.index, dev.bar0_fd) {
                        let cap = sparse_cap(0x1000, 0x1000);
                        let full = if dev.bar0_argsz_grows {
                            r.argsz + 8
                        } else {
                            dev.bar0_argsz.unwrap_or((32 + cap.len()) as u32)
                        };
                        let room = r.argsz >= full;
                        let mut body = payload::RegionInfo {
                            argsz: full,
                            flags: flags | region::FLAG_MMAP | region::FLAG_CAPS,
                            cap_offset: if room { 32 } else { 0 },
                            size,
                            offset: 0,
                            ..r
                        }
                        .encode();
                        if room {
                            body.extend_from_slice(&cap);
                        }
                        c.reply(&h, &body, &[fd]).unwrap();
                        if last {
                            return asked;
                        }
                        continue;
                    }
                    let body = payload::RegionInfo {
                        argsz: 32,
                        flags,
                        size,
                        ..r
                    }
                    .encode();
                    if last {
                        c.reply(&h, &body, &[]).unwrap();
                        return asked;
                    }
                    body
                }
                command::DEVICE_GET_IRQ_INFO => {
                    let r = payload::IrqInfo::decode(&m.payload).unwrap();
                    let (flags, count) = dev.irqs[r.index as usize];
                    let body = payload::IrqInfo {
                        argsz: 16,
                        flags,
                        index: r.index,
                        count,
                    }
                    .encode();
                    c.reply(&h, &body, &[]).unwrap();
                    if r.index as usize + 1 == dev.irqs.len() {
                        return asked;
                    }
                    continue;
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

    /// A 16 KiB memfd standing in for the server's BAR0 memory.
    fn memfd_bar0() -> std::fs::File {
        let fd =
            nix::sys::memfd::memfd_create(c"bar0", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(0x4000).unwrap();
        file
    }

    #[test]
    fn sparse_mmap_areas_of_bar0_are_mapped_the_rest_uses_messages() {
        use std::os::unix::fs::FileExt;
        let file = memfd_bar0();
        let (a, b) = UnixStream::pair().unwrap();
        let bar_fd = file.try_clone().unwrap();
        let server = std::thread::spawn(move || {
            let c = Connection::new(b, Limits::default());
            c.set_peer_max_fds(8);
            let asked = answer_bring_up(&c, &FakeDevice::mxa(Some(bar_fd.as_fd()), 3));
            (c, asked)
        });
        let backend = VfioUserBackend::from_stream(a).unwrap();
        let (server, asked) = server.join().unwrap();
        // The server sends the capability chain only when asked with room for it: asked
        // first with the fixed 32 bytes, then again with the 64 its reply named.
        let bar0: Vec<u32> = asked.iter().filter(|a| a.0 == 0).map(|a| a.1).collect();
        assert_eq!(bar0, [32, 64]);
        let regions = backend.regions().unwrap();
        assert_eq!(regions[0].mapped, [(0x1000, 0x1000)]);
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
        // SAFETY: `local` stays mapped, and is read only after the server thread is joined.
        unsafe {
            backend.dma_map(
                0x10000,
                8192,
                DmaSource::ProcessVa { va },
                DmaAccess::READ_WRITE,
            )
        }
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
        // SAFETY: a PROT_NONE page nothing can read or write, kept mapped for the test.
        unsafe {
            backend.dma_map(
                0x20000,
                4096,
                DmaSource::ProcessVa { va },
                DmaAccess::READ_WRITE,
            )
        }
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

    #[test]
    fn a_region_info_argsz_beyond_the_limit_or_growing_is_an_error_naming_it() {
        let file = memfd_bar0();
        for grows in [false, true] {
            let (a, b) = UnixStream::pair().unwrap();
            let bar_fd = file.try_clone().unwrap();
            let server = std::thread::spawn(move || {
                let c = Connection::new(b, Limits::default());
                c.set_peer_max_fds(8);
                let mut dev = FakeDevice::mxa(Some(bar_fd.as_fd()), 3);
                dev.bar0_argsz = Some(1 << 20);
                dev.bar0_argsz_grows = grows;
                answer_bring_up(&c, &dev)
            });
            let e = VfioUserBackend::from_stream(a).unwrap_err().to_string();
            let asked = server.join().unwrap();
            let bar0: Vec<u32> = asked.iter().filter(|a| a.0 == 0).map(|a| a.1).collect();
            if grows {
                assert_eq!(bar0, [32, 40], "asked again once, then gave up");
                assert!(e.contains("BAR0: asked with the argsz 40"), "{e}");
            } else {
                assert_eq!(bar0, [32], "not asked again beyond the limit");
                assert!(
                    e.contains("argsz 1048576") && e.contains("MAX_REGION_INFO_ARGSZ (65536"),
                    "{e}"
                );
            }
        }
    }

    /// What a scripted server saw after bring-up: `(command, region or IRQ index, offset,
    /// count, fds)` per message.
    type Seen = Vec<(u16, u32, u64, u32, usize)>;

    /// Serve region accesses from `memory` (by region index), refusing with EINVAL any width
    /// `takes(region, count)` refuses; SET_IRQS signals each eventfd it brings once; reset is
    /// answered. Until the client hangs up.
    fn serve(c: &Connection, mut memory: Vec<Vec<u8>>, takes: fn(u32, u32) -> bool) -> Seen {
        let mut seen = Vec::new();
        while let Ok(m) = c.recv() {
            let h = m.header;
            match h.command {
                command::REGION_READ | command::REGION_WRITE => {
                    let write = h.command == command::REGION_WRITE;
                    let req = payload::RegionAccess::decode(&m.payload, write).unwrap();
                    seen.push((h.command, req.region, req.offset, req.count, 0));
                    let bytes = &mut memory[req.region as usize];
                    let range = req.offset as usize..(req.offset + u64::from(req.count)) as usize;
                    if range.end > bytes.len() || !takes(req.region, req.count) {
                        c.reply_error(&h, libc::EINVAL).unwrap();
                        continue;
                    }
                    let data = if write {
                        bytes[range].copy_from_slice(&req.data);
                        Vec::new()
                    } else {
                        bytes[range].to_vec()
                    };
                    c.reply(&h, &payload::RegionAccess { data, ..req }.encode(), &[])
                        .unwrap();
                }
                command::DEVICE_SET_IRQS => {
                    let req = payload::SetIrqs::decode(&m.payload).unwrap();
                    seen.push((
                        h.command,
                        req.index,
                        u64::from(req.flags),
                        req.count,
                        m.fds.len(),
                    ));
                    for fd in m.fds {
                        use std::io::Write;
                        std::fs::File::from(fd)
                            .write_all(&1u64.to_ne_bytes())
                            .unwrap();
                    }
                    c.reply(&h, &[], &[]).unwrap();
                }
                command::DEVICE_RESET => {
                    seen.push((h.command, 0, 0, 0, 0));
                    c.reply(&h, &[], &[]).unwrap();
                }
                other => {
                    seen.push((other, 0, 0, 0, 0));
                    c.reply_error(&h, libc::ENOSYS).unwrap();
                }
            }
        }
        seen
    }

    /// Open a scripted device, then serve it with `memory` (256 bytes per region the device
    /// has, config space starting with `config`).
    fn open_fake(
        dev: fn() -> FakeDevice<'static>,
        config: &[u8],
        takes: fn(u32, u32) -> bool,
    ) -> (VfioUserBackend, JoinHandle<Seen>) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut memory: Vec<Vec<u8>> = dev()
            .regions
            .iter()
            .map(|&(_, size)| vec![0; size as usize])
            .collect();
        memory[region::CONFIG as usize][..config.len()].copy_from_slice(config);
        let server = std::thread::spawn(move || {
            let c = Connection::new(b, Limits::default());
            answer_bring_up(&c, &dev());
            serve(&c, memory, takes)
        });
        (VfioUserBackend::from_stream(a).unwrap(), server)
    }

    fn any_width(_: u32, _: u32) -> bool {
        true
    }

    /// Vendor 0x4e58, device 0x0001: not an MXA-1.
    const GPIO_IDS: [u8; 4] = [0x58, 0x4e, 0x01, 0x00];

    #[test]
    fn a_device_without_bar0_opens_and_its_config_and_bar2_work() {
        let (backend, server) = open_fake(FakeDevice::gpio, &GPIO_IDS, any_width);
        let regions = backend.regions().unwrap();
        let present: Vec<u32> = regions
            .iter()
            .filter(|r| r.present())
            .map(|r| r.index)
            .collect();
        assert_eq!(present, [2, region::CONFIG]);
        let mut id = [0u8; 4];
        backend.config_read(0, &mut id).unwrap();
        assert_eq!(id, GPIO_IDS);
        backend.bar_write(2, 0x10, &[0xa5]).unwrap();
        backend
            .bar_write(2, 0x20, &0x1234_5678u32.to_le_bytes())
            .unwrap();
        let mut b = [0u8; 1];
        backend.bar_read(2, 0x10, &mut b).unwrap();
        assert_eq!(b, [0xa5]);
        let mut w = [0u8; 4];
        backend.bar_read(2, 0x20, &mut w).unwrap();
        assert_eq!(u32::from_le_bytes(w), 0x1234_5678);
        // What the device lacks is named, without a message to the server.
        let e = backend.bar_read(0, 0, &mut w).unwrap_err().to_string();
        assert!(
            e.contains("the device has no BAR0: its region info gives size 0"),
            "{e}"
        );
        let e = backend.bar_read(6, 0, &mut w).unwrap_err().to_string();
        assert!(e.contains("no BAR6: BARs are 0-5"), "{e}");
        let e = backend.bar_read(2, 0xfe, &mut w).unwrap_err().to_string();
        assert!(e.contains("outside BAR2 (0x100 bytes)"), "{e}");
        drop(backend);
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert!(seen.iter().all(|s| s.1 == 2 || s.1 == region::CONFIG));
    }

    #[test]
    fn intx_is_connected_to_an_eventfd_and_the_server_signals_it() {
        let (backend, server) = open_fake(FakeDevice::gpio, &GPIO_IDS, any_width);
        let e = backend
            .set_irqs(vec![eventfd(), eventfd(), eventfd()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the device has no MSI") && e.contains("set_intx"),
            "{e}"
        );
        let event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        backend
            .set_intx(Some(event.as_fd().try_clone_to_owned().unwrap()))
            .unwrap();
        assert!(
            readable(event.as_fd(), 5000),
            "INTx not signalled within 5 s"
        );
        assert_eq!(event.read().unwrap(), 1);
        backend.set_intx(None).unwrap();
        drop(backend);
        let seen = server.join().unwrap();
        let trigger = u64::from(irq::DATA_EVENTFD | irq::ACTION_TRIGGER);
        let disable = u64::from(irq::DATA_NONE | irq::ACTION_TRIGGER);
        assert_eq!(
            seen,
            [
                (command::DEVICE_SET_IRQS, irq::INTX, trigger, 1, 1),
                (command::DEVICE_SET_IRQS, irq::INTX, disable, 0, 0),
            ]
        );
        // A device without INTx says so.
        let mut dev = FakeDevice::mxa(None, 3);
        dev.irqs[0] = (0, 0);
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let c = Connection::new(b, Limits::default());
            answer_bring_up(&c, &dev);
            c
        });
        let backend = VfioUserBackend::from_stream(a).unwrap();
        let _c = t.join().unwrap();
        let e = backend.set_intx(eventfd()).unwrap_err().to_string();
        assert!(e.contains("the device has no INTx"), "{e}");
    }

    /// The OS error behind a failure is a value a caller can match, not only words in the
    /// message: the errno of a server's error reply (EBUSY: it serves another client; EINVAL: a
    /// refused access width), of a send to a server that stopped reading (EPIPE) and of a
    /// connect to a path that does not exist (ENOENT). The messages stay as they were.
    #[test]
    fn os_errors_are_matchable_values() {
        // A server busy with another client answers VERSION with EBUSY.
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let c = Connection::new(b, Limits::default());
            let m = c.recv().unwrap();
            assert_eq!(m.header.command, command::VERSION);
            c.reply_error(&m.header, libc::EBUSY).unwrap();
            c
        });
        let e = VfioUserBackend::from_stream(a).expect_err("EBUSY");
        let _c = server.join().unwrap();
        assert!(
            matches!(
                e,
                BackendError::Transport {
                    errno: Some(libc::EBUSY),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("is serving another client"), "{e}");

        // An access the device refuses carries the errno of the error reply.
        fn eight_byte_bar0(region: u32, count: u32) -> bool {
            region != 0 || count == 8
        }
        let (backend, server) = open_fake(|| FakeDevice::mxa(None, 3), &[], eight_byte_bar0);
        let e = backend.bar_read(0, 0x10, &mut [0u8; 4]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e:?}");
        assert!(
            e.to_string().contains("server answered error EINVAL"),
            "{e}"
        );
        drop(backend);
        server.join().unwrap();

        // A server that stops reading: the next request's send fails EPIPE.
        let (backend, c) = fake();
        c.stream().shutdown(std::net::Shutdown::Read).unwrap();
        let e = backend.config_read(0, &mut [0u8; 4]).unwrap_err();
        assert!(
            matches!(
                e,
                BackendError::Transport {
                    errno: Some(libc::EPIPE),
                    ..
                }
            ),
            "{e:?}"
        );
        drop(c);

        // No socket at the path.
        let e = VfioUserBackend::connect(Path::new("/nonexistent/vfio-user.sock"))
            .expect_err("no socket");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/vfio-user.sock"), "{e}");
    }

    #[test]
    fn a_width_the_device_refuses_is_an_error_naming_region_offset_width_and_errno() {
        fn eight_byte_bar0(region: u32, count: u32) -> bool {
            region != 0 || count == 8
        }
        let (backend, server) = open_fake(|| FakeDevice::mxa(None, 3), &[], eight_byte_bar0);
        let mut w = [0u8; 4];
        let e = backend.bar_read(0, 0x10, &mut w).unwrap_err().to_string();
        for part in [
            "BAR0 read of 4 bytes at 0x10",
            "server answered error EINVAL",
            "may accept only other access widths",
        ] {
            assert!(e.contains(part), "{part:?} missing: {e}");
        }
        let e = backend.bar_write(0, 0x18, &w).unwrap_err().to_string();
        assert!(e.contains("BAR0 write of 4 bytes at 0x18"), "{e}");
        let mut d = [0u8; 8];
        backend.bar_read(0, 0x10, &mut d).unwrap();
        drop(backend);
        // One message per access: the refused width was not retried with another.
        let seen = server.join().unwrap();
        let widths: Vec<(u64, u32)> = seen.iter().map(|s| (s.2, s.3)).collect();
        assert_eq!(widths, [(0x10, 4), (0x18, 4), (0x10, 8)]);
    }

    #[test]
    fn the_mxa1_driver_refuses_a_device_that_is_not_one_with_a_driver_error() {
        use crate::device::{Device, DeviceOptions};
        // The gpio-like device: config space works, its IDs are not the MXA-1's.
        let (backend, _server) = open_fake(FakeDevice::gpio, &GPIO_IDS, any_width);
        let e = Device::bring_up(Box::new(backend), DeviceOptions::default())
            .err()
            .expect("not an MXA-1");
        assert!(
            matches!(e, crate::Error::WrongDevice { vendor: 0x4e58, .. }),
            "{e:?}"
        );
        // MXA-1 IDs on a device without BAR0: the driver names what is missing.
        let mut ids = accel_abi::config::VENDOR_ID.to_le_bytes().to_vec();
        ids.extend_from_slice(&accel_abi::config::DEVICE_ID.to_le_bytes());
        let (backend, _server) = open_fake(FakeDevice::gpio, &ids, any_width);
        let e = Device::bring_up(Box::new(backend), DeviceOptions::default())
            .err()
            .expect("no BAR0");
        assert!(matches!(e, crate::Error::Unsupported(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("needs BAR0") && text.contains("BAR2 (0x100 bytes)"),
            "{text}"
        );
    }
}
