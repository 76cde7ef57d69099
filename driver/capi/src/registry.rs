//! The handle table and everything behind a handle, in safe Rust: a C handle is a number (never
//! a pointer to anything) looked up here, so a wrong, stale or forged handle finds nothing and
//! is refused, and a handle is never reused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use driver::device::Ticket;
use driver::runtime::completion_result;
use driver::{Context, Runtime};
use mirrord_client::{ClientArena, DaemonClient, DaemonTicket};
use sys_util::sync::lock;

use crate::status::{mdrv_status, Failure, Outcome};

/// Where handle numbers start: small integers and typical heap or stack pointers are never
/// handles.
const HANDLE_BASE: u64 = 0x4d44_5256_0000_0000;
/// The low bits of a handle say its kind.
const KIND_BITS: u32 = 4;
const KIND_DEVICE: u64 = 0x1;
const KIND_CONTEXT: u64 = 0x2;

/// An open device.
pub struct DeviceEntry {
    /// How it is reached.
    pub kind: DeviceKind,
    /// Live contexts (a device with any cannot be closed).
    pub contexts: AtomicUsize,
}

/// How a device is reached.
pub enum DeviceKind {
    /// Opened in this process (the emulator, a vfio-user socket, kernel VFIO).
    Local(Arc<Runtime>),
    /// Through the daemon: each context is a session of its own.
    Daemon {
        /// The daemon's socket.
        socket: PathBuf,
        /// The longest wait for any one reply.
        timeout: Duration,
    },
}

/// A context: a device address space mirroring this process.
pub struct ContextEntry {
    /// The context itself. Dropped before the arenas (fields drop in order): the device's view
    /// is torn down before their memory goes.
    pub inner: ContextInner,
    /// Tickets in flight, by the number the caller holds.
    tickets: Mutex<HashMap<u64, InFlight>>,
    /// Arenas by address.
    arenas: Mutex<HashMap<u64, Arena>>,
    /// Counts this context on its device until everything above is released.
    _counted: Counted,
    /// Dropped last of all: `destroy_context` returns once it is gone, so the session, the
    /// arenas and the device's count of the context are all released by then.
    alive: Arc<()>,
}

/// The context behind a handle.
pub enum ContextInner {
    /// In this process.
    Local(Context),
    /// A daemon session.
    Daemon(Arc<DaemonClient>),
}

/// Memory made by `mdrv_arena_alloc`.
pub enum Arena {
    /// An anonymous mapping (in-process contexts).
    Local(memmap2::MmapMut),
    /// Memory shared with the daemon.
    Daemon(ClientArena),
}

/// A command in flight.
#[derive(Clone, Copy)]
struct InFlight {
    command: Command,
    /// A thread is waiting for it now.
    claimed: bool,
}

/// The driver's name for a command in flight.
#[derive(Clone, Copy)]
pub enum Command {
    /// In-process.
    Local(Ticket),
    /// Through the daemon.
    Daemon(DaemonTicket),
}

/// Keeps a device's context count up while alive.
struct Counted(Arc<DeviceEntry>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.contexts.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Entry {
    Device(Arc<DeviceEntry>),
    Context(Arc<ContextEntry>),
}

struct Table {
    next: u64,
    entries: HashMap<u64, Entry>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        next: 1,
        entries: HashMap::new(),
    })
});

/// Ticket numbers: unique over the process, so a ticket of another context is never taken for
/// one of this context's.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

fn table() -> MutexGuard<'static, Table> {
    lock(&TABLE)
}

fn insert(entry: Entry, kind: u64) -> u64 {
    let mut t = table();
    let handle = HANDLE_BASE + (t.next << KIND_BITS) + kind;
    t.next += 1;
    t.entries.insert(handle, entry);
    handle
}

fn bad_handle(what: &str, handle: u64) -> Failure {
    Failure::new(
        mdrv_status::MDRV_ERR_BAD_HANDLE,
        format!(
            "{handle:#x} is not a live {what} handle (never returned by this library, of another \
             kind, or destroyed already)"
        ),
    )
}

/// Register an open device; its handle.
pub fn add_device(device: DeviceEntry) -> u64 {
    insert(Entry::Device(Arc::new(device)), KIND_DEVICE)
}

/// The device behind `handle`.
pub fn device(handle: u64) -> Outcome<Arc<DeviceEntry>> {
    match table().entries.get(&handle) {
        Some(Entry::Device(d)) => Ok(d.clone()),
        _ => Err(bad_handle("device", handle)),
    }
}

/// The context behind `handle`.
pub fn context(handle: u64) -> Outcome<Arc<ContextEntry>> {
    match table().entries.get(&handle) {
        Some(Entry::Context(c)) => Ok(c.clone()),
        _ => Err(bad_handle("context", handle)),
    }
}

/// Close a device: refused while it has contexts. The device is released once no call in
/// progress on another thread holds it any more.
pub fn close_device(handle: u64) -> Outcome<()> {
    let mut t = table();
    let Some(Entry::Device(d)) = t.entries.get(&handle) else {
        return Err(bad_handle("device", handle));
    };
    let live = d.contexts.load(Ordering::Acquire);
    if live > 0 {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_BUSY,
            format!(
                "the device has {live} live context(s): destroy them (mdrv_context_destroy) \
                 before closing it"
            ),
        ));
    }
    let removed = t.entries.remove(&handle);
    drop(t);
    // The runtime goes here (device reset, rings freed) unless another thread's call still
    // holds it, in which case it goes when that call returns.
    drop(removed);
    Ok(())
}

/// Create a context on `handle`'s device: `make` builds it; counted on the device from before
/// it starts, so a concurrent close sees it.
pub fn add_context(
    handle: u64,
    make: impl FnOnce(&DeviceEntry) -> Outcome<ContextInner>,
) -> Outcome<u64> {
    let device = {
        let t = table();
        let Some(Entry::Device(d)) = t.entries.get(&handle) else {
            return Err(bad_handle("device", handle));
        };
        d.contexts.fetch_add(1, Ordering::AcqRel);
        d.clone()
    };
    let counted = Counted(device.clone());
    let inner = make(&device)?;
    let entry = ContextEntry {
        inner,
        tickets: Mutex::new(HashMap::new()),
        arenas: Mutex::new(HashMap::new()),
        _counted: counted,
        alive: Arc::new(()),
    };
    Ok(insert(Entry::Context(Arc::new(entry)), KIND_CONTEXT))
}

/// Destroy a context: its handle is refused from now on; returns once it is released (at
/// once, or when the last call in progress on it on other threads has returned).
pub fn destroy_context(handle: u64) -> Outcome<()> {
    let entry = {
        let mut t = table();
        match t.entries.get(&handle) {
            Some(Entry::Context(_)) => {}
            _ => return Err(bad_handle("context", handle)),
        }
        match t.entries.remove(&handle) {
            Some(Entry::Context(c)) => c,
            _ => unreachable!("checked under the same lock"),
        }
    };
    let watch = match &entry.inner {
        ContextInner::Local(ctx) => Some(ctx.release_watch()),
        ContextInner::Daemon(_) => None,
    };
    let alive = Arc::downgrade(&entry.alive);
    drop(entry);
    if let Some(watch) = watch {
        watch.wait();
    }
    // A call in progress on another thread holds the entry until it returns; the entry's last
    // field goes only after the context, its arenas and its count on the device are released.
    while alive.strong_count() > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

impl ContextEntry {
    fn tickets(&self) -> MutexGuard<'_, HashMap<u64, InFlight>> {
        lock(&self.tickets)
    }

    /// The arenas.
    pub fn arenas(&self) -> MutexGuard<'_, HashMap<u64, Arena>> {
        lock(&self.arenas)
    }

    /// Refuse a call that would unmap or move arena memory: the library unmaps an arena itself
    /// (mdrv_arena_free, destroy), and would then unmap whatever was mapped there since.
    pub fn refuse_arena_overlap(&self, start: u64, len: u64, what: &str) -> Outcome<()> {
        let end = start.saturating_add(len);
        for (&base, arena) in self.arenas().iter() {
            let size = match arena {
                Arena::Local(m) => m.len(),
                Arena::Daemon(a) => a.len(),
            } as u64;
            if start < base.saturating_add(size) && base < end {
                return Err(Failure::new(
                    mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
                    format!(
                        "{what}: [{start:#x}, {end:#x}) overlaps the arena at {base:#x} ({size} \
                         bytes), which the library unmaps itself: free it with mdrv_arena_free"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Commands in flight (not collected by a wait or poll).
    pub fn in_flight(&self) -> usize {
        self.tickets().len()
    }

    /// Record a submitted command; the ticket the caller holds.
    pub fn issued(&self, command: Command) -> u64 {
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        self.tickets().insert(
            ticket,
            InFlight {
                command,
                claimed: false,
            },
        );
        ticket
    }

    /// Claim `ticket` for a wait on this thread.
    fn claim(&self, ticket: u64) -> Outcome<Command> {
        let mut tickets = self.tickets();
        let Some(f) = tickets.get_mut(&ticket) else {
            return Err(Failure::new(
                mdrv_status::MDRV_ERR_BAD_TICKET,
                format!(
                    "ticket {ticket} is not in flight on this context (collected already by a \
                     wait or poll, from another context, or never issued)"
                ),
            ));
        };
        if f.claimed {
            return Err(Failure::new(
                mdrv_status::MDRV_ERR_BUSY,
                format!("another thread is waiting for ticket {ticket} now"),
            ));
        }
        f.claimed = true;
        Ok(f.command)
    }

    fn unclaim(&self, ticket: u64) {
        if let Some(f) = self.tickets().get_mut(&ticket) {
            f.claimed = false;
        }
    }

    fn forget(&self, ticket: u64) {
        self.tickets().remove(&ticket);
    }

    /// The releasing wait: returns, whatever it returns, only once the device can no longer
    /// access the command's memory; the ticket is collected.
    pub fn wait(&self, ticket: u64) -> Outcome<u64> {
        let command = self.claim(ticket)?;
        // Claimed until the wait returned (another thread's wait or poll on it gets BUSY, not
        // "collected"), then collected whatever it returned, a panic included.
        struct Collect<'a>(&'a ContextEntry, u64);
        impl Drop for Collect<'_> {
            fn drop(&mut self) {
                self.0.forget(self.1);
            }
        }
        let _collect = Collect(self, ticket);
        match (&self.inner, command) {
            (ContextInner::Local(ctx), Command::Local(t)) => Ok(ctx.wait(t)?),
            (ContextInner::Daemon(c), Command::Daemon(t)) => Ok(c.wait(t)?),
            _ => unreachable!("a context issues tickets of its own kind"),
        }
    }

    /// Wait up to `timeout` for the completion; `None` if it has not come (the ticket stays in
    /// flight and the device may still access the command's memory).
    pub fn wait_for(&self, ticket: u64, timeout: Duration) -> Outcome<Option<u64>> {
        let command = self.claim(ticket)?;
        let (ctx, t) = match (&self.inner, command) {
            (ContextInner::Local(ctx), Command::Local(t)) => (ctx, t),
            (ContextInner::Daemon(c), Command::Daemon(t)) => {
                return match c.wait_for(t, timeout) {
                    Ok(None) => {
                        self.unclaim(ticket);
                        Ok(None)
                    }
                    // Collected either way: a result, or an error after the session's release.
                    done => {
                        self.forget(ticket);
                        done.map_err(Into::into)
                    }
                };
            }
            _ => unreachable!("a context issues tickets of its own kind"),
        };
        let runtime = ctx.runtime();
        let service = runtime.service();
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            // Read before looking at the record: a completion interrupt after the look changes
            // it, so the wait below cannot miss that completion.
            let seen = service.completion_generation();
            if let Some(c) = ctx.try_complete(t) {
                self.forget(ticket);
                return Ok(Some(completion_result(c)?));
            }
            if runtime.device_lost().is_some() {
                // The releasing wait collects it and says why.
                self.forget(ticket);
                return Ok(Some(ctx.wait(t)?));
            }
            let now = Instant::now();
            if now >= deadline {
                self.unclaim(ticket);
                return Ok(None);
            }
            match service.mode() {
                driver::fault::ServiceMode::Interrupt => {
                    // Bounded: the interrupt is the fast path, the bound a safety net.
                    let slice = (deadline - now).min(Duration::from_millis(2));
                    service.wait_completion_interrupt(seen, slice);
                }
                driver::fault::ServiceMode::Polling => driver::device::backoff(&mut spins),
            }
        }
    }
}

/// Check a buffer argument: not NULL, not empty, inside the user address space.
pub fn check_buffer(what: &str, addr: u64, len: u64) -> Outcome<()> {
    if addr == 0 {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_NULL_POINTER,
            format!("{what} is NULL"),
        ));
    }
    if len == 0 {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_INVALID_ARGUMENT,
            format!("{what}: the length is 0 (a command must name at least one byte)"),
        ));
    }
    match addr.checked_add(len) {
        Some(end) if end <= mirror::VA_LIMIT => Ok(()),
        _ => Err(Failure::new(
            mdrv_status::MDRV_ERR_OUT_OF_RANGE,
            format!(
                "{what}: [{addr:#x}, +{len:#x}) leaves the 47-bit user address space (which ends \
                 at {:#x})",
                mirror::VA_LIMIT
            ),
        )),
    }
}

/// Check a range for the strict wrappers, arenas and invalidation: as [`check_buffer`], and
/// 4096-byte aligned start and length.
pub fn check_pages(what: &str, addr: u64, len: u64) -> Outcome<mirror::VaRange> {
    check_buffer(what, addr, len)?;
    let page = mirror::PAGE_SIZE;
    if addr % page != 0 || len % page != 0 {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_UNALIGNED,
            format!(
                "{what}: [{addr:#x}, +{len:#x}) is not {page}-byte aligned (start and length \
                 must both be multiples of the page size)"
            ),
        ));
    }
    Ok(mirror::VaRange::new(addr, len)?)
}

/// Check a non-NULL out-parameter.
pub fn check_out(what: &str, is_null: bool) -> Outcome<()> {
    if is_null {
        return Err(Failure::new(
            mdrv_status::MDRV_ERR_NULL_POINTER,
            format!("the out-parameter {what} is NULL"),
        ));
    }
    Ok(())
}

/// The context's in-process parts, or why there are none.
pub fn local<'a>(entry: &'a ContextEntry, what: &str) -> Outcome<&'a Context> {
    match &entry.inner {
        ContextInner::Local(ctx) => Ok(ctx),
        ContextInner::Daemon(_) => Err(Failure::new(
            mdrv_status::MDRV_ERR_UNSUPPORTED,
            format!(
                "{what} is not available on a daemon context: the daemon mirrors this process \
                 and sees its changes through userfaultfd events (see docs/daemon.md)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_or_stale_handle_is_refused() {
        for h in [0, 1, 0x1000, HANDLE_BASE, HANDLE_BASE + 0x12] {
            assert_eq!(
                device(h).err().unwrap().status,
                mdrv_status::MDRV_ERR_BAD_HANDLE
            );
            assert_eq!(
                context(h).err().unwrap().status,
                mdrv_status::MDRV_ERR_BAD_HANDLE
            );
        }
        let d = add_device(DeviceEntry {
            kind: DeviceKind::Daemon {
                socket: "/nonexistent".into(),
                timeout: Duration::from_secs(1),
            },
            contexts: AtomicUsize::new(0),
        });
        assert!(device(d).is_ok());
        // A device handle is not a context handle.
        assert!(context(d).is_err());
        close_device(d).unwrap();
        assert!(device(d).is_err());
        assert_eq!(
            close_device(d).unwrap_err().status,
            mdrv_status::MDRV_ERR_BAD_HANDLE
        );
    }

    #[test]
    fn buffers_are_checked() {
        use mdrv_status::*;
        let st = |r: Outcome<()>| r.unwrap_err().status;
        assert_eq!(st(check_buffer("dst", 0, 8)), MDRV_ERR_NULL_POINTER);
        assert_eq!(
            st(check_buffer("dst", 0x1000, 0)),
            MDRV_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            st(check_buffer("dst", u64::MAX - 4, 8)),
            MDRV_ERR_OUT_OF_RANGE
        );
        assert_eq!(st(check_buffer("dst", 1 << 47, 8)), MDRV_ERR_OUT_OF_RANGE);
        assert_eq!(
            check_pages("r", 0x1001, 0x1000).unwrap_err().status,
            MDRV_ERR_UNALIGNED
        );
        assert!(check_pages("r", 0x1000, 0x2000).is_ok());
    }
}
