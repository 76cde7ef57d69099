//! Accounting of pinned memory against RLIMIT_MEMLOCK.
//!
//! Kernel VFIO charges every pinned page to the process's locked memory (unless it has
//! CAP_IPC_LOCK) and fails the map with a bare ENOMEM past the limit. We count what we pin and
//! refuse before the kernel does, with an error that names the limit and the fix.

#[cfg(feature = "vfio")]
use std::sync::atomic::{AtomicU64, Ordering};

/// Pinning would exceed the locked-memory limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pinning {request} more bytes would exceed RLIMIT_MEMLOCK ({limit} bytes; {pinned} already \
     pinned by this driver): raise the limit (`ulimit -l`, systemd `LimitMEMLOCK=`, \
     /etc/security/limits.conf) or run with CAP_IPC_LOCK"
)]
pub struct MemlockExceeded {
    /// Bytes requested.
    pub request: u64,
    /// Bytes already pinned.
    pub pinned: u64,
    /// The limit.
    pub limit: u64,
}

/// The effective locked-memory limit: `None` when unlimited or when CAP_IPC_LOCK lifts it.
pub fn effective_limit() -> Option<u64> {
    if has_cap_ipc_lock() {
        return None;
    }
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft != libc::RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// True if this process's effective capabilities include CAP_IPC_LOCK.
pub fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Bytes this driver has pinned, checked against a limit (kernel VFIO is the backend that pins).
#[cfg(feature = "vfio")]
#[derive(Debug)]
pub struct PinAccount {
    pinned: AtomicU64,
    limit: Option<u64>,
}

#[cfg(feature = "vfio")]
impl PinAccount {
    /// An account with `limit` (`None` = unlimited).
    pub fn new(limit: Option<u64>) -> PinAccount {
        PinAccount {
            pinned: AtomicU64::new(0),
            limit,
        }
    }

    /// Bytes currently charged.
    pub fn pinned(&self) -> u64 {
        self.pinned.load(Ordering::Relaxed)
    }

    /// Charge `bytes`, or refuse without charging anything.
    pub fn charge(&self, bytes: u64) -> Result<(), MemlockExceeded> {
        let mut current = self.pinned.load(Ordering::Relaxed);
        loop {
            let next = current.saturating_add(bytes);
            if let Some(limit) = self.limit {
                if next > limit {
                    return Err(MemlockExceeded {
                        request: bytes,
                        pinned: current,
                        limit,
                    });
                }
            }
            match self.pinned.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// Give back `bytes` charged earlier.
    pub fn uncharge(&self, bytes: u64) {
        let prev = self.pinned.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(prev >= bytes, "uncharged more than charged");
    }
}

#[cfg(all(test, feature = "vfio"))]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_and_names_it() {
        let a = PinAccount::new(Some(8 << 20));
        a.charge(6 << 20).unwrap();
        let e = a.charge(4 << 20).unwrap_err();
        assert_eq!(e.pinned, 6 << 20);
        assert!(e.to_string().contains("RLIMIT_MEMLOCK"));
        assert!(e.to_string().contains("CAP_IPC_LOCK"));
        assert_eq!(a.pinned(), 6 << 20);
        a.uncharge(6 << 20);
        a.charge(8 << 20).unwrap();
    }

    #[test]
    fn unlimited_never_refuses() {
        let a = PinAccount::new(None);
        a.charge(u64::MAX / 2).unwrap();
        a.charge(u64::MAX / 2).unwrap();
    }
}
