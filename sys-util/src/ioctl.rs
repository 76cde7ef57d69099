//! ioctl request numbers, encoded as the asm-generic `_IO`/`_IOR`/`_IOWR` macros do (the layout
//! of x86-64 and arm64): direction in bits 30-31, argument size in bits 16-29, type in bits
//! 8-15, number in bits 0-7.

/// `_IO(ty, nr)`: no argument, or one passed by value.
pub const fn io(ty: u8, nr: u8) -> libc::c_ulong {
    (((ty as u64) << 8) | nr as u64) as libc::c_ulong
}

/// `_IOR(ty, nr, size)`: the kernel writes an argument of `size` bytes.
pub const fn ior(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((2u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}

/// `_IOWR(ty, nr, size)`: the kernel reads and writes an argument of `size` bytes.
pub const fn iowr(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((3u64 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request numbers as the kernel headers define them (values printed by a C program
    /// including `<linux/userfaultfd.h>` and `<linux/vfio.h>` on x86-64).
    #[test]
    fn encoders_match_the_kernel_headers() {
        assert_eq!(iowr(0xAA, 0x3F, 24), 0xc018_aa3f); // UFFDIO_API
        assert_eq!(iowr(0xAA, 0x00, 32), 0xc020_aa00); // UFFDIO_REGISTER
        assert_eq!(ior(0xAA, 0x01, 16), 0x8010_aa01); // UFFDIO_UNREGISTER
        assert_eq!(iowr(0xAA, 0x03, 40), 0xc028_aa03); // UFFDIO_COPY
        assert_eq!(io(0xAA, 0x00), 0xaa00); // USERFAULTFD_IOC_NEW
        assert_eq!(io(b';', 100 + 11), 0x3b6f); // VFIO_DEVICE_RESET
    }
}
