//! The hmm-tests fork cases (`anon_write_child`, `anon_write_child_shared`), in their own process
//! because fork is process-wide, serialized by a lock.
//!
//! A forked child of this multi-threaded test process may only do async-signal-safe work, so it
//! cannot bring up a runtime of its own. The child that "builds its own mirror" is therefore this
//! test binary run again (fork + exec) in child mode (`HMM_FORK_CHILD_FD`), which maps the
//! parent's shared memory from an inherited fd. Private (copy-on-write) memory does not survive an
//! exec, so in `anon_write_child` the child checks and writes its copy with the CPU only; the
//! parent's device side is what the kernel test cannot check and we assert.
mod hmm;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Runtime, RuntimeOptions};
use hmm::*;
use mirror::Mapping;
use sys_util::sync::lock;

static FORKS: Mutex<()> = Mutex::new(());

const CHILD_FD: &str = "HMM_FORK_CHILD_FD";
const CHILD_LEN: &str = "HMM_FORK_CHILD_LEN";

/// The emulated device; in the MXA-1 guest (tests/qemu/mxa-run.sh) the kernel's VFIO, where the
/// child's own mirror gets the second device (a VFIO group is opened by one process at a time).
fn open() -> Arc<Runtime> {
    if integration_tests::guest::in_guest() {
        return integration_tests::guest::open(ServiceMode::Interrupt);
    }
    let options = RuntimeOptions {
        mode: ServiceMode::Interrupt,
        ..Default::default()
    };
    Runtime::open(DeviceSpec::emulated(), options).expect("open the emulated device")
}

/// Port of `anon_write_child` (migrate = 0 rows, with and without THP), adapted: the parent's data
/// is device-mapped before the fork; the child sees the parent's data and overwrites its own
/// copy (CPU); the parent's data is intact, its device view equals its CPU view, and a device
/// write after the fork lands in the parent's page (not in a page the child took).
#[test]
fn anon_write_child() {
    let _serial = lock(&FORKS);
    let rt = open();
    let ctx = hmm_ctx(&rt);
    for use_thp in [false, true] {
        let m = buffer(RW);
        if use_thp {
            // SAFETY: advice on our own mapping.
            unsafe { libc::madvise(m.as_ptr().cast(), BUF, libc::MADV_HUGEPAGE) };
        }
        for i in 0..ints(&m) {
            write_u32(&m, i, i as u32);
        }
        quiesce(&ctx);
        let before = ctx.stats();
        let sum = device_checksum(&ctx, m.addr(), BUF).unwrap();
        assert_eq!(ctx.stats().fault_batches - before.fault_batches, 1);
        assert_eq!(sum, cpu_checksum(m.addr(), BUF));
        let (addr, n) = (m.addr() as *mut u32, ints(&m));
        // SAFETY: the child runs only volatile loads/stores on its own copy and _exit, all
        // async-signal-safe.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let mut code = 0;
            for i in 0..n {
                // SAFETY: the child's copy of the parent's mapping.
                unsafe {
                    if std::ptr::read_volatile(addr.add(i)) != i as u32 {
                        code = 1;
                    }
                    std::ptr::write_volatile(addr.add(i), (i as u32).wrapping_neg());
                }
            }
            for i in 0..n {
                // SAFETY: as above.
                if unsafe { std::ptr::read_volatile(addr.add(i)) } != (i as u32).wrapping_neg() {
                    code = 2;
                }
            }
            // SAFETY: ends the child without running anything else.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: reaping our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child (thp {use_thp}) saw wrong data: status {status:#x}"
        );
        for i in 0..ints(&m) {
            assert_eq!(read_u32(&m, i), i as u32, "thp {use_thp}: parent int {i}");
        }
        assert_eq!(
            device_checksum(&ctx, m.addr(), BUF).unwrap(),
            cpu_checksum(m.addr(), BUF),
            "thp {use_thp}: the parent's device view equals its CPU view after fork"
        );
        device_fill(&ctx, m.addr(), BUF, 0x7e7e_7e7e_7e7e_7e7e).unwrap();
        for i in (0..BUF).step_by(PAGE / 2) {
            assert_eq!(
                m.read_byte(i),
                0x7e,
                "thp {use_thp}: device write reached the parent"
            );
        }
        let r = m.forget();
        // SAFETY: ours, nothing refers into it.
        unsafe { ctx.address_space().munmap(r).unwrap() };
    }
}

/// The shared region as an fd a re-executed child can map: the MAP_SHARED|MAP_ANONYMOUS object
/// itself through /proc/self/map_files (needs CAP_SYS_ADMIN), or else a memfd (also shmem).
fn shared_region(len: usize) -> (u64, OwnedFd, &'static str) {
    let m = Mapping::with_flags(len, RW, libc::MAP_SHARED | libc::MAP_ANONYMOUS, None, 0).unwrap();
    let path = format!(
        "/proc/self/map_files/{:x}-{:x}",
        m.addr(),
        m.addr() + len as u64
    );
    let cpath = std::ffi::CString::new(path).unwrap();
    // SAFETY: a valid C string; the fd is owned below.
    let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR) };
    if fd >= 0 {
        // SAFETY: fresh fd we own.
        return (
            m.forget().start(),
            unsafe { OwnedFd::from_raw_fd(fd) },
            "MAP_SHARED|MAP_ANONYMOUS",
        );
    }
    drop(m);
    let name = std::ffi::CString::new("hmm-shared").unwrap();
    // SAFETY: valid C string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizing our memfd, then mapping it.
    let p = unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as i64), 0);
        libc::mmap(
            std::ptr::null_mut(),
            len,
            RW,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (p as u64, fd, "memfd")
}

/// Port of `anon_write_child_shared`: the child (this binary re-executed, with its own runtime and
/// mirror) device-writes `-i` into memory shared with the parent; the parent's CPU sees `-i`, and
/// the parent's device view, mapped before the child ran, equals its CPU view.
#[test]
fn anon_write_child_shared() {
    let _serial = lock(&FORKS);
    let rt = open();
    let ctx = hmm_ctx(&rt);
    let len = BUF;
    let (addr, fd, kind) = shared_region(len);
    for i in 0..len / 4 {
        // SAFETY: our shared mapping.
        unsafe { std::ptr::write_volatile((addr as *mut u32).add(i), i as u32) };
    }
    assert_eq!(
        device_checksum(&ctx, addr, len).unwrap(),
        cpu_checksum(addr, len)
    );
    // The fd must survive the exec: clear FD_CLOEXEC on it.
    // SAFETY: fcntl on our fd.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_writes_through_its_own_mirror",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_FD, fd.as_raw_fd().to_string())
        .env(CHILD_LEN, len.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "child ({kind}): {status}");
    for i in 0..len / 4 {
        assert_eq!(
            read_u32_at(addr, i),
            (i as u32).wrapping_neg(),
            "{kind}: parent sees the child's device write at int {i}"
        );
    }
    assert_eq!(
        device_checksum(&ctx, addr, len).unwrap(),
        cpu_checksum(addr, len),
        "{kind}: the parent's device view equals its CPU view"
    );
    // SAFETY: ours, nothing refers into it.
    unsafe {
        ctx.address_space()
            .munmap(mirror::VaRange::new(addr, len as u64).unwrap())
            .unwrap()
    };
}

/// Child mode of `anon_write_child_shared` (does nothing unless run by it): map the inherited
/// shared memory, check the parent's data, open an own runtime, device-write `-i`, check it.
#[test]
fn child_writes_through_its_own_mirror() {
    let (Ok(fd), Ok(len)) = (std::env::var(CHILD_FD), std::env::var(CHILD_LEN)) else {
        return;
    };
    let fd: i32 = fd.parse().unwrap();
    let len: usize = len.parse().unwrap();
    let addr = map_shared_aligned(fd, len, RW);
    for i in 0..len / 4 {
        assert_eq!(
            read_u32_at(addr, i),
            i as u32,
            "child sees the parent's data"
        );
    }
    let rt = open();
    let ctx = hmm_ctx(&rt);
    let mirror = bounce(&ctx, len);
    for i in 0..len / 4 {
        write_u32(&mirror, i, (i as u32).wrapping_neg());
    }
    let before = ctx.stats();
    device_write(&ctx, addr, mirror.addr(), len).unwrap();
    let after = ctx.stats();
    assert_eq!(after.fault_batches - before.fault_batches, 1, "{after:?}");
    assert_eq!(
        after.pages_mapped - before.pages_mapped,
        (len / PAGE) as u64
    );
    for i in 0..len / 4 {
        assert_eq!(read_u32_at(addr, i), (i as u32).wrapping_neg());
    }
}
