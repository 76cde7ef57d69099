//! Property test against a shadow oracle: random sequences of CPU changes (raw ones seen through
//! userfaultfd, wrapped ones, explicit invalidations) interleaved with device faults. After each
//! step and `settle()`, every device entry must belong to the page's current incarnation: no
//! entry survives a change of its page (eventual coherence reached), and entries only exist for
//! pages the CPU maps writable.

mod common;

use std::collections::HashMap;

use common::*;
use mirror::{Access, AddressSpace, Config, Mapping, PageState, Perms, VaRange};
use proptest::prelude::*;

const POOL: usize = 12;

#[derive(Clone, Debug)]
enum Op {
    /// Device fault (write) on pages [a, a+n).
    Fault(usize, usize),
    /// Raw MADV_DONTNEED (uffd REMOVE).
    Discard(usize, usize),
    /// MADV_DONTNEED through the wrapper (strict).
    DiscardApi(usize, usize),
    /// Raw munmap of one page (uffd UNMAP), then a fresh mapping at the same address, re-tracked.
    Replace(usize),
    /// mprotect read-only and back through the wrapper (strict).
    ProtectCycle(usize, usize),
    /// Explicit invalidate.
    Invalidate(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let span = (0..POOL).prop_flat_map(|a| (Just(a), 1..=(POOL - a)));
    prop_oneof![
        3 => span.clone().prop_map(|(a, n)| Op::Fault(a, n)),
        2 => span.clone().prop_map(|(a, n)| Op::Discard(a, n)),
        1 => span.clone().prop_map(|(a, n)| Op::DiscardApi(a, n)),
        2 => (0..POOL).prop_map(Op::Replace),
        1 => span.clone().prop_map(|(a, n)| Op::ProtectCycle(a, n)),
        1 => span.prop_map(|(a, n)| Op::Invalidate(a, n)),
    ]
}

/// Device state: page address -> the page incarnation (epoch) it was mirrored from.
type Ptes = HashMap<u64, u64>;

struct World {
    mm: AddressSpace,
    base: u64,
    pages: Vec<Option<Mapping>>,
    epoch: Vec<u64>,
}

impl World {
    fn range(&self, a: usize, n: usize) -> VaRange {
        VaRange::new(self.base + (a * PAGE) as u64, (n * PAGE) as u64).unwrap()
    }

    fn bump(&mut self, a: usize, n: usize) {
        for e in &mut self.epoch[a..a + n] {
            *e += 1;
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mm = AddressSpace::current(Config::default()).unwrap();
    if mm.capabilities().uffd.is_none() {
        println!("SKIP shadow oracle: userfaultfd unavailable");
        return Ok(());
    }
    // The pool sits between two PROT_NONE guard pages that stay mapped: a page Replace frees is
    // then an enclosed one-page hole. Without them, freeing page 0 or the last page joins the
    // free space next to the pool, and any mmap another thread of this process makes in that
    // window (a large malloc, a thread stack) can land on the page's address before we map it
    // again (seen once on CI as EEXIST from MAP_FIXED_NOREPLACE).
    let fenced = Mapping::anonymous((POOL + 2) * PAGE, libc::PROT_NONE).unwrap();
    let (_guard_low, rest) = fenced.split_at(PAGE).unwrap();
    let (pool, _guard_high) = rest.split_at(POOL * PAGE).unwrap();
    pool.protect(0, POOL * PAGE, RW).unwrap();
    let base = pool.addr();
    let mut pages = Vec::new();
    let mut rest = Some(pool);
    for _ in 0..POOL - 1 {
        let (head, tail) = rest.take().unwrap().split_at(PAGE).unwrap();
        pages.push(Some(head));
        rest = Some(tail);
    }
    pages.push(rest);
    let mut w = World {
        mm,
        base,
        pages,
        epoch: vec![0; POOL],
    };
    let whole = w.range(0, POOL);
    w.mm.track(whole).unwrap();
    let sub =
        w.mm.subscribe(whole, Ptes::new(), |ptes: &mut Ptes, inv| {
            ptes.retain(|a, _| !inv.range.contains(*a))
        })
        .unwrap();

    for op in ops {
        match op {
            Op::Fault(a, n) => {
                let r = w.range(a, n);
                let epochs = w.epoch.clone();
                let base = w.base;
                let res = sub.mirror_range(
                    |_| {
                        w.mm.fault(r, Access::Write)?;
                        w.mm.snapshot(r)
                    },
                    |ptes, snap| {
                        for (i, p) in snap.pages().iter().enumerate() {
                            let addr = r.start() + (i * PAGE) as u64;
                            if p.state == PageState::Write {
                                ptes.insert(addr, epochs[((addr - base) / PAGE as u64) as usize]);
                            }
                        }
                    },
                );
                // A fault over a replaced-then-missing page cannot happen (Replace remaps), so
                // every fault must succeed.
                prop_assert!(res.is_ok(), "fault failed: {res:?}");
            }
            Op::Discard(a, n) => {
                let r = w.range(a, n);
                for i in a..a + n {
                    w.pages[i].as_ref().unwrap().discard(0, PAGE).unwrap();
                }
                let _ = r;
                w.bump(a, n);
            }
            Op::DiscardApi(a, n) => {
                // SAFETY: the pool's contents are never relied upon.
                unsafe { w.mm.madvise(w.range(a, n), libc::MADV_DONTNEED) }.unwrap();
                w.bump(a, n);
                // Strict: no entry for the range right after the call, before settle().
                let stale = sub.lock().keys().any(|k| w.range(a, n).contains(*k));
                prop_assert!(!stale, "wrapper returned with entries left");
            }
            Op::Replace(i) => {
                let addr = w.base + (i * PAGE) as u64;
                drop(w.pages[i].take());
                match Mapping::anonymous_at(addr, PAGE, RW) {
                    Ok(m) => w.pages[i] = Some(m),
                    Err(mirror::Error::Sys {
                        errno: nix::errno::Errno::EEXIST,
                        ..
                    }) => {
                        // Another thread's one-page mmap took the hole: that memory is not
                        // ours to touch, so the case ends here (every step so far was checked).
                        println!("page {i} was taken by another mapping; case ends early");
                        return Ok(());
                    }
                    Err(e) => panic!("mapping page {i} again: {e:?}"),
                }
                w.bump(i, 1);
                // The new VMA is not registered: track it again (after the UNMAP was read, which
                // munmap waited for, so coverage already dropped the old one).
                w.mm.track(w.range(i, 1)).unwrap();
            }
            Op::ProtectCycle(a, n) => {
                let r = w.range(a, n);
                // SAFETY: nothing references the pool.
                unsafe { w.mm.mprotect(r, Perms::READ) }.unwrap();
                // SAFETY: as above.
                unsafe { w.mm.mprotect(r, Perms::READ_WRITE) }.unwrap();
                w.bump(a, n);
            }
            Op::Invalidate(a, n) => {
                w.mm.invalidate(w.range(a, n)).unwrap();
                w.bump(a, n);
            }
        }
        w.mm.settle().unwrap();
        let snap = w.mm.snapshot(whole).unwrap();
        for (&addr, &epoch) in sub.lock().iter() {
            let i = ((addr - w.base) / PAGE as u64) as usize;
            prop_assert_eq!(epoch, w.epoch[i], "stale entry for page {}", i);
            prop_assert_eq!(
                snap.pages()[i].state,
                PageState::Write,
                "entry for page {} not mapped writable",
                i
            );
        }
    }
    drop(sub);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn device_entries_never_outlive_their_page(ops in prop::collection::vec(op(), 1..24)) {
        run(ops)?;
    }
}
