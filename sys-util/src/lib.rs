//! OS helpers shared by every crate of the workspace, each defined once: poison-ignoring lock
//! helpers ([`sync`]), ioctl request number encoders ([`ioctl`]), the userfaultfd ABI and its
//! calls ([`uffd`]), `pidfd_open` ([`pidfd`]) and descriptor passing over Unix sockets
//! ([`socket`]).
//!
//! A leaf crate: it depends on `libc` and `nix` only, and knows no device, no mirror and no
//! protocol. `unsafe` is denied crate-wide and allowed only in the modules at the OS edge
//! ([`uffd`], [`pidfd`], [`socket`]), each block with its `// SAFETY:` line.

#![deny(missing_docs)]
#![deny(unsafe_code)]

use nix::errno::Errno;

pub mod ioctl;
#[allow(unsafe_code)]
pub mod pidfd;
#[allow(unsafe_code)]
pub mod socket;
pub mod sync;
#[allow(unsafe_code)]
pub mod uffd;

/// Converts a `-1`-style libc return value into a `Result` carrying errno.
pub fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}
