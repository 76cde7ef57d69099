//! Raw kernel walks with no processing, as baselines for benchmarks of [`crate::Walker`].

use std::fs::File;
use std::os::fd::AsFd;

use super::procfs;
use crate::{Error, VaRange, PAGE_SIZE};

/// One PAGEMAP_SCAN pass over `range` of the current process reporting present-page regions;
/// returns the number of regions.
pub fn pagemap_scan_present(pagemap: &File, range: VaRange) -> Result<usize, Error> {
    let mut regions = vec![procfs::PageRegion::default(); 4096];
    let mut start = range.start();
    let mut total = 0;
    while start < range.end() {
        let req = procfs::ScanRequest {
            start,
            end: range.end(),
            category_anyof_mask: procfs::PAGE_IS_PRESENT,
            return_mask: procfs::PAGE_IS_PRESENT,
        };
        let (n, walk_end) = procfs::pagemap_scan(pagemap.as_fd(), &req, &mut regions)
            .map_err(|e| Error::sys("PAGEMAP_SCAN", e))?;
        total += n;
        if n < regions.len() || walk_end <= start {
            break;
        }
        start = walk_end;
    }
    Ok(total)
}

/// One bulk `pread` of the pagemap entries of `range` into `buf` (resized to fit); returns the
/// number of present pages.
pub fn pagemap_read_present(
    pagemap: &File,
    range: VaRange,
    buf: &mut Vec<u64>,
) -> Result<usize, Error> {
    buf.resize(range.pages(), 0);
    let n = procfs::pagemap_read(pagemap.as_fd(), range.start() / PAGE_SIZE, buf)
        .map_err(|e| Error::sys("pread pagemap", e))?;
    Ok(buf[..n].iter().filter(|e| **e >> 63 == 1).count())
}
