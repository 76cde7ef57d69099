//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use mirror::{AddressSpace, Config, Invalidation, Mapping, Subscription, VaRange};

pub const PAGE: usize = 4096;
pub const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// An address space with userfaultfd events.
pub fn mm() -> AddressSpace {
    AddressSpace::current(Config::default()).expect("address space with userfaultfd")
}

/// An address space with userfaultfd events, or `None` after printing why the test is skipped.
pub fn uffd_mm() -> Option<AddressSpace> {
    let mm = mm();
    if mm.capabilities().uffd.is_none() {
        println!(
            "SKIP: userfaultfd unavailable: {:?}",
            mm.capabilities().degraded
        );
        return None;
    }
    Some(mm)
}

/// A subscription whose state records every invalidation it receives.
pub fn recorder(mm: &AddressSpace, range: VaRange) -> Subscription<Vec<Invalidation>> {
    mm.subscribe(range, Vec::new(), |log: &mut Vec<Invalidation>, inv| {
        log.push(inv.clone())
    })
    .unwrap()
}

/// A subscription modelling a device page table: a set of mirrored page addresses that the
/// callback clears for the invalidated range, plus a shared log.
pub struct Device {
    pub sub: Subscription<Vec<u64>>,
    pub log: Arc<Mutex<Vec<Invalidation>>>,
}

pub fn device(mm: &AddressSpace, range: VaRange) -> Device {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let sub = mm
        .subscribe(range, Vec::new(), move |ptes: &mut Vec<u64>, inv| {
            ptes.retain(|a| !inv.range.contains(*a));
            l.lock().unwrap().push(inv.clone());
        })
        .unwrap();
    Device { sub, log }
}

/// Installs device entries for every present page of `range` through the full protocol.
pub fn mirror_all(mm: &AddressSpace, dev: &Device, range: VaRange) -> usize {
    dev.sub
        .mirror_range(
            |_| mm.snapshot(range),
            |ptes, snap| {
                for (i, p) in snap.pages().iter().enumerate() {
                    if matches!(p.state, mirror::PageState::Read | mirror::PageState::Write) {
                        ptes.push(range.start() + (i * PAGE) as u64);
                    }
                }
                ptes.len()
            },
        )
        .unwrap()
}

/// A memfd of `len` bytes.
pub fn memfd(len: usize) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        c"mirror-test",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .unwrap();
    nix::unistd::ftruncate(&fd, len as i64).unwrap();
    fd
}

/// A regular file of `len` bytes filled with `byte`, on the temp dir's filesystem (unlinked).
pub fn regular_file(len: usize, byte: u8) -> std::fs::File {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!(
        "mirror-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.write_all(&vec![byte; len]).unwrap();
    f.sync_all().unwrap();
    f
}

pub fn map_fd(
    fd: std::os::fd::BorrowedFd<'_>,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
) -> Mapping {
    Mapping::with_flags(len, prot, flags, Some(fd), 0).unwrap()
}

pub fn sub_range(m: &Mapping, first_page: usize, pages: usize) -> VaRange {
    VaRange::new(m.addr() + (first_page * PAGE) as u64, (pages * PAGE) as u64).unwrap()
}
