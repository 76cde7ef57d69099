//! Process helpers for tests and tools.

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::Error;

/// Forks a child that immediately calls `_exit(code)` and returns its pid. The child runs nothing
/// but `_exit`, which is async-signal-safe, so this is sound even in a multi-threaded process.
/// With userfaultfd FORK events enabled, this blocks until a monitor reads the FORK event.
pub fn fork_exiting_child(code: i32) -> Result<Pid, Error> {
    // SAFETY: fork duplicates the process; the child executes only `_exit`, which touches no lock
    // or allocator state that another thread may have held at the time of the fork.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(Error::sys("fork", Errno::last())),
        0 => {
            // SAFETY: _exit is async-signal-safe and ends the child without running destructors.
            unsafe { libc::_exit(code) }
        }
        child => Ok(Pid::from_raw(child)),
    }
}

/// Drops the current process to `uid`/`gid` with no supplementary groups and no capabilities,
/// keeping it dumpable so it can still open its own `/proc/self` files (a credential change
/// otherwise makes them root-owned). For tests of unprivileged behaviour.
pub fn become_unprivileged(uid: u32, gid: u32) -> Result<(), Error> {
    // SAFETY: setgroups reads zero entries from a null list; setgid, setuid and prctl take
    // integers only. None of them touches Rust-visible memory.
    let steps: [(&'static str, libc::c_int); 4] = unsafe {
        [
            ("setgroups", libc::setgroups(0, std::ptr::null())),
            ("setgid", libc::setgid(gid)),
            ("setuid", libc::setuid(uid)),
            (
                "prctl(PR_SET_DUMPABLE)",
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0),
            ),
        ]
    };
    for (op, ret) in steps {
        if ret != 0 {
            return Err(Error::sys(op, Errno::last()));
        }
    }
    Ok(())
}
