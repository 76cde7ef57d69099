//! Mirrors larger than the pin budget (issue 18): eviction keeps the mapped bytes under the
//! budget while the data stays right, thrashing protection keeps part of a cyclic working set
//! resident, device page-table pages return to the pool after a churn of distinct ranges, and a
//! freed table page is never walked through a stale walk-cache entry after its reuse.
//!
//! Everything runs on the in-process emulator of MXA-1 revision 2 (ACCESSED/DIRTY bits and a
//! page-walk cache); each test first checks that the normal path was taken (aging available).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driver::context::{ContextOptions, ThrashProtection};
use driver::runtime::{DeviceSpec, Op, Runtime, RuntimeOptions};
use driver::{Context, Error};
use mirror::Mapping;

const PAGE: usize = 4096;
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const MIB: usize = 1 << 20;

fn open(mirror: mirror::Config) -> Arc<Runtime> {
    let options = RuntimeOptions {
        mirror,
        ..Default::default()
    };
    Runtime::open(DeviceSpec::emulated(), options).expect("open the emulated device")
}

fn fill(ctx: &Context, addr: u64, len: usize, pattern: u64) -> Result<u64, Error> {
    // SAFETY: every range here is a Mapping that no Rust reference points into.
    let t = unsafe {
        ctx.submit(Op::Fill {
            dst: addr,
            len: len as u64,
            pattern,
        })?
    };
    ctx.wait(t)
}

fn checksum(ctx: &Context, addr: u64, len: usize) -> Result<u64, Error> {
    // SAFETY: as above; the device only reads.
    let t = unsafe {
        ctx.submit(Op::Checksum {
            src: addr,
            len: len as u64,
        })?
    };
    ctx.wait(t)
}

fn cpu_checksum(m: &Mapping, offset: usize, len: usize) -> u64 {
    let mut state = accel_abi::FNV_OFFSET;
    for i in offset..offset + len {
        state = accel_abi::fnv1a_update(state, &[m.read_byte(i)]);
    }
    state
}

fn budgeted(rt: &Arc<Runtime>, budget: usize, thrash: Option<ThrashProtection>) -> Context {
    rt.create_context_with(ContextOptions {
        pin_budget: Some(budget as u64),
        thrash_protection: thrash,
        ..Default::default()
    })
    .expect("context")
}

/// A context without fault-around (each fault maps its own pages), under `budget` if given.
fn exact(rt: &Arc<Runtime>, budget: Option<u64>) -> Context {
    rt.create_context_with(ContextOptions {
        pin_budget: budget,
        fault_around: 0,
        ..Default::default()
    })
    .expect("context")
}

/// The byte a fill with `pattern` leaves at `offset` of its range.
fn byte_of(pattern: u64, offset: usize) -> u8 {
    accel_abi::fill_byte(pattern, offset as u64)
}

/// A mirror of four times the budget with a working set that moves through it, three times
/// round: every command's data is right, every page keeps what the device last wrote there
/// (evicted or not), and the mapped bytes, sampled from another thread throughout, never go
/// over the budget. Evictions and refaults happen and are counted, through the aging path.
#[test]
fn a_mirror_four_times_the_budget_stays_right_and_under_budget() {
    let rt = open(mirror::Config::default());
    assert!(
        rt.device().caps().accessed_dirty && rt.device().accessed_dirty(),
        "the emulator is revision 2 with ACCESSED/DIRTY enabled"
    );
    let budget = MIB;
    let ctx = budgeted(&rt, budget, Some(ThrashProtection::default()));
    let total = 4 * budget;
    let m = Mapping::anonymous(total, RW).unwrap();
    let window = budget / 2;
    let step = budget / 4;
    let mut written = vec![0u64; total / PAGE];
    let stop = AtomicBool::new(false);
    let (max_seen, samples) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let (mut max, mut n) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                max = max.max(ctx.stats().mapped_bytes);
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            (max, n)
        });
        for round in 0..3u64 {
            for start in (0..total - window + 1).step_by(step) {
                let pattern =
                    0x0101_0101_0101_0101u64.wrapping_mul(round * 64 + (start / step) as u64 + 1);
                fill(&ctx, m.addr() + start as u64, window, pattern).expect("fill");
                written[start / PAGE..(start + window) / PAGE].fill(pattern);
                let want = cpu_checksum(&m, start, window);
                assert_eq!(
                    checksum(&ctx, m.addr() + start as u64, window).expect("checksum"),
                    want,
                    "round {round}, window at {start:#x}"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        sampler.join().unwrap()
    });
    // Every page holds what the device last wrote there, evicted since or not.
    for (p, &pattern) in written.iter().enumerate() {
        for off in [0, 1, 777, PAGE - 1] {
            // Fills start page-aligned, so a byte's offset in its fill is its offset mod 8.
            let at = p * PAGE + off;
            assert_eq!(
                m.read_byte(at),
                byte_of(pattern, at % 8),
                "page {p} offset {off}"
            );
        }
    }
    let s = ctx.stats();
    assert!(samples > 20, "the sampler ran ({samples} samples)");
    assert!(
        max_seen <= budget as u64,
        "mapped bytes went to {max_seen} over the budget {budget}: {s:?}"
    );
    assert!(s.mapped_bytes <= budget as u64, "{s:?}");
    assert!(s.evictions > 0 && s.evicted_bytes > 0, "{s:?}");
    assert!(s.refaults > 0, "evicted pages came back: {s:?}");
    assert!(s.aging_queries > 0, "{s:?}");
    assert_eq!(s.aging_unavailable, 0, "aging had use information: {s:?}");
    assert_eq!(s.budget_refusals, 0, "{s:?}");
    assert_eq!(s.failures, 0, "{s:?}");
}

/// Bytes evicted in each of `passes` cyclic sweeps over `ws` bytes (one fill per 64 KiB), the
/// data checked every pass.
fn sweep(ctx: &Context, m: &Mapping, ws: usize, passes: usize) -> Vec<u64> {
    let chunk = 64 << 10;
    let mut per_pass = Vec::new();
    for pass in 0..passes {
        let before = ctx.stats().evicted_bytes;
        let pattern = 0x1111_1111_1111_1111u64.wrapping_add(pass as u64);
        for start in (0..ws).step_by(chunk) {
            fill(ctx, m.addr() + start as u64, chunk, pattern).expect("fill");
        }
        for start in (0..ws).step_by(16 * PAGE) {
            assert_eq!(m.read_byte(start + 5), byte_of(pattern, 5), "pass {pass}");
        }
        assert!(ctx.stats().mapped_bytes <= MIB as u64, "pass {pass}");
        per_pass.push(ctx.stats().evicted_bytes - before);
    }
    per_pass
}

/// A cyclic sweep over one and a half times the budget, the pattern that evicts each page just
/// before its next use under an LRU: every pass's data is right, the budget holds after every
/// pass, and after the first passes each pass evicts at least what cannot stay (the working set
/// minus the budget) and at most twice the working set: no pass ping-pongs mappings in and out
/// (a mapping may be evicted and refaulted within one pass, when the CLOCK finds everything used
/// and takes a mapping of this pass; a run measured 1.04x the working set under load). With
/// thrashing protection on, ranges refaulting within the window are protected.
#[test]
fn a_thrashing_sweep_stays_bounded() {
    let rt = open(mirror::Config::default());
    let budget = MIB;
    let ws = budget * 3 / 2;
    let passes = 12;
    for thrash in [None, Some(ThrashProtection::default())] {
        let ctx = budgeted(&rt, budget, thrash);
        let m = Mapping::anonymous(ws, RW).unwrap();
        let per_pass = sweep(&ctx, &m, ws, passes);
        let s = ctx.stats();
        for (pass, &evicted) in per_pass.iter().enumerate().skip(2) {
            // Eviction works on whole mappings, so a pass may evict up to one mapping (an
            // eighth of the budget at most) past what it strictly must.
            assert!(
                evicted + (budget / 8) as u64 >= (ws - budget) as u64 && evicted <= 2 * ws as u64,
                "pass {pass} evicted {evicted} bytes (working set {ws}, budget {budget}): {per_pass:?} {s:?}"
            );
        }
        assert_eq!(s.failures, 0, "{s:?}");
        assert_eq!(s.aging_unavailable, 0, "{s:?}");
        assert_eq!(
            s.thrash_protections > 0,
            thrash.is_some(),
            "protection happens when on, never when off: {s:?}"
        );
    }
}

/// A run larger than the whole budget cannot be made to fit: it is refused naming the budget,
/// its value and the option, and nothing else is lost.
#[test]
fn a_run_larger_than_the_budget_is_refused_naming_the_budget() {
    let rt = open(mirror::Config::default());
    let ctx = rt
        .create_context_with(ContextOptions {
            pin_budget: Some(16 << 10),
            fault_around: 64 << 10,
            ..Default::default()
        })
        .unwrap();
    let m = Mapping::anonymous(MIB, RW).unwrap();
    // Fault-around would make a 64 KiB run; it falls back to the faulting pages, which fit.
    fill(&ctx, m.addr(), 8 * PAGE, 3).expect("small fill under a tiny budget");
    assert!(ctx.stats().mapped_bytes <= 16 << 10);
    // A prefault of 64 KiB in one run cannot fit in 16 KiB.
    let e = ctx.prefault(m.addr(), 64 << 10, true).unwrap_err();
    assert!(
        matches!(e, Error::QuotaExceeded { limit, .. } if limit == 16 << 10),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains("16384") && text.contains("ContextOptions::pin_budget"),
        "{text}"
    );
}

/// DIRTY is reported: the pages the device wrote, not those it only read, including pages
/// whose entries were evicted since; clearing resets the record.
#[test]
fn the_pages_the_device_wrote_are_reported_dirty_across_evictions() {
    let rt = open(mirror::Config::default());
    let budget = 256 << 10;
    let ctx = exact(&rt, Some(budget as u64));
    let m = Mapping::anonymous(4 * budget, RW).unwrap();
    let base = m.addr();
    // Write pages 0..4, read 4..8, then read far enough to evict the written ones.
    fill(&ctx, base, 4 * PAGE, 9).unwrap();
    checksum(&ctx, base + 4 * PAGE as u64, 4 * PAGE).unwrap();
    checksum(&ctx, base + budget as u64, 2 * budget).unwrap();
    assert!(ctx.stats().evictions > 0, "{:?}", ctx.stats());
    let dirty = ctx.take_dirty(base, (4 * budget) as u64).expect("dirty");
    assert_eq!(
        dirty,
        vec![base..base + 4 * PAGE as u64],
        "only the written pages"
    );
    assert_eq!(
        ctx.take_dirty(base, (4 * budget) as u64).unwrap(),
        vec![],
        "taking clears the record"
    );
    // A write after the take is seen again, through a translation the device still caches.
    fill(&ctx, base + 4 * PAGE as u64, PAGE, 1).unwrap();
    fill(&ctx, base + 4 * PAGE as u64, PAGE, 2).unwrap();
    assert_eq!(
        ctx.dirty_pages(base, (4 * budget) as u64).unwrap(),
        vec![base + 4 * PAGE as u64..base + 5 * PAGE as u64]
    );
}

/// Device page-table pages go back to the pool when the ranges they map go: after a churn of
/// distinct ranges (each in its own 2 MiB region, so each cycle creates and frees a level-1
/// table, and every 512th a level-2 table) the table pages in use are back at the baseline and
/// the pool did not grow after the first cycles.
#[test]
fn table_pages_return_to_baseline_after_a_churn_of_distinct_ranges() {
    // Explicit-only: the cycles unmap through `invalidate`, and no range is registered with
    // userfaultfd (each registration would split the reservation's VMA).
    let rt = open(mirror::Config::explicit_only());
    let ctx = exact(&rt, None);
    const CYCLES: usize = 100_000;
    let stride = 2 * MIB + PAGE;
    let len = 64 << 30;
    let m = Mapping::with_flags(
        len,
        RW,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        None,
        0,
    )
    .unwrap();
    let (_, baseline_in_use) = rt.device().table_pool_usage();
    let base_pages = ctx.stats().table_pages;
    let mut pool_bytes_early = 0;
    for i in 0..CYCLES {
        let off = (i * stride) % (len - PAGE);
        let off = off - off % PAGE;
        let va = m.addr() + off as u64;
        ctx.prefault(va, PAGE as u64, true).expect("prefault");
        ctx.address_space()
            .invalidate(mirror::VaRange::new(va, PAGE as u64).unwrap())
            .expect("invalidate");
        m.discard(off, PAGE).unwrap();
        if i == 100 {
            pool_bytes_early = rt.device().table_pool_usage().0;
        }
    }
    let (pool_bytes, in_use) = rt.device().table_pool_usage();
    let s = ctx.stats();
    assert_eq!(s.table_pages, base_pages, "{s:?}");
    assert_eq!(
        in_use, baseline_in_use,
        "table pages in use back at baseline"
    );
    assert_eq!(pool_bytes, pool_bytes_early, "the pool stayed flat");
    assert!(s.table_pages_freed >= CYCLES as u64, "{s:?}");
}

/// A level-1 table page freed with its range and reused for another 2 MiB region must not be
/// walked for the old region through the device's walk cache: the driver invalidates walk caches
/// before reuse. The old region's data is read back through the device after every reuse and
/// checked against the CPU's. (With leaf-only invalidations there, the device translates the
/// old VA through the new region's leaf and the checksum is the other region's.)
#[test]
fn a_reused_table_page_is_never_walked_for_its_old_range() {
    let rt = open(mirror::Config::explicit_only());
    assert!(
        rt.device().caps().walk_cache,
        "the emulator has a walk cache"
    );
    let ctx = rt
        .create_context_with(ContextOptions {
            fault_around: 0,
            large_pages: false,
            ..Default::default()
        })
        .unwrap();
    // Three 2 MiB regions in one 1 GiB region: `keep` keeps the level-2 table alive, so only
    // the level-1 table of `a` is freed and then reused for `b`.
    let m = Mapping::anonymous_aligned(6 * MIB, 2 * MIB, RW).unwrap();
    let (a, b, keep) = (0usize, 2 * MIB, 4 * MIB);
    let slot = 5 * PAGE; // same level-1 index in `a` and `b`
    fill(&ctx, m.addr() + keep as u64, PAGE, 0x4444).unwrap();
    for i in 0..200u64 {
        fill(&ctx, m.addr() + (a + slot) as u64, PAGE, 0x1000 + i).unwrap();
        // The device walks `a` again (its walk cache holds a's level-2 entry).
        checksum(&ctx, m.addr() + (a + slot) as u64, PAGE).unwrap();
        ctx.address_space()
            .invalidate(mirror::VaRange::new(m.addr() + a as u64, (2 * MIB) as u64).unwrap())
            .unwrap();
        fill(&ctx, m.addr() + (b + slot) as u64, PAGE, 0x2000 + i).unwrap();
        let want = cpu_checksum(&m, a + slot, PAGE);
        let got = checksum(&ctx, m.addr() + (a + slot) as u64, PAGE).unwrap();
        assert_eq!(
            got, want,
            "cycle {i}: the device read another region through a"
        );
        ctx.address_space()
            .invalidate(mirror::VaRange::new(m.addr() + b as u64, (2 * MIB) as u64).unwrap())
            .unwrap();
    }
    assert!(ctx.stats().table_pages_freed >= 200, "{:?}", ctx.stats());
}

/// A command whose operands need more than the budget at once (a copy of 16 KiB to 16 KiB under
/// a 16 KiB budget: each run fits, both do not) must not evict its own pages for ever: after
/// the runs have pulled each other back a few times the fault is refused, naming the budget.
#[test]
fn a_command_needing_more_than_the_budget_ends_refused_not_livelocked() {
    let rt = open(mirror::Config::default());
    let ctx = exact(&rt, Some(16 << 10));
    let m = Mapping::anonymous(MIB, RW).unwrap();
    let (dst, src) = (m.addr(), m.addr() + (512 << 10));
    // SAFETY: both ranges are inside a Mapping no Rust reference points into.
    let t = unsafe {
        ctx.submit(Op::Copy {
            dst,
            src,
            len: 16 << 10,
        })
        .unwrap()
    };
    let e = ctx.wait(t).unwrap_err();
    assert!(
        matches!(e, Error::QuotaExceeded { limit, .. } if limit == 16 << 10),
        "{e:?} {:?}",
        ctx.stats()
    );
    assert!(ctx.stats().mapped_bytes <= 16 << 10);
    // Within the budget the same copy works.
    let ctx = exact(&rt, Some(64 << 10));
    // SAFETY: as above.
    let t = unsafe {
        ctx.submit(Op::Copy {
            dst,
            src,
            len: 16 << 10,
        })
        .unwrap()
    };
    ctx.wait(t).expect("a copy within the budget");
}

/// Mapping a range again (a read-only mapping upgraded for writing, a stale fault serviced
/// twice) replaces what was there: it fits a budget the old mapping already fills (it used to be
/// refused as if both had to fit).
#[test]
fn a_read_then_write_of_one_buffer_fits_the_budget_it_fills() {
    let rt = open(mirror::Config::default());
    let budget = 16 << 10;
    let ctx = exact(&rt, Some(budget));
    let m = Mapping::anonymous(budget as usize, RW).unwrap();
    ctx.prefault(m.addr(), budget, false)
        .expect("first mapping");
    // A prefault over what is mapped maps it again (an upgrade, or a stale fault serviced twice):
    // the new mapping replaces the old one.
    ctx.prefault(m.addr(), budget, true)
        .expect("the new mapping replaces the old one within the budget");
    assert!(ctx.stats().mapped_bytes <= budget);
}

/// A take of part of a page reports the whole page (the record is per page) and a later take of
/// the rest of it finds nothing lost.
#[test]
fn a_partial_take_of_dirty_pages_loses_nothing() {
    let rt = open(mirror::Config::default());
    let ctx = exact(&rt, None);
    let m = Mapping::anonymous(4 * PAGE, RW).unwrap();
    fill(&ctx, m.addr(), 2 * PAGE, 5).unwrap();
    let first = ctx.take_dirty(m.addr(), 2048).unwrap();
    assert_eq!(first, vec![m.addr()..m.addr() + PAGE as u64], "whole pages");
    let rest = ctx.take_dirty(m.addr() + 2048, (4 * PAGE) as u64).unwrap();
    assert_eq!(
        rest,
        vec![m.addr() + PAGE as u64..m.addr() + 2 * PAGE as u64],
        "the second written page is still recorded"
    );
    assert_eq!(
        ctx.take_dirty(m.addr(), 0).unwrap(),
        vec![],
        "an empty range"
    );
}
