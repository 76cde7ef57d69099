//! A device region (a BAR) mapped into this process, shared by the transports that can map one
//! (kernel VFIO's device fd, a vfio-user server's region fd).

use std::io;
use std::os::fd::BorrowedFd;

/// A BAR mapped into this process: register accesses become single loads and stores instead
/// of a pread/pwrite each.
pub struct MappedBar {
    map: memmap2::MmapRaw,
}

impl MappedBar {
    /// Map `len` bytes of the device file at `offset` (a region VFIO reports as mmap-able).
    pub fn map(device: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<MappedBar> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file = std::fs::File::from(device.try_clone_to_owned()?);
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&file)?;
        Ok(MappedBar { map })
    }

    fn check(&self, offset: u64, size: usize) -> io::Result<usize> {
        let at =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if !(size == 4 || size == 8)
            || at % size != 0
            || at.checked_add(size).is_none_or(|e| e > self.map.len())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "BAR access of {size} bytes at {offset:#x} (mapped {:#x} bytes)",
                    self.map.len()
                ),
            ));
        }
        Ok(at)
    }

    /// One aligned 4- or 8-byte load.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let at = self.check(offset, data.len())?;
        // SAFETY: in bounds and naturally aligned (checked); device memory must be read with a
        // single access of the register's width, which a volatile read of that width is.
        unsafe {
            let p = self.map.as_ptr().add(at);
            if data.len() == 4 {
                data.copy_from_slice(&std::ptr::read_volatile(p as *const u32).to_le_bytes());
            } else {
                data.copy_from_slice(&std::ptr::read_volatile(p as *const u64).to_le_bytes());
            }
        }
        Ok(())
    }

    /// One aligned 4- or 8-byte store.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self.check(offset, data.len())?;
        // SAFETY: as in `read`, for a single store of the register's width.
        unsafe {
            let p = self.map.as_mut_ptr().add(at);
            if data.len() == 4 {
                let v = u32::from_le_bytes(data.try_into().expect("checked length"));
                std::ptr::write_volatile(p as *mut u32, v);
            } else {
                let v = u64::from_le_bytes(data.try_into().expect("checked length"));
                std::ptr::write_volatile(p as *mut u64, v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_bar_checks_width_alignment_and_bounds() {
        // Any mmap-able fd behaves like a BAR for the access rules: a memfd stands in.
        let fd =
            nix::sys::memfd::memfd_create(c"bar", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4096).unwrap();
        let bar = MappedBar::map(std::os::fd::AsFd::as_fd(&file), 0, 4096).unwrap();
        bar.write(8, &0x1122_3344_5566_7788u64.to_le_bytes())
            .unwrap();
        let mut w = [0u8; 4];
        bar.read(12, &mut w).unwrap();
        assert_eq!(u32::from_le_bytes(w), 0x1122_3344);
        assert!(bar.read(2, &mut w).is_err(), "misaligned");
        assert!(bar.read(4096, &mut w).is_err(), "out of bounds");
        assert!(bar.read(0, &mut [0u8; 2]).is_err(), "wrong width");
    }
}
