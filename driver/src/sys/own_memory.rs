//! This process's memory read and written by address, for device DMA that a transport serves
//! in software: a vfio-user server's DMA_READ/DMA_WRITE of a window that was not shared by fd.
//!
//! `process_vm_readv`/`process_vm_writev` on our own pid rather than a pointer copy: an address
//! that is not mapped, or not writable, fails `EFAULT` (a clear error to the server) instead of
//! raising SIGSEGV in the driver. The window was handed to the device by the unsafe
//! `Backend::dma_map`, whose caller promised the device may access it, which is what makes a
//! write into it sound.

use std::io::{IoSlice, IoSliceMut};

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::getpid;

/// The remote side of one transfer step: `len` bytes at `va + moved`.
fn at(va: u64, moved: usize, len: usize) -> Result<RemoteIoVec, Errno> {
    let base = va
        .checked_add(moved as u64)
        .and_then(|a| usize::try_from(a).ok())
        .ok_or(Errno::EFAULT)?;
    Ok(RemoteIoVec { base, len })
}

/// Copy `out.len()` bytes from this process's address `va` into `out`.
pub fn read(va: u64, out: &mut [u8]) -> Result<(), Errno> {
    let mut moved = 0;
    while moved < out.len() {
        let remote = at(va, moved, out.len() - moved)?;
        // A short transfer stops at the first inaccessible page; nothing moved means that page.
        match process_vm_readv(
            getpid(),
            &mut [IoSliceMut::new(&mut out[moved..])],
            &[remote],
        )? {
            0 => return Err(Errno::EFAULT),
            n => moved += n,
        }
    }
    Ok(())
}

/// Copy `data` to this process's address `va`.
pub fn write(va: u64, data: &[u8]) -> Result<(), Errno> {
    let mut moved = 0;
    while moved < data.len() {
        let remote = at(va, moved, data.len() - moved)?;
        match process_vm_writev(getpid(), &[IoSlice::new(&data[moved..])], &[remote])? {
            0 => return Err(Errno::EFAULT),
            n => moved += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_by_address_and_an_unmapped_page_is_efault() {
        let mut buf = vec![0u8; 3 * 4096];
        let va = buf.as_mut_ptr() as u64;
        write(va + 100, &[7u8; 5000]).unwrap();
        let mut back = vec![0u8; 5000];
        read(va + 100, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 7));
        assert_eq!(buf[99], 0);
        assert_eq!(buf[100], 7);
        // Address 0 is never mapped.
        assert_eq!(read(0, &mut [0u8; 8]), Err(Errno::EFAULT));
        assert_eq!(write(0, &[0u8; 8]), Err(Errno::EFAULT));
        assert_eq!(read(u64::MAX - 3, &mut [0u8; 8]), Err(Errno::EFAULT));
    }
}
