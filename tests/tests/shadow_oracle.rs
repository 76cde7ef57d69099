//! End-to-end shadow oracle: random sequences of mmap, munmap (whole and partial), mremap,
//! madvise(DONTNEED), mprotect, fork, CPU writes, and device reads and writes over a few regions,
//! run against the driver and the emulated device, with a plain byte vector per region as the
//! oracle. After every step — strict steps at once, steps the mirror only sees through
//! userfaultfd after `settle()` — the device sees exactly what the CPU sees and what the shadow
//! says, device writes land where the CPU reads them, accesses the CPU protection forbids fail
//! cleanly, and no device entry survives for memory that is no longer mapped.
//!
//! Cases: 192 by default on the emulated device and 64 on vfio-user (a few seconds each);
//! `MIRROR_ORACLE_CASES=N` for long runs. A failure shrinks
//! to a minimal sequence of `Step`s, printed with Debug.

mod hmm;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use driver::fault::{CancelReason, ServiceMode};
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
use driver::Context;
use hmm::{cpu_checksum, device_checksum, device_fill, is_cancel, PAGE};
use mirror::{Mapping, Perms, VaRange};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const SLOTS: usize = 3;
const MAX_PAGES: usize = 8;

/// How a change reaches the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// The crate's strict wrapper (coherent when it returns).
    Strict,
    /// The plain syscall, seen through userfaultfd (coherent after `settle`).
    Observed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prot {
    None,
    Read,
    ReadWrite,
}

#[derive(Clone, Debug)]
enum Step {
    Mmap {
        slot: usize,
        pages: usize,
    },
    Munmap {
        slot: usize,
        via: Via,
    },
    /// Unmap `pages` from the head or the tail (the region stays contiguous).
    MunmapPart {
        slot: usize,
        head: bool,
        pages: usize,
        via: Via,
    },
    Mremap {
        slot: usize,
        via: Via,
    },
    DontNeed {
        slot: usize,
        page: usize,
        pages: usize,
        via: Via,
    },
    /// `Strict`: the mprotect wrapper; `Observed`: a plain mprotect (no event exists for it)
    /// reported with the explicit `protect()`, as an application must.
    Protect {
        slot: usize,
        prot: Prot,
        via: Via,
    },
    Fork,
    CpuWrite {
        slot: usize,
        page: usize,
        byte: u8,
    },
    DeviceRead {
        slot: usize,
    },
    DeviceWrite {
        slot: usize,
        page: usize,
        pages: usize,
        byte: u8,
    },
}

fn via() -> impl Strategy<Value = Via> {
    prop_oneof![Just(Via::Strict), Just(Via::Observed)]
}

fn step() -> impl Strategy<Value = Step> {
    let slot = 0..SLOTS;
    prop_oneof![
        3 => (slot.clone(), 1..=MAX_PAGES).prop_map(|(slot, pages)| Step::Mmap { slot, pages }),
        1 => (slot.clone(), via()).prop_map(|(slot, via)| Step::Munmap { slot, via }),
        1 => (slot.clone(), any::<bool>(), 1..MAX_PAGES, via())
            .prop_map(|(slot, head, pages, via)| Step::MunmapPart { slot, head, pages, via }),
        1 => (slot.clone(), via()).prop_map(|(slot, via)| Step::Mremap { slot, via }),
        1 => (slot.clone(), 0..MAX_PAGES, 1..=MAX_PAGES, via())
            .prop_map(|(slot, page, pages, via)| Step::DontNeed { slot, page, pages, via }),
        1 => (slot.clone(), prop_oneof![Just(Prot::None), Just(Prot::Read), Just(Prot::ReadWrite)], via())
            .prop_map(|(slot, prot, via)| Step::Protect { slot, prot, via }),
        1 => Just(Step::Fork),
        2 => (slot.clone(), 0..MAX_PAGES, any::<u8>())
            .prop_map(|(slot, page, byte)| Step::CpuWrite { slot, page, byte }),
        3 => slot.clone().prop_map(|slot| Step::DeviceRead { slot }),
        3 => (slot, 0..MAX_PAGES, 1..=MAX_PAGES, any::<u8>())
            .prop_map(|(slot, page, pages, byte)| Step::DeviceWrite { slot, page, pages, byte }),
    ]
}

struct Region {
    addr: u64,
    shadow: Vec<u8>,
    prot: Prot,
}

impl Region {
    /// `[page, page + pages)` clipped to the region, if `page` is inside it.
    fn clip(&self, page: usize, pages: usize) -> Option<(VaRange, usize)> {
        (page < self.pages()).then(|| {
            let pages = pages.min(self.pages() - page);
            let range =
                VaRange::new(self.addr + (page * PAGE) as u64, (pages * PAGE) as u64).unwrap();
            (range, pages)
        })
    }

    fn range(&self) -> VaRange {
        VaRange::new(self.addr, self.shadow.len() as u64).unwrap()
    }
    fn pages(&self) -> usize {
        self.shadow.len() / PAGE
    }
}

struct World<'a> {
    ctx: &'a Context,
    rt: &'a Arc<Runtime>,
    regions: [Option<Region>; SLOTS],
    /// Pages unmapped by the sequence: no device entry may survive for them.
    freed: Vec<u64>,
}

fn check(cond: bool, what: String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what))
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, bytes)
}

fn libc_prot(p: Prot) -> libc::c_int {
    match p {
        Prot::None => libc::PROT_NONE,
        Prot::Read => libc::PROT_READ,
        Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
    }
}

impl World<'_> {
    fn unmap(&mut self, range: VaRange, via: Via) {
        match via {
            // SAFETY: the sequence's own memory; nothing refers into it.
            Via::Strict => unsafe { self.ctx.address_space().munmap(range).unwrap() },
            Via::Observed => {
                // SAFETY: as above.
                let r = unsafe {
                    libc::munmap(range.start() as *mut libc::c_void, range.len() as usize)
                };
                assert_eq!(r, 0);
            }
        }
        self.freed
            .extend((range.start()..range.end()).step_by(PAGE));
    }

    fn apply(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match *step {
            Step::Mmap { slot, pages } => {
                if self.regions[slot].is_none() {
                    let m = Mapping::anonymous(pages * PAGE, libc_prot(Prot::ReadWrite)).unwrap();
                    let addr = m.forget().start();
                    self.freed
                        .retain(|p| !(addr..addr + (pages * PAGE) as u64).contains(p));
                    self.regions[slot] = Some(Region {
                        addr,
                        shadow: vec![0; pages * PAGE],
                        prot: Prot::ReadWrite,
                    });
                }
            }
            Step::Munmap { slot, via } => {
                if let Some(r) = self.regions[slot].take() {
                    self.unmap(r.range(), via);
                }
            }
            Step::MunmapPart {
                slot,
                head,
                pages,
                via,
            } => {
                let Some(r) = self.regions[slot].as_mut() else {
                    return Ok(());
                };
                if pages >= r.pages() {
                    return Ok(());
                }
                let len = (pages * PAGE) as u64;
                let gone = if head {
                    let g = VaRange::new(r.addr, len).unwrap();
                    r.addr += len;
                    r.shadow.drain(..pages * PAGE);
                    g
                } else {
                    let keep = r.shadow.len() - pages * PAGE;
                    r.shadow.truncate(keep);
                    VaRange::new(r.addr + keep as u64, len).unwrap()
                };
                self.unmap(gone, via);
            }
            Step::Mremap { slot, via } => {
                let Some(r) = self.regions[slot].as_mut() else {
                    return Ok(());
                };
                let len = r.shadow.len();
                let target = Mapping::anonymous(len, libc::PROT_NONE).unwrap().forget();
                let old = r.range();
                let new = match via {
                    // SAFETY: the old range and the target reservation are the sequence's own.
                    Via::Strict => unsafe {
                        self.ctx
                            .address_space()
                            .mremap(old, len as u64, true, Some(target.start()))
                            .unwrap()
                    },
                    Via::Observed => {
                        // SAFETY: as above.
                        let p = unsafe {
                            libc::mremap(
                                old.start() as *mut libc::c_void,
                                len,
                                len,
                                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                                target.start() as *mut libc::c_void,
                            )
                        };
                        assert_ne!(p, libc::MAP_FAILED);
                        p as u64
                    }
                };
                r.addr = new;
                self.freed.retain(|p| !(new..new + len as u64).contains(p));
                self.freed.extend((old.start()..old.end()).step_by(PAGE));
            }
            Step::DontNeed {
                slot,
                page,
                pages,
                via,
            } => {
                let Some(r) = self.regions[slot].as_mut() else {
                    return Ok(());
                };
                let Some((range, pages)) = r.clip(page, pages) else {
                    return Ok(());
                };
                match via {
                    // SAFETY: discarding the sequence's own memory.
                    Via::Strict => unsafe {
                        self.ctx
                            .address_space()
                            .madvise(range, libc::MADV_DONTNEED)
                            .unwrap()
                    },
                    Via::Observed => {
                        // SAFETY: as above.
                        let rc = unsafe {
                            libc::madvise(
                                range.start() as *mut libc::c_void,
                                range.len() as usize,
                                libc::MADV_DONTNEED,
                            )
                        };
                        assert_eq!(rc, 0);
                    }
                }
                r.shadow[page * PAGE..(page + pages) * PAGE].fill(0);
            }
            Step::Protect { slot, prot, via } => {
                let Some(r) = self.regions[slot].as_mut() else {
                    return Ok(());
                };
                let perms = match prot {
                    Prot::None => Perms::NONE,
                    Prot::Read => Perms::READ,
                    Prot::ReadWrite => Perms::READ_WRITE,
                };
                match via {
                    // SAFETY: the sequence's own memory; no reference relies on the access.
                    Via::Strict => unsafe {
                        self.ctx.address_space().mprotect(r.range(), perms).unwrap()
                    },
                    Via::Observed => {
                        let range = r.range();
                        // SAFETY: as above.
                        let rc = unsafe {
                            libc::mprotect(
                                range.start() as *mut libc::c_void,
                                range.len() as usize,
                                libc_prot(prot),
                            )
                        };
                        assert_eq!(rc, 0);
                        self.ctx.address_space().protect(range, perms).unwrap();
                    }
                }
                r.prot = prot;
            }
            Step::Fork => {
                let pid = mirror::sys::process::fork_exiting_child(0).unwrap();
                let mut status = 0;
                // SAFETY: reaping our child.
                assert_eq!(
                    unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) },
                    pid.as_raw()
                );
            }
            Step::CpuWrite { slot, page, byte } => {
                let Some(r) = self.regions[slot].as_mut() else {
                    return Ok(());
                };
                if page >= r.pages() || r.prot != Prot::ReadWrite {
                    return Ok(());
                }
                let at = r.addr + (page * PAGE) as u64;
                for i in 0..PAGE {
                    // SAFETY: a writable page of the sequence's memory.
                    unsafe { std::ptr::write_volatile((at as *mut u8).add(i), byte) };
                }
                r.shadow[page * PAGE..(page + 1) * PAGE].fill(byte);
            }
            Step::DeviceRead { slot } => {
                let Some(r) = self.regions[slot].as_ref() else {
                    return Ok(());
                };
                let got = device_checksum(self.ctx, r.addr, r.shadow.len());
                match r.prot {
                    Prot::None => check(
                        matches!(&got, Err(e) if is_cancel(e, CancelReason::NoMapping)),
                        format!("device read of PROT_NONE memory: {got:?}"),
                    )?,
                    _ => check(
                        matches!(got, Ok(sum) if sum == fnv(&r.shadow)),
                        format!("device read {got:?} != shadow {:#x}", fnv(&r.shadow)),
                    )?,
                }
            }
            Step::DeviceWrite {
                slot,
                page,
                pages,
                byte,
            } => {
                let Some(r) = self.regions[slot].as_mut() else {
                    return Ok(());
                };
                let Some((range, pages)) = r.clip(page, pages) else {
                    return Ok(());
                };
                let got = device_fill(
                    self.ctx,
                    range.start(),
                    pages * PAGE,
                    u64::from_ne_bytes([byte; 8]),
                );
                match r.prot {
                    Prot::ReadWrite => {
                        check(got.is_ok(), format!("device write failed: {got:?}"))?;
                        r.shadow[page * PAGE..(page + pages) * PAGE].fill(byte);
                    }
                    Prot::Read => check(
                        matches!(&got, Err(e) if is_cancel(e, CancelReason::Permission)),
                        format!("device write to read-only memory: {got:?}"),
                    )?,
                    Prot::None => check(
                        matches!(&got, Err(e) if is_cancel(e, CancelReason::NoMapping)),
                        format!("device write to PROT_NONE memory: {got:?}"),
                    )?,
                }
            }
        }
        Ok(())
    }

    fn observed(step: &Step) -> bool {
        matches!(
            step,
            Step::Fork
                | Step::Munmap {
                    via: Via::Observed,
                    ..
                }
                | Step::MunmapPart {
                    via: Via::Observed,
                    ..
                }
                | Step::Mremap {
                    via: Via::Observed,
                    ..
                }
                | Step::DontNeed {
                    via: Via::Observed,
                    ..
                }
        )
    }

    /// The invariants, after a step (and `settle` for observed steps).
    fn invariants(&self, after: &Step) -> Result<(), TestCaseError> {
        for r in self.regions.iter().flatten() {
            if r.prot == Prot::None {
                continue;
            }
            let cpu = cpu_checksum(r.addr, r.shadow.len());
            check(
                cpu == fnv(&r.shadow),
                format!(
                    "after {after:?}: CPU contents differ from the shadow at {:#x}",
                    r.addr
                ),
            )?;
            let dev = device_checksum(self.ctx, r.addr, r.shadow.len());
            check(
                matches!(dev, Ok(sum) if sum == cpu),
                format!(
                    "after {after:?}: device sees {dev:?}, CPU {cpu:#x} at {:#x}",
                    r.addr
                ),
            )?;
        }
        for &p in &self.freed {
            if self.regions.iter().flatten().any(|r| r.range().contains(p)) {
                continue;
            }
            check(
                self.settled_without_entry(p),
                format!("after {after:?}: a device entry survived for unmapped page {p:#x}"),
            )?;
        }
        let err = device_checksum(self.ctx, 0x800, 8);
        check(
            matches!(&err, Err(e) if is_cancel(e, CancelReason::NoMapping)),
            format!("device access to a hole: {err:?}"),
        )?;
        check(
            self.rt
                .service()
                .stats()
                .device_errors
                .load(Ordering::Relaxed)
                == 0,
            "the device latched an error (IOMMU fault?)".into(),
        )?;
        Ok(())
    }

    /// Whether the device holds no entry for `p` while no VMA covers it. Something else of this
    /// process may map a freed page meanwhile (a large malloc, a thread stack) and merge with a
    /// region, so fault-around can reach it; when its owner unmaps it again, the event is
    /// handled by the monitor thread some time later (eventual coherence: only `settle` after
    /// the munmap promises it). So an entry over an unmapped page counts only if it survives a
    /// few settles and the page is still unmapped after them.
    fn settled_without_entry(&self, p: u64) -> bool {
        let page = VaRange::new(p, PAGE as u64).unwrap();
        let mm = self.ctx.address_space();
        for attempt in 0..5 {
            if attempt > 0 {
                // The owner's munmap queues its event only after the VMA is gone.
                std::thread::sleep(std::time::Duration::from_millis(attempt * 5));
                mm.settle().unwrap();
            }
            let mapped = !mm.walker().vmas(page).unwrap().is_empty();
            if mapped || self.ctx.device_translation(p).is_none() {
                if attempt > 0 {
                    eprintln!("page {p:#x}: entry over a foreign munmap, cleared by its event");
                }
                return true;
            }
        }
        false
    }

    fn clean_up(&mut self) {
        for r in self.regions.iter_mut().filter_map(Option::take) {
            // SAFETY: the sequence's own memory.
            unsafe { self.ctx.address_space().munmap(r.range()).unwrap() };
        }
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("MIRROR_ORACLE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// On the emulated device; in the MXA-1 guest (tests/qemu/mxa-run.sh) on the kernel's VFIO, with
/// the case count its init sets.
#[test]
fn device_view_matches_cpu_after_every_step() {
    let rt = if integration_tests::guest::in_guest() {
        integration_tests::guest::open(ServiceMode::Interrupt)
    } else {
        Runtime::open(
            DeviceSpec::emulated(),
            RuntimeOptions {
                mode: ServiceMode::Interrupt,
                ..Default::default()
            },
        )
        .unwrap()
    };
    oracle(&rt, cases(192));
}

/// The same oracle with the device in another process (vfio-user); fewer cases by default.
#[test]
fn device_view_matches_cpu_after_every_step_vfio_user() {
    let rt = hmm::vfio_user::open(ServiceMode::Polling, "device_server_mode");
    oracle(&rt, cases(64));
}

/// Server mode for the vfio-user oracle (does nothing otherwise).
#[test]
fn device_server_mode() {
    hmm::vfio_user::serve_if_server_mode();
}

fn oracle(rt: &Arc<Runtime>, cases: u32) {
    let ctx = rt.create_context().unwrap();
    if ctx.address_space().capabilities().uffd.is_none() {
        eprintln!("SKIP shadow oracle: no userfaultfd here (observed steps need events)");
        return;
    }
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(step(), 1..40), |steps| {
        let mut world = World {
            ctx: &ctx,
            rt,
            regions: [None, None, None],
            freed: Vec::new(),
        };
        let outcome = (|| {
            for s in &steps {
                world.apply(s)?;
                if World::observed(s) {
                    ctx.address_space().settle().unwrap();
                }
                world.invariants(s)?;
            }
            Ok(())
        })();
        world.clean_up();
        outcome
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
