//! The event monitor thread: reads userfaultfd events and the pidfd, and runs invalidations.
//!
//! Deadlock rules (the userspace form of the kernel's "notifiers must not recurse into reclaim"):
//! a thread that munmaps/madvises/mremaps/forks tracked memory blocks until this thread *reads*
//! the event, so this thread
//! * reads from a non-blocking fd and never blocks on anything but `poll`;
//! * takes only the registry's short internal locks, the coverage lock (held by `track` only
//!   around UFFDIO_REGISTER, never across an mm syscall) and the subscribers' own locks (which
//!   must not be held across munmap & co., as documented on `Subscription::lock`);
//! * never touches registered memory itself.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::registry::{in_callback, EventKind, EventSource, Registry};
use crate::sys::uffd as raw;
use crate::{Error, Result, VaRange, PAGE_SIZE};

/// Called with the child's userfaultfd (already O_NONBLOCK) when the process forks.
pub type ForkHandler = Box<dyn FnMut(OwnedFd) + Send>;

/// The set of address ranges registered with the uffd, kept merged.
#[derive(Default)]
pub(crate) struct Coverage(BTreeMap<u64, u64>);

impl Coverage {
    pub(crate) fn covers(&self, r: VaRange) -> bool {
        self.0
            .range(..=r.start())
            .next_back()
            .is_some_and(|(_, &end)| end >= r.end())
    }

    pub(crate) fn add(&mut self, r: VaRange) {
        let (mut start, mut end) = (r.start(), r.end());
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    pub(crate) fn remove(&mut self, r: VaRange) {
        let overlapping: Vec<(u64, u64)> = self
            .0
            .range(..r.end())
            .filter(|(_, &e)| e > r.start())
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.0.remove(&s);
            if s < r.start() {
                self.0.insert(s, r.start());
            }
            if e > r.end() {
                self.0.insert(r.end(), e);
            }
        }
    }

    #[cfg(test)]
    fn spans(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|(&s, &e)| (s, e)).collect()
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
    pub(crate) coverage: Mutex<Coverage>,
    fork_handler: Mutex<Option<ForkHandler>>,
    thread: OnceLock<ThreadId>,
    exited: AtomicBool,
}

pub(crate) struct Monitor {
    pub(crate) shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
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
            coverage: Mutex::new(Coverage::default()),
            fork_handler: Mutex::new(None),
            thread: OnceLock::new(),
            exited: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mirror-monitor".into())
            .spawn(move || s.run())
            .map_err(|e| Error::io("spawn the event monitor thread", e))?;
        Ok(Monitor {
            shared,
            thread: Some(thread),
        })
    }

    pub(crate) fn set_fork_handler(&self, handler: Option<ForkHandler>) {
        *lock(&self.shared.fork_handler) = handler;
    }

    /// Returns once every event queued before the call has been read and fully handled.
    pub(crate) fn settle(&self, timeout: Duration) -> Result<()> {
        if in_callback() || self.shared.thread.get() == Some(&std::thread::current().id()) {
            return Err(Error::CalledFromCallback { what: "settle" });
        }
        let generation = self.shared.settle_requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.kick()?;
        let deadline = Instant::now() + timeout;
        let mut settled = lock(&self.shared.settled);
        while *settled < generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::SettleTimeout(timeout));
            }
            settled = self
                .shared
                .settled_cv
                .wait_timeout(settled, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    pub(crate) fn process_exited(&self) -> bool {
        self.shared.exited.load(Ordering::SeqCst)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.kick() {
            tracing::error!(error = %e, "cannot wake the monitor to stop it");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the event monitor thread panicked");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn kick(&self) -> Result<()> {
        self.wake
            .write(1)
            .map(|_| ())
            .map_err(|e| Error::sys("eventfd write", e))
    }

    fn run(self: Arc<Self>) {
        let _ = self.thread.set(std::thread::current().id());
        let mut msgs = [raw::RawMsg::default(); 64];
        let mut watch_uffd = self.uffd.is_some();
        let mut watch_pid = self.pidfd.is_some();
        loop {
            let (uffd_ready, pid_ready) = match self.wait(watch_uffd, watch_pid) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "monitor poll failed; stopping event delivery");
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
            if uffd_ready == Some(false) {
                tracing::error!("userfaultfd reports POLLERR (blocking fd or no UFFDIO_API)");
                watch_uffd = false;
            }
            if watch_pid && pid_ready {
                watch_pid = false;
                self.exited.store(true, Ordering::SeqCst);
                tracing::debug!("mirrored process exited");
                self.registry.release(EventSource::ProcessExit);
            }
            *lock(&self.settled) = requested;
            self.settled_cv.notify_all();
        }
        // Anyone still waiting in settle() must not hang on a stopped monitor.
        *lock(&self.settled) = u64::MAX;
        self.settled_cv.notify_all();
    }

    /// Polls the wake eventfd, the uffd and the pidfd. Returns (uffd state: None = not watched
    /// or idle, Some(false) = error), pidfd readable.
    fn wait(&self, watch_uffd: bool, watch_pid: bool) -> Result<(Option<bool>, bool)> {
        let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        let uffd_slot = match (&self.uffd, watch_uffd) {
            (Some(u), true) => {
                fds.push(PollFd::new(u.as_fd(), PollFlags::POLLIN));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let pid_slot = match (&self.pidfd, watch_pid) {
            (Some(p), true) => {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                Some(fds.len() - 1)
            }
            _ => None,
        };
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::sys("poll", e)),
            }
        }
        let revents = |slot: Option<usize>| {
            slot.and_then(|i| fds[i].revents())
                .unwrap_or(PollFlags::empty())
        };
        if !revents(Some(0)).is_empty() {
            // Clears the counter; EAGAIN just means another wake already consumed it.
            let _ = self.wake.read();
        }
        let u = revents(uffd_slot);
        let uffd_state = if u.contains(PollFlags::POLLERR) && !u.contains(PollFlags::POLLIN) {
            Some(false)
        } else {
            None
        };
        let pid_ready = !revents(pid_slot).is_empty();
        Ok((uffd_state, pid_ready))
    }

    /// Reads every queued message and handles it.
    fn drain(&self, msgs: &mut [raw::RawMsg]) -> Result<()> {
        let Some(uffd) = &self.uffd else {
            return Ok(());
        };
        loop {
            // The coverage lock spans the read so a `track` that follows a returned munmap always
            // sees the coverage update of the event that munmap waited for.
            let (n, read_at) = {
                let mut cov = lock(&self.coverage);
                let n =
                    raw::read_msgs(uffd.as_fd(), msgs).map_err(|e| Error::sys("read(uffd)", e))?;
                let read_at = Instant::now();
                for m in &msgs[..n] {
                    match m.event {
                        raw::EVENT_UNMAP => {
                            if let Some(r) = VaRange::from_kernel(m.arg[0], m.arg[1]) {
                                cov.remove(r);
                            }
                        }
                        raw::EVENT_REMAP => {
                            let (to, len) = (m.arg[1], m.arg[2]);
                            if let Some(r) = VaRange::from_kernel(to, to.saturating_add(len)) {
                                cov.add(r);
                            }
                        }
                        _ => {}
                    }
                }
                (n, read_at)
            };
            if n == 0 {
                return Ok(());
            }
            for m in &msgs[..n] {
                self.handle(m, read_at);
            }
        }
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
                // The kernel installed the child's uffd in our fd table.
                let child = raw::adopt_fork_fd(m.arg[0] as u32 as i32);
                self.hand_over_child(child);
                reg.invalidate(
                    VaRange::whole(),
                    EventKind::Fork,
                    EventSource::Userfaultfd,
                    Some(read_at),
                );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> VaRange {
        VaRange::from_bounds(s, e).unwrap()
    }

    #[test]
    fn coverage_merges_splits_and_answers() {
        let mut c = Coverage::default();
        c.add(r(0x1000, 0x3000));
        c.add(r(0x3000, 0x5000));
        c.add(r(0x8000, 0x9000));
        assert_eq!(c.spans(), vec![(0x1000, 0x5000), (0x8000, 0x9000)]);
        assert!(c.covers(r(0x2000, 0x4000)));
        assert!(!c.covers(r(0x4000, 0x6000)));
        c.remove(r(0x2000, 0x3000));
        assert_eq!(
            c.spans(),
            vec![(0x1000, 0x2000), (0x3000, 0x5000), (0x8000, 0x9000)]
        );
        c.remove(r(0x0, 0x10000));
        assert!(c.spans().is_empty());
    }
}
