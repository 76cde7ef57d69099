//! Memory a client shares with the daemon: a memfd sealed against resizing, mapped shared.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use memmap2::{MmapMut, MmapOptions};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// A sealed memfd and our read-write mapping of all of it.
pub struct SharedMemory {
    file: File,
    map: MmapMut,
}

impl SharedMemory {
    /// `len` bytes (a positive multiple of 4096), zeroed.
    pub fn new(len: usize, name: &str) -> std::io::Result<SharedMemory> {
        if len == 0 || len % 4096 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("shared memory length {len} is not a positive multiple of 4096"),
            ));
        }
        let cname = std::ffi::CString::new(format!("mirror-arena-{name}")).unwrap_or_default();
        let fd = memfd_create(
            &cname,
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(len as u64)?;
        // Neither side may resize it: a shrink would leave the other's mapping over a hole.
        fcntl(
            file.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )?;
        // SAFETY: the memfd is ours and sealed against shrinking, so the mapping never loses its
        // pages; its bytes change behind our back only through the device, which callers reach
        // through `unsafe` submits whose contract covers exactly that.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file)? };
        Ok(SharedMemory { file, map })
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The mapping's address.
    pub fn va(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Give the pages back (MADV_REMOVE: the file's pages go, later reads see zeroes). A
    /// mirror of this process hears of it through userfaultfd as a discard.
    pub fn discard(&self) -> std::io::Result<()> {
        // SAFETY: the range is exactly our own live mapping; MADV_REMOVE only drops its pages
        // (the mapping stays valid and reads back zeroes), which no reference can observe as
        // undefined behaviour.
        let r = unsafe {
            libc::madvise(
                self.map.as_ptr() as *mut libc::c_void,
                self.map.len(),
                libc::MADV_REMOVE,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}
