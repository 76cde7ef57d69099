//! PCI configuration space of the device (a type-0 header plus one MSI capability).

/// Vendor ID. Not assigned to anyone in the pci.ids database (checked 2026-11); chosen so that
/// no host driver binds the emulated device by accident.
pub const VENDOR_ID: u16 = 0xf1a5;
/// Device ID.
pub const DEVICE_ID: u16 = 0x0001;
/// Subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: u16 = VENDOR_ID;
/// Subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x0001;
/// Revision.
pub const REVISION: u8 = 0x01;
/// Class code (base class 0x12 "processing accelerator", subclass 0x00, prog-if 0x00).
pub const CLASS_CODE: u32 = 0x12_00_00;

/// Size of configuration space the device implements.
pub const CONFIG_SIZE: usize = 256;

/// Standard header offsets used by the driver.
pub mod off {
    /// Vendor ID (u16).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: usize = 0x02;
    /// Command register (u16).
    pub const COMMAND: usize = 0x04;
    /// Status register (u16).
    pub const STATUS: usize = 0x06;
    /// Revision (u8).
    pub const REVISION: usize = 0x08;
    /// Class code, 3 bytes at 0x09..0x0c (prog-if, subclass, base class).
    pub const CLASS: usize = 0x09;
    /// Header type (u8).
    pub const HEADER_TYPE: usize = 0x0e;
    /// BAR0 (u32; 64-bit memory BAR spanning BAR0 and BAR1).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (u16).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer (u8).
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt pin (u8); 0 = no INTx.
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod command {
    /// Memory space enable: BAR0 decodes.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master enable: the device may issue DMA.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Bits the device implements (others read 0 and ignore writes).
    pub const WRITABLE: u16 = MEMORY | BUS_MASTER | INTX_DISABLE;
}

/// Status register bit: capabilities list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Offset of the MSI capability.
pub const MSI_CAP: usize = 0x50;
/// MSI capability ID.
pub const MSI_CAP_ID: u8 = 0x05;
/// MSI message control: 64-bit capable (bit 7), multiple-message capable = 4 vectors (bits
/// 3..1 = 2), per-vector masking absent. Bit 0 (enable) and bits 6..4 (enabled vectors) are
/// written by the host.
pub const MSI_CONTROL_CAPS: u16 = (1 << 7) | (2 << 1);
/// MSI vectors the capability advertises: `2^(multiple-message capable)` from
/// [`MSI_CONTROL_CAPS`], i.e. 4. A host may enable any power of two up to it (1, 2 or 4); the
/// device raises only [`crate::vector::COUNT`] (3) of them, vector 3 is reserved: never raised.
pub const MSI_ADVERTISED_VECTORS: u32 = 1 << ((MSI_CONTROL_CAPS >> 1) & 0x7);
// The capability covers the device's vectors with the smallest power of two.
const _: () = assert!(
    MSI_ADVERTISED_VECTORS >= crate::vector::COUNT
        && MSI_ADVERTISED_VECTORS / 2 < crate::vector::COUNT
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_is_processing_accelerator() {
        assert_eq!(CLASS_CODE >> 16, 0x12);
    }

    #[test]
    fn msi_advertises_four_vectors() {
        assert_eq!(MSI_ADVERTISED_VECTORS, 4);
    }
}
