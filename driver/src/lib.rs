//! Userspace HMM mirror driver for the MXA-1 accelerator. Under construction.
#![deny(missing_docs)]
