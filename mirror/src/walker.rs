//! The CPU walker, userspace's `hmm_range_fault`: `snapshot` reports per-page state and page size
//! without faulting or pinning; `fault` makes a range accessible, honouring VMA permissions.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};

use crate::sys::{mm, procfs};
use crate::vma::{Vma, VmaKind, VmaSource};
use crate::{Access, Error, Result, VaRange, PAGE_SIZE};

/// What the CPU maps at one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Nothing mapped yet, but a fault could map it (hmm's 0 output).
    None,
    /// The shared zero page (mapped read-only; a write fault would replace it).
    Zero,
    /// Mapped, readable but not writable without a fault (read-only VMA, copy-on-write page,
    /// file page not yet dirtied in a private mapping).
    Read,
    /// Mapped and writable.
    Write,
    /// Cannot be mirrored (hmm's HMM_PFN_ERROR).
    Error(PageError),
}

/// Why a page is [`PageState::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageError {
    /// No VMA covers it.
    NoVma,
    /// The VMA is PROT_NONE (or otherwise not readable).
    NoAccess,
    /// VM_IO / VM_PFNMAP mapping.
    Special,
    /// A guard region (MADV_GUARD_INSTALL): accessing it raises SIGSEGV.
    Guard,
}

/// The size of the CPU page (folio mapping) a page belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// A 4 KiB page (or unknown, for unmapped pages).
    Base,
    /// Part of a PMD-mapped 2 MiB transparent huge page.
    Thp,
    /// Part of a hugetlb page of `1 << shift` bytes.
    Hugetlb {
        /// log2 of the huge page size.
        shift: u8,
    },
}

impl PageSize {
    /// Bytes in the page.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Base => PAGE_SIZE,
            PageSize::Thp => 2 << 20,
            PageSize::Hugetlb { shift } => 1 << shift,
        }
    }
}

/// One page of a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageInfo {
    /// What is mapped.
    pub state: PageState,
    /// The CPU page size it is mapped with.
    pub size: PageSize,
}

const NO_VMA: PageInfo = PageInfo {
    state: PageState::Error(PageError::NoVma),
    size: PageSize::Base,
};

/// Per-page CPU state of a range at one instant (already possibly stale: use it under the
/// sequence protocol).
#[derive(Clone, Debug)]
pub struct Snapshot {
    range: VaRange,
    pages: Vec<PageInfo>,
}

impl Snapshot {
    /// The range walked.
    pub fn range(&self) -> VaRange {
        self.range
    }

    /// One entry per 4 KiB page, in address order.
    pub fn pages(&self) -> &[PageInfo] {
        &self.pages
    }

    /// The entry for the page containing `addr`, if inside the range.
    pub fn page_at(&self, addr: u64) -> Option<PageInfo> {
        self.range
            .contains(addr)
            .then(|| self.pages[((addr - self.range.start()) / PAGE_SIZE) as usize])
    }

    /// Maximal runs of identical entries, as (range, info).
    pub fn runs(&self) -> impl Iterator<Item = (VaRange, PageInfo)> + '_ {
        let mut i = 0;
        std::iter::from_fn(move || {
            let first = *self.pages.get(i)?;
            let start = i;
            while i < self.pages.len() && self.pages[i] == first {
                i += 1;
            }
            let a = self.range.start() + start as u64 * PAGE_SIZE;
            let r = VaRange::new(a, (i - start) as u64 * PAGE_SIZE).ok()?;
            Some((r, first))
        })
    }
}

/// Which kernel fast paths the walker found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkerCaps {
    /// PROCMAP_QUERY answers VMA lookups (else /proc/PID/maps is parsed).
    pub procmap_query: bool,
    /// PAGEMAP_SCAN reports THP and zero-page regions (else THP is reported as base pages).
    pub pagemap_scan: bool,
    /// pagemap shows PFNs (CAP_SYS_ADMIN); used to recognise the zero page without PAGEMAP_SCAN.
    pub pfn_visible: bool,
    /// PAGEMAP_SCAN reports guard regions (PAGE_IS_GUARD), needed by `snapshot_fast`.
    pub scan_guard: bool,
}

/// Walks one process's CPU mappings.
pub struct Walker {
    vmas: VmaSource,
    pagemap: File,
    pid: Option<libc::pid_t>,
    caps: WalkerCaps,
    zero_pfn: Option<u64>,
}

const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;
const PM_GUARD: u64 = 1 << 58;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// Pagemap entries read per pread (32 KiB: stays in cache while it is decoded). A multiple of
/// `PMD_PAGES`.
const CHUNK_PAGES: usize = 4 * 1024;

impl Walker {
    /// A walker over `pid` (`None` = the current process).
    pub(crate) fn open(pid: Option<libc::pid_t>) -> Result<Self> {
        let pid_dir = match pid {
            None => "/proc/self".to_string(),
            Some(p) => format!("/proc/{p}"),
        };
        let (vmas, procmap_query) = VmaSource::open(&pid_dir)?;
        let path = format!("{pid_dir}/pagemap");
        let pagemap = File::open(&path).map_err(|e| Error::io(format!("open {path}"), e))?;
        let zero_pfn = zero_pfn();
        let pagemap_scan = probe_pagemap_scan(&pagemap, 0);
        let scan_guard = pagemap_scan && probe_pagemap_scan(&pagemap, procfs::PAGE_IS_GUARD);
        if !pagemap_scan {
            tracing::warn!("PAGEMAP_SCAN unavailable: THP pages are reported as base pages");
        }
        Ok(Walker {
            vmas,
            pagemap,
            pid,
            caps: WalkerCaps {
                procmap_query,
                pagemap_scan,
                pfn_visible: zero_pfn.is_some(),
                scan_guard,
            },
            zero_pfn,
        })
    }

    /// The fast paths in use.
    pub fn caps(&self) -> &WalkerCaps {
        &self.caps
    }

    /// The VMAs overlapping `range`.
    pub fn vmas(&self, range: VaRange) -> Result<Vec<Vma>> {
        self.vmas.vmas(range)
    }

    /// Per-page state and page size of `range`, without faulting or pinning.
    pub fn snapshot(&self, range: VaRange) -> Result<Snapshot> {
        let mut entries = Vec::new();
        let mut regions = Vec::new();
        self.walk_readable_vmas(range, |vma, clip, out| {
            // Only a private writable VMA needs pagemap (whether a present page is exclusive);
            // for the others PAGEMAP_SCAN alone gives the same answer at a fraction of the cost.
            let needs_pagemap = vma.perms.write && !vma.shared;
            if self.caps.scan_guard && !needs_pagemap && vma.kind != VmaKind::Hugetlb {
                regions.resize(512, procfs::PageRegion::default());
                return self.fill_from_scan(vma, clip, out, &mut regions);
            }
            let thp_candidates = self.fill_from_pagemap(vma, clip, out, &mut entries)?;
            if vma.kind != VmaKind::Hugetlb && self.caps.pagemap_scan {
                for window in thp_candidates {
                    let first = ((window.start() - clip.start()) / PAGE_SIZE) as usize;
                    let slots = &mut out[first..first + window.pages()];
                    self.mark_thp_and_zero(window, slots)?;
                }
            }
            Ok(())
        })
    }

    /// Builds a snapshot of `range`: holes are `NoVma`, special and unreadable VMAs are errors,
    /// and `fill(vma, clip, pages)` fills the pages of every other VMA's part of the range.
    fn walk_readable_vmas(
        &self,
        range: VaRange,
        mut fill: impl FnMut(&Vma, VaRange, &mut [PageInfo]) -> Result<()>,
    ) -> Result<Snapshot> {
        let mut pages = vec![NO_VMA; range.pages()];
        for vma in self.vmas.vmas(range)? {
            let Some(clip) = vma.range.intersect(&range) else {
                continue;
            };
            let first = ((clip.start() - range.start()) / PAGE_SIZE) as usize;
            let out = &mut pages[first..first + clip.pages()];
            let blocked = match vma.kind {
                VmaKind::Special => Some(PageError::Special),
                _ if !vma.perms.read => Some(PageError::NoAccess),
                _ => None,
            };
            match blocked {
                Some(err) => out.fill(PageInfo {
                    state: PageState::Error(err),
                    size: PageSize::Base,
                }),
                None => fill(&vma, clip, out)?,
            }
        }
        Ok(Snapshot { range, pages })
    }

    /// A cheaper snapshot from PAGEMAP_SCAN alone (one region per run of identical pages instead
    /// of one pagemap entry per page). Same output as [`Walker::snapshot`] except that a present
    /// page of a private writable mapping is reported [`PageState::Write`] even when it is still
    /// copy-on-write shared (after fork), because only pagemap shows exclusivity. Meant for the
    /// fault path right after `fault(range, Access::Write)`, which breaks such sharing. Fails with
    /// [`Error::Unsupported`] without PAGEMAP_SCAN with PAGE_IS_GUARD (guard-region reporting).
    pub fn snapshot_fast(&self, range: VaRange) -> Result<Snapshot> {
        if !self.caps.scan_guard {
            return Err(Error::Unsupported {
                what: "snapshot_fast",
                why:
                    "PAGEMAP_SCAN with PAGE_IS_GUARD is unavailable on this kernel; use snapshot()"
                        .into(),
            });
        }
        let mut regions = vec![procfs::PageRegion::default(); 512];
        self.walk_readable_vmas(range, |vma, clip, out| {
            self.fill_from_scan(vma, clip, out, &mut regions)
        })
    }

    /// Fills `out` (the pages of `clip`, a part of `vma`) from PAGEMAP_SCAN with PAGE_IS_GUARD
    /// alone. Exact for every VMA but a private writable one, where a present page is reported
    /// [`PageState::Write`] without checking that it is exclusive (see
    /// [`Walker::snapshot_fast`]).
    fn fill_from_scan(
        &self,
        vma: &Vma,
        clip: VaRange,
        out: &mut [PageInfo],
        regions: &mut [procfs::PageRegion],
    ) -> Result<()> {
        let base_size = if vma.kind == VmaKind::Hugetlb {
            PageSize::Hugetlb {
                shift: vma.page_size.trailing_zeros() as u8,
            }
        } else {
            PageSize::Base
        };
        // Pages the walk does not report (none inside a VMA it accepts) stay "none".
        out.fill(PageInfo {
            state: PageState::None,
            size: base_size,
        });
        // PAGE_IS_FILE costs a struct-page lookup per PTE; only a private writable file
        // mapping needs it (to tell page-cache pages, which are copy-on-write, from copies).
        let file_mask = if vma.kind == VmaKind::File && vma.perms.write && !vma.shared {
            procfs::PAGE_IS_FILE
        } else {
            0
        };
        let mut start = clip.start();
        while start < clip.end() {
            let req = procfs::ScanRequest {
                start,
                end: clip.end(),
                category_anyof_mask: procfs::PAGE_IS_PRESENT | procfs::PAGE_IS_GUARD,
                return_mask: procfs::PAGE_IS_PRESENT
                    | procfs::PAGE_IS_PFNZERO
                    | procfs::PAGE_IS_HUGE
                    | file_mask
                    | procfs::PAGE_IS_GUARD,
            };
            let (n, walk_end) = procfs::pagemap_scan(self.pagemap.as_fd(), &req, regions)
                .map_err(|e| self.proc_err("PAGEMAP_SCAN", clip, e))?;
            for r in &regions[..n] {
                let c = r.categories;
                let info = if c & procfs::PAGE_IS_PRESENT != 0 {
                    let state = if c & procfs::PAGE_IS_PFNZERO != 0 {
                        PageState::Zero
                    } else if vma.perms.write && (vma.shared || c & procfs::PAGE_IS_FILE == 0) {
                        PageState::Write
                    } else {
                        PageState::Read
                    };
                    let size = if c & procfs::PAGE_IS_HUGE != 0 && vma.kind != VmaKind::Hugetlb {
                        PageSize::Thp
                    } else {
                        base_size
                    };
                    PageInfo { state, size }
                } else {
                    PageInfo {
                        state: PageState::Error(PageError::Guard),
                        size: PageSize::Base,
                    }
                };
                let a = ((r.start.max(clip.start()) - clip.start()) / PAGE_SIZE) as usize;
                let b = ((r.end.min(clip.end()) - clip.start()) / PAGE_SIZE) as usize;
                out[a..b].fill(info);
            }
            if n < regions.len() || walk_end <= start {
                break;
            }
            start = walk_end;
        }
        Ok(())
    }

    /// Fills `out` (the pages of `clip`, a part of `vma`) from pagemap entries and returns the
    /// 2 MiB windows that may hold a PMD-mapped THP (see [`thp_candidate`]).
    ///
    /// The entries are read in chunks of [`CHUNK_PAGES`] ending on 2 MiB boundaries, so every
    /// window lies in one chunk: the window's first present entry decides whether it is a THP
    /// candidate, and the per-page loop below is a plain map from entry to state.
    fn fill_from_pagemap(
        &self,
        vma: &Vma,
        clip: VaRange,
        out: &mut [PageInfo],
        entries: &mut Vec<u64>,
    ) -> Result<Vec<VaRange>> {
        let size = if vma.kind == VmaKind::Hugetlb {
            PageSize::Hugetlb {
                shift: vma.page_size.trailing_zeros() as u8,
            }
        } else {
            PageSize::Base
        };
        let states = EntryStates::new(vma, self.zero_pfn);
        let all_windows = self.zero_pfn.is_none();
        let mut candidates: Vec<VaRange> = Vec::new();
        if entries.len() < CHUNK_PAGES {
            entries.resize(CHUNK_PAGES, 0);
        }
        let first_vpn = clip.start() / PAGE_SIZE;
        let end_vpn = clip.end() / PAGE_SIZE;
        let mut vpn = first_vpn;
        while vpn < end_vpn {
            // Chunks end on a window boundary (CHUNK_PAGES is a multiple of PMD_PAGES).
            let chunk_end = ((vpn / CHUNK_PAGES as u64 + 1) * CHUNK_PAGES as u64).min(end_vpn);
            let n = (chunk_end - vpn) as usize;
            let got = procfs::pagemap_read(self.pagemap.as_fd(), vpn, &mut entries[..n])
                .map_err(|e| self.proc_err("pread pagemap", clip, e))?;
            let base = (vpn - first_vpn) as usize;
            let chunk = &entries[..got];
            let slots = &mut out[base..base + got];
            for (slot, &e) in slots.iter_mut().zip(chunk) {
                *slot = PageInfo {
                    state: states.state(e),
                    size,
                };
            }
            if !all_windows {
                let mut w = vpn;
                while w < vpn + got as u64 {
                    let w_end = ((w / PMD_PAGES + 1) * PMD_PAGES).min(vpn + got as u64);
                    let part = &chunk[(w - vpn) as usize..(w_end - vpn) as usize];
                    if let Some(k) = part.iter().position(|&e| e & PM_PRESENT != 0) {
                        if thp_candidate(w + k as u64, part[k]) {
                            push_window(&mut candidates, clip, w / PMD_PAGES);
                        }
                    }
                    w = w_end;
                }
            }
            if got < n {
                break;
            }
            vpn = chunk_end;
        }
        Ok(if all_windows { vec![clip] } else { candidates })
    }

    /// Marks PMD-mapped THP pages (and the zero page when PFNs are hidden) from PAGEMAP_SCAN.
    fn mark_thp_and_zero(&self, clip: VaRange, out: &mut [PageInfo]) -> Result<()> {
        let mut regions = [procfs::PageRegion::default(); 256];
        let mut start = clip.start();
        let zero_mask = if self.zero_pfn.is_none() {
            procfs::PAGE_IS_PFNZERO
        } else {
            0
        };
        while start < clip.end() {
            let req = procfs::ScanRequest {
                start,
                end: clip.end(),
                category_anyof_mask: procfs::PAGE_IS_HUGE | zero_mask,
                return_mask: procfs::PAGE_IS_HUGE
                    | procfs::PAGE_IS_PFNZERO
                    | procfs::PAGE_IS_PRESENT,
            };
            let (n, walk_end) = procfs::pagemap_scan(self.pagemap.as_fd(), &req, &mut regions)
                .map_err(|e| self.proc_err("PAGEMAP_SCAN", clip, e))?;
            for r in &regions[..n] {
                let present = r.categories & procfs::PAGE_IS_PRESENT != 0;
                let huge = r.categories & procfs::PAGE_IS_HUGE != 0;
                let zero = r.categories & procfs::PAGE_IS_PFNZERO != 0;
                let a = ((r.start.max(clip.start()) - clip.start()) / PAGE_SIZE) as usize;
                let b = ((r.end.min(clip.end()) - clip.start()) / PAGE_SIZE) as usize;
                for slot in &mut out[a..b] {
                    if present && huge {
                        slot.size = PageSize::Thp;
                    }
                    if present && zero {
                        slot.state = PageState::Zero;
                    }
                }
            }
            if n < regions.len() || walk_end <= start {
                break;
            }
            start = walk_end;
        }
        Ok(())
    }

    /// Makes every page of `range` present with at least `access`, honouring VMA permissions:
    /// a hole or PROT_NONE VMA gives [`Error::Fault`], a write to a read-only VMA
    /// [`Error::PermissionDenied`], a VM_IO/VM_PFNMAP VMA [`Error::SpecialMapping`].
    ///
    /// For the current process this is MADV_POPULATE_READ/WRITE. For another process
    /// (daemon mode) a read fault is done with `process_vm_readv`, which faults pages in through
    /// the target's page tables; a write fault has no safe cross-process equivalent
    /// (`process_madvise` rejects POPULATE with EINVAL, and writing data back races with the
    /// owner) and fails with [`Error::Unsupported`]: ask the client to populate, or map memory it
    /// shares by fd.
    pub fn fault(&self, range: VaRange, access: Access) -> Result<()> {
        let vmas = self.vmas.vmas(range)?;
        let mut next = range.start();
        for vma in &vmas {
            if vma.range.start() > next {
                return Err(Error::Fault {
                    addr: next,
                    reason: "no VMA covers the address",
                });
            }
            let addr = next.max(vma.range.start());
            match vma.kind {
                VmaKind::Special => {
                    return Err(Error::SpecialMapping {
                        start: vma.range.start(),
                        end: vma.range.end(),
                    })
                }
                _ if !vma.perms.read => {
                    return Err(Error::Fault {
                        addr,
                        reason: "the VMA is not readable (PROT_NONE)",
                    })
                }
                _ if !vma.perms.allows(access) => {
                    return Err(Error::PermissionDenied { addr, access })
                }
                _ => {}
            }
            next = vma.range.end();
        }
        if next < range.end() {
            return Err(Error::Fault {
                addr: next,
                reason: "no VMA covers the address",
            });
        }
        for vma in &vmas {
            let Some(clip) = vma.range.intersect(&range) else {
                continue;
            };
            match self.pid {
                None => self.populate_local(vma, clip, access)?,
                Some(pid) => self.populate_remote(pid, clip, access)?,
            }
        }
        Ok(())
    }

    fn populate_local(&self, vma: &Vma, clip: VaRange, access: Access) -> Result<()> {
        mm::populate(clip.start(), clip.len(), access == Access::Write).map_err(|e| match e {
            Errno::EFAULT => Error::Fault {
                addr: clip.start(),
                reason: "populate hit SIGBUS/SIGSEGV (file hole beyond EOF, no free hugetlb \
                         pages, guard region or a mapping that changed concurrently)",
            },
            Errno::ENOMEM if self.vmas.vmas(clip).map(|v| v.is_empty()).unwrap_or(false) => {
                Error::Fault {
                    addr: clip.start(),
                    reason: "the VMA disappeared while faulting",
                }
            }
            Errno::EINVAL if vma.kind == VmaKind::Special => Error::SpecialMapping {
                start: vma.range.start(),
                end: vma.range.end(),
            },
            e => Error::sys_range("madvise(MADV_POPULATE)", clip.start(), clip.end(), e),
        })
    }

    fn populate_remote(&self, pid: libc::pid_t, clip: VaRange, access: Access) -> Result<()> {
        if access == Access::Write {
            return Err(Error::Unsupported {
                what: "write fault-in of another process's memory",
                why: "process_madvise(MADV_POPULATE_WRITE) is EINVAL and writing data back races \
                      with the owner; have the client populate (MADV_POPULATE_WRITE) or share \
                      the memory by fd"
                    .into(),
            });
        }
        // One byte per page, up to IOV_MAX pages per call: the kernel faults each page in for read.
        let pid = nix::unistd::Pid::from_raw(pid);
        let mut scratch = [0u8; 1024];
        let mut page = clip.start();
        while page < clip.end() {
            let n = (((clip.end() - page) / PAGE_SIZE) as usize).min(scratch.len());
            let remote: Vec<RemoteIoVec> = (0..n)
                .map(|i| RemoteIoVec {
                    base: (page + i as u64 * PAGE_SIZE) as usize,
                    len: 1,
                })
                .collect();
            let mut local = [std::io::IoSliceMut::new(&mut scratch[..n])];
            let got = process_vm_readv(pid, &mut local, &remote).map_err(|e| match e {
                Errno::EFAULT => Error::Fault {
                    addr: page,
                    reason: "the target process cannot fault this page in",
                },
                Errno::ESRCH => Error::Released,
                e => Error::sys_range("process_vm_readv", page, clip.end(), e),
            })?;
            if got < n {
                return Err(Error::Fault {
                    addr: page + got as u64 * PAGE_SIZE,
                    reason: "the target process cannot fault this page in",
                });
            }
            page += n as u64 * PAGE_SIZE;
        }
        Ok(())
    }

    fn proc_err(&self, op: &'static str, clip: VaRange, e: Errno) -> Error {
        if e == Errno::ESRCH {
            Error::Released
        } else {
            Error::sys_range(op, clip.start(), clip.end(), e)
        }
    }
}

const PMD_PAGES: u64 = 512;

/// Whether the 2 MiB window whose first present page is `vpn` (pagemap entry `entry`) may hold a
/// PMD-mapped THP, so PAGEMAP_SCAN (which costs a page-table walk) only runs there. A PMD-mapped
/// folio is naturally aligned, so each of its pages has `pfn % 512 == vpn % 512`; ordinary
/// 4 KiB pages match that by chance once in 512.
fn thp_candidate(vpn: u64, entry: u64) -> bool {
    (entry & PM_PFN_MASK) % PMD_PAGES == vpn % PMD_PAGES
}

/// Adds window number `window` (clipped to `clip`) to `found`, merging it with the last one when
/// they touch.
fn push_window(found: &mut Vec<VaRange>, clip: VaRange, window: u64) {
    let start = (window * PMD_PAGES * PAGE_SIZE).max(clip.start());
    let end = ((window + 1) * PMD_PAGES * PAGE_SIZE).min(clip.end());
    match found.last_mut() {
        Some(last) if last.end() == start => {
            if let Ok(grown) = VaRange::from_bounds(last.start(), end) {
                *last = grown;
            }
        }
        _ => found.extend(VaRange::from_bounds(start, end).ok()),
    }
}

/// Maps a pagemap entry to a page state for one VMA.
struct EntryStates {
    /// The state of a present page that is neither the zero page nor needs exclusivity.
    mapped: PageState,
    /// Private writable mapping: a present page is writable only if exclusive and anonymous.
    needs_exclusive: bool,
    zero_pfn: u64,
}

impl EntryStates {
    fn new(vma: &Vma, zero_pfn: Option<u64>) -> Self {
        let writable = vma.perms.write;
        EntryStates {
            mapped: if writable && vma.shared {
                PageState::Write
            } else {
                PageState::Read
            },
            needs_exclusive: writable && !vma.shared,
            zero_pfn: zero_pfn.unwrap_or(u64::MAX),
        }
    }

    #[inline]
    fn state(&self, e: u64) -> PageState {
        if e & PM_PRESENT != 0 {
            if e & PM_PFN_MASK == self.zero_pfn {
                PageState::Zero
            } else if self.needs_exclusive && e & (PM_EXCLUSIVE | PM_FILE) == PM_EXCLUSIVE {
                // Private mappings: only a page mapped once and not a page-cache page (bit 61)
                // has a writable PTE; everything else is copy-on-write.
                PageState::Write
            } else {
                self.mapped
            }
        } else if e & PM_GUARD != 0 {
            PageState::Error(PageError::Guard)
        } else {
            PageState::None
        }
    }
}

fn probe_pagemap_scan(pagemap: &File, extra_category: u64) -> bool {
    let mut regions = [procfs::PageRegion::default(); 1];
    let req = procfs::ScanRequest {
        start: 0,
        end: PAGE_SIZE,
        category_anyof_mask: procfs::PAGE_IS_PRESENT,
        return_mask: procfs::PAGE_IS_PRESENT | extra_category,
    };
    procfs::pagemap_scan(pagemap.as_fd(), &req, &mut regions).is_ok()
}

/// The shared zero page's PFN, learned once by read-faulting a private page of our own; `None`
/// when pagemap hides PFNs (no CAP_SYS_ADMIN).
fn zero_pfn() -> Option<u64> {
    static ZERO_PFN: OnceLock<Option<u64>> = OnceLock::new();
    *ZERO_PFN.get_or_init(|| {
        let probe = crate::Mapping::anonymous(PAGE_SIZE as usize, libc::PROT_READ).ok()?;
        mm::populate(probe.addr(), PAGE_SIZE, false).ok()?;
        let pagemap = File::open("/proc/self/pagemap").ok()?;
        let mut e = [0u64; 1];
        procfs::pagemap_read(pagemap.as_fd(), probe.addr() / PAGE_SIZE, &mut e).ok()?;
        let pfn = e[0] & PM_PFN_MASK;
        (e[0] & PM_PRESENT != 0 && pfn != 0).then_some(pfn)
    })
}
