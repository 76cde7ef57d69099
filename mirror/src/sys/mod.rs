//! Raw kernel interfaces: with the private `mm_ops` module (the mapping-changing wrappers), the
//! only place where this crate uses `unsafe`.
//!
//! Each binding checks its return value and turns a failure into [`crate::Error`] with the name of
//! the operation, so callers above this module never see a bare errno.

pub mod baseline;
pub(crate) mod fdpass;
pub mod mapping;
pub(crate) mod mm;
pub mod process;
pub(crate) mod procfs;
pub(crate) mod uffd;

use nix::errno::Errno;

/// Encodes an `_IOWR(ty, nr, size)` ioctl request number (asm-generic layout, as on x86-64 and arm64).
pub(crate) const fn iowr(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((3u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}

/// Encodes an `_IOR(ty, nr, size)` ioctl request number.
pub(crate) const fn ior(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((2u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}

/// Encodes an `_IO(ty, nr)` ioctl request number.
pub(crate) const fn io(ty: u8, nr: u8) -> libc::c_ulong {
    (((ty as u64) << 8) | nr as u64) as libc::c_ulong
}

/// Converts a `-1`-style libc return value into a `Result` carrying errno.
pub(crate) fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}
