//! Locks that ignore poisoning.
//!
//! A thread that panics while holding a lock poisons it, and every later `lock()` returns an
//! error. The state behind the workspace's locks is kept consistent by construction at every
//! unlock point (updates are small and never leave a half-done invariant across a call that can
//! panic), so the guard of a poisoned lock is taken as it is: one panicking thread does not stop
//! the device, the registry or the daemon for everyone else.

use std::sync::{
    LockResult, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

/// The guard (or whatever else a lock operation returns) of a `LockResult`, poisoned or not.
/// For the operations without a helper of their own: `Condvar::wait`, `wait_timeout`,
/// `wait_timeout_while`, and the same calls of a model checker's look-alike types.
pub fn ignore_poison<G>(result: LockResult<G>) -> G {
    result.unwrap_or_else(PoisonError::into_inner)
}

/// Locks `m`, ignoring poisoning.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    ignore_poison(m.lock())
}

/// Read-locks `l`, ignoring poisoning.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    ignore_poison(l.read())
}

/// Write-locks `l`, ignoring poisoning.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    ignore_poison(l.write())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar};
    use std::time::Duration;

    /// Runs `f` on a thread that panics while `f`'s guard is held.
    fn panic_holding<T: Send + Sync + 'static>(what: &Arc<T>, f: fn(&T)) {
        let what = what.clone();
        assert!(std::thread::spawn(move || f(&what)).join().is_err());
    }

    #[test]
    fn a_poisoned_mutex_still_locks_with_its_value() {
        let m = Arc::new(Mutex::new(7));
        panic_holding(&m, |m| {
            let mut g = m.lock().unwrap();
            *g = 8;
            panic!("poisoning on purpose");
        });
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 8);
    }

    #[test]
    fn a_poisoned_rwlock_still_reads_and_writes() {
        let l = Arc::new(RwLock::new(1));
        panic_holding(&l, |l| {
            let mut g = l.write().unwrap();
            *g = 2;
            panic!("poisoning on purpose");
        });
        assert!(l.is_poisoned());
        assert_eq!(*read(&l), 2);
        *write(&l) = 3;
        assert_eq!(*read(&l), 3);
    }

    #[test]
    fn a_condvar_wait_on_a_poisoned_mutex_returns_the_guard() {
        let m = Arc::new(Mutex::new(0));
        panic_holding(&m, |m| {
            let mut g = m.lock().unwrap();
            *g = 5;
            panic!("poisoning on purpose");
        });
        let cv = Condvar::new();
        let (g, timeout) = ignore_poison(cv.wait_timeout(lock(&m), Duration::from_millis(1)));
        assert!(timeout.timed_out());
        assert_eq!(*g, 5);
    }
}
