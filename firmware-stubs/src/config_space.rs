//! PCI configuration space: a type-0 header and one MSI capability.
//!
//! Read-only fields ignore writes; writable fields keep only their implemented bits. BAR0 is a
//! 64-bit non-prefetchable memory BAR of `BAR0_SIZE` bytes spanning the BAR0 and BAR1 dwords,
//! sized the standard way (write all ones, read back the size mask).

use accel_abi::config::{self, command, off};
use accel_abi::regs::BAR0_SIZE;

/// Memory BAR, 64-bit (type 0b10 in bits 2..1).
const BAR_MEM64: u32 = 0b100;
const MSI: usize = config::MSI_CAP;
/// MSI control bits the host may write: enable and multiple-message enable.
const MSI_CONTROL_WRITABLE: u16 = 0x0001 | 0x0070;

pub(crate) struct ConfigSpace {
    bytes: [u8; config::CONFIG_SIZE],
}

impl ConfigSpace {
    pub(crate) fn new() -> Self {
        let mut s = ConfigSpace {
            bytes: [0; config::CONFIG_SIZE],
        };
        s.put16(off::VENDOR_ID, config::VENDOR_ID);
        s.put16(off::DEVICE_ID, config::DEVICE_ID);
        s.put16(off::STATUS, config::STATUS_CAP_LIST);
        s.bytes[off::REVISION] = config::REVISION;
        let class = config::CLASS_CODE.to_le_bytes();
        s.bytes[off::CLASS..off::CLASS + 3].copy_from_slice(&class[..3]);
        s.put32(off::BAR0, BAR_MEM64);
        s.put16(off::SUBSYSTEM_VENDOR_ID, config::SUBSYSTEM_VENDOR_ID);
        s.put16(off::SUBSYSTEM_ID, config::SUBSYSTEM_ID);
        s.bytes[off::CAP_PTR] = MSI as u8;
        s.bytes[MSI] = config::MSI_CAP_ID;
        s.bytes[MSI + 1] = 0;
        s.put16(MSI + 2, config::MSI_CONTROL_CAPS);
        s
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn get16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    pub(crate) fn command(&self) -> u16 {
        self.get16(off::COMMAND)
    }

    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.bytes.get(o).copied())
                .unwrap_or(0xff);
        }
    }

    /// Byte-wise write honouring per-byte write masks.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|o| *o < config::CONFIG_SIZE)
            else {
                continue;
            };
            let mask = Self::write_mask(at);
            self.bytes[at] = (self.bytes[at] & !mask) | (b & mask);
        }
    }

    fn write_mask(at: usize) -> u8 {
        let cmd = command::WRITABLE.to_le_bytes();
        let bar_mask = (!(BAR0_SIZE as u32 - 1)).to_le_bytes();
        let msi_ctrl = MSI_CONTROL_WRITABLE.to_le_bytes();
        match at {
            a if a == off::COMMAND => cmd[0],
            a if a == off::COMMAND + 1 => cmd[1],
            // BAR0 low dword: address bits above the size; the type bits are read-only.
            a if (off::BAR0..off::BAR0 + 4).contains(&a) => bar_mask[a - off::BAR0],
            // BAR1: the upper half of the 64-bit address, fully writable.
            a if (off::BAR0 + 4..off::BAR0 + 8).contains(&a) => 0xff,
            a if a == MSI + 2 => msi_ctrl[0],
            a if a == MSI + 3 => msi_ctrl[1],
            // Message address low (dword aligned: bits 1..0 read as zero), high, data.
            a if a == MSI + 4 => 0xfc,
            a if (MSI + 5..MSI + 12).contains(&a) => 0xff,
            a if (MSI + 12..MSI + 14).contains(&a) => 0xff,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_bar_sizing() {
        let mut c = ConfigSpace::new();
        let mut id = [0u8; 4];
        c.read(0, &mut id);
        assert_eq!(u16::from_le_bytes([id[0], id[1]]), config::VENDOR_ID);
        c.write(off::BAR0 as u64, &[0xff; 4]);
        let mut bar = [0u8; 4];
        c.read(off::BAR0 as u64, &mut bar);
        assert_eq!(u32::from_le_bytes(bar), !(BAR0_SIZE as u32 - 1) | BAR_MEM64);
        c.write(off::VENDOR_ID as u64, &[0, 0]);
        c.read(0, &mut id);
        assert_eq!(u16::from_le_bytes([id[0], id[1]]), config::VENDOR_ID);
        let mut past = [0u8; 4];
        c.read(254, &mut past);
        assert_eq!(&past[2..], &[0xff, 0xff]);
    }

    #[test]
    fn command_keeps_implemented_bits() {
        let mut c = ConfigSpace::new();
        c.write(off::COMMAND as u64, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), command::WRITABLE);
    }
}
