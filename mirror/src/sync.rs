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
    Condvar, Mutex, MutexGuard,
};

/// Locks `m`, ignoring poisoning: a panicking invalidation callback is caught and logged by the
/// registry, and the protocol state it protects stays consistent because every update is a single
/// step under the lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
