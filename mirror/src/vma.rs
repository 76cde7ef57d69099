//! VMA lookup: PROCMAP_QUERY on /proc/PID/maps, with a text-parsing fallback, and the
//! classification of special (VM_IO / VM_PFNMAP) mappings.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::Mutex;

use nix::errno::Errno;
use sys_util::sync::lock;

use crate::sys::procfs;
use crate::{Error, Perms, Result, VaRange, PAGE_SIZE};

/// What backs a VMA, as far as mirroring cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmaKind {
    /// Anonymous memory (private or shared), heap, stack.
    Anonymous,
    /// A file mapping (regular file, memfd/shmem, tmpfs).
    File,
    /// hugetlbfs (MAP_HUGETLB or a hugetlbfs file); see [`Vma::page_size`].
    Hugetlb,
    /// VM_IO / VM_PFNMAP (a device BAR, `[vvar]`): never mirrored.
    Special,
}

/// One VMA of the mirrored process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// The VMA's range.
    pub range: VaRange,
    /// Its protection.
    pub perms: Perms,
    /// MAP_SHARED.
    pub shared: bool,
    /// The kernel page size of the VMA (4 KiB except hugetlb).
    pub page_size: u64,
    /// Backing kind.
    pub kind: VmaKind,
    /// The name /proc/PID/maps shows (path, `[heap]`, empty for anonymous memory).
    pub name: String,
    /// For a file mapping, the file offset of `range.start` (0 for anonymous memory).
    pub offset: u64,
    /// The backing file's inode number (0 for anonymous memory).
    pub inode: u64,
    /// The backing file's device as (major, minor), what `fstat` reports as `st_dev`.
    pub dev: (u32, u32),
}

const SPECIAL_NAMES: [&str; 3] = ["[vvar]", "[vvar_vclock]", "[vsyscall]"];

/// (start, end, inode) of a file-backed VMA.
type VmaKey = (u64, u64, u64);
/// (is VM_IO/VM_PFNMAP, kernel page size).
type FileFacts = (bool, u64);

/// Looks VMAs up in one process.
pub(crate) struct VmaSource {
    pid_dir: String,
    maps: File,
    use_query: bool,
    /// Special-ness of file-backed VMAs, keyed by (start, end, inode): learning it costs a stat or
    /// an smaps read, so it is remembered.
    special_cache: Mutex<HashMap<VmaKey, FileFacts>>,
}

impl VmaSource {
    pub(crate) fn open(pid_dir: &str) -> Result<(Self, bool)> {
        let path = format!("{pid_dir}/maps");
        let maps = File::open(&path).map_err(|e| Error::io(format!("open {path}"), e))?;
        let mut name = [0u8; 8];
        // Probe PROCMAP_QUERY once; old kernels answer ENOTTY. A name longer than the probe
        // buffer (ENAMETOOLONG) still proves the ioctl exists.
        let use_query = match procfs::procmap_query(maps.as_fd(), 0, &mut name) {
            Ok(_) | Err(Errno::ENAMETOOLONG) => true,
            Err(e) => {
                tracing::info!(error = %e, "PROCMAP_QUERY unavailable; parsing {path} instead");
                false
            }
        };
        Ok((
            VmaSource {
                pid_dir: pid_dir.to_string(),
                maps,
                use_query,
                special_cache: Mutex::new(HashMap::new()),
            },
            use_query,
        ))
    }

    /// Every VMA overlapping `range`, in address order.
    pub(crate) fn vmas(&self, range: VaRange) -> Result<Vec<Vma>> {
        let raw = if self.use_query {
            self.query_vmas(range)?
        } else {
            self.parse_vmas(range)?
        };
        raw.into_iter().map(|r| self.classify(r)).collect()
    }

    fn query_vmas(&self, range: VaRange) -> Result<Vec<RawVma>> {
        let mut out = Vec::new();
        let mut addr = range.start();
        let mut name = vec![0u8; libc::PATH_MAX as usize + 64];
        while addr < range.end() {
            let q = procfs::procmap_query(self.maps.as_fd(), addr, &mut name).map_err(|e| {
                if e == Errno::ESRCH {
                    Error::Released
                } else {
                    Error::sys("PROCMAP_QUERY", e)
                }
            })?;
            let Some(q) = q else { break };
            if q.start >= range.end() {
                break;
            }
            out.push(RawVma {
                start: q.start,
                end: q.end,
                perms: Perms {
                    read: q.flags & procfs::PROCMAP_QUERY_VMA_READABLE != 0,
                    write: q.flags & procfs::PROCMAP_QUERY_VMA_WRITABLE != 0,
                    exec: q.flags & procfs::PROCMAP_QUERY_VMA_EXECUTABLE != 0,
                },
                shared: q.flags & procfs::PROCMAP_QUERY_VMA_SHARED != 0,
                page_size: Some(q.page_size),
                offset: q.offset,
                inode: q.inode,
                dev: (q.dev_major, q.dev_minor),
                name: String::from_utf8_lossy(&name[..q.name_len]).into_owned(),
            });
            addr = q.end;
        }
        Ok(out)
    }

    fn parse_vmas(&self, range: VaRange) -> Result<Vec<RawVma>> {
        let path = format!("{}/maps", self.pid_dir);
        let mut text = String::new();
        let mut f = &self.maps;
        f.rewind()
            .and_then(|_| f.read_to_string(&mut text))
            .map_err(|e| Error::io(format!("read {path}"), e))?;
        Ok(text
            .lines()
            .filter_map(parse_maps_line)
            .filter(|v| v.start < range.end() && range.start() < v.end)
            .collect())
    }

    fn classify(&self, raw: RawVma) -> Result<Vma> {
        let range = VaRange::from_kernel(raw.start, raw.end).ok_or(Error::InvalidRange {
            start: raw.start,
            len: raw.end.wrapping_sub(raw.start),
            reason: "kernel reported an empty VMA",
        })?;
        let mut page_size = raw.page_size.unwrap_or(PAGE_SIZE);
        let kind = if SPECIAL_NAMES.contains(&raw.name.as_str()) {
            VmaKind::Special
        } else if raw.inode == 0 {
            VmaKind::Anonymous
        } else {
            let (special, size) = self.file_vma_facts(&raw)?;
            if raw.page_size.is_none() {
                page_size = size;
            }
            if special {
                VmaKind::Special
            } else if page_size > PAGE_SIZE {
                VmaKind::Hugetlb
            } else {
                VmaKind::File
            }
        };
        Ok(Vma {
            range,
            perms: raw.perms,
            shared: raw.shared,
            page_size,
            kind,
            name: raw.name,
            offset: raw.offset,
            inode: raw.inode,
            dev: raw.dev,
        })
    }

    /// (is VM_IO/VM_PFNMAP, kernel page size) for a file-backed VMA. A regular file (including
    /// memfd, tmpfs, hugetlbfs) can only be special through a driver's mmap, which regular files
    /// do not have, so only non-regular backings (device nodes, anon inodes such as a VFIO device
    /// fd) pay for an smaps read.
    fn file_vma_facts(&self, raw: &RawVma) -> Result<(bool, u64)> {
        let key = (raw.start, raw.end, raw.inode);
        if let Some(v) = lock(&self.special_cache).get(&key) {
            return Ok(*v);
        }
        let link = format!("{}/map_files/{:x}-{:x}", self.pid_dir, raw.start, raw.end);
        let regular = std::fs::metadata(&link)
            .map(|m| m.file_type().is_file() && !m.file_type().is_char_device())
            .unwrap_or(false);
        let facts = if regular && raw.page_size.is_some() {
            (false, raw.page_size.unwrap_or(PAGE_SIZE))
        } else {
            self.smaps_facts(raw.start)?
        };
        let mut cache = lock(&self.special_cache);
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, facts);
        Ok(facts)
    }

    fn smaps_facts(&self, start: u64) -> Result<(bool, u64)> {
        let path = format!("{}/smaps", self.pid_dir);
        let f = File::open(&path).map_err(|e| Error::io(format!("open {path}"), e))?;
        let mut in_vma = false;
        let mut page_size = PAGE_SIZE;
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|e| Error::io(format!("read {path}"), e))?;
            if let Some(v) = parse_maps_line(&line) {
                if in_vma {
                    break;
                }
                in_vma = v.start == start;
                continue;
            }
            if !in_vma {
                continue;
            }
            if let Some(rest) = line.strip_prefix("KernelPageSize:") {
                let kb: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(4);
                page_size = kb * 1024;
            } else if let Some(rest) = line.strip_prefix("VmFlags:") {
                let special = rest.split_whitespace().any(|f| f == "io" || f == "pf");
                return Ok((special, page_size));
            }
        }
        Ok((false, page_size))
    }
}

struct RawVma {
    start: u64,
    end: u64,
    perms: Perms,
    shared: bool,
    page_size: Option<u64>,
    offset: u64,
    inode: u64,
    dev: (u32, u32),
    name: String,
}

/// Parses one `/proc/PID/maps` (or smaps header) line.
fn parse_maps_line(line: &str) -> Option<RawVma> {
    let mut parts = line.splitn(6, ' ');
    let (start, end) = parts.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = parts.next()?.as_bytes();
    if perms.len() != 4 {
        return None;
    }
    let offset = u64::from_str_radix(parts.next()?, 16).ok()?;
    let (major, minor) = parts.next()?.split_once(':')?;
    let dev = (
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    let inode: u64 = parts.next()?.parse().ok()?;
    let name = parts.next().unwrap_or("").trim_start().to_string();
    Some(RawVma {
        start,
        end,
        perms: Perms {
            read: perms[0] == b'r',
            write: perms[1] == b'w',
            exec: perms[2] == b'x',
        },
        shared: perms[3] == b's',
        page_size: None,
        offset,
        inode,
        dev,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_line_keeps_the_file_offset() {
        let v = parse_maps_line(
            "7f0000000000-7f0000004000 rw-s 00002000 00:01 1234 /memfd:x (deleted)",
        )
        .unwrap();
        assert_eq!(v.offset, 0x2000);
        assert_eq!(v.dev, (0, 1));
        assert!(v.shared);
    }

    #[test]
    fn parses_maps_lines() {
        let v = parse_maps_line(
            "7f0000000000-7f0000002000 rw-s 00000000 00:01 1234                       /memfd:x (deleted)",
        )
        .unwrap();
        assert_eq!(
            (v.start, v.end, v.inode),
            (0x7f0000000000, 0x7f0000002000, 1234)
        );
        assert!(v.perms.read && v.perms.write && !v.perms.exec && v.shared);
        assert_eq!(v.name, "/memfd:x (deleted)");
        let anon = parse_maps_line("1000-2000 ---p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.perms, Perms::NONE);
        assert_eq!(anon.name, "");
        assert!(parse_maps_line("Rss:   4 kB").is_none());
        assert!(parse_maps_line("VmFlags: rd wr mr mw me ac").is_none());
    }

    #[test]
    fn query_and_parse_agree_on_own_maps() {
        let (src, has_query) = VmaSource::open("/proc/self").unwrap();
        let m = crate::Mapping::anonymous(3 * 4096, libc::PROT_READ).unwrap();
        let via_default = src.vmas(m.range()).unwrap();
        let parsed: Vec<Vma> = src
            .parse_vmas(m.range())
            .unwrap()
            .into_iter()
            .map(|r| src.classify(r).unwrap())
            .collect();
        assert!(has_query, "this kernel (6.18) has PROCMAP_QUERY");
        assert_eq!(via_default.len(), 1);
        let (a, b) = (&via_default[0], &parsed[0]);
        assert_eq!(
            (a.range, a.perms, a.shared, a.kind, a.inode, a.dev),
            (b.range, b.perms, b.shared, b.kind, b.inode, b.dev)
        );
        assert!(a.range.contains_range(&m.range()));
        assert_eq!(a.perms, Perms::READ);
    }
}
