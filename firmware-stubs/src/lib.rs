//! The emulated MXA-1 accelerator (see docs/device.md). Under construction.
#![deny(missing_docs)]
