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
    /// MREMAP_FIXED (and MREMAP_MAYMOVE). For MREMAP_DONTUNMAP (or any flags given as the
    /// syscall takes them) use [`AddressSpace::mremap_with_flags`].
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
        let mut flags = 0;
        if may_move || new_addr.is_some() {
            flags |= libc::MREMAP_MAYMOVE;
        }
        if new_addr.is_some() {
            flags |= libc::MREMAP_FIXED;
        }
        // SAFETY: the caller's guarantee is the one this call needs.
        unsafe { self.mremap_with_flags(old, new_len, flags, new_addr.unwrap_or(0)) }
    }

    /// mremap with strict coherence in every form the syscall has: `flags` and `new_addr` are
    /// passed as `mremap(2)` takes them (MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP; with
    /// DONTUNMAP and no FIXED, `new_addr` is only a hint, 0 for none). Returns the new start.
    ///
    /// Every overlapping subscriber drops its entries for the old range before the syscall (with
    /// DONTUNMAP too: the old range stays mapped but its pages have moved away, so an entry
    /// there would point at memory the old addresses no longer refer to), and for a FIXED target
    /// (whatever was mapped there is replaced). A flag this wrapper does not know is refused
    /// with [`Error::Unsupported`] and a combination the kernel rejects with
    /// [`Error::InvalidArgument`], both before anything is invalidated or changed.
    ///
    /// # Safety
    /// As for `mremap(2)`: nothing may use the old range afterwards (its contents move away even
    /// with DONTUNMAP), nor the target range with MREMAP_FIXED.
    pub unsafe fn mremap_with_flags(
        &self,
        old: VaRange,
        new_len: u64,
        flags: libc::c_int,
        new_addr: u64,
    ) -> Result<u64> {
        self.require_current("mremap wrapper")?;
        check_mremap_form(old, new_len, flags)?;
        VaRange::new(old.start(), new_len)?;
        let fixed = flags & libc::MREMAP_FIXED != 0;
        let target = if fixed {
            Some(VaRange::new(new_addr, new_len)?)
        } else {
            None
        };
        let bracket = self.bracket(
            old,
            EventKind::Remap {
                to: fixed.then_some(new_addr),
            },
        );
        // MREMAP_FIXED replaces whatever was mapped at the target.
        let target_bracket = target.map(|t| self.bracket(t, EventKind::Unmap));
        // SAFETY: the caller guarantees nothing uses the old (or target) range.
        let r = unsafe { mm::mremap(old.start(), old.len(), new_len, flags, new_addr) };
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

/// The mremap flags the strict wrapper knows how to bracket.
const KNOWN_MREMAP_FLAGS: libc::c_int =
    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP;

/// Refuses, before anything changes, a form of mremap the wrapper cannot bracket (an unknown
/// flag) or that the kernel would reject anyway (so a refused call invalidates nothing).
fn check_mremap_form(old: VaRange, new_len: u64, flags: libc::c_int) -> Result<()> {
    let unknown = flags & !KNOWN_MREMAP_FLAGS;
    if unknown != 0 {
        return Err(Error::Unsupported {
            what: "mremap wrapper flags",
            why: format!(
                "flag bits {unknown:#x} are none of MREMAP_MAYMOVE, MREMAP_FIXED, \
                 MREMAP_DONTUNMAP; the wrapper does not know what they change, so it cannot \
                 bracket them (call invalidate() around a plain mremap instead)"
            ),
        });
    }
    let may_move = flags & libc::MREMAP_MAYMOVE != 0;
    if flags & libc::MREMAP_FIXED != 0 && !may_move {
        return Err(Error::InvalidArgument {
            what: "mremap: MREMAP_FIXED needs MREMAP_MAYMOVE",
        });
    }
    if flags & libc::MREMAP_DONTUNMAP != 0 {
        if !may_move {
            return Err(Error::InvalidArgument {
                what: "mremap: MREMAP_DONTUNMAP needs MREMAP_MAYMOVE",
            });
        }
        if new_len != old.len() {
            return Err(Error::InvalidArgument {
                what: "mremap: MREMAP_DONTUNMAP needs the new length equal to the old one",
            });
        }
    }
    Ok(())
}
