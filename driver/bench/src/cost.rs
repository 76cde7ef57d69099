//! The driver's own cost per fault: the fault service thread's CPU time (thread CPU clocks,
//! [`driver::fault::FaultService::set_cpu_accounting`]) per faulted page, split into walk, DMA
//! map, page-table write, replay and the rest, for populated 4 KiB pages, first-touch 4 KiB
//! pages and resident 2 MiB THP pages, at fault batch 1, 16 and 256; beside it the CPU time
//! MADV_POPULATE_WRITE spends per page on the same kind of pages. And one device fault on a
//! resident 2 MiB THP page, submit to completion, beside the 4 KiB one, with the driver's own
//! part of each.
//!
//! CPU time, not wall time: the emulated device shares the machine's two CPUs with the driver,
//! and its time is not the driver's.

use driver::fault::{clock_read_ns, ServiceCpu, ServiceMode};
use driver::runtime::{Context, Runtime};
use driver::Error;

use crate::sys::{self, Region, PAGE};
use crate::{device_touch, median, open, os, p99, target, us, Bench, Figure, Placement};

const LARGE: usize = 2 << 20;
const PAGES_PER_LARGE: usize = LARGE / PAGE;

/// What kind of page a fault lands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// 4 KiB pages the CPU has populated: the driver walks, maps and writes PTEs.
    Populated,
    /// 4 KiB pages nobody touched: the driver populates them too.
    FirstTouch,
    /// Resident 2 MiB THP pages, mapped by the device as one 2 MiB leaf each.
    Large,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Populated => "populated 4 KiB pages",
            Kind::FirstTouch => "first-touch 4 KiB pages",
            Kind::Large => "resident 2 MiB THP pages",
        }
    }
}

/// `count` 2 MiB-aligned 2 MiB pages inside an over-allocated region, THP-eligible and, if
/// `populate`, populated for write. The region must outlive the addresses.
fn large_pages(count: usize, populate: bool) -> Result<(Region, Vec<u64>), Error> {
    let r = Region::new((count + 1) * PAGES_PER_LARGE).map_err(os("mmap"))?;
    r.madvise(libc::MADV_HUGEPAGE).map_err(os("madvise"))?;
    let first = r.addr().div_ceil(LARGE as u64) * LARGE as u64;
    if populate {
        r.madvise_range(first, count * LARGE, libc::MADV_POPULATE_WRITE)
            .map_err(os("madvise"))?;
    }
    let addrs = (0..count).map(|i| first + (i * LARGE) as u64).collect();
    Ok((r, addrs))
}

/// `n` 4 KiB pages, populated for write if `populate`, and their addresses.
fn small_pages(n: usize, populate: bool) -> Result<(Region, Vec<u64>), Error> {
    let r = Region::new(n).map_err(os("mmap"))?;
    if populate {
        r.madvise(libc::MADV_POPULATE_WRITE)
            .map_err(os("madvise"))?;
    }
    let addrs = (0..n).map(|i| r.page(i)).collect();
    Ok((r, addrs))
}

/// The service's CPU time while `f` runs (accounting on for its duration).
pub(crate) fn accounted<T>(
    rt: &Runtime,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<(T, ServiceCpu), Error> {
    rt.service().set_cpu_accounting(true);
    let before = rt.service().cpu_cost();
    let out = f();
    let after = rt.service().cpu_cost();
    rt.service().set_cpu_accounting(false);
    Ok((out?, after.since(&before)))
}

/// Per-page figures of one accounted run.
#[derive(Default, Clone, Copy)]
pub(crate) struct PerPage {
    pub(crate) total: f64,
    walk: f64,
    dma: f64,
    table: f64,
    replay: f64,
    rest: f64,
    batches: f64,
}

impl PerPage {
    pub(crate) fn of(c: &ServiceCpu, pages: usize) -> PerPage {
        let n = pages.max(1) as f64;
        PerPage {
            total: c.total_ns as f64 / n,
            walk: c.walk_ns as f64 / n,
            dma: c.dma_map_ns as f64 / n,
            table: c.page_table_ns as f64 / n,
            replay: c.replay_ns as f64 / n,
            rest: c.rest_ns() as f64 / n,
            batches: c.batches as f64 / n,
        }
    }

    pub(crate) fn split(&self) -> String {
        format!(
            "walk {:.0}, DMA map {:.0}, page-table write {:.0}, replay {:.0}, rest {:.0} ns; {:.2} batches per page",
            self.walk, self.dma, self.table, self.replay, self.rest, self.batches
        )
    }
}

/// The median run (by total) of `runs`.
fn median_run(mut runs: Vec<PerPage>) -> PerPage {
    runs.sort_by(|a, b| a.total.total_cmp(&b.total));
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

impl Bench {
    /// CPU time of MADV_POPULATE_WRITE per page of `kind` (fresh 4 KiB pages, fresh THP per
    /// 2 MiB page; populated pages: the call on pages already present), median of the repeats.
    fn populate_cpu(&self, kind: Kind) -> Result<f64, Error> {
        let mut v = Vec::new();
        for _ in 0..self.sizes.repeats {
            let (region, addrs) = match kind {
                Kind::Large => large_pages(self.sizes.large_pages, false)?,
                Kind::Populated => small_pages(self.sizes.fault_pages, true)?,
                Kind::FirstTouch => small_pages(self.sizes.fault_pages, false)?,
            };
            let unit = if kind == Kind::Large { LARGE } else { PAGE };
            let t = sys::thread_cpu();
            region
                .madvise_range(addrs[0], addrs.len() * unit, libc::MADV_POPULATE_WRITE)
                .map_err(os("madvise"))?;
            let per = (sys::thread_cpu() - t).as_nanos() as f64 / addrs.len() as f64;
            v.push(per);
        }
        Ok(median(&mut v))
    }

    /// One accounted run of `kind` faults on `ctx`: one 8-byte FILL per page, up to 1000 in
    /// flight.
    fn cost_run(&self, rt: &Runtime, ctx: &Context, kind: Kind) -> Result<PerPage, Error> {
        let (region, addrs) = match kind {
            Kind::Large => large_pages(self.sizes.large_pages, true)?,
            Kind::Populated => small_pages(self.sizes.fault_pages, true)?,
            Kind::FirstTouch => small_pages(self.sizes.fault_pages, false)?,
        };
        let large0 = ctx.stats().large_mappings;
        let (_, cpu) = accounted(rt, || device_touch(ctx, &addrs, 1000))?;
        if kind == Kind::Large {
            let large = ctx.stats().large_mappings - large0;
            if large < addrs.len() as u64 {
                return Err(Error::Unsupported(
                    "2 MiB device mappings: the kernel did not back the region with THP \
                     (check /sys/kernel/mm/transparent_hugepage/enabled)"
                        .into(),
                ));
            }
        }
        let ctx_mm = ctx.address_space().clone();
        sys::mirror_munmap(&ctx_mm, region.forget())?;
        Ok(PerPage::of(&cpu, addrs.len()))
    }

    pub(crate) fn driver_cost(&mut self) -> Result<(), Error> {
        sys::pin(&[0]).map_err(os("sched_setaffinity"))?;
        let kinds = [Kind::Populated, Kind::FirstTouch, Kind::Large];
        let mut baselines = Vec::new();
        for kind in kinds {
            baselines.push((kind, self.populate_cpu(kind)?));
        }
        for batch in [1, 16, 256] {
            for kind in kinds {
                let large = kind == Kind::Large;
                let (rt, ctx) = open(ServiceMode::Polling, batch, Placement::Same, large)?;
                let mut runs = Vec::new();
                for _ in 0..self.sizes.repeats {
                    runs.push(self.cost_run(&rt, &ctx, kind)?);
                }
                let m = median_run(runs);
                let base = baselines.iter().find(|b| b.0 == kind).map(|b| b.1);
                let unit = if large {
                    "ns per 2 MiB page"
                } else {
                    "ns/page"
                };
                let tgt = match (kind, batch) {
                    (Kind::Populated, 256) => target("<= 500 ns/page", m.total <= 500.0),
                    (Kind::FirstTouch, 256) => base.and_then(|b| {
                        target(
                            "<= 1.25x MADV_POPULATE_WRITE's CPU time per page",
                            m.total <= 1.25 * b,
                        )
                    }),
                    _ => None,
                };
                self.fig(Figure {
                    group: "driver cost".into(),
                    name: format!(
                        "fault service CPU per fault, {}, batch {batch}",
                        kind.name()
                    ),
                    mode: "polling".into(),
                    placement: "same-core".into(),
                    value: m.total,
                    unit: unit.into(),
                    baseline_name: match kind {
                        Kind::Populated => "MADV_POPULATE_WRITE CPU on present pages",
                        Kind::FirstTouch => "MADV_POPULATE_WRITE CPU on fresh pages",
                        Kind::Large => "MADV_POPULATE_WRITE CPU per fresh THP",
                    }
                    .into(),
                    baseline: base,
                    ratio: base.map(|b| m.total / b),
                    target: tgt,
                    note: format!(
                        "service thread CPU time (median run of {}, the clock's own {} ns per read subtracted); {}",
                        self.sizes.repeats,
                        clock_read_ns(),
                        m.split()
                    ),
                    ..Default::default()
                });
            }
        }
        self.large_fault_latency()
    }

    /// One device fault on a resident 2 MiB THP page beside one on a populated 4 KiB page,
    /// submit to completion (polling, same-core), and the fault service's CPU time for each.
    fn large_fault_latency(&mut self) -> Result<(), Error> {
        let iters = self.sizes.large_pages * 2;
        for kind in [Kind::Populated, Kind::Large] {
            let large = kind == Kind::Large;
            let (rt, ctx) = open(ServiceMode::Polling, 256, Placement::Same, large)?;
            let mm = ctx.address_space().clone();
            let mut lat = Vec::with_capacity(iters);
            let mut cpu = Vec::with_capacity(iters);
            // A page the device maps already: the command round trip without a fault.
            let warm = Region::new(1).map_err(os("mmap"))?;
            warm.madvise(libc::MADV_POPULATE_WRITE)
                .map_err(os("madvise"))?;
            device_touch(&ctx, &[warm.addr()], 1)?;
            let mut round_trip = Vec::with_capacity(iters);
            for i in 0..iters {
                let (region, addrs) = if large {
                    large_pages(1, true)?
                } else {
                    small_pages(1, true)?
                };
                // Alternate: odd iterations account the service's CPU (the clock reads would
                // add to the latency), even ones time the round trip.
                if i % 2 == 0 {
                    lat.push(us(device_touch(&ctx, &addrs, 1)?));
                    round_trip.push(us(device_touch(&ctx, &[warm.addr()], 1)?));
                } else {
                    let (_, c) = accounted(&rt, || device_touch(&ctx, &addrs, 1))?;
                    cpu.push(c);
                }
                sys::mirror_munmap(&mm, region.forget())?;
            }
            let (m, p) = (median(&mut lat), p99(&mut lat));
            let rt_m = median(&mut round_trip);
            let mut totals: Vec<f64> = cpu.iter().map(|c| c.total_ns as f64).collect();
            let own = median(&mut totals) / 1000.0;
            let phase = |f: fn(&ServiceCpu) -> u64| {
                let mut v: Vec<f64> = cpu.iter().map(|c| f(c) as f64 / 1000.0).collect();
                median(&mut v)
            };
            let (walk, dma, table) = (
                phase(|c| c.walk_ns),
                phase(|c| c.dma_map_ns),
                phase(|c| c.page_table_ns),
            );
            self.fig(Figure {
                group: "latency".into(),
                name: format!(
                    "single device fault on {}, submit -> completion",
                    if large { "a resident 2 MiB THP page" } else { "a populated 4 KiB page" }
                ),
                mode: "polling".into(),
                placement: "same-core".into(),
                value: m,
                p99: Some(p),
                unit: "us".into(),
                baseline_name: "command round trip, no fault".into(),
                baseline: Some(rt_m),
                ratio: Some(m / rt_m),
                target: if large {
                    target("<= 30 us end to end", m <= 30.0)
                } else {
                    None
                },
                note: format!(
                    "driver's own part (service thread CPU, median): {own:.1} us, of which walk {walk:.1}, DMA map {dma:.1}, page-table write {table:.1}; {} iterations each",
                    iters / 2
                ),
            });
        }
        Ok(())
    }
}
