//! Raw kernel interfaces: with the private `mm_ops` module (the mapping-changing wrappers), the
//! only place where this crate uses `unsafe`.
//!
//! Each binding checks its return value and turns a failure into [`crate::Error`] with the name of
//! the operation, so callers above this module never see a bare errno. What the workspace shares
//! (the ioctl number encoders, the userfaultfd ABI, `pidfd_open`, `check`) comes from `sys_util`.

pub mod baseline;
pub(crate) mod fdpass;
pub mod mapping;
pub(crate) mod mm;
pub mod process;
pub(crate) mod procfs;
pub(crate) mod uffd;
