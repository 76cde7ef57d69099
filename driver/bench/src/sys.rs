//! The benchmarks' raw kernel calls: CPU pinning, madvise/munmap baselines, a minimal
//! MISSING-mode userfaultfd handler (the UFFDIO_COPY round-trip baseline), and device command
//! submission on bench-owned memory. The only `unsafe` of `driver-bench`.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use driver::device::Ticket;
use driver::runtime::{Context, Op};
use driver::Error;

/// Page size the benchmarks use.
pub const PAGE: usize = 4096;

/// Pin the calling thread to `cpus` (threads it spawns later inherit the mask).
pub fn pin(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it; the syscall reads
    // it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CPUs online (at least 1).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system parameter.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// An anonymous private mapping owned by the benchmark, reached only through raw addresses.
pub struct Region {
    addr: usize,
    len: usize,
}

impl Region {
    /// `pages` 4 KiB pages, read-write, MADV_NOHUGEPAGE (so every page is a 4 KiB fault).
    pub fn new(pages: usize) -> io::Result<Region> {
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let r = Region {
            addr: p as usize,
            len,
        };
        r.madvise(libc::MADV_NOHUGEPAGE)?;
        Ok(r)
    }

    /// `pages` of address space without memory behind it until touched (MAP_NORESERVE), for
    /// sparse use: a churn over many distinct ranges.
    pub fn new_reserved(pages: usize) -> io::Result<Region> {
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            addr: p as usize,
            len,
        })
    }

    /// MADV_DONTNEED the page at `va` (inside the region): its memory goes back to the kernel.
    pub fn discard(&self, va: u64) -> io::Result<()> {
        let va = va as usize;
        if va < self.addr || va + PAGE > self.addr + self.len {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a page of our mapping that no Rust reference points into; its contents are
        // not needed any more.
        if unsafe { libc::madvise(va as *mut _, PAGE, libc::MADV_DONTNEED) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Address of page `i`.
    pub fn page(&self, i: usize) -> u64 {
        (self.addr + i * PAGE) as u64
    }

    /// madvise over the whole region (POPULATE_*, NOHUGEPAGE: no effect on Rust-visible memory).
    pub fn madvise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the region is ours and no Rust reference points into it; the advice values
        // used here populate or change backing policy, never discard data someone relies on.
        if unsafe { libc::madvise(self.addr as *mut _, self.len, advice) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// madvise over `len` bytes at `addr`, which must lie inside the region (same advice values
    /// as [`Region::madvise`]).
    pub fn madvise_range(&self, addr: u64, len: usize, advice: libc::c_int) -> io::Result<()> {
        let a = addr as usize;
        if a < self.addr || a.saturating_add(len) > self.addr + self.len {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: inside our region, which no Rust reference points into; as for `madvise`.
        if unsafe { libc::madvise(a as *mut _, len, advice) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// mprotect page `i` to PROT_NONE (splits the VMA; the device has never mapped it).
    pub fn protect_none(&self, i: usize) -> io::Result<()> {
        // SAFETY: a page of our mapping that no Rust reference points into.
        if unsafe { libc::mprotect((self.addr + i * PAGE) as *mut _, PAGE, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Write one byte in every page from the CPU.
    pub fn touch(&self) {
        for i in 0..self.len / PAGE {
            // SAFETY: in bounds of our read-write mapping; no reference aliases it.
            unsafe { std::ptr::write_volatile((self.addr + i * PAGE) as *mut u8, 1) };
        }
    }

    /// Time `munmap` of the whole region with libc (no mirror wrapper), consuming it.
    pub fn munmap_timed(self) -> Duration {
        let (a, l) = (self.addr, self.len);
        std::mem::forget(self);
        let t = Instant::now();
        // SAFETY: the region was forgotten; nothing refers to it.
        unsafe { libc::munmap(a as *mut _, l) };
        t.elapsed()
    }

    /// Give the range up without unmapping it (the caller unmaps through the mirror).
    pub fn forget(self) -> mirror::VaRange {
        let r =
            mirror::VaRange::new(self.addr as u64, self.len as u64).expect("page-aligned region");
        std::mem::forget(self);
        r
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our mapping; nothing refers to it any more.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// munmap `range` through the mirror's strict wrapper (device PTEs cleared and fenced before it
/// returns); returns the time it took.
pub fn mirror_munmap(mm: &mirror::AddressSpace, range: mirror::VaRange) -> Result<Duration, Error> {
    let t = Instant::now();
    // SAFETY: `range` comes from `Region::forget`: owned by nobody, referenced by nothing.
    unsafe { mm.munmap(range) }.map_err(Error::Mirror)?;
    Ok(t.elapsed())
}

/// Submit a device FILL of `len` bytes at `addr` (inside a bench [`Region`]).
pub fn submit_fill(ctx: &Context, addr: u64, len: u64) -> Result<Ticket, Error> {
    // SAFETY: `addr` lies in a bench-owned Region that Rust code reaches only through raw
    // pointers, and the caller waits for the ticket before unmapping it.
    unsafe {
        ctx.submit(Op::Fill {
            dst: addr,
            len,
            pattern: 0x5a5a,
        })
    }
}

/// A device PREFETCH of `len` bytes at `addr`: translation (and faults) without data.
pub fn submit_prefetch(ctx: &Context, addr: u64, len: u64) -> Result<Ticket, Error> {
    // SAFETY: as for `submit_fill`; the device only translates.
    unsafe { ctx.submit(Op::Prefetch { src: addr, len }) }
}

// --- userfaultfd MISSING-mode baseline ---

/// Round trips of a userfaultfd MISSING fault resolved by UFFDIO_COPY: the measuring thread
/// (pinned to `fault_cpu`) touches `n` fresh pages, a handler thread (pinned to `handler_cpu`)
/// reads each fault message and copies a page in. Returns one duration per fault.
pub fn uffd_round_trips(
    n: usize,
    fault_cpu: usize,
    handler_cpu: usize,
) -> io::Result<Vec<Duration>> {
    use sys_util::uffd::{self, Missing};
    let fd = uffd::create(false, true)?;
    uffd::api(fd.as_fd(), 0)?;
    let region = Region::new(n)?;
    uffd::register(
        fd.as_fd(),
        region.addr(),
        region.len() as u64,
        uffd::REGISTER_MODE_MISSING,
    )?;
    // Pinned before the handler starts: a failure here returns before any thread waits.
    pin(&[fault_cpu])?;
    let out = std::thread::scope(|s| -> io::Result<Vec<Duration>> {
        let handler = s.spawn(|| -> io::Result<()> {
            pin(&[handler_cpu])?;
            let src = vec![7u8; PAGE];
            let mut served = 0;
            while served < n {
                match uffd::resolve_missing(fd.as_fd(), &src)? {
                    Missing::Filled(_) => served += 1,
                    Missing::CopyFailed(_, e) => return Err(e.into()),
                    Missing::Nothing => {}
                }
            }
            Ok(())
        });
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let p = region.page(i) as *const u8;
            let t = Instant::now();
            // SAFETY: in bounds of our mapping; the fault blocks until the handler copies the
            // page.
            unsafe { std::ptr::read_volatile(p) };
            out.push(t.elapsed());
        }
        handler
            .join()
            .map_err(|_| io::Error::other("uffd handler panicked"))??;
        Ok(out)
    })?;
    drop(region);
    drop(fd);
    Ok(out)
}

/// CPU time of the calling thread.
pub fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; the clock id is a constant the kernel knows.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time in ns of this process's threads whose name starts with `prefix`, from
/// `/proc/self/task/*/schedstat` (time on a CPU, nanoseconds; threads that exited are not
/// counted). 0 where the kernel does not provide it.
pub fn threads_cpu_ns(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let dir = task.path();
        let named = std::fs::read_to_string(dir.join("comm"))
            .is_ok_and(|comm| comm.trim_end().starts_with(prefix));
        if !named {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) {
            total += stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    /// Every touched page is one fault the handler resolves (skipped where this process may
    /// not use userfaultfd).
    #[test]
    fn each_page_is_one_resolved_fault() {
        match super::uffd_round_trips(8, 0, 0) {
            Ok(times) => assert_eq!(times.len(), 8),
            Err(e) => eprintln!("SKIP: no userfaultfd here ({e})"),
        }
    }
}
