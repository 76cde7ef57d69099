//! Memory-management syscalls on the current process.

use nix::errno::Errno;

use sys_util::check;

pub(crate) const MADV_POPULATE_READ: libc::c_int = 22;
pub(crate) const MADV_POPULATE_WRITE: libc::c_int = 23;

/// MADV_POPULATE_READ/WRITE over `[addr, addr+len)`. Populating never changes what memory the
/// range refers to, so this is safe to call on any range (the kernel rejects bad ones).
pub(crate) fn populate(addr: u64, len: u64, write: bool) -> Result<(), Errno> {
    let advice = if write {
        MADV_POPULATE_WRITE
    } else {
        MADV_POPULATE_READ
    };
    loop {
        // SAFETY: POPULATE_* only faults pages in; it never unmaps, moves or changes memory
        // contents, so no Rust reference can be invalidated whatever the range is.
        let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
        match check(ret as libc::c_long) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Raw `madvise`.
///
/// # Safety
/// Advice such as MADV_DONTNEED or MADV_REMOVE discards memory contents: the caller guarantees no
/// live Rust reference depends on the contents of the range.
pub(crate) unsafe fn madvise(addr: u64, len: u64, advice: libc::c_int) -> Result<(), Errno> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    check(ret as libc::c_long).map(|_| ())
}

/// Raw `munmap`.
///
/// # Safety
/// The caller guarantees nothing still uses the range.
pub(crate) unsafe fn munmap(addr: u64, len: u64) -> Result<(), Errno> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
    check(ret as libc::c_long).map(|_| ())
}

/// Raw `mprotect`.
///
/// # Safety
/// The caller guarantees no live Rust reference relies on the access being removed.
pub(crate) unsafe fn mprotect(addr: u64, len: u64, prot: libc::c_int) -> Result<(), Errno> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot) };
    check(ret as libc::c_long).map(|_| ())
}

/// Raw `mremap`; returns the new address.
///
/// # Safety
/// The caller guarantees nothing still uses the old range (and, with MREMAP_FIXED, the target).
/// `flags` and `new_addr` go to the kernel as given (MREMAP_DONTUNMAP included).
pub(crate) unsafe fn mremap(
    old: u64,
    old_len: u64,
    new_len: u64,
    flags: libc::c_int,
    new_addr: u64,
) -> Result<u64, Errno> {
    // SAFETY: guaranteed by the caller; the fifth argument is an address the kernel takes as
    // a number (the MREMAP_FIXED target, or a placement hint with MREMAP_DONTUNMAP), never a
    // pointer it reads through.
    let ret = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            old_len as usize,
            new_len as usize,
            flags,
            new_addr as *mut libc::c_void,
        )
    };
    if ret == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        Ok(ret as u64)
    }
}
