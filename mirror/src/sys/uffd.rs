//! userfaultfd binding over libc (the `libc` crate has no UFFD definitions and the bookworm headers
//! stop at feature bit 12, so everything is defined here from the kernel UAPI).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::{check, io, ior, iowr};

pub(crate) const UFFD_API: u64 = 0xAA;
const UFFDIO: u8 = 0xAA;
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub(crate) const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub(crate) const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub(crate) const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub(crate) const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub(crate) const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub(crate) const FEATURE_WP_ASYNC: u64 = 1 << 15;

pub(crate) const REGISTER_MODE_WP: u64 = 1 << 1;

pub(crate) const EVENT_PAGEFAULT: u8 = 0x12;
pub(crate) const EVENT_FORK: u8 = 0x13;
pub(crate) const EVENT_REMAP: u8 = 0x14;
pub(crate) const EVENT_REMOVE: u8 = 0x15;
pub(crate) const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

const UFFDIO_API: libc::c_ulong = iowr(UFFDIO, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = iowr(UFFDIO, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: libc::c_ulong = ior(UFFDIO, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: libc::c_ulong = ior(UFFDIO, 0x02, std::mem::size_of::<UffdioRange>());
const USERFAULTFD_IOC_NEW: libc::c_ulong = io(UFFDIO, 0x00);

/// One `struct uffd_msg` (32 bytes, packed in the UAPI; every field here is naturally aligned).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct RawMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<RawMsg>() == 32);

/// Creates a userfaultfd with the syscall, falling back to `/dev/userfaultfd` (which root or a
/// member of its group may use when `vm.unprivileged_userfaultfd=0`).
/// `user_mode_only` asks for UFFD_USER_MODE_ONLY, which unprivileged callers are allowed.
pub(crate) fn create(nonblocking: bool, user_mode_only: bool) -> Result<OwnedFd, Errno> {
    let mut flags = libc::O_CLOEXEC;
    if nonblocking {
        flags |= libc::O_NONBLOCK;
    }
    if user_mode_only {
        flags |= UFFD_USER_MODE_ONLY;
    }
    // SAFETY: userfaultfd takes one int argument and returns a new fd or -1; no memory is passed.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    match check(ret) {
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }),
        Err(syscall_err) => create_via_dev(flags).map_err(|_| syscall_err),
    }
}

fn create_via_dev(flags: libc::c_int) -> Result<OwnedFd, Errno> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    let fd = check(ret as libc::c_long)?;
    // SAFETY: the ioctl returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// UFFDIO_API handshake; returns (features granted, ioctls available).
pub(crate) fn api(fd: BorrowedFd<'_>, features: u64) -> Result<(u64, u64), Errno> {
    let mut arg = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `arg` is a live, correctly sized uffdio_api the kernel reads and writes back.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut arg as *mut UffdioApi) };
    check(ret as libc::c_long)?;
    Ok((arg.features, arg.ioctls))
}

/// Registers `[start, start+len)` with the given mode; returns the ioctls allowed on the range.
pub(crate) fn register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
    let mut arg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: `arg` is a live uffdio_register; the kernel only reads the range/mode and writes ioctls.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            UFFDIO_REGISTER,
            &mut arg as *mut UffdioRegister,
        )
    };
    check(ret as libc::c_long)?;
    Ok(arg.ioctls)
}

/// Unregisters `[start, start+len)`.
pub(crate) fn unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut arg = UffdioRange { start, len };
    // SAFETY: `arg` is a live uffdio_range the kernel only reads.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            UFFDIO_UNREGISTER,
            &mut arg as *mut UffdioRange,
        )
    };
    check(ret as libc::c_long).map(|_| ())
}

/// Wakes threads blocked on a page fault in `[start, start+len)` (only used if a synchronous fault
/// message ever arrives, which WP_ASYNC should prevent).
pub(crate) fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut arg = UffdioRange { start, len };
    // SAFETY: `arg` is a live uffdio_range the kernel only reads.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE, &mut arg as *mut UffdioRange) };
    check(ret as libc::c_long).map(|_| ())
}

/// Reads as many queued messages as fit in `buf`. Returns 0 when nothing is queued (EAGAIN on a
/// non-blocking fd).
pub(crate) fn read_msgs(fd: BorrowedFd<'_>, buf: &mut [RawMsg]) -> Result<usize, Errno> {
    let bytes = std::mem::size_of_val(buf);
    loop {
        // SAFETY: `buf` is a writable slice of `bytes` bytes; RawMsg is plain old data so any bytes
        // the kernel writes form valid values.
        let ret = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        match check(ret as libc::c_long) {
            Ok(n) => return Ok(n as usize / std::mem::size_of::<RawMsg>()),
            Err(Errno::EAGAIN) => return Ok(0),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `pidfd_open(pid, 0)`.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = check(ret)?;
    // SAFETY: fresh fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Takes ownership of the child userfaultfd a FORK message announces. The kernel installed that
/// fd in this process's table for the reader alone, so owning it here is sound; callers must pass
/// only the fd number of a FORK message they have just read.
pub(crate) fn adopt_fork_fd(fd: libc::c_int) -> OwnedFd {
    // SAFETY: the FORK event's fd was installed for us by the kernel and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
