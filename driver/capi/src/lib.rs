//! The driver's C ABI: `libmirrordrv.so` and `libmirrordrv.a`, with the header
//! `include/mirrordrv.h` generated from this crate by cbindgen
//! (`cargo run -p driver-capi --example gen-header`; a test fails when the committed header is
//! not what cbindgen makes of the source now).
//!
//! Every entry point is an `extern "C"` function of [`ffi`], the only module with `unsafe`.
//! Handles are numbers looked up in a table ([`registry`]), never pointers the library
//! dereferences, so a wrong or destroyed handle is an error code, not a crash; every entry
//! point catches panics; errors are [`status::mdrv_status`] codes plus a thread-local message.
//! The lifetime rules (what the caller keeps alive until completion, what destroying a
//! context or device does to work in flight) are in the header's comments and docs/capi.md.
#![deny(missing_docs)]

pub mod ffi;
pub mod registry;
pub mod status;
