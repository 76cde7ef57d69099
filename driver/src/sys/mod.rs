//! The driver's unsafe edge: memory the device shares with us, and raw OS interfaces.
pub mod dmabuf;
pub mod shared_mem;
pub mod unix_msg;
pub mod vfio;
