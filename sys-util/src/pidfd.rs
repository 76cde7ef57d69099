//! Process file descriptors.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;

/// `pidfd_open(pid, 0)`: a descriptor that refers to process `pid` (readable once it exits).
pub fn open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = crate::check(ret)?;
    // SAFETY: a fresh fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pidfd_of_this_process_opens_and_a_missing_pid_is_esrch() {
        match super::open(std::process::id() as libc::pid_t) {
            Ok(_) => {}
            // Kernels before 5.3 have no pidfd_open.
            Err(nix::errno::Errno::ENOSYS) => return,
            Err(e) => panic!("pidfd_open(self): {e}"),
        }
        // pid_max is at most 2^22: this pid is never in use.
        assert_eq!(super::open(1 << 23).unwrap_err(), nix::errno::Errno::ESRCH);
    }
}
