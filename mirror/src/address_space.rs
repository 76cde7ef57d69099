//! [`AddressSpace`]: one mirrored process address space with its registry, walker and events.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;

use crate::monitor::{ForkHandler, Monitor};
use crate::registry::{
    AgeQuery, Callbacks, EventKind, EventObserver, EventSource, Invalidation, Registry,
    DEFAULT_RETRY_BUDGET,
};
use crate::stats::Stats;
use crate::sys::uffd as raw;
use crate::uffd::UffdCaps;
use crate::vma::{Vma, VmaKind};
use crate::walker::{Snapshot, Walker, WalkerCaps};
use crate::{Access, Error, Perms, Result, Subscription, VaRange};

/// How an address space is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a fault may keep retrying before [`Error::RetryBudgetExhausted`] (default 1 s).
    pub retry_budget: Duration,
    /// Use userfaultfd events (default true). Without them only the explicit API invalidates.
    pub userfaultfd: bool,
    /// How long [`AddressSpace::settle`] waits for the monitor (default 10 s).
    pub settle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            retry_budget: DEFAULT_RETRY_BUDGET,
            userfaultfd: true,
            settle_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// No userfaultfd: coherence only through the explicit API (and release on drop).
    pub fn explicit_only() -> Self {
        Config {
            userfaultfd: false,
            ..Config::default()
        }
    }
}

/// What this address space could set up, and what it had to do without.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// Walker fast paths.
    pub walker: WalkerCaps,
    /// The userfaultfd, if events are on.
    pub uffd: Option<UffdCaps>,
    /// Process exit is watched through a pidfd.
    pub pidfd: bool,
    /// Human-readable notes on every degradation (also logged when it happened).
    pub degraded: Vec<String>,
}

/// One mirrored process address space: the subscriptions, the CPU walker and the event sources.
///
/// ```
/// use mirror::{AddressSpace, Config, Mapping, Access, PageState};
/// let mm = AddressSpace::current(Config::default()).unwrap();
/// let buf = Mapping::anonymous(8 * 4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
/// mm.track(buf.range()).unwrap(); // munmap/madvise/mremap/fork of it now produce events
/// mm.fault(buf.range(), Access::Write).unwrap();
/// let snap = mm.snapshot(buf.range()).unwrap();
/// assert!(snap.pages().iter().all(|p| p.state == PageState::Write));
/// ```
pub struct AddressSpace {
    registry: Arc<Registry>,
    walker: Walker,
    pid: Option<libc::pid_t>,
    monitor: Option<Monitor>,
    caps: Capabilities,
    settle_timeout: Duration,
}

impl AddressSpace {
    /// Mirrors the current process. With `config.userfaultfd`, creates a uffd (degrading to
    /// user-mode-only, and to no fork events, when privileges are missing) and starts the monitor.
    pub fn current(config: Config) -> Result<Self> {
        Self::build(None, None, None, config)
    }

    /// Mirrors another process (daemon mode). `pidfd` is opened from `pid` if not given; `uffd` is
    /// the client's userfaultfd received over SCM_RIGHTS (preferably not yet initialised: the
    /// handshake is done here). The fd is made O_NONBLOCK, which also affects the client's copy;
    /// the client must close its copy after sending it. Without a uffd only explicit invalidation
    /// and release on exit are available.
    pub fn for_process(
        pid: libc::pid_t,
        pidfd: Option<OwnedFd>,
        uffd: Option<OwnedFd>,
        config: Config,
    ) -> Result<Self> {
        if pid <= 0 {
            return Err(Error::InvalidArgument {
                what: "pid must be positive",
            });
        }
        let pidfd = match pidfd {
            Some(fd) => fd,
            None => sys_util::pidfd::open(pid).map_err(|e| match e {
                Errno::ESRCH => Error::Released,
                e => Error::sys("pidfd_open", e),
            })?,
        };
        let use_uffd = uffd.is_some();
        Self::build(
            Some(pid),
            Some(pidfd),
            uffd,
            Config {
                userfaultfd: use_uffd && config.userfaultfd,
                ..config
            },
        )
    }

    fn build(
        pid: Option<libc::pid_t>,
        pidfd: Option<OwnedFd>,
        uffd: Option<OwnedFd>,
        config: Config,
    ) -> Result<Self> {
        let registry = Arc::new(Registry::new(config.retry_budget));
        let walker = Walker::open(pid)?;
        let mut degraded = Vec::new();
        let walker_caps = walker.caps().clone();
        if !walker_caps.procmap_query {
            degraded.push("PROCMAP_QUERY unavailable: VMA lookups parse /proc/PID/maps".into());
        }
        if !walker_caps.pagemap_scan {
            degraded.push("PAGEMAP_SCAN unavailable: THP reported as base pages".into());
        }
        if !walker_caps.pfn_visible {
            degraded.push(
                "pagemap hides PFNs (no CAP_SYS_ADMIN): the zero page is recognised through \
                 PAGEMAP_SCAN"
                    .into(),
            );
        }
        let (uffd, uffd_caps) = if config.userfaultfd {
            match crate::uffd::open(uffd) {
                Ok((fd, caps)) => {
                    if caps.user_mode_only {
                        degraded.push(
                            "userfaultfd created with UFFD_USER_MODE_ONLY \
                             (vm.unprivileged_userfaultfd=0)"
                                .into(),
                        );
                    }
                    if !caps.initialised_elsewhere
                        && caps.features & crate::sys::uffd::FEATURE_WP_ASYNC == 0
                    {
                        degraded.push(
                            "no UFFD_FEATURE_WP_ASYNC (kernel before 6.7): plain write-protect \
                             registration; non-shmem file mappings cannot be tracked"
                                .into(),
                        );
                    }
                    if !caps.fork_events {
                        degraded.push(
                            "no FORK events (needs CAP_SYS_PTRACE, or the sender initialised the \
                             uffd): forks are not reported"
                                .into(),
                        );
                    }
                    (Some(fd), Some(caps))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "userfaultfd unavailable: explicit API only");
                    degraded.push(format!("userfaultfd unavailable ({e}): explicit API only"));
                    (None, None)
                }
            }
        } else {
            (None, None)
        };
        let has_pidfd = pidfd.is_some();
        let monitor = if uffd.is_some() || pidfd.is_some() {
            Some(Monitor::start(registry.clone(), uffd, pidfd)?)
        } else {
            None
        };
        Ok(AddressSpace {
            registry,
            walker,
            pid,
            monitor,
            caps: Capabilities {
                walker: walker_caps,
                uffd: uffd_caps,
                pidfd: has_pidfd,
                degraded,
            },
            settle_timeout: config.settle_timeout,
        })
    }

    /// The mirrored pid (`None` for the current process).
    pub fn pid(&self) -> Option<libc::pid_t> {
        self.pid
    }

    /// What was set up and what is degraded.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Subscribes `callback` to invalidations of `range`. The callback runs with the subscriber
    /// lock held on `state` (after the sequence number was bumped) from the monitor's worker thread or the
    /// thread making an explicit change; it must not return before the subscriber stopped using
    /// the range (device PTEs cleared, TLB invalidated and fenced), must not touch registered user
    /// memory and must not call munmap/madvise/mremap/fork on tracked memory.
    pub fn subscribe<T, F>(&self, range: VaRange, state: T, callback: F) -> Result<Subscription<T>>
    where
        T: Send + 'static,
        F: Fn(&mut T, &Invalidation) + Send + Sync + 'static,
    {
        self.registry.subscribe(range, state, callback)
    }

    /// Subscribes with the [`Callbacks`] given: an invalidate callback and, optionally, a second
    /// pass ([`Callbacks::two_pass`]) and an aging callback ([`Callbacks::aging`]).
    ///
    /// A two-pass subscriber's invalidate callback may return before its device stopped using
    /// the range, as long as it has *started* everything that makes it stop (entries cleared,
    /// invalidation posted); its `finish` callback then must not return before the device
    /// stopped, and does what must wait for that (unpinning, freeing). For one event, every
    /// subscriber it hits runs its first pass, then every two-pass subscriber its second, each
    /// under its own lock (taken again for the second pass: other threads may take it in
    /// between, and must not assume a started teardown is finished). The event is complete,
    /// and faults in its range proceed, only after the last second pass. Both callbacks follow
    /// [`AddressSpace::subscribe`]'s rules.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use mirror::{AddressSpace, Callbacks, Config, Mapping};
    /// let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    /// let buf = Mapping::anonymous(4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    /// let order = Arc::new(Mutex::new(Vec::new()));
    /// let mut subs = Vec::new();
    /// for id in 0..2 {
    ///     let (a, b) = (order.clone(), order.clone());
    ///     let callbacks = Callbacks::new(move |_: &mut (), _: &mirror::Invalidation| {
    ///         a.lock().unwrap().push(("start", id))
    ///     })
    ///     .two_pass(move |_: &mut (), _: &mirror::Invalidation| b.lock().unwrap().push(("finish", id)));
    ///     subs.push(mm.subscribe_with(buf.range(), (), callbacks).unwrap());
    /// }
    /// mm.invalidate(buf.range()).unwrap();
    /// let order = order.lock().unwrap();
    /// // Both first passes before either second pass.
    /// assert!(order[..2].iter().all(|(pass, _)| *pass == "start"));
    /// assert!(order[2..].iter().all(|(pass, _)| *pass == "finish"));
    /// ```
    pub fn subscribe_with<T: Send + 'static>(
        &self,
        range: VaRange,
        state: T,
        callbacks: Callbacks<T>,
    ) -> Result<Subscription<T>> {
        self.registry.subscribe_with(range, state, callbacks)
    }

    /// Subscribes like [`AddressSpace::subscribe`], with an aging callback too (the counterpart of
    /// `mmu_notifier`'s `clear_young`/`test_young` for a secondary MMU).
    ///
    /// `young(state, query, out)` runs under the subscriber lock, like `callback`, and pushes into
    /// `out` the page-aligned sub-ranges of `query.range` (the query clipped to this
    /// subscription) that the subscriber saw used since it last cleared them; with `query.clear`
    /// it also clears its record of use, and does what it needs so that later use is seen again
    /// (for a device: clear the accessed bits and invalidate the TLB entries that would otherwise
    /// keep using the translation without setting them). Ranges it pushes outside `query.range`
    /// are clipped away. A panic is caught and logged, counted in
    /// [`Stats::aging_callback_panics`], and the whole `query.range` is then reported young.
    /// The callback follows the invalidate callback's rules, and must not call
    /// [`AddressSpace::clear_young`] or `test_young` (they return
    /// [`Error::CalledFromCallback`] there). Dropping the subscription waits for an aging
    /// callback of it that is running; once the drop returned the callback never runs again.
    ///
    /// A subscription made with plain [`AddressSpace::subscribe`] has no aging callback: aging
    /// skips it, so its use of memory is invisible to `clear_young`/`test_young`.
    ///
    /// ```
    /// use std::collections::BTreeSet;
    /// use mirror::{AddressSpace, Config, Mapping, VaRange};
    /// let mm = AddressSpace::current(Config::explicit_only()).unwrap();
    /// let buf = Mapping::anonymous(4 * 4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
    /// // The state is a toy device's accessed bits: the set of page addresses it used.
    /// let sub = mm
    ///     .subscribe_aging(
    ///         buf.range(),
    ///         BTreeSet::<u64>::new(),
    ///         |used, inv| used.retain(|a| !inv.range.contains(*a)),
    ///         |used, query, out| {
    ///             for &page in used.range(query.range.start()..query.range.end()) {
    ///                 out.push(VaRange::new(page, 4096).unwrap());
    ///             }
    ///             if query.clear {
    ///                 used.retain(|a| !query.range.contains(*a));
    ///             }
    ///         },
    ///     )
    ///     .unwrap();
    /// // The device used the second and third pages.
    /// sub.lock().extend([buf.addr() + 4096, buf.addr() + 2 * 4096]);
    /// let used = VaRange::new(buf.addr() + 4096, 2 * 4096).unwrap();
    /// assert_eq!(mm.test_young(buf.range()).unwrap(), [used]); // merged into one range
    /// assert_eq!(mm.clear_young(buf.range()).unwrap(), [used]);
    /// assert!(mm.test_young(buf.range()).unwrap().is_empty()); // cleared
    /// ```
    pub fn subscribe_aging<T, F, Y>(
        &self,
        range: VaRange,
        state: T,
        callback: F,
        young: Y,
    ) -> Result<Subscription<T>>
    where
        T: Send + 'static,
        F: Fn(&mut T, &Invalidation) + Send + Sync + 'static,
        Y: Fn(&mut T, &AgeQuery, &mut Vec<VaRange>) + Send + Sync + 'static,
    {
        self.registry.subscribe_aging(range, state, callback, young)
    }

    /// Asks every subscriber overlapping `range` that has an aging callback
    /// ([`AddressSpace::subscribe_aging`]) which parts of it were used, clearing their record of
    /// use: the union of their answers (a page is young if *any* subscriber saw it used), sorted,
    /// with overlapping and adjacent ranges merged, clipped to `range`. Subscribers without an
    /// aging callback contribute nothing.
    ///
    /// Each callback runs with its own subscriber's lock held, one subscriber at a time; the
    /// registry's internal lock is not held meanwhile, so an invalidation waits at most for the
    /// callback holding the lock it needs.
    ///
    /// Never call it while holding a subscriber lock: on a thread holding a
    /// [`crate::SubscriberGuard`] it returns [`Error::SubscriberLockHeld`], and from inside any
    /// subscriber callback (invalidate or aging) [`Error::CalledFromCallback`]. After the address
    /// space was released: [`Error::Released`].
    pub fn clear_young(&self, range: VaRange) -> Result<Vec<VaRange>> {
        self.registry.age(range, true)
    }

    /// [`AddressSpace::clear_young`] without clearing: the subscribers keep their record of use.
    /// The same rules and errors apply.
    pub fn test_young(&self, range: VaRange) -> Result<Vec<VaRange>> {
        self.registry.age(range, false)
    }

    /// Subscribes to the whole user address space `[0, 2^47)` (test_hmm style).
    pub fn subscribe_all<T, F>(&self, state: T, callback: F) -> Result<Subscription<T>>
    where
        T: Send + 'static,
        F: Fn(&mut T, &Invalidation) + Send + Sync + 'static,
    {
        self.registry.subscribe(VaRange::whole(), state, callback)
    }

    /// Number of live subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.registry.subscription_count()
    }

    /// The CPU walker.
    pub fn walker(&self) -> &Walker {
        &self.walker
    }

    /// [`Walker::snapshot`].
    pub fn snapshot(&self, range: VaRange) -> Result<Snapshot> {
        self.check_alive()?;
        self.walker.snapshot(range)
    }

    /// [`Walker::snapshot_fast`].
    pub fn snapshot_fast(&self, range: VaRange) -> Result<Snapshot> {
        self.check_alive()?;
        self.walker.snapshot_fast(range)
    }

    /// [`Walker::fault`].
    pub fn fault(&self, range: VaRange, access: Access) -> Result<()> {
        self.check_alive()?;
        self.walker.fault(range, access)
    }

    fn check_alive(&self) -> Result<()> {
        if self.registry.is_released() {
            Err(Error::Released)
        } else {
            Ok(())
        }
    }

    /// Registers `range` (the parts of it covered by VMAs; the kernel splits VMAs at its bounds)
    /// with the userfaultfd (WP mode, WP_ASYNC, so no fault is ever diverted), so munmap, madvise,
    /// mremap and fork of it produce events. Idempotent: the kernel
    /// skips VMAs already registered with this uffd, so a repeat costs one PROCMAP_QUERY and one
    /// UFFDIO_REGISTER per VMA (about 1-2 µs). Registration is always asked of the kernel rather
    /// than cached, because a VMA can be unmapped and replaced at the same address at any time.
    /// New mmaps are never registered automatically: call this before mapping a range on the
    /// device. VMAs that cannot be registered and cannot be mirrored anyway (`[vdso]`, `[vvar]`,
    /// VM_IO/VM_PFNMAP) are skipped.
    pub fn track(&self, range: VaRange) -> Result<()> {
        self.check_alive()?;
        let vmas = self.walker.vmas(range)?;
        self.track_vmas(range, &vmas)
    }

    /// [`AddressSpace::track`] with the VMAs the caller just looked up (`walker().vmas(r)` of a
    /// range `r` covering `range`), so they are not looked up again. Consecutive registrable
    /// VMAs are registered with one UFFDIO_REGISTER (the kernel walks them itself); if that
    /// fails because the VMAs changed since the lookup, they are registered one at a time as
    /// they are now. The result is the same as `track(range)`'s.
    pub fn track_vmas(&self, range: VaRange, vmas: &[Vma]) -> Result<()> {
        self.check_alive()?;
        let uffd = self.uffd()?;
        // Runs of adjacent registrable VMAs, clipped to `range`.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for vma in vmas {
            if vma.kind == VmaKind::Special || vma.name == "[vdso]" {
                continue;
            }
            // Only the requested part: a whole VMA may include a neighbour's memory that merged
            // with it (adjacent anonymous mappings merge), which must stay free for others.
            let Some(r) = vma.range.intersect(&range) else {
                continue;
            };
            match runs.last_mut() {
                Some(last) if last.1 == r.start() => last.1 = r.end(),
                _ => runs.push((r.start(), r.end())),
            }
        }
        for (start, end) in runs {
            match raw::register(uffd.as_fd(), start, end - start, raw::REGISTER_MODE_WP) {
                Ok(_) => {}
                Err(Errno::EBUSY) => return Err(Error::TrackedElsewhere { start, end }),
                Err(Errno::ESRCH) => return Err(Error::Released),
                // Part of the run went away or changed since the lookup: as they are now.
                Err(Errno::ENOMEM) | Err(Errno::EINVAL) => {
                    let r = VaRange::from_bounds(start, end)?;
                    self.register_each(uffd, r)?
                }
                Err(e) => return Err(Error::sys_range("UFFDIO_REGISTER", start, end, e)),
            }
        }
        Ok(())
    }

    /// Register every registrable VMA of `range`, one UFFDIO_REGISTER each.
    fn register_each(&self, uffd: &OwnedFd, range: VaRange) -> Result<()> {
        for vma in self.walker.vmas(range)? {
            if vma.kind == VmaKind::Special || vma.name == "[vdso]" {
                continue;
            }
            let Some(r) = vma.range.intersect(&range) else {
                continue;
            };
            match raw::register(uffd.as_fd(), r.start(), r.len(), raw::REGISTER_MODE_WP) {
                Ok(_) => {}
                Err(Errno::EBUSY) => {
                    return Err(Error::TrackedElsewhere {
                        start: r.start(),
                        end: r.end(),
                    })
                }
                // The VMA went away between the lookup and the ioctl.
                Err(Errno::ENOMEM) | Err(Errno::EINVAL) if self.walker.vmas(r)?.is_empty() => {}
                Err(Errno::ESRCH) => return Err(Error::Released),
                Err(e) => return Err(Error::sys_range("UFFDIO_REGISTER", r.start(), r.end(), e)),
            }
        }
        Ok(())
    }

    fn uffd(&self) -> Result<&OwnedFd> {
        self.monitor
            .as_ref()
            .and_then(|m| m.shared.uffd.as_ref())
            .ok_or_else(|| Error::Unsupported {
                what: "track (userfaultfd events)",
                why: self
                    .caps
                    .degraded
                    .iter()
                    .find(|d| d.contains("userfaultfd"))
                    .cloned()
                    .unwrap_or_else(|| "the address space was built without userfaultfd".into()),
            })
    }

    /// One UFFDIO_UNREGISTER over `range`, errors ignored (for ranges about to disappear).
    pub(crate) fn unregister_quietly(&self, range: VaRange) {
        if let Ok(uffd) = self.uffd() {
            let _ = raw::unregister(uffd.as_fd(), range.start(), range.len());
        }
    }

    /// Unregisters the VMAs covering `range` from the userfaultfd (events stop for them).
    pub fn untrack(&self, range: VaRange) -> Result<()> {
        let Ok(uffd) = self.uffd() else {
            return Ok(());
        };
        for vma in self.walker.vmas(range)? {
            let Some(clip) = vma.range.intersect(&range) else {
                continue;
            };
            if vma.kind == VmaKind::Special {
                continue;
            }
            raw::unregister(uffd.as_fd(), clip.start(), clip.len())
                .map_err(|e| Error::sys_range("UFFDIO_UNREGISTER", clip.start(), clip.end(), e))?;
        }
        Ok(())
    }

    /// Explicit invalidation with strict coherence: when this returns, every subscriber overlapping
    /// `range` has torn it down.
    pub fn invalidate(&self, range: VaRange) -> Result<()> {
        self.registry
            .invalidate(range, EventKind::Explicit, EventSource::Api, None);
        Ok(())
    }

    /// Tells subscribers the CPU protection of `range` is now (or is about to become) `perms`;
    /// mprotect has no userfaultfd event, so a change made behind the crate's back must be
    /// reported this way. Strict: subscribers have acted when this returns.
    pub fn protect(&self, range: VaRange, perms: Perms) -> Result<()> {
        self.registry
            .invalidate(range, EventKind::Protect { perms }, EventSource::Api, None);
        Ok(())
    }

    /// Starts an explicit invalidation and keeps faults on `range` excluded until the returned
    /// guard drops: the building block of the munmap/mremap/madvise/mprotect wrappers.
    pub(crate) fn bracket(&self, range: VaRange, kind: EventKind) -> crate::registry::Bracket<'_> {
        self.registry.begin(range, kind, EventSource::Api)
    }

    /// Returns once every userfaultfd event the kernel has queued so far has been read and all its
    /// callbacks have returned (so eventual coherence has been reached for every change made
    /// before the call). Returns at once without userfaultfd. Fails if called from a callback.
    pub fn settle(&self) -> Result<()> {
        match &self.monitor {
            Some(m) => m.settle(self.settle_timeout),
            None => Ok(()),
        }
    }

    /// Returns once every userfaultfd event the kernel has handed over so far has been handled,
    /// so a munmap/madvise/mremap that returned in the mirrored process before this call is
    /// reflected in every subscription (the kernel lets those calls return as soon as their
    /// event is read, before it is handled). Cheap when nothing is pending: no wake-up, unlike
    /// [`AddressSpace::settle`]. Must not be called from an invalidate callback.
    pub fn catch_up(&self) -> Result<()> {
        match &self.monitor {
            Some(m) => m.catch_up(self.settle_timeout),
            None => Ok(()),
        }
    }

    /// Counters: events by kind, invalidations, retries, budget exhaustions, event latency.
    pub fn stats(&self) -> Stats {
        self.registry.stats.snapshot()
    }

    /// Installs (or removes) a hook called after every event's callbacks have all returned, with
    /// its latency for userfaultfd events. Runs on the thread that handled the event.
    pub fn set_event_observer(&self, observer: Option<EventObserver>) {
        self.registry.set_observer(observer);
    }

    /// Installs (or removes) the handler receiving the child's userfaultfd on fork. Without one
    /// the child's uffd is closed at once, which drops the child's registrations (so the child
    /// never waits for us).
    pub fn on_fork(&self, handler: Option<ForkHandler>) {
        if let Some(m) = &self.monitor {
            m.set_fork_handler(handler);
        }
    }

    /// Whether the mirrored process has exited (pidfd readable). Always false for the current
    /// process.
    pub fn process_exited(&self) -> bool {
        self.monitor.as_ref().is_some_and(|m| m.process_exited())
    }

    /// Whether the address space was released.
    pub fn is_released(&self) -> bool {
        self.registry.is_released()
    }

    /// Delivers [`EventKind::Release`] to every subscription and fails all later faults. Happens
    /// automatically on process exit (pidfd) and on drop.
    pub fn release(&self) {
        self.registry.release(EventSource::Api);
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        // Unregister everything while the reader still reads: once it stops, an event on a still
        // registered range would block its thread until the uffd is closed, and a fork (which
        // holds the malloc locks meanwhile) could then deadlock with this thread's frees.
        if let Ok(uffd) = self.uffd() {
            match self.walker.vmas(VaRange::whole()) {
                Ok(vmas) => {
                    for vma in vmas.iter().filter(|v| v.kind != VmaKind::Special) {
                        // EINVAL: [vdso] or another uffd's range; neither is ours.
                        let _ = raw::unregister(uffd.as_fd(), vma.range.start(), vma.range.len());
                    }
                }
                Err(e) => tracing::debug!(error = %e, "no VMA list at drop; relying on close"),
            }
        }
        // Stop the monitor so no event races the release, then close the fds (the monitor's
        // shared state owns them).
        let monitor = self.monitor.take();
        drop(monitor);
        self.registry.release(EventSource::Api);
    }
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("pid", &self.pid)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}
