//! The driver's unsafe edge: memory the device shares with us, and raw OS interfaces.
pub mod dmabuf;
pub mod mapped_bar;
pub mod own_memory;
#[cfg(feature = "vfio")]
pub mod vfio;
