//! A vfio-user server for the emulated MXA-1: a thin layer over [`Accelerator`].
//!
//! One connection at a time, one fresh device per connection (a reconnecting client finds a
//! device at power-on state). Per connection:
//! - the calling thread reads every message: replies to our DMA_READ/DMA_WRITE requests go to
//!   the device thread waiting for them (matched by message id), commands go to a command
//!   thread; so a command that waits on device DMA (a TLB invalidation waiting for in-flight
//!   work) never stops the replies that DMA needs;
//! - the command thread runs the client's commands in order against the device.
//!
//! DMA_MAP with an fd maps it ([`SharedRegion::from_fd`]); without one the device reaches the
//! client's memory through DMA_READ/DMA_WRITE requests ([`RemoteMemory`]), which fail cleanly
//! (an IOMMU-style device fault) once the client is gone. When the client disconnects, pending
//! requests fail, the command thread stops and the device is dropped.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vfio_user_protocol::payload::{self, irq, region, DecodeError};
use vfio_user_protocol::version::{self, Capabilities, Version};
use vfio_user_protocol::{
    command, CallError, Calls, Connection, Limits, Message, MessageType, RecvError,
};

use crate::SharedRegion;
use crate::{Accelerator, AcceleratorConfig, DmaAccessError, DmaError, DmaMemory, DmaPerms};

/// How long a device access waits for the client to answer a DMA_READ/DMA_WRITE. Only a live
/// but unresponsive client reaches it; a dead one fails the access at once.
const DMA_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Capabilities the server announces.
fn server_caps() -> Capabilities {
    Capabilities {
        max_msg_fds: Limits::default().max_fds as u32,
        max_data_xfer_size: version::DEFAULT_MAX_DATA_XFER,
        pgsizes: accel_abi::PAGE_SIZE,
        max_dma_maps: version::DEFAULT_MAX_DMA_MAPS,
        write_multiple: false,
        twin_socket: false,
    }
}

/// The connection as the device's DMA sees it.
struct Link {
    conn: Connection,
    calls: Calls,
    max_xfer: AtomicUsize,
}

impl Link {
    /// Send a server-to-client command and wait for its reply (a dead client fails at once).
    fn request(&self, cmd: u16, body: &[u8]) -> Result<Message, DmaAccessError> {
        self.calls
            .call(&self.conn, cmd, body, &[], DMA_REPLY_TIMEOUT)
            .map_err(|e| {
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
        let out = DmaAccessError::OutOfBounds {
            offset,
            len: len as u64,
            size: self.len,
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => self.iova.checked_add(offset).ok_or(out),
            _ => Err(out),
        }
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

    fn size(&self) -> Option<u64> {
        Some(self.len)
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
}

/// Serve one connected client until it disconnects. A fresh device is created for it.
pub fn serve_connection(stream: UnixStream, cfg: &AcceleratorConfig) -> Result<(), ServeError> {
    let device = Arc::new(Accelerator::new(cfg.clone())?);
    let link = Arc::new(Link {
        conn: Connection::new(stream, Limits::default()),
        calls: Calls::new(),
        max_xfer: AtomicUsize::new(version::DEFAULT_MAX_DATA_XFER as usize),
    });
    let (tx, rx) = mpsc::channel::<Message>();
    let worker = {
        let link = Arc::clone(&link);
        let device = Arc::clone(&device);
        std::thread::Builder::new()
            .name("vfio-user-cmd".into())
            .spawn(move || command_loop(&link, &device, rx))?
    };
    let result = reader_loop(&link, &tx);
    // Stop: refuse and fail DMA requests, let the command thread drain and end.
    link.close();
    link.conn.shutdown();
    drop(tx);
    if worker.join().is_err() {
        tracing::error!("the vfio-user command thread panicked");
    }
    // Unmap everything before the device goes (the RemoteMemory objects hold the link).
    if let Err(e) = device.dma_unmap(0, 1 << 63) {
        tracing::warn!("unmapping on disconnect: {e}");
    }
    drop(device);
    match result {
        Err(RecvError::Closed) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(()),
    }
}

fn reader_loop(link: &Link, commands: &mpsc::Sender<Message>) -> Result<(), RecvError> {
    loop {
        match link.conn.recv() {
            Ok(msg) => match msg.header.message_type() {
                MessageType::Reply => {
                    let id = msg.header.id;
                    if !link.calls.complete(id, Ok(msg)) {
                        tracing::warn!(id, "reply to no outstanding request: dropped");
                    }
                }
                MessageType::Command => {
                    if commands.send(msg).is_err() {
                        return Ok(());
                    }
                }
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
                _ => {
                    let _ = link.conn.reply_error(&h, libc::E2BIG);
                }
            },
            Err(e) => return Err(e),
        }
    }
}

fn command_loop(link: &Arc<Link>, device: &Accelerator, rx: Receiver<Message>) {
    let mut negotiated = false;
    while let Ok(msg) = rx.recv() {
        let h = msg.header;
        let outcome = if !negotiated && h.command != command::VERSION {
            Err(libc::EINVAL)
        } else {
            handle(link, device, &msg, &mut negotiated)
        };
        let sent = match outcome {
            Ok(Reply { body, close }) => {
                let r = if h.no_reply() {
                    Ok(())
                } else {
                    link.conn.reply(&h, &body, &[])
                };
                if close {
                    link.conn.shutdown();
                }
                r
            }
            Err(errno) => {
                if h.no_reply() {
                    Ok(())
                } else {
                    link.conn.reply_error(&h, errno)
                }
            }
        };
        if let Err(e) = sent {
            tracing::debug!("reply failed (client gone): {e}");
            link.conn.shutdown();
        }
    }
}

struct Reply {
    body: Vec<u8>,
    close: bool,
}

impl Reply {
    fn body(body: Vec<u8>) -> Result<Reply, i32> {
        Ok(Reply { body, close: false })
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
    negotiated: &mut bool,
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
            if *negotiated {
                return Err(libc::EINVAL);
            }
            let proposed = Version::decode(p).map_err(einval)?;
            match version::server_reply(&server_caps(), &proposed) {
                Ok(reply) => {
                    link.conn
                        .set_peer_max_fds(proposed.caps.max_msg_fds as usize);
                    link.max_xfer.store(
                        reply.caps.max_data_xfer_size.max(8) as usize,
                        Ordering::Relaxed,
                    );
                    *negotiated = true;
                    Reply::body(reply.encode())
                }
                Err(errno) => Err(errno),
            }
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
            let (flags, count) = if req.index == irq::MSI {
                (
                    irq::INFO_EVENTFD | irq::INFO_NORESIZE,
                    accel_abi::vector::COUNT,
                )
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
        command::DEVICE_SET_IRQS => set_irqs(device, msg).map(|()| Reply {
            body: Vec::new(),
            close: false,
        }),
        command::REGION_READ => {
            no_fds(msg)?;
            let req = payload::RegionAccess::decode(p, false).map_err(einval)?;
            check_region_access(req.region, req.offset, req.count)?;
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
            check_region_access(req.region, req.offset, req.count)?;
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
        command::DMA_MAP => dma_map(link, device, msg).map(|()| Reply {
            body: Vec::new(),
            close: false,
        }),
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
            Reply::body(
                payload::DmaUnmap {
                    argsz: payload::DmaUnmap::SIZE as u32,
                    size: bytes,
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

fn check_region_access(index: u32, offset: u64, count: u32) -> Result<(), i32> {
    let size = region_size(index).ok_or(libc::EINVAL)?;
    let end = offset.checked_add(count.into()).ok_or(libc::EINVAL)?;
    if end > size || count == 0 {
        return Err(libc::EINVAL);
    }
    if index == region::BAR0 && count != 4 && count != 8 {
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

fn set_irqs(device: &Accelerator, msg: &Message) -> Result<(), i32> {
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
    if end > accel_abi::vector::COUNT {
        return Err(libc::EINVAL);
    }
    match data {
        irq::DATA_NONE if req.count == 0 && msg.fds.is_empty() => {
            // Disable every vector.
            for v in 0..accel_abi::vector::COUNT {
                device.set_irq(v, None).map_err(|_| libc::EINVAL)?;
            }
            Ok(())
        }
        irq::DATA_EVENTFD if msg.fds.is_empty() => {
            // No descriptors: disconnect the vectors (an fd of -1 cannot travel by SCM_RIGHTS).
            for v in req.start..end {
                device.set_irq(v, None).map_err(|_| libc::EINVAL)?;
            }
            Ok(())
        }
        irq::DATA_EVENTFD if msg.fds.len() == req.count as usize => {
            for (v, fd) in (req.start..end).zip(&msg.fds) {
                let own = fd
                    .try_clone()
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                device.set_irq(v, Some(own)).map_err(|_| libc::EINVAL)?;
            }
            Ok(())
        }
        irq::DATA_EVENTFD => Err(libc::EINVAL),
        _ => Err(libc::ENOTSUP),
    }
}

fn dma_map(link: &Arc<Link>, device: &Accelerator, msg: &Message) -> Result<(), i32> {
    let req = payload::DmaMap::decode(&msg.payload).map_err(einval)?;
    if req.flags & !(payload::DMA_MAP_READ | payload::DMA_MAP_WRITE) != 0 {
        return Err(libc::EINVAL);
    }
    let perms = DmaPerms {
        read: req.flags & payload::DMA_MAP_READ != 0,
        write: req.flags & payload::DMA_MAP_WRITE != 0,
    };
    let len = usize::try_from(req.size).map_err(|_| libc::EINVAL)?;
    if req.size == 0 || req.size % accel_abi::PAGE_SIZE != 0 {
        return Err(libc::EINVAL);
    }
    let memory: Arc<dyn DmaMemory> = match msg.fds.as_slice() {
        [] => Arc::new(RemoteMemory {
            link: Arc::clone(link),
            iova: req.address,
            len: req.size,
            atomic: Mutex::new(()),
        }),
        [fd] => SharedRegion::from_fd(fd.as_fd(), req.offset, len, perms.write).map_err(
            |e| match e {
                DmaAccessError::Os(errno) => errno as i32,
                _ => libc::EINVAL,
            },
        )?,
        _ => return Err(libc::EINVAL),
    };
    device
        .dma_map(req.address, req.size, memory, perms)
        .map_err(dma_errno)
}

/// Serve clients on `listener`, one at a time, until `stop` becomes readable (for example a
/// signalfd for SIGTERM), or with `once` until the first client disconnects. A second client
/// connecting while one is served is refused (closed).
pub fn serve(
    listener: &UnixListener,
    cfg: &AcceleratorConfig,
    stop: BorrowedFd<'_>,
    once: bool,
) -> std::io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::{Read, Write};
    listener.set_nonblocking(true)?;
    // A connection thread writes one byte here when it ends, waking the loop.
    let (mut done_rx, done_tx) = UnixStream::pair()?;
    // The connection served, its thread and its generation (the byte it writes when done).
    let mut active: Option<(UnixStream, std::thread::JoinHandle<()>, u8)> = None;
    let mut generation = 0u8;
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
                tracing::warn!("a second client was refused: one device, one client");
                drop(stream);
                continue;
            }
            stream.set_nonblocking(false)?;
            let handle = stream.try_clone()?;
            let cfg = cfg.clone();
            let mut done = done_tx.try_clone()?;
            generation = generation.wrapping_add(1);
            let me = generation;
            let t = std::thread::Builder::new()
                .name("vfio-user-conn".into())
                .spawn(move || {
                    match serve_connection(stream, &cfg) {
                        Ok(()) => tracing::info!("client disconnected"),
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
    use crate::sync::lock;
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
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_connection(b, &small()));
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
        let v = Version::ours(Capabilities::default());
        c.send(Header::command(0, command::VERSION, 0), &v.encode(), &[])
            .unwrap();
        assert!(!reply_to(c, 0).header.is_error());
    }

    fn vendor_id(c: &Connection, id: u16) -> Vec<u8> {
        let req = payload::RegionAccess {
            offset: 0,
            region: region::CONFIG,
            count: 2,
            data: Vec::new(),
        };
        c.send(
            Header::command(id, command::REGION_READ, 0),
            &req.encode(),
            &[],
        )
        .unwrap();
        let r = reply_to(c, id);
        assert!(!r.header.is_error());
        payload::RegionAccess::decode(&r.payload, true)
            .unwrap()
            .data
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
                vendor_id(&c, 1000),
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
        let link = Arc::new(Link {
            conn: Connection::new(b, Limits::default()),
            calls: Calls::new(),
            max_xfer: AtomicUsize::new(16),
        });
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
                let (tx, _rx) = mpsc::channel();
                let _ = reader_loop(&link, &tx);
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
}
