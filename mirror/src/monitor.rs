//! The event monitor: a *reader* thread that drains the userfaultfd and the pidfd, and a *worker*
//! thread that runs the invalidations.
//!
//! Why two threads: a thread that munmaps/madvises/mremaps/forks tracked memory blocks until the
//! event is *read*, and glibc's `fork()` holds every malloc arena lock across the fork syscall,
//! which (with FORK events) blocks until the FORK message is read. A reader that allocated, or
//! waited for anything that allocates, could therefore deadlock against any forking thread (a
//! test once hung exactly so: the monitor was in `malloc` while the forker waited for it). So the
//! reader
//! * never allocates after start-up: fixed poll set, fixed message buffer, a preallocated queue;
//! * takes only the queue's mutex, which the worker holds for a few instructions and never while
//!   allocating;
//! * never touches registered memory.
//!
//! The worker may allocate and takes the registry's short locks and the subscribers' own locks
//! (which must not be held across munmap & co., as documented on `Subscription::lock`). If it is
//! stalled (in malloc during a fork, or in a slow callback), the reader keeps reading into the
//! queue, so the kernel is never kept waiting on the worker. The queue holds `QUEUE_CAPACITY`
//! messages; only if the worker falls that far behind does the reader stop reading until it
//! catches up.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use sys_util::sync::{ignore_poison, lock};

use crate::registry::{in_callback, EventKind, EventSource, Registry};
use crate::sys::uffd as raw;
use crate::{Error, Result, VaRange, PAGE_SIZE};

/// Called with the child's userfaultfd (already O_NONBLOCK) when the process forks.
pub type ForkHandler = Box<dyn FnMut(OwnedFd) + Send>;

const QUEUE_CAPACITY: usize = 16 * 1024;
const READ_BATCH: usize = 64;

enum Item {
    /// A userfaultfd message and when it was read.
    Msg(raw::RawMsg, Instant),
    /// Everything queued before a `settle()` request of this generation has been pushed.
    Settled(u64),
    /// The mirrored process exited.
    ProcessExit,
    /// The reader stopped; the worker drains and stops too.
    Closed,
}

struct Queue {
    items: Mutex<VecDeque<Item>>,
    not_empty: Condvar,
    not_full: Condvar,
}

/// Waits until the counter reaches `target`; `Err` at the deadline.
fn wait_for_count(
    count: &Mutex<u64>,
    cv: &Condvar,
    target: u64,
    deadline: Instant,
) -> std::result::Result<(), ()> {
    let mut now = lock(count);
    while *now < target {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(());
        }
        now = ignore_poison(cv.wait_timeout(now, left)).0;
    }
    Ok(())
}

impl Queue {
    /// Pushes without allocating: waits while the preallocated queue is full.
    fn push(&self, item: Item) {
        let mut q = lock(&self.items);
        while q.len() >= QUEUE_CAPACITY {
            q = ignore_poison(self.not_full.wait(q));
        }
        q.push_back(item);
        drop(q);
        self.not_empty.notify_one();
    }

    fn pop(&self) -> Item {
        let mut q = lock(&self.items);
        loop {
            if let Some(item) = q.pop_front() {
                drop(q);
                self.not_full.notify_one();
                return item;
            }
            q = ignore_poison(self.not_empty.wait(q));
        }
    }
}

pub(crate) struct Shared {
    registry: Arc<Registry>,
    pub(crate) uffd: Option<OwnedFd>,
    pidfd: Option<OwnedFd>,
    wake: EventFd,
    stop: AtomicBool,
    settle_requested: AtomicU64,
    settled: Mutex<u64>,
    settled_cv: Condvar,
    /// The reader is inside a read of the uffd (messages may be dequeued but not yet counted).
    reading: AtomicBool,
    /// Messages the reader has taken from the kernel.
    messages_read: AtomicU64,
    /// Messages the worker has fully handled.
    handled: Mutex<u64>,
    handled_cv: Condvar,
    queue: Queue,
    fork_handler: Mutex<Option<ForkHandler>>,
    threads: OnceLock<[ThreadId; 2]>,
    exited: AtomicBool,
    /// Set by the reader once its thread start-up (which allocates) is over.
    reader_ready: Mutex<bool>,
    reader_ready_cv: Condvar,
}

pub(crate) struct Monitor {
    pub(crate) shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
}

impl Monitor {
    pub(crate) fn start(
        registry: Arc<Registry>,
        uffd: Option<OwnedFd>,
        pidfd: Option<OwnedFd>,
    ) -> Result<Self> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| Error::sys("eventfd", e))?;
        let shared = Arc::new(Shared {
            registry,
            uffd,
            pidfd,
            wake,
            stop: AtomicBool::new(false),
            settle_requested: AtomicU64::new(0),
            settled: Mutex::new(0),
            settled_cv: Condvar::new(),
            reading: AtomicBool::new(false),
            messages_read: AtomicU64::new(0),
            handled: Mutex::new(0),
            handled_cv: Condvar::new(),
            queue: Queue {
                items: Mutex::new(VecDeque::with_capacity(QUEUE_CAPACITY)),
                not_empty: Condvar::new(),
                not_full: Condvar::new(),
            },
            fork_handler: Mutex::new(None),
            threads: OnceLock::new(),
            exited: AtomicBool::new(false),
            reader_ready: Mutex::new(false),
            reader_ready_cv: Condvar::new(),
        });
        let spawn = |name: &str, body: fn(Arc<Shared>)| {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(s))
                .map_err(|e| Error::io(format!("spawn the {name} thread"), e))
        };
        let worker = spawn("mirror-events", Shared::work)?;
        let reader = match spawn("mirror-uffd-reader", Shared::read_loop) {
            Ok(r) => r,
            Err(e) => {
                shared.queue.push(Item::Closed);
                let _ = worker.join();
                return Err(e);
            }
        };
        let _ = shared
            .threads
            .set([reader.thread().id(), worker.thread().id()]);
        // Return only once the reader is inside its allocation-free loop: a thread still starting
        // up allocates (thread-locals, output capture), and a fork in progress holds the malloc
        // locks while it waits for the reader. Seen as a hang when a test forked right after
        // creating an address space.
        let mut ready = lock(&shared.reader_ready);
        while !*ready {
            ready = ignore_poison(shared.reader_ready_cv.wait(ready));
        }
        drop(ready);
        Ok(Monitor {
            shared,
            reader: Some(reader),
            worker: Some(worker),
        })
    }

    pub(crate) fn set_fork_handler(&self, handler: Option<ForkHandler>) {
        *lock(&self.shared.fork_handler) = handler;
    }

    /// Returns once every event queued before the call has been read and fully handled.
    pub(crate) fn settle(&self, timeout: Duration) -> Result<()> {
        self.refuse_from_monitor("settle")?;
        let generation = self.shared.settle_requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.kick()?;
        let deadline = Instant::now() + timeout;
        wait_for_count(
            &self.shared.settled,
            &self.shared.settled_cv,
            generation,
            deadline,
        )
        .map_err(|()| Error::SettleTimeout(timeout))
    }

    /// Waiting for the monitor from one of its own threads or callbacks would deadlock.
    fn refuse_from_monitor(&self, what: &'static str) -> Result<()> {
        let me = std::thread::current().id();
        let on_monitor = self.shared.threads.get().is_some_and(|t| t.contains(&me));
        if in_callback() || on_monitor {
            return Err(Error::CalledFromCallback { what });
        }
        Ok(())
    }

    /// Returns once every message the reader has taken from the kernel so far has been
    /// handled. Unlike `settle` it does not wake the reader: nothing to do costs two atomic
    /// loads and a lock.
    pub(crate) fn catch_up(&self, timeout: Duration) -> Result<()> {
        self.refuse_from_monitor("catch_up")?;
        let deadline = Instant::now() + timeout;
        while self.shared.reading.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                return Err(Error::SettleTimeout(timeout));
            }
            std::thread::yield_now();
        }
        let target = self.shared.messages_read.load(Ordering::SeqCst);
        wait_for_count(
            &self.shared.handled,
            &self.shared.handled_cv,
            target,
            deadline,
        )
        .map_err(|()| Error::SettleTimeout(timeout))
    }

    pub(crate) fn process_exited(&self) -> bool {
        self.shared.exited.load(Ordering::SeqCst)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.kick() {
            tracing::error!(error = %e, "cannot wake the uffd reader to stop it");
        }
        for t in [self.reader.take(), self.worker.take()]
            .into_iter()
            .flatten()
        {
            if t.join().is_err() {
                tracing::error!("an event monitor thread panicked");
            }
        }
    }
}

impl Shared {
    fn kick(&self) -> Result<()> {
        self.wake
            .write(1)
            .map(|_| ())
            .map_err(|e| Error::sys("eventfd write", e))
    }

    /// The reader: poll, drain, queue. No allocation happens in this loop.
    fn read_loop(self: Arc<Self>) {
        let mut msgs = [raw::RawMsg::default(); READ_BATCH];
        let mut watch_uffd = self.uffd.is_some();
        let mut watch_pid = self.pidfd.is_some();
        let mut last_settle_pushed = 0;
        *lock(&self.reader_ready) = true;
        self.reader_ready_cv.notify_all();
        loop {
            let (uffd_failed, pid_ready) = match self.wait(watch_uffd, watch_pid) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "uffd reader poll failed; stopping event delivery");
                    break;
                }
            };
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let requested = self.settle_requested.load(Ordering::SeqCst);
            if watch_uffd {
                if let Err(e) = self.drain(&mut msgs) {
                    tracing::error!(error = %e, "reading the userfaultfd failed; events stop");
                    watch_uffd = false;
                }
            }
            if uffd_failed {
                tracing::error!("userfaultfd reports POLLERR (blocking fd or no UFFDIO_API)");
                watch_uffd = false;
            }
            if watch_pid && pid_ready {
                watch_pid = false;
                self.exited.store(true, Ordering::SeqCst);
                self.queue.push(Item::ProcessExit);
            }
            if requested > last_settle_pushed {
                last_settle_pushed = requested;
                self.queue.push(Item::Settled(requested));
            }
        }
        self.queue.push(Item::Closed);
    }

    /// Polls the wake eventfd, the uffd and the pidfd (a fixed array: no allocation). Returns
    /// (uffd in error, pidfd readable).
    fn wait(&self, watch_uffd: bool, watch_pid: bool) -> Result<(bool, bool)> {
        let none = PollFlags::empty();
        let uffd = self.uffd.as_ref().filter(|_| watch_uffd);
        let pid = self.pidfd.as_ref().filter(|_| watch_pid);
        let wake = self.wake.as_fd();
        let mut fds = [
            PollFd::new(wake, PollFlags::POLLIN),
            PollFd::new(
                uffd.map_or(wake, |f| f.as_fd()),
                if uffd.is_some() {
                    PollFlags::POLLIN
                } else {
                    none
                },
            ),
            PollFd::new(
                pid.map_or(wake, |f| f.as_fd()),
                if pid.is_some() {
                    PollFlags::POLLIN
                } else {
                    none
                },
            ),
        ];
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::sys("poll", e)),
            }
        }
        let revents = |i: usize| fds[i].revents().unwrap_or(none);
        if !revents(0).is_empty() {
            // Clears the counter; EAGAIN only means another wake already consumed it.
            let _ = self.wake.read();
        }
        let u = revents(1);
        let uffd_failed =
            uffd.is_some() && u.contains(PollFlags::POLLERR) && !u.contains(PollFlags::POLLIN);
        let pid_ready = pid.is_some() && !revents(2).is_empty();
        Ok((uffd_failed, pid_ready))
    }

    /// Reads every queued message into the queue.
    fn drain(&self, msgs: &mut [raw::RawMsg]) -> Result<()> {
        let Some(uffd) = &self.uffd else {
            return Ok(());
        };
        loop {
            // The kernel lets an munmap return once its event has been read: `catch_up` must
            // see the message counted from that moment, so the read is bracketed.
            self.reading.store(true, Ordering::SeqCst);
            let n = raw::read_msgs(uffd.as_fd(), msgs);
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.reading.store(false, Ordering::SeqCst);
                    return Err(Error::sys("read(uffd)", e));
                }
            };
            self.messages_read.fetch_add(n as u64, Ordering::SeqCst);
            self.reading.store(false, Ordering::SeqCst);
            if n == 0 {
                return Ok(());
            }
            let read_at = Instant::now();
            for m in &msgs[..n] {
                self.queue.push(Item::Msg(*m, read_at));
            }
        }
    }

    /// The worker: handles queued items in order.
    fn work(self: Arc<Self>) {
        loop {
            match self.queue.pop() {
                Item::Msg(m, read_at) => {
                    self.handle(&m, read_at);
                    *lock(&self.handled) += 1;
                    self.handled_cv.notify_all();
                }
                Item::Settled(generation) => {
                    let mut s = lock(&self.settled);
                    *s = (*s).max(generation);
                    drop(s);
                    self.settled_cv.notify_all();
                }
                Item::ProcessExit => {
                    tracing::debug!("mirrored process exited");
                    self.registry.release(EventSource::ProcessExit);
                }
                Item::Closed => break,
            }
        }
        // Anyone still waiting in settle() or catch_up() must not hang on a stopped monitor.
        *lock(&self.settled) = u64::MAX;
        self.settled_cv.notify_all();
        *lock(&self.handled) = u64::MAX;
        self.handled_cv.notify_all();
    }

    fn handle(&self, m: &raw::RawMsg, read_at: Instant) {
        let reg = &self.registry;
        let uffd_event = |start: u64, end: u64, kind: EventKind| {
            if let Some(r) = VaRange::from_kernel(start, end) {
                reg.invalidate(r, kind, EventSource::Userfaultfd, Some(read_at));
            }
        };
        match m.event {
            raw::EVENT_UNMAP => uffd_event(m.arg[0], m.arg[1], EventKind::Unmap),
            raw::EVENT_REMOVE => uffd_event(m.arg[0], m.arg[1], EventKind::Discard),
            raw::EVENT_REMAP => {
                let (from, to, len) = (m.arg[0], m.arg[1], m.arg[2]);
                uffd_event(
                    from,
                    from.saturating_add(len),
                    EventKind::Remap { to: Some(to) },
                );
            }
            raw::EVENT_FORK => {
                // The kernel installed the child's uffd in our fd table when the reader read it.
                let child = raw::adopt_fork_fd(m.arg[0] as u32 as i32);
                self.hand_over_child(child);
                uffd_event(0, crate::VA_LIMIT, EventKind::Fork);
            }
            raw::EVENT_PAGEFAULT => {
                reg.stats.unexpected_message();
                let page = m.arg[1] & !(PAGE_SIZE - 1);
                tracing::warn!(
                    addr = page,
                    "unexpected synchronous page fault message; waking"
                );
                if let Some(u) = &self.uffd {
                    if let Err(e) = raw::wake(u.as_fd(), page, PAGE_SIZE) {
                        tracing::error!(error = %e, "UFFDIO_WAKE failed");
                    }
                }
            }
            other => {
                reg.stats.unexpected_message();
                tracing::warn!(event = other, "unknown userfaultfd event ignored");
            }
        }
    }

    fn hand_over_child(&self, child: OwnedFd) {
        let mut handler = lock(&self.fork_handler);
        match handler.as_mut() {
            Some(h) => {
                if let Err(e) = crate::uffd::set_nonblocking(child.as_fd()) {
                    tracing::warn!(error = %e, "cannot make the child's uffd non-blocking");
                }
                h(child);
            }
            // Closing releases the child's registrations, so its munmaps never wait for us.
            None => drop(child),
        }
    }
}
