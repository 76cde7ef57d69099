//! A vfio-user server for the emulated MXA-1: a thin layer over [`Accelerator`].
//!
//! One client at a time on one device that outlives its connections: when a client disconnects,
//! its DMA maps are unmapped and its interrupt eventfds closed, and the rest of the device state
//! is kept for the next client (the spec's "Client Disconnection"). A client connecting while
//! another is served gets a header-only `EBUSY` reply to its VERSION and is closed. Per
//! connection:
//! - the calling thread reads every message: replies to our DMA_READ/DMA_WRITE requests go to
//!   the device thread waiting for them (matched by message id), commands go to a command
//!   thread through a bounded queue ([`QUEUE_MAX_MESSAGES`], [`QUEUE_MAX_BYTES`]): when it is
//!   full the reader stops reading the socket, so a client that sends without reading replies
//!   is held back instead of growing the server. A command that waits on device DMA (a TLB
//!   invalidation waiting for in-flight work) never stops the replies that DMA needs: in
//!   twin-socket mode they come on their own socket, read by their own thread; on a single
//!   socket the reader keeps reading while the server waits for the client, up to the larger
//!   [`QUEUE_MAX_MESSAGES_WAITING`] and [`QUEUE_MAX_BYTES_WAITING`];
//! - the command thread runs the client's commands in order against the device; a reply that
//!   cannot be sent within [`ServerOptions::reply_send_timeout`] drops the connection;
//! - once a message's first byte has arrived, the rest must come within
//!   [`ServerOptions::message_timeout`], else the connection is dropped.
//!
//! DMA_MAP with an fd reaches the file through one shared mapping of the whole file
//! (`FileMaps`: a client such as QEMU sends one 4 KiB map per guest IOMMU leaf, all of the
//! guest-RAM memfd, far more than `vm.max_map_count` mmaps would allow); without one the device
//! reaches the client's memory through DMA_READ/DMA_WRITE requests (`RemoteMemory`), which fail
//! cleanly (an IOMMU-style device fault) once the client is gone. The map table itself is the
//! device's IOMMU (a `BTreeMap` by IOVA: lookups and overlap checks are range queries), bounded by
//! [`ServerOptions::max_dma_maps`]. When the client disconnects, pending requests fail, the
//! command thread stops, the maps are unmapped and the interrupts disconnected.
//!
//! MSI: the capability advertises [`accel_abi::config::MSI_ADVERTISED_VECTORS`] (4, a power of
//! two) while the device has `accel_abi::vector::COUNT` (3); SET_IRQS accepts every range up to
//! the advertised count. Vector 3 is reserved: its eventfd is held (and closed on disable or
//! replace) but never signalled.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use sys_util::sync::{ignore_poison, lock};

use vfio_user_protocol::payload::{self, irq, region, DecodeError};
use vfio_user_protocol::version::{self, Capabilities, Version};
use vfio_user_protocol::{
    command, CallError, Calls, Connection, Header, Limits, Message, MessageType, RecvError,
    HEADER_SIZE,
};

use crate::SharedRegion;
use crate::{Accelerator, AcceleratorConfig, DmaAccessError, DmaError, DmaMemory, DmaPerms};

/// How long a device access waits for the client to answer a DMA_READ/DMA_WRITE. Only a live
/// but unresponsive client reaches it; a dead one fails the access at once.
const DMA_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// MSI vectors a client may enable: what the MSI capability advertises (a power of two).
const MSI_VECTORS: u32 = accel_abi::config::MSI_ADVERTISED_VECTORS;
/// MSI vectors the device raises; `DEVICE_VECTORS..MSI_VECTORS` are reserved (never raised).
const DEVICE_VECTORS: u32 = accel_abi::vector::COUNT;

/// Default [`ServerOptions::max_dma_maps`]: 4 GiB of client memory in 4 KiB maps. A map costs
/// the server about 110 bytes (29 MB measured for 262144 maps) and, when it comes with a regular
/// file, no mmap of its own.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 1 << 20;

/// Commands queued for the command thread before the reader stops reading the socket (the
/// client's sends then block: backpressure). With [`QUEUE_MAX_BYTES`], what one connection can
/// make the server hold.
pub const QUEUE_MAX_MESSAGES: usize = 64;
/// Bytes of queued commands (headers included) past which the reader stops reading; a single
/// larger command is still taken when the queue is empty.
pub const QUEUE_MAX_BYTES: usize = 8 << 20;
/// On a single socket, while the server waits for the client's reply to a DMA request, the
/// reader has to keep reading to find that reply: commands sent meanwhile are queued up to this
/// many (and [`QUEUE_MAX_BYTES_WAITING`]); past it the connection is dropped. A client that
/// sends one command at a time never comes near it; twin-socket mode does not need it.
pub const QUEUE_MAX_MESSAGES_WAITING: usize = 1024;
/// Bytes counterpart of [`QUEUE_MAX_MESSAGES_WAITING`].
pub const QUEUE_MAX_BYTES_WAITING: usize = 64 << 20;
/// Default [`ServerOptions::reply_send_timeout`].
pub const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client refused for being second may take to send its VERSION (which is answered
/// `EBUSY`) before it is closed without an answer.
const BUSY_VERSION_WAIT: Duration = Duration::from_secs(2);
/// Refusals of second clients answered at once; more connections meanwhile are closed without
/// an answer (and logged), so a connection flood cannot start unbounded threads.
const MAX_REFUSALS_IN_PROGRESS: usize = 4;

/// Options of the server (the device itself is configured by [`AcceleratorConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Most DMA maps one client may have at once; a DMA_MAP beyond it is refused with
    /// `ENOSPC`. At least 1. The VERSION reply announces the smaller of this and the client's
    /// proposal (QEMU proposes 65535 and refuses a larger answer), so a client that keeps to
    /// what it was told is never refused. `mirrorctl emulate --max-dma-maps N`.
    pub max_dma_maps: u32,
    /// How long the rest of a message may take once its first byte arrived; a client that
    /// stops mid-message is dropped past it. Default
    /// `vfio_user_protocol::framing::MESSAGE_TIMEOUT` (5 s).
    pub message_timeout: Duration,
    /// How long a reply (or a DMA request) may wait for room in the socket; a client that does
    /// not read what the server sends is dropped past it. Default [`REPLY_SEND_TIMEOUT`].
    pub reply_send_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            message_timeout: vfio_user_protocol::framing::MESSAGE_TIMEOUT,
            reply_send_timeout: REPLY_SEND_TIMEOUT,
        }
    }
}

/// What the server observed, for tests and diagnostics (all connections of one `serve`, or of
/// one [`serve_connection_on`] call).
#[derive(Debug, Default)]
pub struct ServerStats {
    queue_high_water_messages: AtomicUsize,
    queue_high_water_bytes: AtomicUsize,
    refused_busy: AtomicUsize,
    dma_requests_main: AtomicU64,
    dma_requests_twin: AtomicU64,
    bar_width_refusals: AtomicU64,
}

/// A copy of [`ServerStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStatsSnapshot {
    /// Most commands ever queued for a command thread at once.
    pub queue_high_water_messages: usize,
    /// Most bytes of commands ever queued at once.
    pub queue_high_water_bytes: usize,
    /// Clients refused with `EBUSY` (or closed) because another was served.
    pub refused_busy: usize,
    /// DMA_READ/DMA_WRITE requests sent on the main socket.
    pub dma_requests_main: u64,
    /// DMA_READ/DMA_WRITE requests sent on the twin socket.
    pub dma_requests_twin: u64,
    /// BAR0 accesses refused for their width.
    pub bar_width_refusals: u64,
}

impl ServerStats {
    /// The counters now.
    pub fn snapshot(&self) -> ServerStatsSnapshot {
        ServerStatsSnapshot {
            queue_high_water_messages: self.queue_high_water_messages.load(Ordering::Relaxed),
            queue_high_water_bytes: self.queue_high_water_bytes.load(Ordering::Relaxed),
            refused_busy: self.refused_busy.load(Ordering::Relaxed),
            dma_requests_main: self.dma_requests_main.load(Ordering::Relaxed),
            dma_requests_twin: self.dma_requests_twin.load(Ordering::Relaxed),
            bar_width_refusals: self.bar_width_refusals.load(Ordering::Relaxed),
        }
    }
}

/// Bytes a received message takes in the queue.
fn queued_bytes(m: &Message) -> usize {
    HEADER_SIZE + m.payload.len()
}

/// The commands between a connection's reader and its command thread, bounded.
#[derive(Default)]
struct CommandQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

#[derive(Default)]
struct QueueState {
    commands: VecDeque<Message>,
    bytes: usize,
    /// No more commands come: the command thread runs what is queued, then stops.
    finished: bool,
    /// The connection is over: queued commands are dropped.
    closed: bool,
    /// Server requests on the main socket waiting for the client's reply.
    awaiting_client: usize,
}

/// What [`CommandQueue::push`] did.
#[derive(Debug)]
enum Push {
    Queued,
    Closed,
    /// The bound for a server waiting on the client was reached.
    Overflow {
        messages: usize,
        bytes: usize,
    },
}

impl CommandQueue {
    /// Queue `msg`, waiting for room, except while the server waits for the client on the main
    /// socket (its reply can only be read past this command).
    fn push(&self, msg: Message, stats: &ServerStats) -> Push {
        let size = queued_bytes(&msg);
        let mut s = lock(&self.state);
        loop {
            if s.closed || s.finished {
                return Push::Closed;
            }
            let full = !s.commands.is_empty()
                && (s.commands.len() >= QUEUE_MAX_MESSAGES || s.bytes + size > QUEUE_MAX_BYTES);
            if !full {
                break;
            }
            if s.awaiting_client > 0 {
                if s.commands.len() >= QUEUE_MAX_MESSAGES_WAITING
                    || s.bytes + size > QUEUE_MAX_BYTES_WAITING
                {
                    return Push::Overflow {
                        messages: s.commands.len(),
                        bytes: s.bytes,
                    };
                }
                break;
            }
            s = ignore_poison(self.changed.wait(s));
        }
        s.bytes += size;
        s.commands.push_back(msg);
        stats
            .queue_high_water_messages
            .fetch_max(s.commands.len(), Ordering::Relaxed);
        stats
            .queue_high_water_bytes
            .fetch_max(s.bytes, Ordering::Relaxed);
        self.changed.notify_all();
        Push::Queued
    }

    /// The next command; `None` once the queue is closed, or finished and empty.
    fn pop(&self) -> Option<Message> {
        let mut s = lock(&self.state);
        loop {
            if s.closed {
                return None;
            }
            if let Some(m) = s.commands.pop_front() {
                s.bytes -= queued_bytes(&m);
                self.changed.notify_all();
                return Some(m);
            }
            if s.finished {
                return None;
            }
            s = ignore_poison(self.changed.wait(s));
        }
    }

    /// No more commands: what is queued still runs.
    fn finish(&self) {
        lock(&self.state).finished = true;
        self.changed.notify_all();
    }

    /// The connection is over: drop what is queued, refuse more.
    fn close(&self) {
        let mut s = lock(&self.state);
        s.closed = true;
        s.commands.clear();
        s.bytes = 0;
        drop(s);
        self.changed.notify_all();
    }

    /// A server request on the main socket starts (`true`) or ends.
    fn awaiting_client(&self, starts: bool) {
        let mut s = lock(&self.state);
        if starts {
            s.awaiting_client += 1;
        } else {
            s.awaiting_client = s.awaiting_client.saturating_sub(1);
        }
        drop(s);
        self.changed.notify_all();
    }
}

impl ServerOptions {
    fn check(&self) -> std::io::Result<()> {
        if self.max_dma_maps == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "vfio-user server: max_dma_maps is 0; it must be at least 1 \
                 (ServerOptions::max_dma_maps, mirrorctl emulate --max-dma-maps)",
            ));
        }
        for (name, value) in [
            ("message_timeout", self.message_timeout),
            ("reply_send_timeout", self.reply_send_timeout),
        ] {
            if value.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "vfio-user server: ServerOptions::{name} is 0; it must be positive \
                         (the default is {:?})",
                        match name {
                            "message_timeout" => vfio_user_protocol::framing::MESSAGE_TIMEOUT,
                            _ => REPLY_SEND_TIMEOUT,
                        }
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Capabilities the server announces.
fn server_caps(opts: &ServerOptions) -> Capabilities {
    Capabilities {
        max_msg_fds: Limits::default().max_fds as u32,
        max_data_xfer_size: version::DEFAULT_MAX_DATA_XFER,
        pgsizes: accel_abi::PAGE_SIZE,
        max_dma_maps: opts.max_dma_maps,
        write_multiple: false,
        twin_socket: true,
        twin_socket_fd_index: None,
    }
}

/// `base + offset` if `[offset, offset + len)` lies inside a mapping of `size` bytes.
fn inside(base: u64, size: u64, offset: u64, len: usize) -> Result<u64, DmaAccessError> {
    let out = DmaAccessError::OutOfBounds {
        offset,
        len: len as u64,
        size,
    };
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => base.checked_add(offset).ok_or(out),
        _ => Err(out),
    }
}

/// The connection as the device's DMA sees it.
struct Link {
    conn: Connection,
    /// Twin-socket mode: the socket for server-to-client commands and their replies.
    twin: OnceLock<Arc<Connection>>,
    /// The thread reading `twin`.
    twin_reader: Mutex<Option<JoinHandle<()>>>,
    calls: Calls,
    max_xfer: AtomicUsize,
    queue: CommandQueue,
    stats: Arc<ServerStats>,
}

impl Link {
    fn new(conn: Connection, stats: Arc<ServerStats>) -> Link {
        Link {
            conn,
            twin: OnceLock::new(),
            twin_reader: Mutex::new(None),
            calls: Calls::new(),
            max_xfer: AtomicUsize::new(version::DEFAULT_MAX_DATA_XFER as usize),
            queue: CommandQueue::default(),
            stats,
        }
    }

    /// Send a server-to-client command and wait for its reply (a dead client fails at once).
    /// In twin-socket mode it goes on the twin socket; otherwise on the main one, and the
    /// reader is told to keep reading meanwhile (the reply comes behind any queued commands).
    fn request(&self, cmd: u16, body: &[u8]) -> Result<Message, DmaAccessError> {
        let result = match self.twin.get() {
            Some(twin) => {
                self.stats.dma_requests_twin.fetch_add(1, Ordering::Relaxed);
                self.calls.call(twin, cmd, body, &[], DMA_REPLY_TIMEOUT)
            }
            None => {
                self.stats.dma_requests_main.fetch_add(1, Ordering::Relaxed);
                self.queue.awaiting_client(true);
                let r = self
                    .calls
                    .call(&self.conn, cmd, body, &[], DMA_REPLY_TIMEOUT);
                self.queue.awaiting_client(false);
                r
            }
        };
        result.map_err(|e| {
            tracing::debug!("DMA request to the client failed: {e}");
            match e {
                CallError::OverLimit => DmaAccessError::Fault,
                _ => DmaAccessError::Os(nix::errno::Errno::ENOTCONN),
            }
        })
    }

    /// Fail every waiting request and refuse new ones.
    fn close(&self) {
        self.calls.close();
    }

    /// End the connection: both sockets shut down, waiting requests failed, queued commands
    /// dropped.
    fn hang_up(&self) {
        self.close();
        self.queue.close();
        self.conn.shutdown();
        if let Some(twin) = self.twin.get() {
            twin.shutdown();
        }
    }
}

/// Client memory reached with DMA_READ/DMA_WRITE: the mapping at `iova` of `len` bytes.
struct RemoteMemory {
    link: Arc<Link>,
    iova: u64,
    len: u64,
    atomic: Mutex<()>,
}

impl RemoteMemory {
    fn address(&self, offset: u64, len: usize) -> Result<u64, DmaAccessError> {
        inside(self.iova, self.len, offset, len)
    }

    fn chunk(&self) -> usize {
        self.link.max_xfer.load(Ordering::Relaxed).max(1)
    }
}

impl DmaMemory for RemoteMemory {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaAccessError> {
        self.address(offset, buf.len())?;
        let chunk = self.chunk();
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            let address = self.address(offset + (i * chunk) as u64, part.len())?;
            let req = payload::DmaAccess {
                address,
                count: part.len() as u64,
                data: Vec::new(),
            };
            let reply = self.link.request(command::DMA_READ, &req.encode())?;
            if reply.header.is_error() {
                return Err(DmaAccessError::Fault);
            }
            let got = payload::DmaAccess::decode(&reply.payload, true)
                .map_err(|_| DmaAccessError::Fault)?;
            if got.address != address || got.data.len() != part.len() {
                return Err(DmaAccessError::Fault);
            }
            part.copy_from_slice(&got.data);
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DmaAccessError> {
        self.address(offset, buf.len())?;
        let chunk = self.chunk();
        for (i, part) in buf.chunks(chunk).enumerate() {
            let address = self.address(offset + (i * chunk) as u64, part.len())?;
            let req = payload::DmaAccess {
                address,
                count: part.len() as u64,
                data: part.to_vec(),
            };
            let reply = self.link.request(command::DMA_WRITE, &req.encode())?;
            if reply.header.is_error() {
                return Err(DmaAccessError::Fault);
            }
            let got = payload::DmaAccess::decode(&reply.payload, false)
                .map_err(|_| DmaAccessError::Fault)?;
            if got.address != address || got.count != part.len() as u64 {
                return Err(DmaAccessError::Fault);
            }
        }
        Ok(())
    }

    /// A read and a write under one lock: atomic against other device work on this mapping,
    /// not against the client's CPU (memory shared by fd gets real atomics).
    fn atomic_add_u64(&self, offset: u64, value: u64) -> Result<u64, DmaAccessError> {
        crate::memory::read_add_write(self, &self.atomic, self.iova, offset, value)
    }

    /// A read, a compare and a write under the same lock: atomic against other device work on
    /// this mapping, **not** against the client's CPU (a client store between the read and the
    /// write is lost; memory shared by fd gets a real compare-and-swap).
    fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, DmaAccessError> {
        crate::memory::read_compare_write(self, &self.atomic, self.iova, offset, current, new)
    }

    fn size(&self) -> Option<u64> {
        Some(self.len)
    }
}

/// One DMA map of a file: `len` bytes from `offset` of a mapping of the whole file, which every
/// map of that file shares.
struct FileWindow {
    file: Arc<SharedRegion>,
    offset: u64,
    len: u64,
}

impl FileWindow {
    /// Offset in the file's mapping of `[offset, offset + len)` of this window.
    fn at(&self, offset: u64, len: usize) -> Result<u64, DmaAccessError> {
        inside(self.offset, self.len, offset, len)
    }
}

impl DmaMemory for FileWindow {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaAccessError> {
        self.file.read_bytes(self.at(offset, buf.len())?, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), DmaAccessError> {
        self.file.write_bytes(self.at(offset, buf.len())?, buf)
    }

    /// Window offsets are page aligned, so alignment in the window is alignment in the file.
    fn atomic_add_u64(&self, offset: u64, value: u64) -> Result<u64, DmaAccessError> {
        DmaMemory::atomic_add_u64(&*self.file, self.at(offset, 8)?, value)
    }

    fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, DmaAccessError> {
        DmaMemory::compare_exchange_u64(&*self.file, self.at(offset, 8)?, current, new)
    }

    fn store_u32_release(&self, offset: u64, value: u32) -> Result<(), DmaAccessError> {
        self.file.store_u32(self.at(offset, 4)?, value)
    }

    fn size(&self) -> Option<u64> {
        Some(self.len)
    }
}

/// A file as the map cache knows it: the same file through any fd, and the mapping's access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    writable: bool,
}

/// The files behind one client's fd-backed DMA maps, each mapped once, whole, and shared by its
/// maps ([`FileWindow`]); a file's mapping goes when its last map is unmapped. No fd is kept:
/// each DMA_MAP's fd is closed before its reply. Files that are not regular files (no
/// meaningful size) get one mapping per DMA map, as before.
#[derive(Default)]
struct FileMaps {
    files: HashMap<FileKey, Weak<SharedRegion>>,
    /// Entry count at which dead entries are dropped next.
    prune_at: usize,
}

fn os_errno(e: DmaAccessError) -> i32 {
    match e {
        DmaAccessError::Os(errno) => errno as i32,
        _ => libc::EINVAL,
    }
}

impl FileMaps {
    /// Memory for `len` bytes of the file `fd` from `offset`.
    fn window(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<Arc<dyn DmaMemory>, i32> {
        const PAGE: u64 = accel_abi::PAGE_SIZE;
        let size = usize::try_from(len).map_err(|_| libc::EINVAL)?;
        if offset % PAGE != 0 {
            return Err(libc::EINVAL);
        }
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| e as i32)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            let region = SharedRegion::from_fd(fd, offset, size, writable).map_err(os_errno)?;
            return Ok(region);
        }
        // The shared mapping may outlive this fd: check the access mmap would have checked.
        let mode = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| e as i32)?
            & libc::O_ACCMODE;
        if mode == libc::O_WRONLY || (writable && mode != libc::O_RDWR) {
            return Err(libc::EACCES);
        }
        // Pages wholly beyond the end of the file would raise SIGBUS when the device touches
        // them: refused.
        let file_len = u64::try_from(st.st_size)
            .ok()
            .and_then(|s| s.checked_next_multiple_of(PAGE))
            .ok_or(libc::EINVAL)?;
        let end = offset.checked_add(len).ok_or(libc::EINVAL)?;
        if end > file_len {
            tracing::warn!(
                offset,
                len,
                file_len,
                "DMA_MAP refused (EINVAL): the range lies beyond the end of its file"
            );
            return Err(libc::EINVAL);
        }
        let key = FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            writable,
        };
        let file = match self.files.get(&key).and_then(Weak::upgrade) {
            // A file that grew since it was mapped is mapped again, whole; maps of the old
            // mapping keep it.
            Some(file) if file.len() as u64 >= end => file,
            _ => {
                let whole = usize::try_from(file_len).map_err(|_| libc::EINVAL)?;
                let file = SharedRegion::from_fd(fd, 0, whole, writable).map_err(os_errno)?;
                self.files.insert(key, Arc::downgrade(&file));
                if self.files.len() > self.prune_at {
                    self.files.retain(|_, f| f.strong_count() > 0);
                    self.prune_at = (2 * self.files.len()).max(64);
                }
                file
            }
        };
        Ok(Arc::new(FileWindow { file, offset, len }))
    }
}

/// What a connection's command thread keeps between commands.
struct Session {
    opts: ServerOptions,
    negotiated: bool,
    /// Eventfds of the reserved MSI vectors `DEVICE_VECTORS..MSI_VECTORS`: held so that a
    /// client can enable every count the capability allows, never signalled.
    reserved_irqs: Vec<Option<OwnedFd>>,
    files: FileMaps,
    /// A DMA_MAP refused for a full table was logged (again after a map succeeds).
    full_logged: bool,
    /// A BAR0 access of a refused width was logged (once per connection).
    width_logged: bool,
    /// The proposed version cannot be served: close once the error reply is sent (spec,
    /// "Connection Initiation": the server "closes the connection if it cannot support the
    /// advertised version").
    refused_version: bool,
}

impl Session {
    fn new(opts: ServerOptions) -> Session {
        Session {
            opts,
            negotiated: false,
            reserved_irqs: (DEVICE_VECTORS..MSI_VECTORS).map(|_| None).collect(),
            files: FileMaps::default(),
            full_logged: false,
            width_logged: false,
            refused_version: false,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The device could not be created.
    #[error("device: {0}")]
    Device(#[from] crate::ConfigError),
    /// The stream broke (or the peer sent something that cannot be followed).
    #[error("connection: {0}")]
    Recv(#[from] RecvError),
    /// A socket or thread error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client kept sending commands while the server waited for its reply to a DMA
    /// request on the same socket, past what the server holds.
    #[error(
        "the client sent {messages} commands ({bytes} bytes) while the server waited for its \
         reply to a DMA request on the same socket; the server holds at most \
         QUEUE_MAX_MESSAGES_WAITING = {QUEUE_MAX_MESSAGES_WAITING} commands and \
         QUEUE_MAX_BYTES_WAITING = {QUEUE_MAX_BYTES_WAITING} bytes then (twin-socket mode, or \
         waiting for replies, avoids this)"
    )]
    QueueOverflow {
        /// Commands queued.
        messages: usize,
        /// Their bytes.
        bytes: usize,
    },
}

/// Serve one connected client until it disconnects. A fresh device is created for it.
pub fn serve_connection(stream: UnixStream, cfg: &AcceleratorConfig) -> Result<(), ServeError> {
    serve_connection_with(stream, cfg, &ServerOptions::default())
}

/// [`serve_connection`] with server options.
pub fn serve_connection_with(
    stream: UnixStream,
    cfg: &AcceleratorConfig,
    opts: &ServerOptions,
) -> Result<(), ServeError> {
    opts.check()?;
    let device = Arc::new(Accelerator::new(cfg.clone())?);
    serve_connection_on(stream, &device, opts, &Arc::new(ServerStats::default()))
}

/// Serve one connected client on `device` until it disconnects. On return the client's DMA
/// maps are unmapped and its interrupt eventfds closed; the rest of the device state is kept
/// (the spec's "Client Disconnection"), for the next client.
pub fn serve_connection_on(
    stream: UnixStream,
    device: &Arc<Accelerator>,
    opts: &ServerOptions,
    stats: &Arc<ServerStats>,
) -> Result<(), ServeError> {
    opts.check()?;
    let opts = *opts;
    let conn =
        Connection::new(stream, Limits::default()).with_message_timeout(opts.message_timeout);
    conn.set_send_timeout(Some(opts.reply_send_timeout))?;
    let link = Arc::new(Link::new(conn, Arc::clone(stats)));
    let worker = {
        let link = Arc::clone(&link);
        let device = Arc::clone(device);
        std::thread::Builder::new()
            .name("vfio-user-cmd".into())
            .spawn(move || command_loop(&link, &device, opts))?
    };
    let result = reader_loop(&link);
    // Stop: refuse and fail DMA requests; after a clean end of the stream the command thread
    // still runs what was queued (no reply can be sent any more), else it drops it.
    link.close();
    match result {
        Ok(()) | Err(ServeError::Recv(RecvError::Closed)) => link.queue.finish(),
        Err(_) => link.queue.close(),
    }
    if worker.join().is_err() {
        tracing::error!("the vfio-user command thread panicked");
    }
    link.hang_up();
    let twin_reader = lock(&link.twin_reader).take();
    if let Some(t) = twin_reader {
        if t.join().is_err() {
            tracing::error!("the vfio-user twin-socket reader panicked");
        }
    }
    release_client(device);
    match result {
        Err(ServeError::Recv(RecvError::Closed)) => Ok(()),
        other => other,
    }
}

/// What a disconnected client leaves behind goes: its DMA maps (the RemoteMemory objects hold
/// the link; fd maps hold their file's mapping) and its interrupt eventfds. The device state
/// stays.
fn release_client(device: &Accelerator) {
    if let Err(e) = device.dma_unmap(0, 1 << 63) {
        tracing::warn!("unmapping on disconnect: {e}");
    }
    for v in 0..DEVICE_VECTORS {
        if let Err(e) = device.set_irq(v, None) {
            tracing::warn!("disconnecting MSI vector {v} on disconnect: {e}");
        }
    }
}

/// Read the main socket: replies to our requests go to their waiters, commands to the queue.
fn reader_loop(link: &Link) -> Result<(), ServeError> {
    loop {
        match link.conn.recv() {
            Ok(msg) => match msg.header.message_type() {
                MessageType::Reply => {
                    let id = msg.header.id;
                    if !link.calls.complete(id, Ok(msg)) {
                        tracing::warn!(id, "reply to no outstanding request: dropped");
                    }
                }
                MessageType::Command => match link.queue.push(msg, &link.stats) {
                    Push::Queued => {}
                    Push::Closed => return Ok(()),
                    Push::Overflow { messages, bytes } => {
                        let e = ServeError::QueueOverflow { messages, bytes };
                        tracing::warn!("vfio-user server: dropping the connection: {e}");
                        return Err(e);
                    }
                },
                MessageType::Other(t) => {
                    tracing::warn!(kind = t, "message of unknown type");
                    if !msg.header.no_reply() {
                        let _ = link.conn.reply_error(&msg.header, libc::EINVAL);
                    }
                }
            },
            Err(RecvError::TooLarge(h)) | Err(RecvError::TooManyFds(h)) => match h.message_type() {
                MessageType::Reply => {
                    link.calls.complete(h.id, Err(CallError::OverLimit));
                }
                // Drained and dropped; a command that wants no reply gets none, even E2BIG
                // (its id may be reused by a later command, whose reply this would impersonate).
                _ if h.no_reply() => {
                    tracing::warn!(
                        id = h.id,
                        command = h.command,
                        "a no-reply command over the size or descriptor limit was dropped"
                    );
                }
                _ => {
                    let _ = link.conn.reply_error(&h, libc::E2BIG);
                }
            },
            Err(e @ RecvError::Stalled { .. }) => {
                tracing::warn!(
                    "vfio-user server: dropping the connection: {e}; the bound is \
                     ServerOptions::message_timeout"
                );
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Read the twin socket of twin-socket mode: the client's replies to our requests. The client
/// sends no commands here; one that does is answered `EINVAL`. When it ends, the connection
/// ends.
fn twin_reader_loop(link: &Link, twin: &Connection) {
    let reason = loop {
        match twin.recv() {
            Ok(msg) => match msg.header.message_type() {
                MessageType::Reply => {
                    let id = msg.header.id;
                    if !link.calls.complete(id, Ok(msg)) {
                        tracing::warn!(id, "reply on the twin socket to no request: dropped");
                    }
                }
                _ => {
                    tracing::warn!(
                        command = msg.header.command,
                        "a client command on the twin socket (it carries only the server's \
                         commands): refused with EINVAL"
                    );
                    if !msg.header.no_reply() {
                        let _ = twin.reply_error(&msg.header, libc::EINVAL);
                    }
                }
            },
            Err(RecvError::TooLarge(h)) | Err(RecvError::TooManyFds(h)) => {
                if h.message_type() == MessageType::Reply {
                    link.calls.complete(h.id, Err(CallError::OverLimit));
                } else if !h.no_reply() {
                    let _ = twin.reply_error(&h, libc::E2BIG);
                }
            }
            Err(e) => break e,
        }
    };
    if !matches!(reason, RecvError::Closed) {
        tracing::warn!(
            "vfio-user server: the twin socket failed ({reason}): dropping the connection"
        );
    }
    link.hang_up();
}

/// Start twin-socket mode: `ours` is the server end of the new socket pair.
fn start_twin(link: &Arc<Link>, ours: UnixStream, opts: &ServerOptions) -> std::io::Result<()> {
    let twin = Arc::new(
        Connection::new(ours, Limits::default()).with_message_timeout(opts.message_timeout),
    );
    twin.set_send_timeout(Some(opts.reply_send_timeout))?;
    twin.set_peer_max_fds(1);
    let reader = {
        let (link, twin) = (Arc::clone(link), Arc::clone(&twin));
        std::thread::Builder::new()
            .name("vfio-user-twin".into())
            .spawn(move || twin_reader_loop(&link, &twin))?
    };
    *lock(&link.twin_reader) = Some(reader);
    if link.twin.set(twin).is_err() {
        // Only one VERSION is accepted per connection, so this cannot happen.
        tracing::error!("twin-socket mode started twice");
    }
    Ok(())
}

fn command_loop(link: &Arc<Link>, device: &Accelerator, opts: ServerOptions) {
    let mut session = Session::new(opts);
    while let Some(msg) = link.queue.pop() {
        let h = msg.header;
        let outcome = if !session.negotiated && h.command != command::VERSION {
            Err(libc::EINVAL)
        } else {
            handle(link, device, &msg, &mut session)
        };
        // The descriptors that came with the command are closed before its reply: a client
        // that got the reply finds none of them kept.
        drop(msg);
        let sent = match outcome {
            Ok(Reply { body, close, fds }) => {
                let r = if h.no_reply() {
                    Ok(())
                } else {
                    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                    link.conn.reply(&h, &body, &fds)
                };
                if close {
                    link.conn.shutdown();
                }
                r
            }
            Err(errno) => {
                let r = if h.no_reply() {
                    Ok(())
                } else {
                    link.conn.reply_error(&h, errno)
                };
                if session.refused_version {
                    link.conn.shutdown();
                }
                r
            }
        };
        if let Err(e) = sent {
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut
            {
                tracing::warn!(
                    "vfio-user server: dropping the connection: a reply could not be sent \
                     within the reply send timeout of {:?} (ServerOptions::reply_send_timeout, \
                     default REPLY_SEND_TIMEOUT): the client does not read its replies",
                    session.opts.reply_send_timeout
                );
            } else {
                tracing::debug!("reply failed (client gone): {e}");
            }
            link.hang_up();
            return;
        }
    }
}

struct Reply {
    body: Vec<u8>,
    close: bool,
    /// Descriptors sent with the reply (the twin socket's client end).
    fds: Vec<OwnedFd>,
}

impl Reply {
    fn body(body: Vec<u8>) -> Result<Reply, i32> {
        Ok(Reply {
            body,
            close: false,
            fds: Vec::new(),
        })
    }
}

fn einval(_: DecodeError) -> i32 {
    libc::EINVAL
}

/// Run one client command; `Err` is the errno of a header-only error reply.
fn handle(
    link: &Arc<Link>,
    device: &Accelerator,
    msg: &Message,
    session: &mut Session,
) -> Result<Reply, i32> {
    let p = &msg.payload;
    let no_fds = |m: &Message| {
        if m.fds.is_empty() {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    };
    match msg.header.command {
        command::VERSION => {
            no_fds(msg)?;
            if session.negotiated {
                return Err(libc::EINVAL);
            }
            let proposed = Version::decode(p).map_err(einval)?;
            let reply = version::server_reply(&server_caps(&session.opts), &proposed).inspect_err(
                |errno| {
                    tracing::warn!(
                        "VERSION {}.{} refused ({}): we speak {}.0 to {}.{} with 4 KiB DMA \
                         pages; closing the connection",
                        proposed.major,
                        proposed.minor,
                        nix::errno::Errno::from_raw(*errno),
                        version::MAJOR,
                        version::MAJOR,
                        version::MINOR
                    );
                    session.refused_version = true;
                },
            )?;
            let mut fds = Vec::new();
            if reply.caps.twin_socket {
                // The client end goes as the reply's descriptor 0 (`fd_index` 0); DMA requests
                // from now on travel on the server end.
                let os = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
                let (ours, theirs) = UnixStream::pair().map_err(os)?;
                start_twin(link, ours, &session.opts).map_err(os)?;
                fds.push(OwnedFd::from(theirs));
            }
            link.conn
                .set_peer_max_fds(proposed.caps.max_msg_fds as usize);
            link.max_xfer.store(
                // No minimum: a client taking 4-byte transfers gets 4-byte DMA requests.
                reply.caps.max_data_xfer_size.max(1) as usize,
                Ordering::Relaxed,
            );
            session.negotiated = true;
            Ok(Reply {
                body: reply.encode(),
                close: false,
                fds,
            })
        }
        command::DEVICE_GET_INFO => {
            no_fds(msg)?;
            let req = payload::DeviceInfo::decode(p).map_err(einval)?;
            if (req.argsz as usize) < payload::DeviceInfo::SIZE {
                return Err(libc::EINVAL);
            }
            Reply::body(
                payload::DeviceInfo {
                    argsz: payload::DeviceInfo::SIZE as u32,
                    flags: payload::DEVICE_FLAGS_RESET | payload::DEVICE_FLAGS_PCI,
                    num_regions: region::COUNT,
                    num_irqs: irq::COUNT,
                }
                .encode(),
            )
        }
        command::DEVICE_GET_REGION_INFO => {
            no_fds(msg)?;
            let req = payload::RegionInfo::decode(p).map_err(einval)?;
            if (req.argsz as usize) < payload::RegionInfo::SIZE || req.index >= region::COUNT {
                return Err(libc::EINVAL);
            }
            let (size, flags) = region_size(req.index)
                .map(|s| (s, region::FLAG_READ | region::FLAG_WRITE))
                .unwrap_or((0, 0));
            Reply::body(
                payload::RegionInfo {
                    argsz: payload::RegionInfo::SIZE as u32,
                    flags,
                    index: req.index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                }
                .encode(),
            )
        }
        command::DEVICE_GET_IRQ_INFO => {
            no_fds(msg)?;
            let req = payload::IrqInfo::decode(p).map_err(einval)?;
            if (req.argsz as usize) < payload::IrqInfo::SIZE || req.index >= irq::COUNT {
                return Err(libc::EINVAL);
            }
            // MSI: the count the capability advertises, so that a client trusting IRQ_INFO can
            // enable what config space offers.
            let (flags, count) = if req.index == irq::MSI {
                (irq::INFO_EVENTFD | irq::INFO_NORESIZE, MSI_VECTORS)
            } else {
                (0, 0)
            };
            Reply::body(
                payload::IrqInfo {
                    argsz: payload::IrqInfo::SIZE as u32,
                    flags,
                    index: req.index,
                    count,
                }
                .encode(),
            )
        }
        command::DEVICE_SET_IRQS => {
            set_irqs(device, msg, &mut session.reserved_irqs).and_then(|()| Reply::body(Vec::new()))
        }
        command::REGION_READ => {
            no_fds(msg)?;
            let req = payload::RegionAccess::decode(p, false).map_err(einval)?;
            check_region_access("REGION_READ", &req, link, session)?;
            let mut data = vec![0u8; req.count as usize];
            if req.region == region::CONFIG {
                device.config_read(req.offset, &mut data);
            } else {
                device.bar_read(0, req.offset, &mut data);
            }
            Reply::body(payload::RegionAccess { data, ..req }.encode())
        }
        command::REGION_WRITE => {
            no_fds(msg)?;
            let req = payload::RegionAccess::decode(p, true).map_err(einval)?;
            check_region_access("REGION_WRITE", &req, link, session)?;
            if req.region == region::CONFIG {
                device.config_write(req.offset, &req.data);
            } else {
                device.bar_write(0, req.offset, &req.data);
            }
            Reply::body(
                payload::RegionAccess {
                    data: Vec::new(),
                    ..req
                }
                .encode(),
            )
        }
        command::DMA_MAP => {
            dma_map(link, device, msg, session).and_then(|()| Reply::body(Vec::new()))
        }
        command::DMA_UNMAP => {
            no_fds(msg)?;
            let req = payload::DmaUnmap::decode(p).map_err(einval)?;
            if req.flags & !payload::DMA_UNMAP_ALL != 0 {
                return Err(libc::ENOTSUP);
            }
            let (iova, len) = if req.flags & payload::DMA_UNMAP_ALL != 0 {
                if req.address != 0 || req.size != 0 {
                    return Err(libc::EINVAL);
                }
                (0, 1 << 63)
            } else {
                (req.address, req.size)
            };
            let bytes = device.dma_unmap(iova, len).map_err(dma_errno)?;
            if bytes == 0 && req.flags & payload::DMA_UNMAP_ALL == 0 {
                // The spec wants the range to match a mapping; this one covers none.
                return Err(libc::ENOENT);
            }
            // The spec: "The server responds with the original DMA entry in the request".
            Reply::body(
                payload::DmaUnmap {
                    argsz: payload::DmaUnmap::SIZE as u32,
                    ..req
                }
                .encode(),
            )
        }
        command::DEVICE_RESET => {
            no_fds(msg)?;
            device.reset();
            Reply::body(Vec::new())
        }
        _ => Err(libc::ENOSYS),
    }
}

fn region_size(index: u32) -> Option<u64> {
    match index {
        region::BAR0 => Some(accel_abi::regs::BAR0_SIZE),
        region::CONFIG => Some(accel_abi::config::CONFIG_SIZE as u64),
        _ => None,
    }
}

/// Bounds and widths of a REGION_READ/WRITE (`op`). A BAR0 access of another width than 4 or
/// 8 bytes is logged once per connection with the widths allowed: the header-only error reply
/// carries no text.
fn check_region_access(
    op: &str,
    req: &payload::RegionAccess,
    link: &Link,
    session: &mut Session,
) -> Result<(), i32> {
    let (index, offset, count) = (req.region, req.offset, req.count);
    let size = region_size(index).ok_or(libc::EINVAL)?;
    let end = offset.checked_add(count.into()).ok_or(libc::EINVAL)?;
    if end > size || count == 0 {
        return Err(libc::EINVAL);
    }
    if index == region::BAR0 && count != 4 && count != 8 {
        link.stats
            .bar_width_refusals
            .fetch_add(1, Ordering::Relaxed);
        if !session.width_logged {
            session.width_logged = true;
            tracing::warn!(
                "{op} of BAR0 refused (EINVAL): {count} bytes at {offset:#x}; BAR0 takes \
                 4- or 8-byte accesses only (further width refusals on this connection are not \
                 logged)"
            );
        }
        return Err(libc::EINVAL);
    }
    Ok(())
}

fn dma_errno(e: DmaError) -> i32 {
    match e {
        DmaError::Overlap { .. } => libc::EEXIST,
        _ => libc::EINVAL,
    }
}

/// SET_IRQS. MSI ranges may reach the advertised vector count: vectors below
/// `DEVICE_VECTORS` are routed to the device, the reserved ones above are only held in
/// `reserved` (never signalled; closed on disable or replace).
fn set_irqs(
    device: &Accelerator,
    msg: &Message,
    reserved: &mut [Option<OwnedFd>],
) -> Result<(), i32> {
    let req = payload::SetIrqs::decode(&msg.payload).map_err(einval)?;
    let data = req.flags & (irq::DATA_NONE | irq::DATA_BOOL | irq::DATA_EVENTFD);
    let action = req.flags & (irq::ACTION_MASK | irq::ACTION_UNMASK | irq::ACTION_TRIGGER);
    if !data.is_power_of_two() || action != irq::ACTION_TRIGGER {
        return Err(libc::EINVAL);
    }
    if req.index != irq::MSI {
        return if req.count == 0 && msg.fds.is_empty() {
            Ok(())
        } else {
            Err(libc::EINVAL)
        };
    }
    let end = req.start.checked_add(req.count).ok_or(libc::EINVAL)?;
    if end > MSI_VECTORS {
        return Err(libc::EINVAL);
    }
    let mut route = |v: u32, fd: Option<OwnedFd>| -> Result<(), i32> {
        if v < DEVICE_VECTORS {
            return device.set_irq(v, fd).map_err(|_| libc::EINVAL);
        }
        let slot = reserved
            .get_mut((v - DEVICE_VECTORS) as usize)
            .ok_or(libc::EINVAL)?;
        *slot = fd;
        Ok(())
    };
    match data {
        irq::DATA_NONE if req.count == 0 && msg.fds.is_empty() => {
            // Disable every vector.
            (0..MSI_VECTORS).try_for_each(|v| route(v, None))
        }
        irq::DATA_EVENTFD if msg.fds.is_empty() => {
            // No descriptors: disconnect the vectors (an fd of -1 cannot travel by SCM_RIGHTS).
            (req.start..end).try_for_each(|v| route(v, None))
        }
        irq::DATA_EVENTFD if msg.fds.len() == req.count as usize => {
            // Duplicate them all first: a failure changes no routing.
            let own = msg
                .fds
                .iter()
                .map(|fd| fd.try_clone())
                .collect::<std::io::Result<Vec<OwnedFd>>>()
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            (req.start..end)
                .zip(own)
                .try_for_each(|(v, fd)| route(v, Some(fd)))
        }
        irq::DATA_EVENTFD => Err(libc::EINVAL),
        _ => Err(libc::ENOTSUP),
    }
}

fn dma_map(
    link: &Arc<Link>,
    device: &Accelerator,
    msg: &Message,
    session: &mut Session,
) -> Result<(), i32> {
    let req = payload::DmaMap::decode(&msg.payload).map_err(einval)?;
    if req.flags & !(payload::DMA_MAP_READ | payload::DMA_MAP_WRITE) != 0 {
        return Err(libc::EINVAL);
    }
    let perms = DmaPerms {
        read: req.flags & payload::DMA_MAP_READ != 0,
        write: req.flags & payload::DMA_MAP_WRITE != 0,
    };
    if req.size == 0 || req.size % accel_abi::PAGE_SIZE != 0 {
        return Err(libc::EINVAL);
    }
    let limit = session.opts.max_dma_maps;
    let live = device.dma_stats().mappings;
    if live >= limit as usize {
        if !session.full_logged {
            session.full_logged = true;
            tracing::warn!(
                "DMA_MAP refused (ENOSPC): the client has {live} DMA maps, the server's limit \
                 max_dma_maps is {limit}; raise it with `mirrorctl emulate --max-dma-maps N` \
                 (ServerOptions::max_dma_maps); further refusals are not logged until a map \
                 succeeds"
            );
        }
        return Err(libc::ENOSPC);
    }
    let memory: Arc<dyn DmaMemory> = match msg.fds.as_slice() {
        [] => Arc::new(RemoteMemory {
            link: Arc::clone(link),
            iova: req.address,
            len: req.size,
            atomic: Mutex::new(()),
        }),
        [fd] => session
            .files
            .window(fd.as_fd(), req.offset, req.size, perms.write)?,
        _ => return Err(libc::EINVAL),
    };
    device
        .dma_map(req.address, req.size, memory, perms)
        .map_err(dma_errno)?;
    session.full_logged = false;
    Ok(())
}

/// Serve clients on `listener`, one at a time, until `stop` becomes readable (for example a
/// signalfd for SIGTERM), or with `once` until the first client disconnects. One device serves
/// every connection: a reconnecting client finds it as the last one left it, less its DMA maps
/// and interrupt eventfds. A second client connecting while one is served gets a header-only
/// `EBUSY` reply to its VERSION and is closed.
pub fn serve(
    listener: &UnixListener,
    cfg: &AcceleratorConfig,
    stop: BorrowedFd<'_>,
    once: bool,
) -> std::io::Result<()> {
    serve_with(listener, cfg, &ServerOptions::default(), stop, once)
}

/// [`serve`] with server options.
pub fn serve_with(
    listener: &UnixListener,
    cfg: &AcceleratorConfig,
    opts: &ServerOptions,
    stop: BorrowedFd<'_>,
    once: bool,
) -> std::io::Result<()> {
    serve_observed(
        listener,
        cfg,
        opts,
        stop,
        once,
        &Arc::new(ServerStats::default()),
    )
}

/// [`serve_with`], counting into `stats`.
pub fn serve_observed(
    listener: &UnixListener,
    cfg: &AcceleratorConfig,
    opts: &ServerOptions,
    stop: BorrowedFd<'_>,
    once: bool,
    stats: &Arc<ServerStats>,
) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    opts.check()?;
    let opts = *opts;
    use std::io::{Read, Write};
    let device = Arc::new(
        Accelerator::new(cfg.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
    );
    listener.set_nonblocking(true)?;
    // A connection thread writes one byte here when it ends, waking the loop.
    let (mut done_rx, done_tx) = UnixStream::pair()?;
    // The connection served, its thread and its generation (the byte it writes when done).
    let mut active: Option<(UnixStream, JoinHandle<()>, u8)> = None;
    let mut generation = 0u8;
    let refusals = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop, PollFlags::POLLIN),
            PollFd::new(done_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let stop_now = fds[1].any().unwrap_or(false);
        let incoming = fds[0].any().unwrap_or(false);
        if fds[2].any().unwrap_or(false) {
            let mut b = [0u8; 1];
            done_rx.read_exact(&mut b)?;
            if active.as_ref().is_some_and(|a| a.2 == b[0]) {
                if let Some((_, h, _)) = active.take() {
                    let _ = h.join();
                }
                if once {
                    return Ok(());
                }
            }
        }
        if stop_now {
            if let Some((s, h, _)) = active.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
                let _ = h.join();
            }
            return Ok(());
        }
        if incoming {
            let (stream, _) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if let Some((old, h, g)) = active.take() {
                // The previous client may have just hung up (a reconnect): then its clean-up
                // is finishing and the new client waits for it; otherwise it is refused.
                if peer_gone(&old) {
                    let _ = h.join();
                    if once {
                        return Ok(());
                    }
                } else {
                    active = Some((old, h, g));
                }
            }
            if active.is_some() {
                stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                refuse_busy(stream, &refusals);
                continue;
            }
            stream.set_nonblocking(false)?;
            let handle = stream.try_clone()?;
            let device = Arc::clone(&device);
            let stats = Arc::clone(stats);
            let mut done = done_tx.try_clone()?;
            generation = generation.wrapping_add(1);
            let me = generation;
            let t = std::thread::Builder::new()
                .name("vfio-user-conn".into())
                .spawn(move || {
                    match serve_connection_on(stream, &device, &opts, &stats) {
                        Ok(()) => tracing::info!(
                            "client disconnected: its DMA maps unmapped, its interrupts \
                             disconnected, the device state kept for the next client"
                        ),
                        Err(e) => tracing::warn!("client connection ended: {e}"),
                    }
                    if let Err(e) = done.write_all(&[me]) {
                        tracing::error!("waking the accept loop: {e}");
                    }
                })?;
            tracing::info!(fd = handle.as_raw_fd(), "client connected");
            active = Some((handle, t, me));
        }
    }
}

/// Refuse a client that connected while another is served: answer its VERSION (or whatever
/// command it sends first) with a header-only `EBUSY` error reply, then close. A client that
/// sends nothing within [`BUSY_VERSION_WAIT`] is closed without an answer. At most
/// [`MAX_REFUSALS_IN_PROGRESS`] refusals run at once; beyond that the connection is closed at
/// once.
fn refuse_busy(stream: UnixStream, in_progress: &Arc<AtomicUsize>) {
    const WHY: &str = "the server serves one client at a time and one is connected; it may \
                       connect again once that client has disconnected";
    if in_progress.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSALS_IN_PROGRESS {
        in_progress.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(
            "a second client was closed without an answer: {WHY} ({MAX_REFUSALS_IN_PROGRESS} \
             refusals already in progress)"
        );
        return;
    }
    tracing::warn!("a second client is refused with EBUSY: {WHY}");
    let count = Arc::clone(in_progress);
    let refusal = move || {
        let answer = || -> std::io::Result<()> {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            stream.set_nonblocking(false)?;
            let limits = Limits {
                max_msg_size: HEADER_SIZE + version::MAX_JSON + 4,
                max_fds: 0,
            };
            let conn = Connection::new(stream, limits);
            conn.set_send_timeout(Some(BUSY_VERSION_WAIT))?;
            let mut fds = [PollFd::new(conn.stream().as_fd(), PollFlags::POLLIN)];
            let wait = PollTimeout::from(BUSY_VERSION_WAIT.as_millis() as u16);
            if poll(&mut fds, wait)? == 0 {
                return Ok(());
            }
            let first: Option<Header> = match conn.recv() {
                Ok(m) => Some(m.header),
                Err(RecvError::TooLarge(h)) | Err(RecvError::TooManyFds(h)) => Some(h),
                Err(_) => None,
            };
            if let Some(h) = first {
                if h.message_type() == MessageType::Command && !h.no_reply() {
                    conn.reply_error(&h, libc::EBUSY)?;
                }
            }
            conn.shutdown();
            Ok(())
        };
        if let Err(e) = answer() {
            tracing::debug!("refusing a second client: {e}");
        }
        count.fetch_sub(1, Ordering::AcqRel);
    };
    if let Err(e) = std::thread::Builder::new()
        .name("vfio-user-busy".into())
        .spawn(refusal)
    {
        in_progress.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!("a second client was closed without an answer: {WHY} (thread: {e})");
    }
}

/// True if the peer of `s` hung up (or the socket was shut down), even with unread data left:
/// a closed peer sets both shutdown bits on our side, which poll reports as POLLHUP.
fn peer_gone(s: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{Read, Write};
    use vfio_user_protocol::Header;

    fn small() -> AcceleratorConfig {
        AcceleratorConfig {
            workers: 1,
            ..Default::default()
        }
    }

    fn start() -> (Connection, std::thread::JoinHandle<Result<(), ServeError>>) {
        start_with(ServerOptions::default())
    }

    fn start_with(
        opts: ServerOptions,
    ) -> (Connection, std::thread::JoinHandle<Result<(), ServeError>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_connection_with(b, &small(), &opts));
        (Connection::new(a, Limits::default()), t)
    }

    /// Receive the reply to `id`, answering any server request (DMA_READ/WRITE) with EFAULT.
    fn reply_to(c: &Connection, id: u16) -> Message {
        loop {
            let m = c.recv().expect("a reply");
            if m.header.message_type() == MessageType::Command {
                c.reply_error(&m.header, libc::EFAULT).unwrap();
                continue;
            }
            assert_eq!(m.header.id, id, "replies come in order");
            return m;
        }
    }

    fn negotiate(c: &Connection) {
        negotiate_caps(c, Capabilities::default());
    }

    /// VERSION with `caps`; the capabilities the server answered.
    fn negotiate_caps(c: &Connection, caps: Capabilities) -> Capabilities {
        let v = Version::ours(caps);
        let r = call(c, 0, command::VERSION, &v.encode(), &[]);
        assert!(!r.header.is_error());
        Version::decode(&r.payload).unwrap().caps
    }

    /// Send a command and receive its reply.
    fn call(c: &Connection, id: u16, cmd: u16, body: &[u8], fds: &[BorrowedFd<'_>]) -> Message {
        c.send(Header::command(id, cmd, 0), body, fds).unwrap();
        reply_to(c, id)
    }

    /// The errno of an error reply, 0 for success.
    fn errno(r: &Message) -> u32 {
        if r.header.is_error() {
            r.header.error
        } else {
            0
        }
    }

    fn region_read(c: &Connection, index: u32, offset: u64, count: u32) -> Vec<u8> {
        let req = payload::RegionAccess {
            offset,
            region: index,
            count,
            data: Vec::new(),
        };
        let r = call(c, 1, command::REGION_READ, &req.encode(), &[]);
        assert!(!r.header.is_error());
        payload::RegionAccess::decode(&r.payload, true)
            .unwrap()
            .data
    }

    fn region_write(c: &Connection, index: u32, offset: u64, data: &[u8]) {
        let req = payload::RegionAccess {
            offset,
            region: index,
            count: data.len() as u32,
            data: data.to_vec(),
        };
        let r = call(c, 1, command::REGION_WRITE, &req.encode(), &[]);
        assert!(!r.header.is_error());
    }

    fn bar_read32(c: &Connection, offset: u64) -> u32 {
        let b = region_read(c, region::BAR0, offset, 4);
        u32::from_le_bytes(b.try_into().unwrap())
    }

    fn bar_read64(c: &Connection, offset: u64) -> u64 {
        let b = region_read(c, region::BAR0, offset, 8);
        u64::from_le_bytes(b.try_into().unwrap())
    }

    /// Memory decoding and bus mastering on.
    fn enable_pci(c: &Connection) {
        use accel_abi::config::{command as cmd, off};
        let bits = cmd::MEMORY | cmd::BUS_MASTER;
        region_write(c, region::CONFIG, off::COMMAND as u64, &bits.to_le_bytes());
    }

    fn vendor_id(c: &Connection) -> Vec<u8> {
        region_read(c, region::CONFIG, 0, 2)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any command with any payload gets exactly one reply, and the stream stays in step.
        #[test]
        fn arbitrary_commands_get_one_reply_each(
            msgs in proptest::collection::vec(
                (0u16..20, proptest::collection::vec(any::<u8>(), 0..48)), 0..12)
        ) {
            let (c, t) = start();
            negotiate(&c);
            for (i, (cmd, body)) in msgs.iter().enumerate() {
                let id = i as u16 + 1;
                c.send(Header::command(id, *cmd, 0), body, &[]).unwrap();
                let r = reply_to(&c, id);
                prop_assert_eq!(r.header.message_type(), MessageType::Reply);
                prop_assert_eq!(r.header.command, *cmd);
                if r.header.is_error() {
                    prop_assert_eq!(r.header.size as usize, vfio_user_protocol::HEADER_SIZE);
                }
            }
            prop_assert_eq!(
                vendor_id(&c),
                accel_abi::config::VENDOR_ID.to_le_bytes().to_vec()
            );
            drop(c);
            prop_assert!(t.join().is_ok());
        }

        /// A stream of garbage ends the connection cleanly (no panic, no hang).
        #[test]
        fn garbage_streams_end_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (mut a, b) = UnixStream::pair().unwrap();
            let t = std::thread::spawn(move || serve_connection(b, &small()));
            a.write_all(&bytes).unwrap();
            a.shutdown(std::net::Shutdown::Write).unwrap();
            let mut sink = Vec::new();
            let _ = a.read_to_end(&mut sink);
            prop_assert!(t.join().is_ok());
        }
    }

    #[test]
    fn a_client_dying_mid_message_ends_the_connection() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_connection(b, &small()));
        let c = Connection::new(a, Limits::default());
        negotiate(&c);
        let h = Header {
            size: 64,
            ..Header::command(1, command::DMA_MAP, 0)
        };
        c.stream().write_all(&h.encode()[..]).unwrap();
        c.stream().write_all(&[0; 10]).unwrap();
        drop(c);
        let r = t.join().expect("no panic");
        assert!(
            matches!(r, Err(ServeError::Recv(RecvError::Truncated { .. }))),
            "{r:?}"
        );
    }

    #[test]
    fn dma_through_requests_and_a_gone_client() {
        // Device memory without an fd is reached by DMA_READ/DMA_WRITE to the client; once the
        // client is gone the access fails instead of hanging.
        let (a, b) = UnixStream::pair().unwrap();
        let link = Arc::new(Link::new(
            Connection::new(b, Limits::default()),
            Arc::new(ServerStats::default()),
        ));
        link.max_xfer.store(16, Ordering::Relaxed);
        let mem = RemoteMemory {
            link: Arc::clone(&link),
            iova: 0x1000,
            len: 0x1000,
            atomic: Mutex::new(()),
        };
        let client = Connection::new(a, Limits::default());
        let server_reader = {
            let link = Arc::clone(&link);
            std::thread::spawn(move || {
                let _ = reader_loop(&link);
                link.close();
            })
        };
        let backing = Arc::new(Mutex::new(vec![0u8; 0x1000]));
        let client_thread = {
            let backing = Arc::clone(&backing);
            std::thread::spawn(move || {
                // Serve DMA requests until the test closes the link, then hang up.
                while let Ok(m) = client.recv() {
                    let write = m.header.command == command::DMA_WRITE;
                    let req = payload::DmaAccess::decode(&m.payload, write).unwrap();
                    let at = (req.address - 0x1000) as usize;
                    let n = req.count as usize;
                    let mut mem = lock(&backing);
                    let reply = if write {
                        mem[at..at + n].copy_from_slice(&req.data);
                        payload::DmaAccess {
                            data: Vec::new(),
                            ..req
                        }
                    } else {
                        payload::DmaAccess {
                            data: mem[at..at + n].to_vec(),
                            ..req
                        }
                    };
                    drop(mem);
                    if req.address == 0x1ff8 {
                        // The last word: die instead of answering.
                        return;
                    }
                    client.reply(&m.header, &reply.encode(), &[]).unwrap();
                }
            })
        };
        // 40 bytes with a 16-byte transfer limit: three requests each way.
        let data: Vec<u8> = (0..40).collect();
        mem.write(8, &data).unwrap();
        assert_eq!(&lock(&backing)[8..48], &data[..]);
        let mut back = vec![0u8; 40];
        mem.read(8, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(
            mem.atomic_add_u64(16, 5).unwrap(),
            u64::from_le_bytes(data[8..16].try_into().unwrap())
        );
        assert!(matches!(
            mem.read(0x1000, &mut [0u8; 1]),
            Err(DmaAccessError::OutOfBounds { .. })
        ));
        // The client dies while answering: the access fails, later ones fail at once.
        assert!(mem.read(0xff8, &mut [0u8; 8]).is_err());
        client_thread.join().unwrap();
        server_reader.join().unwrap();
        assert!(mem.read(0, &mut [0u8; 8]).is_err());
    }

    // ------------------------------------------------------------------ MSI vectors

    fn set_irqs_msg(
        c: &Connection,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> u32 {
        let req = payload::SetIrqs {
            argsz: payload::SetIrqs::SIZE as u32,
            flags,
            index: irq::MSI,
            start,
            count,
        };
        errno(&call(c, 2, command::DEVICE_SET_IRQS, &req.encode(), fds))
    }

    const EVENTFDS: u32 = irq::DATA_EVENTFD | irq::ACTION_TRIGGER;

    /// Raise the error vector: clear its status bit, then read a reserved BAR0 offset.
    fn raise_error_vector(c: &Connection) {
        use accel_abi::regs;
        region_write(
            c,
            region::BAR0,
            regs::INTR_STATUS,
            &regs::intr::ERROR.to_le_bytes(),
        );
        region_read(c, region::BAR0, 0x03c, 4);
        assert_ne!(
            bar_read32(c, regs::ERROR_CODE),
            0,
            "the bad access was recorded"
        );
    }

    /// (readable, hung up) of a pipe's read end, without waiting.
    fn pipe_state(r: &OwnedFd) -> (bool, bool) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap();
        let ev = fds[0].revents().unwrap();
        (
            ev.contains(PollFlags::POLLIN),
            ev.contains(PollFlags::POLLHUP),
        )
    }

    #[test]
    fn msi_takes_every_count_the_capability_advertises() {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let (c, t) = start();
        negotiate(&c);
        c.set_peer_max_fds(Limits::default().max_fds);
        enable_pci(&c);
        // IRQ_INFO reports what config space advertises.
        let req = payload::IrqInfo {
            argsz: payload::IrqInfo::SIZE as u32,
            flags: 0,
            index: irq::MSI,
            count: 0,
        };
        let r = call(&c, 3, command::DEVICE_GET_IRQ_INFO, &req.encode(), &[]);
        let info = payload::IrqInfo::decode(&r.payload).unwrap();
        let control = region_read(&c, region::CONFIG, accel_abi::config::MSI_CAP as u64 + 2, 2);
        let mmc = (u16::from_le_bytes([control[0], control[1]]) >> 1) & 7;
        assert_eq!(info.count, 1 << mmc);
        assert_eq!(info.count, 4);

        // What a guest can enable (a power of two, the most it got), then a disable; the
        // count changes from one enable to the next.
        for n in [4u32, 1, 2, 4, 3] {
            let events: Vec<EventFd> = (0..n.min(3))
                .map(|_| EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap())
                .collect();
            let (reserved_r, reserved_w) = nix::unistd::pipe().unwrap();
            let mut fds: Vec<BorrowedFd<'_>> = events.iter().map(|e| e.as_fd()).collect();
            if n == 4 {
                fds.push(reserved_w.as_fd());
            }
            assert_eq!(
                set_irqs_msg(&c, EVENTFDS, 0, n, &fds),
                0,
                "enable {n} vectors"
            );
            drop(fds);
            drop(reserved_w);
            raise_error_vector(&c);
            let error_signalled = events
                .get(accel_abi::vector::ERROR as usize)
                .map(|e| e.read().unwrap());
            assert_eq!(error_signalled, (n >= 3).then_some(1), "{n} vectors");
            if n == 4 {
                // Vector 3 is held, never signalled.
                assert_eq!(pipe_state(&reserved_r), (false, false));
            }
            let none = irq::DATA_NONE | irq::ACTION_TRIGGER;
            assert_eq!(set_irqs_msg(&c, none, 0, 0, &[]), 0, "disable");
            // Disabled: the server closed its copy of vector 3's descriptor, and no vector
            // fires.
            assert_eq!(pipe_state(&reserved_r), (false, true));
            raise_error_vector(&c);
            if let Some(e) = events.get(accel_abi::vector::ERROR as usize) {
                assert_eq!(e.read().err(), Some(nix::errno::Errno::EAGAIN));
            }
        }

        // Vector 3 alone: replaced, then disconnected; each time the previous descriptor is
        // closed.
        let (r1, w1) = nix::unistd::pipe().unwrap();
        assert_eq!(set_irqs_msg(&c, EVENTFDS, 3, 1, &[w1.as_fd()]), 0);
        drop(w1);
        assert_eq!(pipe_state(&r1), (false, false));
        let (r2, w2) = nix::unistd::pipe().unwrap();
        assert_eq!(set_irqs_msg(&c, EVENTFDS, 3, 1, &[w2.as_fd()]), 0);
        drop(w2);
        assert_eq!(pipe_state(&r1), (false, true));
        assert_eq!(pipe_state(&r2), (false, false));
        assert_eq!(set_irqs_msg(&c, EVENTFDS, 3, 1, &[]), 0);
        assert_eq!(pipe_state(&r2), (false, true));

        // Ranges no guest can enable.
        let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        for (start, count) in [(0u32, 5u32), (3, 2), (4, 1), (u32::MAX, 2)] {
            let fds = vec![e.as_fd(); count as usize];
            assert_eq!(
                set_irqs_msg(&c, EVENTFDS, start, count, &fds),
                libc::EINVAL as u32,
                "start {start} count {count}"
            );
        }
        drop(c);
        t.join().unwrap().unwrap();
    }

    // ------------------------------------------------------------------ DMA maps

    const PAGE: u64 = accel_abi::PAGE_SIZE;

    /// A memfd of `len` bytes named `name` (unique per test, so /proc/self can tell it apart).
    fn memfd(name: &str, len: u64) -> OwnedFd {
        let cname = std::ffi::CString::new(name).unwrap();
        let fd =
            nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        nix::unistd::ftruncate(&fd, len as libc::off_t).unwrap();
        fd
    }

    /// How many of this process's descriptors, and of its mappings, are of the memfd `name`.
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

    /// Another open file description of `fd`'s file, with `flags` (through /proc/self/fd).
    fn reopen(fd: &OwnedFd, flags: libc::c_int) -> OwnedFd {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(flags & libc::O_ACCMODE == libc::O_RDWR)
            .open(path)
            .unwrap();
        OwnedFd::from(f)
    }

    fn map_body(iova: u64, offset: u64, size: u64, flags: u32) -> Vec<u8> {
        payload::DmaMap {
            argsz: payload::DmaMap::SIZE as u32,
            flags,
            offset,
            address: iova,
            size,
        }
        .encode()
    }

    const RW: u32 = payload::DMA_MAP_READ | payload::DMA_MAP_WRITE;

    fn dma_map_msg(
        c: &Connection,
        iova: u64,
        offset: u64,
        size: u64,
        flags: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> u32 {
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        errno(&call(
            c,
            4,
            command::DMA_MAP,
            &map_body(iova, offset, size, flags),
            &fds,
        ))
    }

    /// DMA_UNMAP of a range (or all, with `size` 0 and the ALL flag). A success reply must
    /// echo the request (the spec: "the original DMA entry in the request"); its size.
    fn dma_unmap_msg(c: &Connection, iova: u64, size: u64, flags: u32) -> Result<u64, u32> {
        let req = payload::DmaUnmap {
            argsz: payload::DmaUnmap::SIZE as u32,
            flags,
            address: iova,
            size,
        };
        let r = call(c, 5, command::DMA_UNMAP, &req.encode(), &[]);
        match errno(&r) {
            0 => {
                let echo = payload::DmaUnmap::decode(&r.payload).unwrap();
                assert_eq!(echo, req, "the reply echoes the request");
                Ok(echo.size)
            }
            e => Err(e),
        }
    }

    #[test]
    fn the_announced_dma_map_limit_is_enforced() {
        let opts = ServerOptions {
            max_dma_maps: 8,
            ..ServerOptions::default()
        };
        let (c, t) = start_with(opts);
        // A client proposing no lower ceiling is told the limit.
        let caps = Capabilities {
            max_dma_maps: u32::MAX,
            ..Capabilities::default()
        };
        assert_eq!(negotiate_caps(&c, caps).max_dma_maps, 8);
        let name = format!("mxa-limit-{}", std::process::id());
        let fd = memfd(&name, 16 * PAGE);
        for i in 0..8 {
            assert_eq!(
                dma_map_msg(
                    &c,
                    0x10_0000 + i * PAGE,
                    i * PAGE,
                    PAGE,
                    RW,
                    Some(fd.as_fd())
                ),
                0
            );
        }
        // The ninth, with an fd or without, is refused; nothing was mapped for it.
        let ninth = 0x10_0000 + 8 * PAGE;
        assert_eq!(
            dma_map_msg(&c, ninth, 8 * PAGE, PAGE, RW, Some(fd.as_fd())),
            libc::ENOSPC as u32
        );
        assert_eq!(
            dma_map_msg(&c, ninth, 0, PAGE, RW, None),
            libc::ENOSPC as u32
        );
        // Nothing mapped there: refused (the spec wants an unmap to match a mapping).
        assert_eq!(dma_unmap_msg(&c, ninth, PAGE, 0), Err(libc::ENOENT as u32));
        // One unmapped: one fits again.
        assert_eq!(dma_unmap_msg(&c, 0x10_0000, PAGE, 0), Ok(PAGE));
        assert_eq!(
            dma_map_msg(&c, ninth, 8 * PAGE, PAGE, RW, Some(fd.as_fd())),
            0
        );
        assert_eq!(
            dma_map_msg(&c, 0x10_0000, 0, PAGE, RW, None),
            libc::ENOSPC as u32
        );
        drop(c);
        t.join().unwrap().unwrap();

        // QEMU proposes 65535 and refuses a larger answer: it is told 65535, and the server
        // still takes its own limit's worth (tested below with 262144 maps).
        let (c, t) = start();
        let qemu = Capabilities {
            max_dma_maps: 65535,
            ..Capabilities::default()
        };
        assert_eq!(negotiate_caps(&c, qemu).max_dma_maps, 65535);
        drop(c);
        t.join().unwrap().unwrap();
        let (c, t) = start();
        assert_eq!(negotiate_caps(&c, caps).max_dma_maps, DEFAULT_MAX_DMA_MAPS);
        drop(c);
        t.join().unwrap().unwrap();
        assert!(serve_connection_with(
            UnixStream::pair().unwrap().0,
            &small(),
            &ServerOptions {
                max_dma_maps: 0,
                ..ServerOptions::default()
            }
        )
        .is_err());
        let no_timeout = ServerOptions {
            message_timeout: Duration::ZERO,
            ..ServerOptions::default()
        };
        let err = serve_connection_with(UnixStream::pair().unwrap().0, &small(), &no_timeout)
            .unwrap_err()
            .to_string();
        assert!(err.contains("message_timeout is 0"), "{err}");
    }

    #[test]
    fn fd_maps_share_one_mapping_per_file() {
        let (c, t) = start();
        negotiate(&c);
        let name = format!("mxa-share-{}", std::process::id());
        let fd = memfd(&name, 4 * PAGE);
        // Two maps through two different open files of one memfd: one mapping.
        assert_eq!(dma_map_msg(&c, 0x10_0000, 0, PAGE, RW, Some(fd.as_fd())), 0);
        let other = reopen(&fd, libc::O_RDWR);
        assert_eq!(
            dma_map_msg(&c, 0x20_0000, PAGE, 2 * PAGE, RW, Some(other.as_fd())),
            0
        );
        drop(other);
        assert_eq!(memfd_uses(&name), (1, 1));
        // Pages past the end of the file would be SIGBUS for the device: refused.
        assert_eq!(
            dma_map_msg(&c, 0x30_0000, 3 * PAGE, 2 * PAGE, RW, Some(fd.as_fd())),
            libc::EINVAL as u32
        );
        assert_eq!(
            dma_map_msg(&c, 0x30_0000, 100, PAGE, RW, Some(fd.as_fd())),
            libc::EINVAL as u32
        );
        // The file grows: the new part is mapped anew (the old mapping stays for its maps).
        nix::unistd::ftruncate(&fd, 8 * PAGE as libc::off_t).unwrap();
        assert_eq!(
            dma_map_msg(&c, 0x30_0000, 3 * PAGE, 2 * PAGE, RW, Some(fd.as_fd())),
            0
        );
        assert_eq!(memfd_uses(&name), (1, 2));
        // A read-only descriptor gives read-only maps only.
        let ro = reopen(&fd, libc::O_RDONLY);
        assert_eq!(
            dma_map_msg(&c, 0x40_0000, 0, PAGE, RW, Some(ro.as_fd())),
            libc::EACCES as u32
        );
        assert_eq!(
            dma_map_msg(
                &c,
                0x40_0000,
                0,
                PAGE,
                payload::DMA_MAP_READ,
                Some(ro.as_fd())
            ),
            0
        );
        drop(ro);
        assert_eq!(memfd_uses(&name), (1, 3));
        // Unmapping the maps of the first mapping releases it.
        assert_eq!(dma_unmap_msg(&c, 0x10_0000, 0x20_0000, 0), Ok(0x20_0000));
        assert_eq!(memfd_uses(&name), (1, 2));
        assert_eq!(dma_unmap_msg(&c, 0, 0, payload::DMA_UNMAP_ALL), Ok(0));
        assert_eq!(memfd_uses(&name), (1, 0));
        drop(c);
        t.join().unwrap().unwrap();
    }

    /// A guest's worth of 4 KiB IOMMU leaves (1 GiB), all of one memfd as QEMU sends them: the
    /// maps fit (one mapping of the file, no descriptor kept), the device reaches the right
    /// bytes through them, and a range unmap removes many at once.
    #[test]
    fn a_quarter_million_4k_maps_of_one_memfd() {
        use accel_abi::{regs, Command, Completion};
        const N: u64 = 262_144;
        const BASE: u64 = 0x1_0000_0000;
        // Map i: file page i at a scattered IOVA page (7919 is odd: a permutation of 0..N).
        let slot = |i: u64| (i * 7919) % N;
        let iova = |i: u64| BASE + slot(i) * PAGE;
        let name = format!("mxa-quarter-million-{}", std::process::id());
        let fd = memfd(&name, N * PAGE);
        let (c, t) = start();
        negotiate(&c);
        let started = std::time::Instant::now();
        // Pipelined, a few requests ahead (each carries the memfd).
        let (mut sent, mut done) = (0u64, 0u64);
        while done < N {
            while sent < N && sent - done < 256 {
                let body = map_body(iova(sent), sent * PAGE, PAGE, RW);
                c.send(
                    Header::command(sent as u16, command::DMA_MAP, 0),
                    &body,
                    &[fd.as_fd()],
                )
                .unwrap();
                sent += 1;
            }
            let r = reply_to(&c, done as u16);
            assert_eq!(errno(&r), 0, "map {done}");
            done += 1;
        }
        let mapping = started.elapsed();
        // One mapping of the file; the server kept none of the 262144 descriptors.
        assert_eq!(memfd_uses(&name), (1, 1));

        // The device fetches a FENCE from the ring in the last map and writes its completion
        // into the middle one: both land in the pages of the file those maps name.
        let (ring, record) = (N - 1, N / 2);
        let value = 0x5eed_0000_0000_0001u64;
        let cmd = Command::fence(value).with_completion(iova(record) + 0x100);
        nix::sys::uio::pwrite(&fd, &cmd.encode(), (ring * PAGE) as libc::off_t).unwrap();
        start_ring(&c, iova(ring));
        let wait = std::time::Instant::now();
        while bar_read64(&c, regs::FENCE_DONE) != value {
            assert!(
                wait.elapsed() < Duration::from_secs(10),
                "the FENCE never completed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut rec = [0u8; 16];
        nix::sys::uio::pread(&fd, &mut rec, (record * PAGE + 0x100) as libc::off_t).unwrap();
        let done_rec = Completion::decode(&rec)
            .unwrap()
            .expect("the record is done");
        assert_eq!(done_rec.status, accel_abi::Status::Ok);
        assert_eq!(bar_read32(&c, regs::ERROR_CODE), 0);

        // One unmap of the lower half of the IOVA range removes the maps in it, and only them.
        let half = N / 2 * PAGE;
        assert_eq!(dma_unmap_msg(&c, BASE, half, 0), Ok(half));
        assert_eq!(dma_map_msg(&c, BASE, 0, PAGE, RW, Some(fd.as_fd())), 0);
        assert_eq!(
            dma_map_msg(&c, BASE + half, 0, PAGE, RW, Some(fd.as_fd())),
            libc::EEXIST as u32
        );
        assert_eq!(dma_unmap_msg(&c, 0, 0, payload::DMA_UNMAP_ALL), Ok(0));
        // Everything unmapped: the file's mapping is gone too.
        assert_eq!(memfd_uses(&name), (1, 0));
        drop(c);
        t.join().unwrap().unwrap();
        eprintln!(
            "{N} maps in {mapping:?}, whole test {:?}",
            started.elapsed()
        );
    }

    // ------------------------------------------------------------------ hostile and dying peers

    /// A connection on a fresh device with `opts`, observed; the server end's send buffer is
    /// shrunk to `sndbuf` bytes (if given) so that a client that does not read fills it at once.
    fn start_observed(
        opts: ServerOptions,
        sndbuf: Option<usize>,
    ) -> (
        Connection,
        std::thread::JoinHandle<Result<(), ServeError>>,
        Arc<ServerStats>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        if let Some(n) = sndbuf {
            nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::SndBuf, &n).unwrap();
        }
        let stats = Arc::new(ServerStats::default());
        let t = {
            let stats = Arc::clone(&stats);
            std::thread::spawn(move || {
                let device = Arc::new(Accelerator::new(small()).unwrap());
                serve_connection_on(b, &device, &opts, &stats)
            })
        };
        (Connection::new(a, Limits::default()), t, stats)
    }

    /// Join `t`, failing the test if it takes longer than `limit` (a hang, not a slow run).
    fn join_within<T: Send + 'static>(t: std::thread::JoinHandle<T>, limit: Duration) -> T {
        let started = std::time::Instant::now();
        while !t.is_finished() {
            assert!(
                started.elapsed() < limit,
                "the server did not end within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("no panic")
    }

    /// A client that sends many 1 MiB commands and never reads a reply: the server holds at
    /// most the queue bound (its reader stops reading, so the client's sends block), and once
    /// a reply cannot be sent within the send timeout the connection is dropped.
    #[test]
    fn a_client_that_never_reads_is_bounded_and_then_dropped() {
        const SENT: usize = 200;
        let opts = ServerOptions {
            reply_send_timeout: Duration::from_millis(500),
            ..ServerOptions::default()
        };
        let (c, t, stats) = start_observed(opts, Some(4096));
        negotiate(&c);
        let c = Arc::new(c);
        let writer = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                // Out of config space's bounds: each gets a small EINVAL reply.
                let req = payload::RegionAccess {
                    offset: 0,
                    region: region::CONFIG,
                    count: 1 << 20,
                    data: vec![0x5a; 1 << 20],
                };
                let body = req.encode();
                let mut sent = 0;
                while sent < SENT {
                    let id = sent as u16 + 1;
                    if c.send(Header::command(id, command::REGION_WRITE, 0), &body, &[])
                        .is_err()
                    {
                        break;
                    }
                    sent += 1;
                }
                sent
            })
        };
        let result = join_within(t, Duration::from_secs(120));
        assert!(result.is_ok(), "{result:?}");
        let sent = join_within(writer, Duration::from_secs(120));
        assert!(sent < SENT, "the client's sends were never held back");
        let seen = stats.snapshot();
        eprintln!("{sent} of {SENT} commands sent before the server dropped the client; {seen:?}");
        assert!(
            seen.queue_high_water_messages <= QUEUE_MAX_MESSAGES,
            "{} commands queued, the bound is {QUEUE_MAX_MESSAGES}",
            seen.queue_high_water_messages
        );
        assert!(
            seen.queue_high_water_bytes <= QUEUE_MAX_BYTES,
            "{} bytes queued, the bound is {QUEUE_MAX_BYTES}",
            seen.queue_high_water_bytes
        );
    }

    /// On a single socket, commands that arrive while the server waits for the client's reply
    /// to its own DMA request are read past the normal bound (the reply is behind them), so a
    /// pipelining client does not deadlock the server.
    #[test]
    fn commands_queued_behind_a_dma_reply_do_not_deadlock() {
        // In a thread: a push that waits for room would block the test forever.
        join_within(
            std::thread::spawn(queue_past_the_bound_while_awaiting_the_client),
            Duration::from_secs(60),
        );
    }

    fn queue_past_the_bound_while_awaiting_the_client() {
        let queue = CommandQueue::default();
        let stats = ServerStats::default();
        let msg = || Message {
            header: Header::command(1, command::DEVICE_RESET, 0),
            payload: Vec::new(),
            fds: Vec::new(),
        };
        for _ in 0..QUEUE_MAX_MESSAGES {
            assert!(matches!(queue.push(msg(), &stats), Push::Queued));
        }
        // Full, but the server waits on the client: taken at once.
        queue.awaiting_client(true);
        assert!(matches!(queue.push(msg(), &stats), Push::Queued));
        for _ in QUEUE_MAX_MESSAGES + 1..QUEUE_MAX_MESSAGES_WAITING {
            assert!(matches!(queue.push(msg(), &stats), Push::Queued));
        }
        // Up to the larger bound; past it, the connection goes.
        assert!(matches!(
            queue.push(msg(), &stats),
            Push::Overflow {
                messages: QUEUE_MAX_MESSAGES_WAITING,
                ..
            }
        ));
        queue.awaiting_client(false);
        assert_eq!(
            stats.snapshot().queue_high_water_messages,
            QUEUE_MAX_MESSAGES_WAITING
        );
        queue.close();
        assert!(matches!(queue.push(msg(), &stats), Push::Closed));
        assert!(queue.pop().is_none());
    }

    /// A header announcing 100 bytes, 10 of them, then silence with the connection open: the
    /// server gives up after the message timeout instead of stalling forever.
    #[test]
    fn a_half_sent_message_times_out() {
        let opts = ServerOptions {
            message_timeout: Duration::from_millis(300),
            ..ServerOptions::default()
        };
        let (c, t, _) = start_observed(opts, None);
        negotiate(&c);
        let h = Header {
            size: 100,
            ..Header::command(1, command::REGION_WRITE, 0)
        };
        c.stream().write_all(&h.encode()).unwrap();
        c.stream().write_all(&[0; 10]).unwrap();
        let r = join_within(t, Duration::from_secs(60));
        assert!(
            matches!(
                r,
                Err(ServeError::Recv(RecvError::Stalled {
                    got: 26,
                    want: 100,
                    ..
                }))
            ),
            "{r:?}"
        );
        // The server hung up.
        let mut rest = Vec::new();
        c.stream().read_to_end(&mut rest).unwrap();
        drop(c);
    }

    /// VERSION proposing twin-socket mode; the reply's capabilities and the twin socket.
    fn negotiate_twin(c: &Connection) -> (Version, Connection) {
        let v = Version::ours(Capabilities {
            max_msg_fds: 8,
            twin_socket: true,
            ..Capabilities::default()
        });
        c.send(Header::command(0, command::VERSION, 0), &v.encode(), &[])
            .unwrap();
        let mut r = c.recv().unwrap();
        assert!(!r.header.is_error());
        let reply = Version::decode(&r.payload).unwrap();
        assert_eq!(r.fds.len(), 1);
        let twin = UnixStream::from(r.fds.remove(0));
        (reply, Connection::new(twin, Limits::default()))
    }

    /// Start the device on the command ring at `ring`, with one command in it.
    fn start_ring(c: &Connection, ring: u64) {
        use accel_abi::regs;
        enable_pci(c);
        region_write(c, region::BAR0, regs::CMDQ_BASE, &ring.to_le_bytes());
        region_write(c, region::BAR0, regs::CMDQ_ENTRIES, &64u32.to_le_bytes());
        region_write(
            c,
            region::BAR0,
            regs::CMDQ_CTRL,
            &regs::cmdq_ctrl::ENABLE.to_le_bytes(),
        );
        region_write(
            c,
            region::BAR0,
            regs::CONTROL,
            &regs::control::ENABLE.to_le_bytes(),
        );
        region_write(c, region::BAR0, regs::CMDQ_TAIL, &1u32.to_le_bytes());
    }

    /// Serve DMA_READ/DMA_WRITE on `conn` from `backing` (mapped at `base`) until it closes.
    fn serve_dma(conn: Connection, base: u64, backing: Arc<Mutex<Vec<u8>>>) -> usize {
        let mut served = 0;
        while let Ok(m) = conn.recv() {
            assert_eq!(m.header.message_type(), MessageType::Command);
            let write = m.header.command == command::DMA_WRITE;
            let req = payload::DmaAccess::decode(&m.payload, write).unwrap();
            let at = (req.address - base) as usize;
            let n = req.count as usize;
            let mut mem = lock(&backing);
            let data = if write {
                mem[at..at + n].copy_from_slice(&req.data);
                Vec::new()
            } else {
                mem[at..at + n].to_vec()
            };
            drop(mem);
            let reply = payload::DmaAccess { data, ..req };
            if conn.reply(&m.header, &reply.encode(), &[]).is_err() {
                break;
            }
            served += 1;
        }
        served
    }

    /// Twin-socket mode: the server passes a socket in its VERSION reply and sends its
    /// DMA_READ/DMA_WRITE there; none comes on the main socket.
    #[test]
    fn twin_socket_carries_the_servers_dma_requests() {
        use accel_abi::{regs, Command};
        let (c, t, stats) = start_observed(ServerOptions::default(), None);
        let (reply, twin) = negotiate_twin(&c);
        assert!(reply.caps.twin_socket);
        assert_eq!(reply.caps.twin_socket_fd_index, Some(0));
        const BASE: u64 = 0x40_0000;
        let value = 0x7a1e_0000_0000_0001u64;
        let mut memory = vec![0u8; PAGE as usize];
        memory[..64].copy_from_slice(&Command::fence(value).with_completion(BASE + 0x100).encode());
        let backing = Arc::new(Mutex::new(memory));
        let dma = {
            let backing = Arc::clone(&backing);
            std::thread::spawn(move || serve_dma(twin, BASE, backing))
        };
        assert_eq!(dma_map_msg(&c, BASE, 0, PAGE, RW, None), 0);
        start_ring(&c, BASE);
        let wait = std::time::Instant::now();
        // Every message on the main socket must be a reply (`call` would answer a command
        // EFAULT; here a command is a failure).
        let read64 = |offset: u64| {
            let req = payload::RegionAccess {
                offset,
                region: region::BAR0,
                count: 8,
                data: Vec::new(),
            };
            c.send(
                Header::command(9, command::REGION_READ, 0),
                &req.encode(),
                &[],
            )
            .unwrap();
            let m = c.recv().unwrap();
            assert_eq!(
                m.header.message_type(),
                MessageType::Reply,
                "a server command on the main socket in twin-socket mode"
            );
            let got = payload::RegionAccess::decode(&m.payload, true).unwrap();
            u64::from_le_bytes(got.data.try_into().unwrap())
        };
        while read64(regs::FENCE_DONE) != value {
            assert!(wait.elapsed() < Duration::from_secs(30), "no FENCE");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The completion record went through DMA_WRITE on the twin socket.
        let rec: [u8; 16] = lock(&backing)[0x100..0x110].try_into().unwrap();
        let done = accel_abi::Completion::decode(&rec).unwrap().expect("done");
        assert_eq!(done.status, accel_abi::Status::Ok);
        drop(c);
        join_within(t, Duration::from_secs(60)).unwrap();
        let served = dma.join().unwrap();
        let seen = stats.snapshot();
        assert!(served >= 2, "{served} requests served");
        assert_eq!(seen.dma_requests_main, 0, "{seen:?}");
        assert_eq!(seen.dma_requests_twin, served as u64, "{seen:?}");
    }

    /// Without a twin-socket proposal (QEMU's client), no socket is passed and DMA requests
    /// use the main socket.
    #[test]
    fn without_a_twin_proposal_the_main_socket_carries_requests() {
        let (c, t, stats) = start_observed(ServerOptions::default(), None);
        let v = Version::ours(Capabilities::default());
        c.send(Header::command(0, command::VERSION, 0), &v.encode(), &[])
            .unwrap();
        let r = c.recv().unwrap();
        assert!(r.fds.is_empty());
        let reply = Version::decode(&r.payload).unwrap();
        assert!(!reply.caps.twin_socket);
        assert!(!reply.named.contains(version::CapSet::TWIN_SOCKET));
        assert_eq!(dma_map_msg(&c, 0x40_0000, 0, PAGE, RW, None), 0);
        // The test's reply_to answers the device's DMA_READ of the ring with EFAULT.
        start_ring(&c, 0x40_0000);
        let wait = std::time::Instant::now();
        while stats.snapshot().dma_requests_main == 0 {
            assert!(wait.elapsed() < Duration::from_secs(30), "no DMA request");
            let _ = bar_read32(&c, accel_abi::regs::STATUS);
        }
        assert_eq!(stats.snapshot().dma_requests_twin, 0);
        // A DMA request may still be unread here: closing then resets the connection, which
        // the server reports as an error; either way it ends.
        drop(c);
        let _ = join_within(t, Duration::from_secs(60));
    }

    /// The capabilities a VERSION reply's JSON names.
    fn reply_json(c: &Connection, json: &str) -> String {
        let mut body = vec![0, 0, 2, 0];
        body.extend_from_slice(json.as_bytes());
        body.push(0);
        let r = call(c, 0, command::VERSION, &body, &[]);
        assert!(!r.header.is_error());
        String::from_utf8_lossy(&r.payload[4..]).into_owned()
    }

    #[test]
    fn the_version_reply_names_only_what_was_proposed() {
        let (c, t) = start();
        let text = reply_json(&c, r#"{"capabilities":{"max_msg_fds":4}}"#);
        assert!(text.contains("max_msg_fds"), "{text}");
        for absent in [
            "max_data_xfer_size",
            "pgsizes",
            "max_dma_maps",
            "twin_socket",
        ] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
        drop(c);
        t.join().unwrap().unwrap();
        // QEMU's proposal (65535 maps) is answered 65535 though the server takes more.
        let (c, t) = start();
        let text = reply_json(
            &c,
            r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"migration":{"pgsize":4096}}}"#,
        );
        assert!(text.contains("\"max_dma_maps\":65535"), "{text}");
        assert!(!text.contains("migration"), "{text}");
        drop(c);
        t.join().unwrap().unwrap();
    }

    /// BAR0 accesses of a width other than 4 or 8 bytes are refused (EINVAL) and counted.
    #[test]
    fn bar0_width_refusals_are_counted() {
        let (c, t, stats) = start_observed(ServerOptions::default(), None);
        negotiate(&c);
        for _ in 0..3 {
            let req = payload::RegionAccess {
                offset: 0,
                region: region::BAR0,
                count: 2,
                data: Vec::new(),
            };
            let r = call(&c, 1, command::REGION_READ, &req.encode(), &[]);
            assert_eq!(errno(&r), libc::EINVAL as u32);
        }
        assert_eq!(stats.snapshot().bar_width_refusals, 3);
        drop(c);
        join_within(t, Duration::from_secs(60)).unwrap();
    }

    /// A listener served by [`serve_observed`] on a fresh socket path; dropping it stops the
    /// server.
    struct Listening {
        path: std::path::PathBuf,
        stop: Option<OwnedFd>,
        thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
        stats: Arc<ServerStats>,
    }

    impl Listening {
        fn start(name: &str) -> Listening {
            let path =
                std::env::temp_dir().join(format!("vfu-server-{name}-{}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).unwrap();
            let (stop_r, stop_w) = nix::unistd::pipe().unwrap();
            let stats = Arc::new(ServerStats::default());
            let thread = {
                let stats = Arc::clone(&stats);
                std::thread::spawn(move || {
                    serve_observed(
                        &listener,
                        &small(),
                        &ServerOptions::default(),
                        stop_r.as_fd(),
                        false,
                        &stats,
                    )
                })
            };
            Listening {
                path,
                stop: Some(stop_w),
                thread: Some(thread),
                stats,
            }
        }

        fn connect(&self) -> Connection {
            Connection::new(UnixStream::connect(&self.path).unwrap(), Limits::default())
        }
    }

    impl Drop for Listening {
        fn drop(&mut self) {
            if let Some(w) = self.stop.take() {
                let _ = nix::unistd::write(&w, &[1]);
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A client connecting while another is served gets an EBUSY error reply to its VERSION,
    /// then end of file; the first client is unaffected.
    #[test]
    fn a_second_client_gets_ebusy() {
        let server = Listening::start("busy");
        let first = server.connect();
        negotiate(&first);
        let second = server.connect();
        let v = Version::ours(Capabilities::default());
        second
            .send(Header::command(7, command::VERSION, 0), &v.encode(), &[])
            .unwrap();
        let r = second.recv().expect("an answer, not a bare end of file");
        assert_eq!(r.header.message_type(), MessageType::Reply);
        assert!(r.header.is_error());
        assert_eq!((r.header.id, r.header.error), (7, libc::EBUSY as u32));
        assert_eq!(r.header.size as usize, HEADER_SIZE);
        assert!(matches!(second.recv(), Err(RecvError::Closed)));
        assert_eq!(server.stats.snapshot().refused_busy, 1);
        assert_eq!(
            vendor_id(&first),
            accel_abi::config::VENDOR_ID.to_le_bytes()
        );
    }

    /// A reconnecting client finds the device as the last one left it (config and BAR0
    /// registers), while that client's DMA maps are gone and its interrupt descriptors closed.
    #[test]
    fn a_reconnect_keeps_the_device_state_but_not_maps_or_irqs() {
        use accel_abi::config::{command as cmd, off};
        use accel_abi::regs;
        let server = Listening::start("reconnect");
        let name = format!("mxa-reconnect-{}", std::process::id());
        let fd = memfd(&name, 4 * PAGE);
        let first = server.connect();
        negotiate(&first);
        first.set_peer_max_fds(Limits::default().max_fds);
        enable_pci(&first);
        region_write(
            &first,
            region::BAR0,
            regs::CMDQ_BASE,
            &0x7000_0000u64.to_le_bytes(),
        );
        assert_eq!(
            dma_map_msg(&first, 0x10_0000, 0, PAGE, RW, Some(fd.as_fd())),
            0
        );
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..4).map(|_| nix::unistd::pipe().unwrap()).collect();
        let ends: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        assert_eq!(set_irqs_msg(&first, EVENTFDS, 0, 4, &ends), 0);
        drop(ends);
        let readers: Vec<OwnedFd> = pipes.into_iter().map(|(r, _)| r).collect();
        assert_eq!(memfd_uses(&name), (1, 1));
        for r in &readers {
            assert_eq!(
                pipe_state(r),
                (false, false),
                "the server holds the vector's fd"
            );
        }
        drop(first);

        let second = server.connect();
        negotiate(&second);
        // The first client's interrupt descriptors and its maps' mapping are gone...
        for r in &readers {
            assert_eq!(pipe_state(r), (false, true), "a vector's fd is still held");
        }
        assert_eq!(memfd_uses(&name), (1, 0));
        // ...its maps too: the same IOVA maps again.
        assert_eq!(
            dma_map_msg(&second, 0x10_0000, 0, PAGE, RW, Some(fd.as_fd())),
            0
        );
        // The device state stayed.
        let command = region_read(&second, region::CONFIG, off::COMMAND as u64, 2);
        let bits = u16::from_le_bytes([command[0], command[1]]);
        assert_eq!(
            bits & (cmd::MEMORY | cmd::BUS_MASTER),
            cmd::MEMORY | cmd::BUS_MASTER
        );
        assert_eq!(bar_read64(&second, regs::CMDQ_BASE), 0x7000_0000);
    }
}
