//! `/proc/PID/pagemap` reads and the PAGEMAP_SCAN / PROCMAP_QUERY ioctls (linux/fs.h), defined by
//! hand because the libc crate and the bookworm headers lack them.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

use sys_util::{check, ioctl::iowr};

/// `struct page_region` as PAGEMAP_SCAN fills it.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
pub(crate) const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub(crate) const PAGE_IS_HUGE: u64 = 1 << 6;
pub(crate) const PAGE_IS_FILE: u64 = 1 << 2;
pub(crate) const PAGE_IS_GUARD: u64 = 1 << 8;

const PAGEMAP_SCAN: libc::c_ulong = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

/// What a PAGEMAP_SCAN call should report.
pub(crate) struct ScanRequest {
    pub start: u64,
    pub end: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// Runs PAGEMAP_SCAN once. Returns the number of regions written and the address where the walk
/// stopped (it stops early when `out` is full).
pub(crate) fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    req: &ScanRequest,
    out: &mut [PageRegion],
) -> Result<(usize, u64), Errno> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        start: req.start,
        end: req.end,
        vec: out.as_mut_ptr() as u64,
        vec_len: out.len() as u64,
        category_anyof_mask: req.category_anyof_mask,
        return_mask: req.return_mask,
        ..Default::default()
    };
    // SAFETY: `arg` is a live pm_scan_arg whose `vec`/`vec_len` describe the writable slice `out`,
    // which outlives the call; the kernel writes at most `vec_len` page_region entries.
    let ret = unsafe {
        libc::ioctl(
            pagemap.as_raw_fd(),
            PAGEMAP_SCAN,
            &mut arg as *mut PmScanArg,
        )
    };
    let n = check(ret as libc::c_long)?;
    Ok((n as usize, arg.walk_end))
}

#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);

const PROCMAP_QUERY: libc::c_ulong = iowr(b'f', 17, std::mem::size_of::<ProcmapQuery>());
pub(crate) const PROCMAP_QUERY_VMA_READABLE: u64 = 0x01;
pub(crate) const PROCMAP_QUERY_VMA_WRITABLE: u64 = 0x02;
pub(crate) const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 0x04;
pub(crate) const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;
const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;

/// One VMA as PROCMAP_QUERY reports it.
pub(crate) struct QueriedVma {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
    pub page_size: u64,
    pub offset: u64,
    pub inode: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub name_len: usize,
}

/// Looks up the VMA covering `addr`, or the next one above it. `Ok(None)` means no VMA at or
/// above `addr`. The VMA name is written into `name` (truncated to its length).
pub(crate) fn procmap_query(
    maps: BorrowedFd<'_>,
    addr: u64,
    name: &mut [u8],
) -> Result<Option<QueriedVma>, Errno> {
    let mut arg = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_flags: PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
        query_addr: addr,
        vma_name_size: name.len() as u32,
        vma_name_addr: name.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `arg` is a live procmap_query; `vma_name_addr`/`vma_name_size` describe the writable
    // buffer `name`, which outlives the call; build_id_size is 0 so no build-id buffer is used.
    let ret = unsafe {
        libc::ioctl(
            maps.as_raw_fd(),
            PROCMAP_QUERY,
            &mut arg as *mut ProcmapQuery,
        )
    };
    match check(ret as libc::c_long) {
        Ok(_) => Ok(Some(QueriedVma {
            start: arg.vma_start,
            end: arg.vma_end,
            flags: arg.vma_flags,
            page_size: arg.vma_page_size,
            offset: arg.vma_offset,
            inode: arg.inode,
            dev_major: arg.dev_major,
            dev_minor: arg.dev_minor,
            // vma_name_size counts the terminating NUL when a name exists.
            name_len: (arg.vma_name_size as usize)
                .saturating_sub(1)
                .min(name.len()),
        })),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads pagemap entries for consecutive pages starting at virtual page `first_vpn` into `out`.
/// Returns how many entries were read (fewer only at the end of the address space).
pub(crate) fn pagemap_read(
    pagemap: BorrowedFd<'_>,
    first_vpn: u64,
    out: &mut [u64],
) -> Result<usize, Errno> {
    let mut done = 0usize;
    while done < out.len() {
        let rest = &mut out[done..];
        let offset = (first_vpn + done as u64) * 8;
        // SAFETY: `rest` is a writable u64 slice of `rest.len() * 8` bytes; any bytes are valid u64s.
        let ret = unsafe {
            libc::pread(
                pagemap.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len() * 8,
                offset as libc::off_t,
            )
        };
        match check(ret as libc::c_long) {
            Ok(0) => break,
            Ok(n) => done += n as usize / 8,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
