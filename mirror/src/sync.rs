//! Sync primitives for the sequence-protocol core: std normally, loom's under `--cfg loom` so the
//! model checker can explore every interleaving of [`crate::seq`].

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU64, Ordering},
    Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU64, Ordering},
    Condvar, Mutex,
};

/// Locks `m`, ignoring poisoning: a panicking invalidation callback is caught and logged by the
/// registry, and the protocol state it protects stays consistent because every update is a single
/// step under the lock.
#[cfg(not(loom))]
pub(crate) use sys_util::sync::lock;

/// Locks loom's `m`, ignoring poisoning (as `sys_util::sync::lock` does std's).
#[cfg(loom)]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    sys_util::sync::ignore_poison(m.lock())
}
