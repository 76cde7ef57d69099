//! The edu guest test: runs as root inside the QEMU guest booted by `tests/qemu/run.sh`, with
//! QEMU's edu device bound to vfio-pci behind an emulated Intel IOMMU. It drives edu through
//! the driver's kernel VFIO backend and the mirror (the runtime with the [`driver::edu::Edu`]
//! personality: `Runtime::<Edu>::open_with`, the path an MXA-1 opens through) and checks, on the
//! real kernel:
//! 1. identity, liveness and MSI through an eventfd;
//! 2. DMA from and to malloc'd and mmap'd memory, mapped on submit at IOVA == VA, data checked
//!    on both sides;
//! 3. munmap of part of a mirrored buffer: the page stays pinned until the unmap, the IOMMU
//!    mapping goes with it, an edu DMA there is blocked (DMAR fault in the kernel log) and no
//!    byte reaches memory;
//! 4. MADV_DONTNEED and mremap of mirrored buffers: the device sees the new pages;
//! 5. RLIMIT_MEMLOCK without CAP_IPC_LOCK: an over-limit mirror fails with the memlock error
//!    and leaks nothing.
//!
//! Prints one line `EDU-GUEST-TEST: PASS (...)` or `EDU-GUEST-TEST: FAIL: ...` and exits 0 or 1.
//! Usage: `edu-guest-test [PCI address]` (default: the first 1234:11e8 device).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use driver::edu::{self, Edu};
use driver::runtime::{Context, DeviceSpec, Runtime, RuntimeOptions};
use mirror::Mapping;

const PAGE: u64 = 4096;
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const LEN: u64 = edu::MAX_DMA;

type Res<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// The unsafe part: volatile access to memory the device writes behind Rust's back.
mod sys {
    /// Copy `len` bytes from `vec[offset..]` with volatile loads (the device wrote them by DMA).
    pub fn read_vec(vec: &[u8], offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= vec.len(), "read_vec out of bounds");
        (0..len)
            .map(|i| {
                // SAFETY: in bounds of `vec` (checked above); a volatile byte load has no
                // alignment requirement and observes what the device wrote.
                unsafe { std::ptr::read_volatile(vec.as_ptr().add(offset + i)) }
            })
            .collect()
    }
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn fill(m: &Mapping, offset: usize, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        m.write_byte(offset + i, *b);
    }
}

fn read(m: &Mapping, offset: usize, len: u64) -> Vec<u8> {
    (0..len as usize).map(|i| m.read_byte(offset + i)).collect()
}

fn check_eq(what: &str, got: &[u8], want: &[u8]) -> Res {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        return Err(format!(
            "{what}: byte {i} is {:#04x}, expected {:#04x}",
            got[i], want[i]
        ));
    }
    ensure!(got.len() == want.len(), "{what}: length differs");
    Ok(())
}

/// Unmap a mirrored buffer through the mirror's strict wrapper (the device's mapping is gone
/// when it returns). A plain munmap (dropping the [`Mapping`]) is only seen through userfaultfd
/// events, which the mirror cannot register for on kernels without UFFD_FEATURE_WP_ASYNC (6.1).
fn release(edu: &Context<Edu>, m: Mapping) -> Res {
    let range = m.forget();
    // SAFETY: the owner is forgotten and only raw byte accesses referred into the range.
    unsafe { edu.core().address_space().munmap(range) }.map_err(e("munmap"))
}

fn locked() -> Res<u64> {
    edu::locked_bytes().ok_or_else(|| "VmLck missing from /proc/self/status".to_string())
}

/// The kernel log from now on, read through /dev/kmsg.
struct Kmsg {
    file: std::fs::File,
    device: String,
}

impl Kmsg {
    fn open(device: &str) -> Res<Kmsg> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .map_err(e("open /dev/kmsg"))?;
        f.seek(SeekFrom::End(0)).map_err(e("seek /dev/kmsg"))?;
        Ok(Kmsg {
            file: f,
            device: device.to_string(),
        })
    }

    /// Records logged since the last call.
    fn drain(&mut self) -> Res<Vec<String>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    // "prio,seq,time,flags;message"
                    let msg = rec.split_once(';').map_or(&*rec, |(_, m)| m);
                    out.push(msg.trim_end().to_string());
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                // A record overwritten before we read it.
                Err(err) if err.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(err) => return Err(format!("read /dev/kmsg: {err}")),
            }
        }
        Ok(out)
    }

    /// Wait (up to 3 s) for the DMAR fault on `addr`'s page; returns the line.
    fn wait_dmar_fault(&mut self, addr: u64) -> Res<String> {
        let needle = format!("fault addr {:#x}", addr & !(PAGE - 1));
        // "0000:00:01.0" is logged as "[00:01.0]".
        let device = format!("[{}]", self.device.get(5..).unwrap_or(&self.device));
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut seen = Vec::new();
        loop {
            for line in self.drain()? {
                if line.contains("DMAR") && line.contains(&needle) && line.contains(&device) {
                    return Ok(line);
                }
                seen.push(line);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no DMAR fault at {addr:#x} in the kernel log; it said: {seen:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn find_edu() -> Res<String> {
    let dir = std::fs::read_dir("/sys/bus/pci/devices").map_err(e("read /sys/bus/pci/devices"))?;
    for entry in dir.flatten() {
        let p = entry.path();
        let id = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        if id("vendor").trim() == "0x1234" && id("device").trim() == "0x11e8" {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err("no edu device (1234:11e8) in /sys/bus/pci/devices".into())
}

struct Run {
    checks: u32,
}

impl Run {
    fn ok(&mut self, what: &str) {
        self.checks += 1;
        println!("ok {:2} {what}", self.checks);
    }
}

/// Load `data` into edu's buffer from a scratch mapping.
fn load_device(edu: &Context<Edu>, scratch: &Mapping, data: &[u8]) -> Res {
    fill(scratch, 0, data);
    edu.dma_to_device(scratch.addr(), data.len() as u64)
        .map_err(e("load the device buffer"))
}

/// Read edu's buffer into a scratch mapping.
fn device_contents(edu: &Context<Edu>, scratch: &Mapping) -> Res<Vec<u8>> {
    edu.dma_from_device(scratch.addr(), LEN)
        .map_err(e("read the device buffer"))?;
    Ok(read(scratch, 0, LEN))
}

/// DMA `LEN` bytes at `va` (holding pattern `seed`) to edu and check edu's buffer holds them.
fn to_device(edu: &Context<Edu>, scratch: &Mapping, va: u64, seed: u8, what: &str) -> Res {
    edu.dma_to_device(va, LEN).map_err(e(what))?;
    check_eq(what, &device_contents(edu, scratch)?, &pattern(seed, LEN))
}

/// Load pattern `seed` into edu, DMA it to `va` and check it arrived, reading through `view`
/// at `offset` (the same memory, possibly through another mapping).
fn from_device(
    edu: &Context<Edu>,
    scratch: &Mapping,
    va: u64,
    (view, offset): (&Mapping, usize),
    seed: u8,
    what: &str,
) -> Res {
    load_device(edu, scratch, &pattern(seed, LEN))?;
    edu.dma_from_device(va, LEN).map_err(e(what))?;
    check_eq(what, &read(view, offset, LEN), &pattern(seed, LEN))
}

fn basics(run: &mut Run, edu: &Context<Edu>) -> Res {
    let device = edu.runtime().device();
    let id = device.id().map_err(e("read ID"))?;
    ensure!(
        id == 0x0100_00ed,
        "ID register {id:#010x}, expected 0x010000ed"
    );
    run.ok(&format!("identity: ID register {id:#010x}"));
    device.liveness_check().map_err(e("liveness"))?;
    run.ok("liveness register returns the complement");
    let status = device.raise_irq(0x1).map_err(e("MSI"))?;
    ensure!(status & 1 == 1, "MSI status {status:#x}");
    run.ok(&format!(
        "MSI through the eventfd (status {status:#x}, acked)"
    ));
    for (len, word) in [(0u64, "0 bytes"), (4096, "4095")] {
        match edu.dma_to_device(0x1000, len) {
            Err(err) if err.to_string().contains(word) => {}
            other => return Err(format!("DMA of {len} bytes: {other:?}")),
        }
    }
    run.ok("DMA of 0 and 4096 bytes refused with clear errors");
    Ok(())
}

fn malloc_and_mmap(run: &mut Run, edu: &Context<Edu>, scratch: &Mapping) -> Res {
    let base = locked()?;
    // malloc'd (heap) memory, at odd offsets.
    let mut src = vec![0u8; LEN as usize + 77];
    src[77..].copy_from_slice(&pattern(1, LEN));
    let dst = vec![0u8; LEN as usize + 301];
    let src_va = src.as_ptr() as u64 + 77;
    let dst_va = dst.as_ptr() as u64 + 301;
    to_device(edu, scratch, src_va, 1, "malloc'd -> edu")?;
    edu.dma_from_device(dst_va, LEN)
        .map_err(e("edu -> malloc"))?;
    check_eq(
        "malloc'd memory after DMA from edu",
        &sys::read_vec(&dst, 301, LEN as usize),
        &pattern(1, LEN),
    )?;
    let t = edu
        .core()
        .translate(src_va)
        .ok_or("malloc'd source not mirrored")?;
    ensure!(t.iova == src_va, "IOVA {:#x} != VA {src_va:#x}", t.iova);
    run.ok(&format!(
        "DMA malloc'd -> edu -> malloc'd at IOVA == VA {src_va:#x}, data checked"
    ));

    // mmap'd memory, across a page boundary.
    let a = Mapping::anonymous(2 * PAGE as usize, RW).map_err(e("mmap"))?;
    let b = Mapping::anonymous(2 * PAGE as usize, RW).map_err(e("mmap"))?;
    fill(&a, 2500, &pattern(2, LEN));
    to_device(edu, scratch, a.addr() + 2500, 2, "mmap'd -> edu")?;
    edu.dma_from_device(b.addr() + 1000, LEN)
        .map_err(e("edu -> mmap"))?;
    check_eq(
        "mmap'd memory after DMA",
        &read(&b, 1000, LEN),
        &pattern(2, LEN),
    )?;
    ensure!(
        read(&b, 0, 1000).iter().all(|x| *x == 0),
        "edu wrote before the destination"
    );
    let pinned = locked()? - base;
    ensure!(
        pinned >= 4 * PAGE,
        "only {pinned} bytes newly pinned (VmLck) for two 2-page transfers"
    );
    run.ok(&format!(
        "DMA mmap'd -> edu -> mmap'd across pages, data checked; {pinned} bytes pinned (VmLck)"
    ));
    release(edu, a)?;
    release(edu, b)?;
    drop(src);
    drop(dst);
    Ok(())
}

fn munmap(run: &mut Run, edu: &Context<Edu>, scratch: &Mapping, kmsg: &mut Kmsg) -> Res {
    let mm = edu.core().address_space().clone();
    let m = Mapping::anonymous(4 * PAGE as usize, RW).map_err(e("mmap"))?;
    fill(&m, 0, &pattern(3, LEN));
    fill(&m, PAGE as usize, &pattern(4, LEN));
    let before = locked()?;
    let (maps_before, bytes_before, ..) = edu.core().footprint();
    edu.map(m.addr(), 4 * PAGE, true)
        .map_err(e("mirror the buffer"))?;
    let mapped = locked()?;
    ensure!(
        mapped >= before + 4 * PAGE,
        "mirroring 4 pages pinned {} bytes (VmLck)",
        mapped - before
    );
    // The device reaches it: read page 1, write page 0.
    edu.dma_to_device(m.addr() + PAGE, LEN)
        .map_err(e("page 1 -> edu"))?;
    edu.dma_from_device(m.addr(), LEN)
        .map_err(e("edu -> page 0"))?;
    check_eq("page 0 after DMA", &read(&m, 0, LEN), &pattern(4, LEN))?;
    ensure!(
        locked()? == mapped,
        "the pin changed while the buffer stayed mapped"
    );
    run.ok("mirrored buffer pinned (VmLck) and reachable while mapped");

    // munmap page 0 (strict: the mirror has torn the mapping down when this returns).
    let (head, rest) = m.split_at(PAGE as usize).map_err(e("split"))?;
    let head = head.forget();
    // SAFETY: page 0 is ours, forgotten by its owner, and nothing refers into it.
    unsafe { mm.munmap(head) }.map_err(e("munmap"))?;
    ensure!(
        edu.core().translate(head.start()).is_none() && edu.core().translate(rest.addr()).is_none(),
        "the device still translates the buffer after munmap"
    );
    let (maps_after, bytes_after, ..) = edu.core().footprint();
    ensure!(
        (maps_after, bytes_after) == (maps_before, bytes_before),
        "mirror footprint {maps_after}/{bytes_after} after munmap, {maps_before}/{bytes_before} before"
    );
    let after = locked()?;
    ensure!(
        after == before,
        "VmLck {after} after munmap, {before} before mapping: the pin leaked"
    );
    run.ok("munmap of page 0: the whole DMA mapping torn down and unpinned");

    // The device now writes a fresh pattern at the unmapped page and at page 1 (still mapped
    // on the CPU, no longer in the IOMMU): both blocked.
    load_device(edu, scratch, &pattern(5, LEN))?;
    kmsg.drain()?;
    edu.dma_from_device_unmapped(head.start(), LEN)
        .map_err(e("DMA to the unmapped page"))?;
    let line = kmsg.wait_dmar_fault(head.start())?;
    println!("   guest kernel: {line}");
    edu.dma_from_device_unmapped(rest.addr(), LEN)
        .map_err(e("DMA to page 1"))?;
    let line = kmsg.wait_dmar_fault(rest.addr())?;
    println!("   guest kernel: {line}");
    check_eq(
        "page 1 after the blocked DMA",
        &read(&rest, 0, LEN),
        &pattern(4, LEN),
    )?;
    run.ok(
        "edu DMA to the unmapped range blocked by the IOMMU (DMAR faults), no byte reached memory",
    );
    release(edu, rest)
}

/// munmap of a page whose memory lives on (a memfd mapped twice): after the unmap, an edu DMA to
/// the old address is blocked and the page, read through the other mapping, is unchanged.
fn munmap_shared(run: &mut Run, edu: &Context<Edu>, scratch: &Mapping, kmsg: &mut Kmsg) -> Res {
    let mm = edu.core().address_space().clone();
    let fd =
        nix::sys::memfd::memfd_create(c"edu-alias", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(e("memfd_create"))?;
    let file = std::fs::File::from(fd);
    file.set_len(2 * PAGE).map_err(e("ftruncate"))?;
    let shared = |what| {
        Mapping::with_flags(
            2 * PAGE as usize,
            RW,
            libc::MAP_SHARED,
            Some(std::os::fd::AsFd::as_fd(&file)),
            0,
        )
        .map_err(e(what))
    };
    let mirrored = shared("mmap the memfd")?;
    let alias = shared("mmap the memfd again")?;
    fill(&alias, 0, &pattern(13, LEN));
    to_device(edu, scratch, mirrored.addr(), 13, "memfd -> edu")?;
    let through_alias = (&alias, 0);
    from_device(
        edu,
        scratch,
        mirrored.addr(),
        through_alias,
        14,
        "edu -> memfd",
    )?;
    let gone = mirrored.forget();
    // SAFETY: the owner is forgotten and only raw byte accesses referred into the range.
    unsafe { mm.munmap(gone) }.map_err(e("munmap"))?;
    ensure!(
        edu.core().translate(gone.start()).is_none(),
        "mapping survived munmap"
    );
    load_device(edu, scratch, &pattern(15, LEN))?;
    kmsg.drain()?;
    edu.dma_from_device_unmapped(gone.start(), LEN)
        .map_err(e("DMA to the unmapped memfd page"))?;
    kmsg.wait_dmar_fault(gone.start())?;
    check_eq(
        "memfd page after the blocked DMA (through the alias)",
        &read(&alias, 0, LEN),
        &pattern(14, LEN),
    )?;
    run.ok("munmap of a memfd mapping: edu DMA to the old address blocked (DMAR fault), the page (seen through an alias) unchanged");
    release(edu, alias)
}

fn dontneed(run: &mut Run, edu: &Context<Edu>, scratch: &Mapping) -> Res {
    let mm = edu.core().address_space().clone();
    let n = Mapping::anonymous(2 * PAGE as usize, RW).map_err(e("mmap"))?;
    fill(&n, 0, &pattern(6, LEN));
    to_device(edu, scratch, n.addr(), 6, "old page -> edu")?;
    // SAFETY: only raw byte accesses refer into `n`.
    unsafe { mm.madvise(n.range(), libc::MADV_DONTNEED) }.map_err(e("madvise"))?;
    ensure!(
        edu.core().translate(n.addr()).is_none(),
        "mapping survived MADV_DONTNEED"
    );
    ensure!(
        read(&n, 0, LEN).iter().all(|x| *x == 0),
        "MADV_DONTNEED left data"
    );
    fill(&n, 0, &pattern(7, LEN));
    to_device(edu, scratch, n.addr(), 7, "new page -> edu")?;
    from_device(edu, scratch, n.addr(), (&n, 0), 8, "edu -> new page")?;
    run.ok("MADV_DONTNEED: mapping torn down, edu reads and writes the new pages");
    release(edu, n)
}

/// A change made behind the mirror's back (a plain madvise, as an allocator does) is seen
/// through the userfaultfd REMOVE event: after settling, the mapping and its pin are gone.
fn observed_by_userfaultfd(run: &mut Run, edu: &Context<Edu>, scratch: &Mapping) -> Res {
    let mm = edu.core().address_space().clone();
    let n = Mapping::anonymous(2 * PAGE as usize, RW).map_err(e("mmap"))?;
    fill(&n, 0, &pattern(9, LEN));
    to_device(
        edu,
        scratch,
        n.addr(),
        9,
        "page -> edu (before a plain MADV_DONTNEED)",
    )?;
    let pinned = locked()?;
    n.discard(0, n.len())
        .map_err(e("plain madvise(MADV_DONTNEED)"))?;
    mm.settle().map_err(e("settle the userfaultfd events"))?;
    ensure!(
        edu.core().translate(n.addr()).is_none(),
        "a plain MADV_DONTNEED was not seen through userfaultfd"
    );
    ensure!(locked()? < pinned, "pin kept after the userfaultfd event");
    fill(&n, 0, &pattern(10, LEN));
    to_device(edu, scratch, n.addr(), 10, "new page -> edu")?;
    run.ok("plain MADV_DONTNEED seen through userfaultfd: mapping torn down, unpinned, new pages reach edu");
    release(edu, n)
}

fn mremap(run: &mut Run, edu: &Context<Edu>, scratch: &Mapping) -> Res {
    let mm = edu.core().address_space().clone();
    let r = Mapping::anonymous(2 * PAGE as usize, RW).map_err(e("mmap"))?;
    fill(&r, 0, &pattern(9, LEN));
    to_device(edu, scratch, r.addr(), 9, "old range -> edu")?;
    // The target: a reservation whose owner then owns the moved pages (unmapped on drop).
    let moved = Mapping::anonymous(2 * PAGE as usize, libc::PROT_NONE).map_err(e("mmap"))?;
    let old = r.forget();
    // SAFETY: the old range is ours and forgotten by its owner; the target is our reservation;
    // nothing refers into either.
    let new =
        unsafe { mm.mremap(old, old.len(), true, Some(moved.addr())) }.map_err(e("mremap"))?;
    ensure!(
        new == moved.addr(),
        "mremap moved to {new:#x}, not {:#x}",
        moved.addr()
    );
    ensure!(
        edu.core().translate(old.start()).is_none(),
        "mapping of the old range survived mremap"
    );
    check_eq("moved data", &read(&moved, 0, LEN), &pattern(9, LEN))?;
    from_device(
        edu,
        scratch,
        moved.addr(),
        (&moved, 0),
        10,
        "edu -> moved range",
    )?;
    fill(&moved, 0, &pattern(11, LEN));
    to_device(edu, scratch, moved.addr(), 11, "moved range -> edu")?;
    run.ok(
        "mremap: old mapping torn down, edu reads and writes the moved pages at their new address",
    );
    release(edu, moved)
}

fn memlock(run: &mut Run, address: &str, baseline: u64) -> Res {
    const CAP_IPC_LOCK: u32 = 14;
    const LIMIT: u64 = 256 << 10;
    integration_tests::guest::drop_capability(CAP_IPC_LOCK)?;
    ensure!(!driver::has_cap_ipc_lock(), "CAP_IPC_LOCK still effective");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK, LIMIT, LIMIT)
        .map_err(e("setrlimit(RLIMIT_MEMLOCK)"))?;
    let edu = open(address).map_err(e("reopen edu"))?;
    let big = Mapping::anonymous(1 << 20, RW).map_err(e("mmap"))?;
    let before = locked()?;
    match edu.map(big.addr(), 1 << 20, true) {
        Err(err) if err.to_string().contains("RLIMIT_MEMLOCK") => {
            println!("   {err}");
        }
        other => return Err(format!("over-limit mirror: {other:?}")),
    }
    let (maps, bytes, ..) = edu.core().footprint();
    ensure!(
        maps == 0 && bytes == 0,
        "failed mirror left {maps} mappings"
    );
    ensure!(
        edu.runtime().device().dma().iova().allocations() == 0,
        "failed mirror left IOVA allocations"
    );
    ensure!(locked()? == before, "failed mirror left pinned memory");
    // Under the limit it still works.
    let small = Mapping::anonymous(PAGE as usize, RW).map_err(e("mmap"))?;
    fill(&small, 0, &pattern(12, LEN));
    edu.dma_to_device(small.addr(), LEN)
        .map_err(e("DMA under the limit"))?;
    drop(edu);
    ensure!(
        locked()? == baseline,
        "VmLck {} after closing edu, {baseline} at start",
        locked()?
    );
    run.ok("over RLIMIT_MEMLOCK without CAP_IPC_LOCK: memlock error, nothing leaked, small DMA still works");
    Ok(())
}

/// Open edu at PCI `address` (bound to vfio-pci) through kernel VFIO, with a context mirroring
/// this process (it holds the runtime: dropping it closes the device).
fn open(address: &str) -> Result<Context<Edu>, driver::Error> {
    let spec = DeviceSpec::KernelVfio(address.to_owned());
    Runtime::<Edu>::open_with(spec, RuntimeOptions::default())?.create_context()
}

fn main_inner(run: &mut Run) -> Res {
    let address = match std::env::args().nth(1) {
        Some(a) => a,
        None => find_edu()?,
    };
    let mut kmsg = Kmsg::open(&address)?;
    let baseline = locked()?;
    {
        let edu = open(&address).map_err(e("open edu through kernel VFIO"))?;
        let caps = edu.core().address_space().capabilities();
        println!(
            "   mirror here: uffd {:?}; degraded: {:?}",
            caps.uffd, caps.degraded
        );
        run.ok(&format!("opened {address} through kernel VFIO (TYPE1v2)"));
        let scratch = Mapping::anonymous(PAGE as usize, RW).map_err(e("mmap"))?;
        basics(run, &edu)?;
        malloc_and_mmap(run, &edu, &scratch)?;
        munmap(run, &edu, &scratch, &mut kmsg)?;
        munmap_shared(run, &edu, &scratch, &mut kmsg)?;
        dontneed(run, &edu, &scratch)?;
        observed_by_userfaultfd(run, &edu, &scratch)?;
        mremap(run, &edu, &scratch)?;
        release(&edu, scratch)?;
    }
    ensure!(
        locked()? == baseline,
        "VmLck {} after closing edu, {baseline} at start",
        locked()?
    );
    run.ok("closing edu unpinned everything");
    memlock(run, &address, baseline)?;
    Ok(())
}

fn main() {
    let mut run = Run { checks: 0 };
    let start = Instant::now();
    match main_inner(&mut run) {
        Ok(()) => {
            println!(
                "EDU-GUEST-TEST: PASS ({} checks in {:.2} s)",
                run.checks,
                start.elapsed().as_secs_f64()
            );
        }
        Err(msg) => {
            println!("EDU-GUEST-TEST: FAIL after {} checks: {msg}", run.checks);
            std::process::exit(1);
        }
    }
}
