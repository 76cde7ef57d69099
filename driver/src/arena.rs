//! Arenas: memfd-backed memory another process shares with us by fd, the only memory of that
//! process a device can reach in daemon mode.
//!
//! A daemon cannot DMA-map another process's private memory by address (kernel VFIO pins pages
//! of the *calling* process's mm), so a client allocates its device-visible memory in memfd
//! arenas and passes the fds. The daemon checks each arena (a sealed-against-shrinking memfd,
//! really mapped by the client at the address it claims), maps it into its own address space and
//! hands the device that mapping. Each fault re-checks that the client still maps the same file
//! at the same offset there, so a client that unmaps an arena and maps something else at the
//! address gets a cancelled work item, never a stale or foreign page.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, RwLock};

use accel_abi::PAGE_SIZE;
use memmap2::{MmapOptions, MmapRaw};
use mirror::{AddressSpace, VaRange, Vma, VmaKind};
use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use sys_util::sync::{read, write};

/// Why an arena was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// Address, length or offset unusable.
    #[error("arena at {va:#x}+{len:#x} (file offset {offset:#x}): {why}")]
    BadRange {
        /// Client VA.
        va: u64,
        /// Length.
        len: u64,
        /// File offset.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The fd is not a usable memfd.
    #[error("arena fd refused: {0}")]
    BadFd(String),
    /// The client does not map the file at the address it claims.
    #[error("the client does not map this arena at {va:#x}: {why}")]
    NotMapped {
        /// Client VA.
        va: u64,
        /// What the client's mapping looks like instead.
        why: String,
    },
    /// It overlaps an arena already registered.
    #[error("arena at {va:#x}+{len:#x} overlaps the registered arena at {other:#x}")]
    Overlap {
        /// Client VA.
        va: u64,
        /// Length.
        len: u64,
        /// The existing arena's VA.
        other: u64,
    },
    /// A limit would be exceeded.
    #[error("arena limit reached: {limit} is {max}")]
    Limit {
        /// Which limit.
        limit: &'static str,
        /// Its value.
        max: u64,
    },
    /// No arena starts at this address.
    #[error("no arena is registered at {0:#x}")]
    NotFound(u64),
    /// Mapping it into this process failed.
    #[error("mapping the arena failed: {0}")]
    Map(std::io::Error),
}

/// Limits on one client's arenas.
#[derive(Debug, Clone, Copy)]
pub struct ArenaLimits {
    /// Most arenas registered at once.
    pub max_arenas: usize,
    /// Most bytes registered at once.
    pub max_bytes: u64,
}

impl Default for ArenaLimits {
    fn default() -> Self {
        ArenaLimits {
            max_arenas: 64,
            max_bytes: 4 << 30,
        }
    }
}

/// One registered arena: the client's range, and our own mapping of the same file pages.
pub struct Arena {
    va: u64,
    len: u64,
    file_offset: u64,
    inode: u64,
    dev: (u32, u32),
    writable: bool,
    map: MmapRaw,
    file: File,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("va", &format_args!("{:#x}", self.va))
            .field("len", &self.len)
            .field("inode", &self.inode)
            .field("writable", &self.writable)
            .finish()
    }
}

/// Where the device finds a run of an arena.
pub(crate) struct ArenaRun<'a> {
    /// Our mapping's address of the run's first byte.
    pub(crate) local_va: u64,
    /// The memfd.
    pub(crate) fd: BorrowedFd<'a>,
    /// File offset of the run's first byte.
    pub(crate) offset: u64,
}

impl Arena {
    /// The client's VA range.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.va..self.va + self.len
    }

    /// Whether the device may write it (the fd was O_RDWR and the file is not write-sealed).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The run `[start, end)` (inside this arena) as the device reaches it.
    pub(crate) fn run(&self, start: u64) -> ArenaRun<'_> {
        let delta = start - self.va;
        ArenaRun {
            local_va: self.map.as_ptr() as u64 + delta,
            fd: self.file.as_fd(),
            offset: self.file_offset + delta,
        }
    }

    /// Checks that `vma` (the client's, covering `start`) maps this arena's file at the offset
    /// the arena says. Returns why not.
    fn check_vma(&self, vma: &Vma, start: u64) -> Result<(), String> {
        if vma.kind != VmaKind::File || !vma.shared {
            return Err(format!(
                "{:?} {} mapping",
                vma.kind,
                if vma.shared { "shared" } else { "private" }
            ));
        }
        if (vma.inode, vma.dev) != (self.inode, self.dev) {
            return Err(format!(
                "another file (inode {} on {}:{}, the arena is inode {} on {}:{})",
                vma.inode, vma.dev.0, vma.dev.1, self.inode, self.dev.0, self.dev.1
            ));
        }
        let client_offset = vma.offset + (start - vma.range.start());
        let arena_offset = self.file_offset + (start - self.va);
        if client_offset != arena_offset {
            return Err(format!(
                "the file at offset {client_offset:#x}, the arena says {arena_offset:#x}"
            ));
        }
        Ok(())
    }
}

/// The arenas of one client, by client VA.
pub struct ArenaTable {
    arenas: RwLock<BTreeMap<u64, Arc<Arena>>>,
    limits: ArenaLimits,
}

impl std::fmt::Debug for ArenaTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaTable")
            .field("arenas", &self.len())
            .field("limits", &self.limits)
            .finish()
    }
}

fn page_aligned(v: u64) -> bool {
    v % PAGE_SIZE == 0
}

/// (inode, device, writable) of an acceptable arena fd covering `end` bytes, after sealing it
/// against shrinking (a shrink would turn our mapping's pages into SIGBUS for the device).
fn vet_fd(fd: BorrowedFd<'_>, end: u64) -> Result<(u64, (u32, u32), bool), ArenaError> {
    // nix 0.29 takes raw fds here; `fd` is borrowed for the whole function.
    let fd = fd.as_raw_fd();
    let bad = |m: String| ArenaError::BadFd(m);
    let st = nix::sys::stat::fstat(fd).map_err(|e| bad(format!("fstat: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(bad("not a regular file (expected a memfd)".into()));
    }
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS)
        .map_err(|e| bad(format!("F_GET_SEALS: {e} (expected a memfd)")))?;
    let seals = SealFlag::from_bits_truncate(seals);
    if !seals.contains(SealFlag::F_SEAL_SHRINK) {
        fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).map_err(|e| {
            bad(format!(
                "cannot seal it against shrinking ({e}); create it with MFD_ALLOW_SEALING or \
                 add F_SEAL_SHRINK before sending"
            ))
        })?;
    }
    if (st.st_size as u64) < end {
        return Err(bad(format!(
            "the file has {} bytes, the arena needs {end}",
            st.st_size
        )));
    }
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| bad(format!("F_GETFL: {e}")))?;
    let rdwr = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE == OFlag::O_RDWR;
    let write_sealed = seals.intersects(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_FUTURE_WRITE);
    let dev = (
        nix::sys::stat::major(st.st_dev) as u32,
        nix::sys::stat::minor(st.st_dev) as u32,
    );
    Ok((st.st_ino, dev, rdwr && !write_sealed))
}

impl ArenaTable {
    /// An empty table with `limits`.
    pub fn new(limits: ArenaLimits) -> ArenaTable {
        ArenaTable {
            arenas: RwLock::new(BTreeMap::new()),
            limits,
        }
    }

    /// Arenas registered.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True if none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes registered.
    pub fn bytes(&self) -> u64 {
        self.read().values().map(|a| a.len).sum()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Arena>>> {
        read(&self.arenas)
    }

    /// Register `len` bytes of `fd` at `file_offset`, which the process mirrored by `mm` maps at
    /// `va`: checks the fd and the process's mapping, then maps the pages here.
    pub fn register(
        &self,
        mm: &AddressSpace,
        va: u64,
        len: u64,
        file_offset: u64,
        fd: OwnedFd,
    ) -> Result<Arc<Arena>, ArenaError> {
        let bad = |why| ArenaError::BadRange {
            va,
            len,
            offset: file_offset,
            why,
        };
        if len == 0 {
            return Err(bad("empty"));
        }
        if !(page_aligned(va) && page_aligned(len) && page_aligned(file_offset)) {
            return Err(bad("address, length and offset must be 4 KiB aligned"));
        }
        let end = va.checked_add(len).ok_or(bad("the range wraps"))?;
        let file_end = file_offset
            .checked_add(len)
            .ok_or(bad("the file range wraps"))?;
        let range = VaRange::from_bounds(va, end).map_err(|_| bad("not a user address range"))?;
        if usize::try_from(len).is_err() || usize::try_from(file_offset).is_err() {
            return Err(bad("too large for this machine"));
        }
        let (inode, dev, writable) = vet_fd(fd.as_fd(), file_end)?;
        let file = File::from(fd);
        let map = if writable {
            MmapOptions::new()
                .offset(file_offset)
                .len(len as usize)
                .map_raw(&file)
        } else {
            MmapOptions::new()
                .offset(file_offset)
                .len(len as usize)
                .map_raw_read_only(&file)
        }
        .map_err(ArenaError::Map)?;
        let arena = Arena {
            va,
            len,
            file_offset,
            inode,
            dev,
            writable,
            map,
            file,
        };
        // The client must map exactly this file here now (later changes are caught per fault).
        let vmas = mm.walker().vmas(range).map_err(|e| ArenaError::NotMapped {
            va,
            why: e.to_string(),
        })?;
        let mut cursor = va;
        for v in &vmas {
            if v.range.start() > cursor {
                break;
            }
            arena
                .check_vma(v, cursor)
                .map_err(|why| ArenaError::NotMapped { va: cursor, why })?;
            cursor = v.range.end();
        }
        if cursor < end {
            return Err(ArenaError::NotMapped {
                va: cursor,
                why: "nothing is mapped there".into(),
            });
        }
        let mut arenas = write(&self.arenas);
        if arenas.len() >= self.limits.max_arenas {
            return Err(ArenaError::Limit {
                limit: "arenas per client",
                max: self.limits.max_arenas as u64,
            });
        }
        let bytes: u64 = arenas.values().map(|a| a.len).sum();
        if bytes.saturating_add(len) > self.limits.max_bytes {
            return Err(ArenaError::Limit {
                limit: "arena bytes per client",
                max: self.limits.max_bytes,
            });
        }
        if let Some((_, other)) = arenas
            .range(..end)
            .next_back()
            .filter(|(_, a)| a.va + a.len > va)
        {
            return Err(ArenaError::Overlap {
                va,
                len,
                other: other.va,
            });
        }
        let arena = Arc::new(arena);
        arenas.insert(va, arena.clone());
        Ok(arena)
    }

    /// Remove the arena starting at `va`. The caller invalidates its range (so the device's
    /// entries and DMA mappings into our mapping go) before dropping the returned arena.
    pub fn unregister(&self, va: u64) -> Result<Arc<Arena>, ArenaError> {
        write(&self.arenas)
            .remove(&va)
            .ok_or(ArenaError::NotFound(va))
    }

    /// Remove every arena (client released).
    pub fn clear(&self) -> Vec<Arc<Arena>> {
        let mut arenas = write(&self.arenas);
        std::mem::take(&mut *arenas).into_values().collect()
    }

    /// The arena holding `[start, end)` if the client's `vmas` (covering that run, in order)
    /// still map it there; why not otherwise.
    pub(crate) fn resolve(&self, vmas: &[Vma], start: u64, end: u64) -> Option<Arc<Arena>> {
        let arena = self
            .read()
            .range(..end)
            .next_back()
            .filter(|(_, a)| a.va <= start && end <= a.va + a.len)
            .map(|(_, a)| a.clone())?;
        let mut cursor = start;
        for v in vmas {
            if v.range.start() > cursor || cursor >= end {
                break;
            }
            if let Err(why) = arena.check_vma(v, cursor) {
                tracing::debug!(
                    start,
                    why,
                    "fault in an arena the client no longer maps as registered"
                );
                return None;
            }
            cursor = v.range.end();
        }
        (cursor >= end).then_some(arena)
    }
}
