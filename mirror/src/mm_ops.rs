//! Wrappers for munmap, mremap, madvise and mprotect that bracket the change synchronously
//! (strict coherence): subscribers tear the range down before the syscall, and no fault can
//! install in it until the syscall has returned. This module (with [`crate::sys`]) is where the
//! crate uses `unsafe`: changing mappings under live Rust references is undefined behaviour, so
//! the wrappers are `unsafe fn`s with the same contract as the syscalls.

use crate::registry::EventKind;
use crate::sys::mm;
use crate::{AddressSpace, Error, Perms, Result, VaRange};

/// `madvise` advice that changes neither contents nor mappings, so no invalidation is needed.
const HARMLESS_ADVICE: [libc::c_int; 12] = [
    libc::MADV_NORMAL,
    libc::MADV_RANDOM,
    libc::MADV_SEQUENTIAL,
    libc::MADV_WILLNEED,
    libc::MADV_DONTFORK,
    libc::MADV_DOFORK,
    libc::MADV_DONTDUMP,
    libc::MADV_DODUMP,
    libc::MADV_HUGEPAGE,
    libc::MADV_NOHUGEPAGE,
    mm::MADV_POPULATE_READ,
    mm::MADV_POPULATE_WRITE,
];

/// Largest munmap whose range the wrapper unregisters first instead of letting the kernel send
/// an UNMAP event (see [`AddressSpace::munmap`]).
const QUIET_UNMAP_MAX: u64 = 64 * 4096;

impl AddressSpace {
    fn require_current(&self, what: &'static str) -> Result<()> {
        match self.pid() {
            None => Ok(()),
            Some(pid) => Err(Error::Unsupported {
                what,
                why: format!(
                    "pid {pid} is another process: only it can change its own mappings; it must \
                     report changes with invalidate()/protect() or rely on userfaultfd events"
                ),
            }),
        }
    }

    /// munmap with strict coherence.
    ///
    /// # Safety
    /// As for `munmap(2)`: nothing may use the range afterwards (no live references into it, and
    /// any owner such as a [`crate::Mapping`] must be forgotten).
    pub unsafe fn munmap(&self, range: VaRange) -> Result<()> {
        self.require_current("munmap wrapper")?;
        let bracket = self.bracket(range, EventKind::Unmap);
        // Every subscriber has torn the range down already: spare the kernel the UNMAP event,
        // which would make this munmap wait until the monitor thread has read it (~12 µs, most
        // of a 1-page munmap's cost here). Only for small ranges: unregistering a write-protect
        // registration walks the page tables of the whole range (~150 ns/page measured), which
        // costs more than the event beyond a few dozen pages. Best effort: a range the kernel
        // will not unregister (a special mapping in it) still gets its event, then redundant.
        if range.len() <= QUIET_UNMAP_MAX {
            self.unregister_quietly(range);
        }
        // SAFETY: the caller guarantees nothing uses the range.
        let r = unsafe { mm::munmap(range.start(), range.len()) };
        drop(bracket);
        r.map_err(|e| Error::sys_range("munmap", range.start(), range.end(), e))
    }

    /// mremap with strict coherence for the old range; returns the new start. `new_addr` implies
    /// MREMAP_FIXED (and MREMAP_MAYMOVE).
    ///
    /// # Safety
    /// As for `mremap(2)`: nothing may use the old range afterwards (nor the target range with a
    /// fixed `new_addr`).
    pub unsafe fn mremap(
        &self,
        old: VaRange,
        new_len: u64,
        may_move: bool,
        new_addr: Option<u64>,
    ) -> Result<u64> {
        self.require_current("mremap wrapper")?;
        VaRange::new(old.start(), new_len)?;
        let mut flags = 0;
        if may_move || new_addr.is_some() {
            flags |= libc::MREMAP_MAYMOVE;
        }
        let target = match new_addr {
            Some(a) => {
                let t = VaRange::new(a, new_len)?;
                flags |= libc::MREMAP_FIXED;
                Some(t)
            }
            None => None,
        };
        let bracket = self.bracket(old, EventKind::Remap { to: new_addr });
        // MREMAP_FIXED replaces whatever was mapped at the target.
        let target_bracket = target.map(|t| self.bracket(t, EventKind::Unmap));
        // SAFETY: the caller guarantees nothing uses the old (or target) range.
        let r = unsafe {
            mm::mremap(
                old.start(),
                old.len(),
                new_len,
                flags,
                new_addr.unwrap_or(0),
            )
        };
        drop(target_bracket);
        drop(bracket);
        r.map_err(|e| Error::sys_range("mremap", old.start(), old.end(), e))
    }

    /// madvise with strict coherence for advice that discards or moves pages (DONTNEED, FREE,
    /// REMOVE, COLLAPSE, PAGEOUT, GUARD_INSTALL, ...); harmless advice passes straight through.
    ///
    /// # Safety
    /// As for `madvise(2)`: discarding advice must only be given for memory whose contents no live
    /// reference relies on.
    pub unsafe fn madvise(&self, range: VaRange, advice: libc::c_int) -> Result<()> {
        self.require_current("madvise wrapper")?;
        let bracket =
            (!HARMLESS_ADVICE.contains(&advice)).then(|| self.bracket(range, EventKind::Discard));
        // SAFETY: the caller guarantees the contents may be discarded.
        let r = unsafe { mm::madvise(range.start(), range.len(), advice) };
        drop(bracket);
        r.map_err(|e| Error::sys_range("madvise", range.start(), range.end(), e))
    }

    /// mprotect with strict coherence (mprotect has no userfaultfd event at all).
    ///
    /// # Safety
    /// As for `mprotect(2)`: no live reference may rely on the access being removed.
    pub unsafe fn mprotect(&self, range: VaRange, perms: Perms) -> Result<()> {
        self.require_current("mprotect wrapper")?;
        let bracket = self.bracket(range, EventKind::Protect { perms });
        // SAFETY: the caller guarantees no reference relies on the removed access.
        let r = unsafe { mm::mprotect(range.start(), range.len(), perms.to_prot()) };
        drop(bracket);
        r.map_err(|e| Error::sys_range("mprotect", range.start(), range.end(), e))
    }
}
