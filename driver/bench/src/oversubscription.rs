//! Mirrors larger than the pin budget: sweep throughput at working set / budget of 1x, 2x and
//! 4x (thrashing protection on and off) beside the same sweep with no budget; the cost of an
//! aging pass per mapped page beside a PAGEMAP_SCAN walk of the same pages; table-page bytes
//! after a churn of distinct ranges beside the bytes after its first cycles.

use std::time::Instant;

use driver::context::{ContextOptions, ThrashProtection};
use driver::fault::ServiceMode;
use driver::runtime::{AcceleratorConfig, DeviceSpec, Runtime, RuntimeOptions};
use driver::{Context, Error};

use crate::sys::{self, Region, PAGE};
use crate::{device_fill, median, os, Bench, Figure};

/// Pages per fill command of a sweep (64 KiB).
const CHUNK_PAGES: usize = 16;

/// A polling runtime pinned to CPU 0 with one context of `options`.
fn open_with(
    options: ContextOptions,
    mirror: mirror::Config,
) -> Result<(std::sync::Arc<Runtime>, Context), Error> {
    sys::pin(&[0]).map_err(os("sched_setaffinity"))?;
    let rt = Runtime::open(
        DeviceSpec::Emulated(AcceleratorConfig::default()),
        RuntimeOptions {
            mode: ServiceMode::Polling,
            mirror,
            ..Default::default()
        },
    )?;
    let ctx = rt.create_context_with(options)?;
    Ok((rt, ctx))
}

/// Pages per second of `passes` sweeps over `r` in 64 KiB fills, after one warm pass (median of
/// the timed passes), and the evictions per timed pass.
fn sweep_rate(ctx: &Context, r: &Region, passes: usize) -> Result<(f64, f64), Error> {
    let addrs: Vec<u64> = (0..r.len() / (CHUNK_PAGES * PAGE))
        .map(|i| r.page(i * CHUNK_PAGES))
        .collect();
    device_fill(ctx, &addrs, (CHUNK_PAGES * PAGE) as u64, 16)?;
    let e0 = ctx.stats().evictions;
    let mut rates = Vec::new();
    for _ in 0..passes {
        let t = device_fill(ctx, &addrs, (CHUNK_PAGES * PAGE) as u64, 16)?;
        rates.push((r.len() / PAGE) as f64 / t.as_secs_f64());
    }
    let evictions = (ctx.stats().evictions - e0) as f64 / passes as f64;
    Ok((median(&mut rates), evictions))
}

impl Bench {
    pub(crate) fn oversubscription(&mut self) -> Result<(), Error> {
        let quick = self.report.profile == "quick";
        let budget_pages = if quick { 1024 } else { 4096 };
        let passes = if quick { 3 } else { 5 };
        let budget = (budget_pages * PAGE) as u64;

        // Baseline: the same sweep with no budget (everything resident after the warm pass).
        let (_rt, ctx) = open_with(ContextOptions::default(), mirror::Config::default())?;
        let r = Region::new(budget_pages).map_err(os("mmap"))?;
        r.madvise(libc::MADV_POPULATE_WRITE)
            .map_err(os("madvise"))?;
        let (resident, _) = sweep_rate(&ctx, &r, passes)?;
        drop((r, ctx, _rt));

        for ratio in [1usize, 2, 4] {
            for thrash in [Some(ThrashProtection::default()), None] {
                if ratio == 1 && thrash.is_none() {
                    continue;
                }
                let options = ContextOptions {
                    pin_budget: Some(budget),
                    thrash_protection: thrash,
                    ..Default::default()
                };
                let (_rt, ctx) = open_with(options, mirror::Config::default())?;
                let r = Region::new(ratio * budget_pages).map_err(os("mmap"))?;
                r.madvise(libc::MADV_POPULATE_WRITE)
                    .map_err(os("madvise"))?;
                let (rate, evictions) = sweep_rate(&ctx, &r, passes)?;
                let s = ctx.stats();
                self.fig(Figure {
                    group: "oversubscription".into(),
                    name: format!(
                        "sweep, working set {ratio}x the pin budget ({} MiB), thrashing protection {}",
                        budget >> 20,
                        if thrash.is_some() { "on" } else { "off" }
                    ),
                    mode: "polling".into(),
                    placement: "same-core".into(),
                    value: rate,
                    unit: "pages/s".into(),
                    baseline_name: "the same sweep over the budget's pages, no budget (all resident)".into(),
                    baseline: Some(resident),
                    ratio: Some(rate / resident),
                    note: format!(
                        "{evictions:.0} evictions per pass; {} refaults, {} protections, {} second chances, {} KiB mapped at the end of {} KiB",
                        s.refaults,
                        s.thrash_protections,
                        s.second_chances,
                        s.mapped_bytes >> 10,
                        budget >> 10
                    ),
                    ..Default::default()
                });
            }
        }

        // Aging pass: clear_young over a mirror of `n` mapped pages in 64 KiB mappings.
        let n = if quick { 4096 } else { 65536 };
        let (_rt, ctx) = open_with(ContextOptions::default(), mirror::Config::default())?;
        let r = Region::new(n).map_err(os("mmap"))?;
        r.madvise(libc::MADV_POPULATE_WRITE)
            .map_err(os("madvise"))?;
        ctx.prefault(r.addr(), r.len() as u64, true)?;
        let mm = ctx.address_space().clone();
        let range = mirror::VaRange::new(r.addr(), r.len() as u64).map_err(Error::Mirror)?;
        let mut aging = Vec::new();
        let mut scan = Vec::new();
        for _ in 0..self.sizes.repeats {
            let t = Instant::now();
            mm.clear_young(range).map_err(Error::Mirror)?;
            aging.push(t.elapsed().as_nanos() as f64 / n as f64);
            let t = Instant::now();
            let snap = mm.snapshot_fast(range).or_else(|_| mm.snapshot(range));
            scan.push(t.elapsed().as_nanos() as f64 / n as f64);
            snap.map_err(Error::Mirror)?;
        }
        let (a, b) = (median(&mut aging), median(&mut scan));
        self.fig(Figure {
            group: "oversubscription".into(),
            name: format!("aging pass (clear_young) over {n} mapped pages"),
            mode: "-".into(),
            placement: "same-core".into(),
            value: a,
            unit: "ns/page".into(),
            baseline_name: "PAGEMAP_SCAN snapshot of the same pages".into(),
            baseline: Some(b),
            ratio: Some(a / b),
            note: "ACCESSED cleared in every device leaf, one leaf-only TLB invalidation per pass"
                .into(),
            ..Default::default()
        });
        drop((r, ctx, _rt));

        // Table-page bytes after a churn of distinct ranges (one 4 KiB page per 2 MiB region).
        let cycles = if quick { 10_000 } else { 100_000 };
        let (rt, ctx) = open_with(
            ContextOptions {
                fault_around: 0,
                ..Default::default()
            },
            mirror::Config::explicit_only(),
        )?;
        let span_pages = 16 << 18; // 64 GiB of address space, reserved without memory
        let r = Region::new_reserved(span_pages).map_err(os("mmap"))?;
        let stride = (2 << 20) + PAGE;
        let mut early = 0;
        let t = Instant::now();
        for i in 0..cycles {
            let off = (i * stride) % (r.len() - PAGE);
            let va = r.addr() + (off - off % PAGE) as u64;
            ctx.prefault(va, PAGE as u64, true)?;
            mm_invalidate(&ctx, va)?;
            r.discard(va).map_err(os("madvise"))?;
            if i == 100 {
                early = rt.device().table_pool_usage().0;
            }
        }
        let per_cycle = t.elapsed().as_nanos() as f64 / cycles as f64 / 1000.0;
        let (bytes, in_use) = rt.device().table_pool_usage();
        self.fig(Figure {
            group: "oversubscription".into(),
            name: format!("table-page bytes after {cycles} distinct map/unmap cycles"),
            mode: "-".into(),
            placement: "same-core".into(),
            value: bytes as f64,
            unit: "bytes".into(),
            baseline_name: "table-page bytes after the first 100 cycles".into(),
            baseline: Some(early as f64),
            ratio: Some(bytes as f64 / early.max(1) as f64),
            target: crate::target("flat: equal to the bytes after 100 cycles", bytes == early),
            note: format!(
                "{in_use} table pages in use at the end, {} freed; {per_cycle:.1} us per cycle",
                ctx.stats().table_pages_freed
            ),
            ..Default::default()
        });
        Ok(())
    }
}

fn mm_invalidate(ctx: &Context, va: u64) -> Result<(), Error> {
    let range = mirror::VaRange::new(va, PAGE as u64).map_err(Error::Mirror)?;
    ctx.address_space().invalidate(range).map_err(Error::Mirror)
}
