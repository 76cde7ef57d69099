//! An `hmm_mirror`-style registry for one process address space, in userspace.
//!
//! * [`AddressSpace`]: one per mirrored process (this one, or another by pid for a daemon). It
//!   holds any number of [`Subscription`]s (interval notifiers with the kernel's
//!   `mmu_interval_notifier` sequence protocol), the CPU [`Walker`] (the `hmm_range_fault`
//!   counterpart: [`AddressSpace::snapshot`] and [`AddressSpace::fault`]) and the event sources:
//!   userfaultfd UNMAP/REMOVE/REMAP/FORK events ([`AddressSpace::track`]), the explicit API
//!   ([`AddressSpace::invalidate`], [`AddressSpace::protect`] and the `munmap`/`mremap`/`madvise`/
//!   `mprotect` wrappers) and process exit through a pidfd.
//! * The fault path: `seq = sub.read_begin()`, fault + snapshot + pin without locks, then
//!   `sub.lock()` and `read_retry(seq)` before installing ([`Subscription::mirror_range`] does
//!   all of it, bounded by the retry budget).
//! * What is promised (strict vs eventual coherence, safety through pins) is in
//!   `docs/semantics.md`.
//!
//! `unsafe` is confined to [`sys`] (syscall and ioctl bindings) and `mm_ops` (the mapping-changing
//! wrappers, which are `unsafe fn` like the syscalls they wrap).
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod address_space;
mod error;
#[allow(unsafe_code)]
mod mm_ops;
mod monitor;
mod range;
mod registry;
mod seq;
mod stats;
mod sync;
#[allow(unsafe_code)]
pub mod sys;
pub mod uffd;
mod vma;
mod walker;

pub use address_space::{AddressSpace, Capabilities, Config};
pub use error::{Error, Result};
pub use monitor::ForkHandler;
pub use range::{Access, Perms, VaRange, PAGE_SIZE, VA_LIMIT};
pub use registry::{
    AgeQuery, Callbacks, EventKind, EventObserver, EventRecord, EventSource, Invalidation, ReadSeq,
    RetryBudget, SubscriberGuard, Subscription, DEFAULT_RETRY_BUDGET,
};
pub use stats::{LatencySummary, Stats};
pub use sys::mapping::Mapping;
pub use uffd::UffdCaps;
pub use vma::{Vma, VmaKind};
pub use walker::{PageError, PageInfo, PageSize, PageState, Snapshot, Walker, WalkerCaps};
