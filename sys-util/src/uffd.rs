//! The userfaultfd ABI and its calls, over libc (the `libc` crate has no UFFD definitions and the
//! Debian bookworm headers stop at feature bit 12, so everything is defined here from the kernel
//! UAPI `<linux/userfaultfd.h>`).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use crate::check;
use crate::ioctl::{io, ior, iowr};

/// `UFFD_API`: the API version UFFDIO_API asks for.
pub const UFFD_API: u64 = 0xAA;
/// The ioctl type of every UFFDIO_* request.
const UFFDIO: u8 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: a userfaultfd(2) flag; only user-mode faults are reported, which
/// unprivileged callers may ask for when `vm.unprivileged_userfaultfd=0`.
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// `UFFD_FEATURE_EVENT_FORK`: a FORK event with the child's userfaultfd.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`: a REMAP event on mremap.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`: a REMOVE event on madvise(DONTNEED/REMOVE).
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP`: an UNMAP event on munmap.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect mode on hugetlbfs and shmem.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_ASYNC`: write-protect faults are resolved by the kernel (Linux 6.7).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER_MODE_MISSING`: faults on missing pages are reported.
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`: write-protect faults are reported.
pub const REGISTER_MODE_WP: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
pub const EVENT_UNMAP: u8 = 0x16;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFDIO_API: libc::c_ulong = iowr(UFFDIO, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = iowr(UFFDIO, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: libc::c_ulong = ior(UFFDIO, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: libc::c_ulong = ior(UFFDIO, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = iowr(UFFDIO, 0x03, std::mem::size_of::<UffdioCopy>());
const USERFAULTFD_IOC_NEW: libc::c_ulong = io(UFFDIO, 0x00);

/// One `struct uffd_msg` (32 bytes, packed in the UAPI; every field here is naturally aligned).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RawMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// The event's union, as three u64s: for PAGEFAULT flags and address; FORK the child's fd;
    /// REMAP from, to and length; REMOVE and UNMAP start and end.
    pub arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<RawMsg>() == 32);

/// Creates a userfaultfd with the syscall, falling back to `/dev/userfaultfd` (which root or a
/// member of its group may use when `vm.unprivileged_userfaultfd=0`). `user_mode_only` asks for
/// [`UFFD_USER_MODE_ONLY`], which unprivileged callers are allowed. On failure, the syscall's
/// errno.
pub fn create(nonblocking: bool, user_mode_only: bool) -> Result<OwnedFd, Errno> {
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
pub fn api(fd: BorrowedFd<'_>, features: u64) -> Result<(u64, u64), Errno> {
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

/// Registers `[start, start+len)` with `mode` (`REGISTER_MODE_*`); returns the ioctls allowed
/// on the range.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
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
pub fn unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
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

/// Wakes threads blocked on a page fault in `[start, start+len)`.
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut arg = UffdioRange { start, len };
    // SAFETY: `arg` is a live uffdio_range the kernel only reads.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE, &mut arg as *mut UffdioRange) };
    check(ret as libc::c_long).map(|_| ())
}

/// Reads as many queued messages as fit in `buf`, retrying on EINTR. Returns 0 when nothing is
/// queued (EAGAIN on a non-blocking fd); a blocking fd waits for a message.
pub fn read_msgs(fd: BorrowedFd<'_>, buf: &mut [RawMsg]) -> Result<usize, Errno> {
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

/// What [`resolve_missing`] did with the next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Nothing was queued (a non-blocking fd), or the message was another event.
    Nothing,
    /// The page at this address was filled and its faulting threads woken.
    Filled(u64),
    /// A fault on the page at this address was read but UFFDIO_COPY failed (EEXIST: the page was
    /// populated meanwhile).
    CopyFailed(u64, Errno),
}

/// Resolves the next MISSING fault on `fd` with a copy of `page`: reads one message (as
/// [`read_msgs`] does, so a blocking fd waits for one) and, if it is a page fault, copies `page`
/// (one page: its length a power of two) to the page that faulted with UFFDIO_COPY, which also
/// wakes the faulting threads. `Err` only if the read failed.
pub fn resolve_missing(fd: BorrowedFd<'_>, page: &[u8]) -> Result<Missing, Errno> {
    let mut msg = [RawMsg::default()];
    if read_msgs(fd, &mut msg)? == 0 || msg[0].event != EVENT_PAGEFAULT {
        return Ok(Missing::Nothing);
    }
    let address = msg[0].arg[1] & !(page.len() as u64 - 1);
    let mut arg = UffdioCopy {
        dst: address,
        src: page.as_ptr() as u64,
        len: page.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: the kernel reads `page.len()` bytes from `page`, alive for the call, and writes
    // `arg.copy` and the faulting page of the range registered on `fd` (it checks the
    // destination lies there). It fills only a page that is not present (EEXIST otherwise), so
    // no byte anyone has read changes: the faulting threads see `page`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY, &mut arg as *mut UffdioCopy) };
    Ok(match check(ret as libc::c_long) {
        Ok(_) => Missing::Filled(address),
        Err(e) => Missing::CopyFailed(address, e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A MISSING fault on a fresh mapping is resolved with the page given and the faulting
    /// thread reads it. Skipped (with a line saying why) where this process may not use
    /// userfaultfd.
    #[test]
    fn a_missing_fault_is_resolved_with_the_page_given() {
        const PAGE: usize = 4096;
        let fd = match create(false, true) {
            Ok(fd) => fd,
            Err(e) => return eprintln!("SKIP: no userfaultfd here ({e})"),
        };
        api(fd.as_fd(), 0).unwrap();
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = p as u64;
        register(fd.as_fd(), start, PAGE as u64, REGISTER_MODE_MISSING).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: in our mapping, which nothing else references; the read blocks until the
            // fault is resolved.
            unsafe { std::ptr::read_volatile((start + 100) as *const u8) }
        });
        let page = vec![0x5au8; PAGE];
        let outcome = loop {
            match resolve_missing(fd.as_fd(), &page).unwrap() {
                Missing::Nothing => continue,
                other => break other,
            }
        };
        assert_eq!(outcome, Missing::Filled(start));
        assert_eq!(reader.join().unwrap(), 0x5a);
        unregister(fd.as_fd(), start, PAGE as u64).unwrap();
        // SAFETY: our mapping; the reader has finished.
        assert_eq!(unsafe { libc::munmap(p, PAGE) }, 0);
    }
}
