//! The driver's unsafe edge: memory the device shares with us, and raw OS interfaces.
pub mod dmabuf;
pub mod vfio;
