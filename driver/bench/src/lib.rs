//! `mirrorctl bench`: the driver's benchmarks, each beside a kernel baseline measured in the same
//! run, written as JSON, Markdown and SVG plots (see `docs/performance.md`).
//!
//! Everything runs in this process against the embedded emulated MXA-1. Placement labels mean:
//! *same-core*: the process (application thread, fault service, emulated device, mirror monitor)
//! pinned to CPU 0; *cross-core*: the driver's threads and the device pinned to CPU 1, the
//! measuring thread to CPU 0. Interrupt mode completes commands through cross-thread wake-ups;
//! polling mode busy-polls.

mod cost;
pub mod daemon;
mod oversubscription;
pub mod report;
mod sys;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use driver::context::ContextOptions;
use driver::device::{DeviceOptions, Ticket};
use driver::fault::ServiceMode;
use driver::runtime::{AcceleratorConfig, Context, DeviceSpec, Runtime, RuntimeOptions};
use driver::Error;
pub use report::{Figure, Plot, Report, Target};
use sys::{Region, PAGE};

/// How much to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Quick (CI smoke, seconds) or full.
    pub quick: bool,
    /// Results directory.
    pub out: PathBuf,
    /// Show progress bars.
    pub progress: bool,
    /// The executable whose hidden `bench-client` subcommand runs a daemon client process
    /// (`mirrorctl` itself); without it the daemon rows are not measured.
    pub client_exe: Option<PathBuf>,
}

struct Sizes {
    repeats: usize,
    fault_pages: usize,
    lat_iters: usize,
    range_pages: Vec<usize>,
    walk_pages: usize,
    overhead_pages: usize,
    scale_pages: Vec<usize>,
    scale_vmas: Vec<usize>,
    scale_asids: Vec<usize>,
    /// 2 MiB pages per driver-cost run.
    large_pages: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                repeats: 3,
                fault_pages: 2048,
                lat_iters: 200,
                range_pages: vec![1, 16, 256, 4096],
                walk_pages: 16384,
                overhead_pages: 16384,
                scale_pages: vec![1024, 4096, 16384],
                scale_vmas: vec![10, 100, 1000],
                scale_asids: vec![1, 4, 16],
                large_pages: 8,
            }
        } else {
            Sizes {
                repeats: 7,
                fault_pages: 16384,
                lat_iters: 2000,
                range_pages: vec![1, 16, 256, 4096, 65536],
                walk_pages: 65536,
                overhead_pages: 262144,
                scale_pages: vec![1024, 16384, 262144, 1 << 20],
                scale_vmas: vec![10, 100, 1000, 10000],
                scale_asids: vec![1, 4, 16, 64],
                large_pages: 32,
            }
        }
    }
}

const BATCHES: [usize; 5] = [1, 16, 64, 256, 512];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[((v.len() as f64 * 0.99).ceil() as usize).min(v.len()) - 1]
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn os(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}

fn mode_name(m: ServiceMode) -> &'static str {
    match m {
        ServiceMode::Polling => "polling",
        ServiceMode::Interrupt => "interrupt",
    }
}

/// Where the threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Same,
    Cross,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Same => "same-core",
            Placement::Cross => "cross-core",
        }
    }
}

/// CPUs online. Not `available_parallelism`: that is the calling thread's affinity, which the
/// benchmarks themselves narrow to one CPU (it made every "cross-core" row same-core once the
/// first pin was taken, and `unpin` a no-op).
fn cpus() -> usize {
    sys::online_cpus()
}

/// Open a runtime and one context with the driver's threads placed as asked; the calling thread
/// ends pinned to CPU 0. Contexts created later inherit the mirror monitor placement.
fn open(
    mode: ServiceMode,
    batch: usize,
    placement: Placement,
    large_pages: bool,
) -> Result<(Arc<Runtime>, Context), Error> {
    open_device(
        AcceleratorConfig::default(),
        mode,
        batch,
        placement,
        large_pages,
    )
}

/// [`open`] with an emulated device configured as `device`.
fn open_device(
    device: AcceleratorConfig,
    mode: ServiceMode,
    batch: usize,
    placement: Placement,
    large_pages: bool,
) -> Result<(Arc<Runtime>, Context), Error> {
    let driver_cpu = if placement == Placement::Cross && cpus() > 1 {
        1
    } else {
        0
    };
    sys::pin(&[driver_cpu]).map_err(os("sched_setaffinity"))?;
    let options = RuntimeOptions {
        mode,
        batch,
        device: DeviceOptions {
            cmdq_entries: 1024,
            ..Default::default()
        },
        context: ContextOptions {
            fault_around: 0,
            large_pages,
            ..Default::default()
        },
        ..Default::default()
    };
    let rt = Runtime::open(DeviceSpec::Emulated(device), options)?;
    let ctx = rt.create_context()?;
    sys::pin(&[0]).map_err(os("sched_setaffinity"))?;
    Ok((rt, ctx))
}

fn unpin() {
    let all: Vec<usize> = (0..cpus()).collect();
    let _ = sys::pin(&all);
}

/// Device FILLs of 8 bytes at each address, up to `window` in flight; elapsed time.
fn device_touch(ctx: &Context, addrs: &[u64], window: usize) -> Result<Duration, Error> {
    device_fill(ctx, addrs, 8, window)
}

/// Where the CPU time of one more fault run goes (one 8-byte FILL per page of `n` fresh or
/// populated pages), per page: the emulated device's workers, the fault service thread, the
/// submitting thread, beside the wall time. Every thread here shares the 2 vCPUs, and the
/// polling ones count their spinning too.
fn cpu_by_thread(ctx: &Context, n: usize, populate: bool) -> Result<String, Error> {
    let r = Region::new(n).map_err(os("mmap"))?;
    if populate {
        r.madvise(libc::MADV_POPULATE_WRITE)
            .map_err(os("madvise"))?;
    }
    let addrs = pages_of(&r, n);
    let emulator = sys::threads_cpu_ns("mxa1-worker");
    let service = sys::threads_cpu_ns("mxa-fault");
    let me = sys::thread_cpu();
    let wall = device_touch(ctx, &addrs, 1000)?;
    let per = |ns: u64| ns as f64 / n as f64;
    let text = format!(
        "CPU per page in a further run: emulated device {:.0} ns, fault service {:.0} ns, submitting thread {:.0} ns; wall {:.0} ns (2 vCPUs)",
        per(sys::threads_cpu_ns("mxa1-worker").saturating_sub(emulator)),
        per(sys::threads_cpu_ns("mxa-fault").saturating_sub(service)),
        per((sys::thread_cpu() - me).as_nanos() as u64),
        per(wall.as_nanos() as u64)
    );
    sys::mirror_munmap(ctx.address_space(), r.forget())?;
    Ok(text)
}

/// Device FILLs of `len` bytes at each address, up to `window` in flight; elapsed time.
fn device_fill(ctx: &Context, addrs: &[u64], len: u64, window: usize) -> Result<Duration, Error> {
    device_commands(ctx, addrs, len, window, sys::submit_fill)
}

/// One device command of `len` bytes at each address (`submit`), up to `window` in flight;
/// elapsed time.
fn device_commands(
    ctx: &Context,
    addrs: &[u64],
    len: u64,
    window: usize,
    submit: fn(&Context, u64, u64) -> Result<Ticket, Error>,
) -> Result<Duration, Error> {
    let t = Instant::now();
    let mut q = VecDeque::with_capacity(window);
    for &a in addrs {
        if q.len() >= window {
            ctx.wait(q.pop_front().unwrap())?;
        }
        q.push_back(submit(ctx, a, len)?);
    }
    while let Some(tk) = q.pop_front() {
        ctx.wait(tk)?;
    }
    Ok(t.elapsed())
}

fn pages_of(r: &Region, n: usize) -> Vec<u64> {
    (0..n).map(|i| r.page(i)).collect()
}

/// Runs the benchmarks.
pub struct Bench {
    sizes: Sizes,
    report: Report,
    bar: ProgressBar,
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    format!(
        "{} x {cpu}, {:.0} GiB RAM, Linux {}",
        cpus(),
        mem as f64 / (1 << 20) as f64,
        read_trim("/proc/sys/kernel/osrelease")
    )
}

/// UTC now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (s.div_euclid(86400), s.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn target(text: &str, met: bool) -> Option<Target> {
    Some(Target {
        text: text.into(),
        met,
    })
}

impl Bench {
    /// Run everything and write the results into `options.out`.
    pub fn run(options: &BenchOptions) -> Result<Report, Error> {
        let sizes = Sizes::new(options.quick);
        let bar = if options.progress {
            let b = ProgressBar::new(11);
            b.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        let mut b = Bench {
            sizes,
            report: Report {
                profile: if options.quick { "quick" } else { "full" }.into(),
                date: utc_now(),
                machine: machine(),
                load_start: read_trim("/proc/loadavg"),
                ..Default::default()
            },
            bar,
        };
        let t = Instant::now();
        b.step("warm-up", Self::warm_up)?;
        b.step("fault throughput vs batch", Self::fault_throughput)?;
        b.step("single-fault latency", Self::fault_latency)?;
        b.step("driver's own cost per fault", Self::driver_cost)?;
        b.step("invalidation", Self::invalidation)?;
        b.step("walk", Self::walk)?;
        b.step("memory overhead", Self::overhead)?;
        b.step("emulator idle spin", Self::idle_spin)?;
        b.step("scaling", Self::scaling)?;
        b.step("oversubscription", Self::oversubscription)?;
        unpin();
        match &options.client_exe {
            Some(exe) => {
                let (figures, plot) = {
                    b.bar.set_message("daemon clients");
                    daemon::figures(options.quick, exe)?
                };
                b.bar.inc(1);
                b.report.figures.extend(figures);
                b.report.plots.push(plot);
            }
            None => b.report.not_measured.push((
                "daemon: aggregate fault throughput and p99 with 1, 4, 16, 64 clients".into(),
                "not measured: no client executable given (run through mirrorctl bench)".into(),
            )),
        }
        b.report.seconds = t.elapsed().as_secs_f64();
        b.report.load_end = read_trim("/proc/loadavg");
        b.bar.finish_with_message("done");
        b.report
            .write(&options.out)
            .map_err(os("writing the results"))?;
        Ok(b.report)
    }

    fn step(
        &mut self,
        msg: &'static str,
        f: fn(&mut Bench) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.bar.set_message(msg);
        let r = f(self);
        unpin();
        self.bar.inc(1);
        r
    }

    fn fig(&mut self, f: Figure) {
        self.report.figures.push(f);
    }

    /// First touch of guest RAM is ~10x slower on this VM (the host backs it lazily): touch and
    /// free more memory than the benchmarks use so later allocations reuse backed pages.
    fn warm_up(&mut self) -> Result<(), Error> {
        let pages = (self.sizes.overhead_pages.max(self.sizes.fault_pages * 4)).max(65536);
        let r = Region::new(pages).map_err(os("mmap"))?;
        r.madvise(libc::MADV_POPULATE_WRITE)
            .map_err(os("madvise"))?;
        Ok(())
    }

    fn populate_rate(
        &self,
        n: usize,
        advice: libc::c_int,
        prepopulate: bool,
    ) -> Result<f64, Error> {
        let mut v = Vec::new();
        for _ in 0..self.sizes.repeats {
            let r = Region::new(n).map_err(os("mmap"))?;
            if prepopulate {
                r.touch();
            }
            let t = Instant::now();
            r.madvise(advice).map_err(os("madvise"))?;
            v.push(n as f64 / t.elapsed().as_secs_f64());
        }
        Ok(median(&mut v))
    }

    /// Device faults when one command covers many pages (as a GPU kernel's accesses do). The
    /// device's fault lookahead reports up to 15 pages past the stalled one, so a 64 KiB command
    /// costs one stall instead of 16. Lookahead on and off (a device without it); FILL (data
    /// moves: the ceiling row has the same commands on pages already mapped) and PREFETCH
    /// (translation only: the fault path alone); fresh and populated pages.
    fn multi_page_commands(&mut self, pw: f64, pw_pop: f64) -> Result<(), Error> {
        type Submit = fn(&Context, u64, u64) -> Result<Ticket, Error>;
        let ops: [(&str, Submit); 2] = [
            ("FILL", sys::submit_fill),
            ("PREFETCH", sys::submit_prefetch),
        ];
        let n = self.sizes.fault_pages;
        for lookahead in [true, false] {
            let device = AcceleratorConfig {
                fault_lookahead: if lookahead {
                    firmware_stubs::DEFAULT_FAULT_LOOKAHEAD
                } else {
                    0
                },
                ..Default::default()
            };
            let (_rt, ctx) =
                open_device(device, ServiceMode::Polling, 256, Placement::Same, false)?;
            let on_off = if lookahead {
                "lookahead 15"
            } else {
                "no lookahead"
            };
            for per_cmd in [16usize, 64] {
                let len = (per_cmd * PAGE) as u64;
                for (op, submit) in ops {
                    let (mut first, mut popd, mut mapped) = (Vec::new(), Vec::new(), Vec::new());
                    for _ in 0..self.sizes.repeats {
                        for populate in [false, true] {
                            let r = Region::new(n).map_err(os("mmap"))?;
                            if populate {
                                r.madvise(libc::MADV_POPULATE_WRITE)
                                    .map_err(os("madvise"))?;
                            }
                            let starts: Vec<u64> =
                                (0..n / per_cmd).map(|i| r.page(per_cmd * i)).collect();
                            let pages = (starts.len() * per_cmd) as f64;
                            let d = device_commands(&ctx, &starts, len, 1000, submit)?;
                            if populate {
                                popd.push(pages / d.as_secs_f64());
                                // Again, now that the device maps every page: no faults.
                                let d = device_commands(&ctx, &starts, len, 1000, submit)?;
                                mapped.push(pages / d.as_secs_f64());
                            } else {
                                first.push(pages / d.as_secs_f64());
                            }
                        }
                    }
                    let (f, p, c) = (median(&mut first), median(&mut popd), median(&mut mapped));
                    let note = format!(
                        "{n} pages, one {} KiB {op} per {per_cmd} pages, batch 256, fault_around 0; \
                         the same commands on device-mapped pages: {c:.0} pages/s",
                        per_cmd * 4
                    );
                    self.throughput_pair(
                        &format!("{per_cmd}-page {op}, {on_off}"),
                        (ServiceMode::Polling, Placement::Same),
                        (f, p),
                        (pw, pw_pop),
                        lookahead && per_cmd == 16 && op == "PREFETCH",
                        (note.clone(), note),
                    );
                }
            }
        }
        Ok(())
    }

    /// The first-touch and populated-page throughput figures of one configuration, each beside
    /// its `MADV_POPULATE_WRITE` baseline; `tracked` adds the targets.
    fn throughput_pair(
        &mut self,
        what: &str,
        (mode, placement): (ServiceMode, Placement),
        (first, populated): (f64, f64),
        (pw, pw_pop): (f64, f64),
        tracked: bool,
        (first_note, populated_note): (String, String),
    ) {
        self.fig(Figure {
            group: "fault".into(),
            name: format!("first-touch fault throughput, {what}"),
            mode: mode_name(mode).into(),
            placement: placement.name().into(),
            value: first,
            unit: "pages/s".into(),
            baseline_name: "MADV_POPULATE_WRITE (fresh pages)".into(),
            baseline: Some(pw),
            ratio: Some(first / pw),
            target: tracked
                .then(|| target(">= 0.8x MADV_POPULATE_WRITE", first >= 0.8 * pw))
                .flatten(),
            note: first_note,
            ..Default::default()
        });
        self.fig(Figure {
            group: "fault".into(),
            name: format!("populated-page fault throughput, {what}"),
            mode: mode_name(mode).into(),
            placement: placement.name().into(),
            value: populated,
            unit: "pages/s".into(),
            baseline_name: "MADV_POPULATE_WRITE (populated pages)".into(),
            baseline: Some(pw_pop),
            ratio: Some(populated / pw_pop),
            target: tracked
                .then(|| target(">= 1M pages/s", populated >= 1e6))
                .flatten(),
            note: populated_note,
            ..Default::default()
        });
    }

    /// Median first-touch and populated-page device fault throughput (pages/s) on `ctx`.
    fn fault_rates(&self, ctx: &Context) -> Result<(f64, f64), Error> {
        let n = self.sizes.fault_pages;
        let (mut first, mut popd) = (Vec::new(), Vec::new());
        for _ in 0..self.sizes.repeats {
            let r = Region::new(n).map_err(os("mmap"))?;
            let d = device_touch(ctx, &pages_of(&r, n), 1000)?;
            first.push(n as f64 / d.as_secs_f64());
            drop(r);
            let r = Region::new(n).map_err(os("mmap"))?;
            r.madvise(libc::MADV_POPULATE_WRITE)
                .map_err(os("madvise"))?;
            let d = device_touch(ctx, &pages_of(&r, n), 1000)?;
            popd.push(n as f64 / d.as_secs_f64());
        }
        Ok((median(&mut first), median(&mut popd)))
    }

    fn fault_throughput(&mut self) -> Result<(), Error> {
        let n = self.sizes.fault_pages;
        sys::pin(&[0]).map_err(os("sched_setaffinity"))?;
        let pw = self.populate_rate(n, libc::MADV_POPULATE_WRITE, false)?;
        let pr = self.populate_rate(n, libc::MADV_POPULATE_READ, false)?;
        let pw_pop = self.populate_rate(n, libc::MADV_POPULATE_WRITE, true)?;
        let mut first_line = Vec::new();
        let mut pop_line = Vec::new();
        for &batch in &BATCHES {
            let (_rt, ctx) = open(ServiceMode::Polling, batch, Placement::Same, false)?;
            let (f, p) = self.fault_rates(&ctx)?;
            if batch == 256 {
                // The same commands on pages the device already maps: the command-path ceiling.
                let r = Region::new(n).map_err(os("mmap"))?;
                r.madvise(libc::MADV_POPULATE_WRITE)
                    .map_err(os("madvise"))?;
                let addrs = pages_of(&r, n);
                device_touch(&ctx, &addrs, 1000)?;
                let mut v = Vec::new();
                for _ in 0..self.sizes.repeats {
                    v.push(n as f64 / device_touch(&ctx, &addrs, 1000)?.as_secs_f64());
                }
                let c = median(&mut v);
                self.fig(Figure {
                    group: "fault".into(),
                    name: "command throughput without faults (pages already device-mapped)".into(),
                    mode: "polling".into(),
                    placement: "same-core".into(),
                    value: c,
                    unit: "commands/s".into(),
                    note: "ceiling for the one-command-per-page fault rows above".into(),
                    ..Default::default()
                });
            }
            first_line.push((batch as f64, f));
            pop_line.push((batch as f64, p));
            let (first_cpu, pop_cpu) = if batch == 256 {
                (
                    format!("; {}", cpu_by_thread(&ctx, n, false)?),
                    format!("; {}", cpu_by_thread(&ctx, n, true)?),
                )
            } else {
                Default::default()
            };
            self.throughput_pair(
                &format!("batch {batch}"),
                (ServiceMode::Polling, Placement::Same),
                (f, p),
                (pw, pw_pop),
                batch == 256,
                (
                    format!("{n} pages, one 8-byte device FILL per page, <= 1000 in flight, fault_around 0{first_cpu}"),
                    format!("CPU pages present; device maps them{pop_cpu}"),
                ),
            );
        }
        self.multi_page_commands(pw, pw_pop)?;
        for (mode, placement) in [
            (ServiceMode::Interrupt, Placement::Same),
            (ServiceMode::Polling, Placement::Cross),
            (ServiceMode::Interrupt, Placement::Cross),
        ] {
            let (_rt, ctx) = open(mode, 256, placement, false)?;
            let (f, p) = self.fault_rates(&ctx)?;
            let note = format!("{n} pages, one 8-byte device FILL per page");
            self.throughput_pair(
                "batch 256",
                (mode, placement),
                (f, p),
                (pw, pw_pop),
                false,
                (note.clone(), note),
            );
        }
        self.fig(Figure {
            group: "fault".into(),
            name: "MADV_POPULATE_READ (fresh pages, baseline)".into(),
            mode: "-".into(),
            placement: "same-core".into(),
            value: pr,
            unit: "pages/s".into(),
            note: "maps the zero page".into(),
            ..Default::default()
        });
        self.report.plots.push(Plot {
            file: "fault_throughput".into(),
            title: "Device fault throughput vs batch (polling, same-core)".into(),
            x_label: "fault batch size".into(),
            y_label: "pages/s".into(),
            log_x: true,
            log_y: true,
            lines: vec![
                ("first touch".into(), first_line),
                ("populated".into(), pop_line),
                (
                    "POPULATE_WRITE".into(),
                    BATCHES.iter().map(|b| (*b as f64, pw)).collect(),
                ),
                (
                    "POPULATE_WRITE popul.".into(),
                    BATCHES.iter().map(|b| (*b as f64, pw_pop)).collect(),
                ),
            ],
        });
        Ok(())
    }

    fn fault_latency(&mut self) -> Result<(), Error> {
        let n = self.sizes.lat_iters;
        let mut uffd = Vec::new();
        for placement in [Placement::Same, Placement::Cross] {
            let hcpu = if placement == Placement::Cross && cpus() > 1 {
                1
            } else {
                0
            };
            let mut v: Vec<f64> = sys::uffd_round_trips(n, 0, hcpu)
                .map_err(os("userfaultfd baseline"))?
                .into_iter()
                .map(us)
                .collect();
            let (m, p) = (median(&mut v), p99(&mut v));
            uffd.push((placement, m, p));
            self.fig(Figure {
                group: "latency".into(),
                name: "uffd MISSING + UFFDIO_COPY round trip (baseline)".into(),
                mode: "-".into(),
                placement: placement.name().into(),
                value: m,
                p99: Some(p),
                unit: "us".into(),
                note: "blocking read() handler thread".into(),
                ..Default::default()
            });
        }
        for mode in [ServiceMode::Polling, ServiceMode::Interrupt] {
            for placement in [Placement::Same, Placement::Cross] {
                let (_rt, ctx) = open(mode, 256, placement, false)?;
                let r = Region::new(n + 1).map_err(os("mmap"))?;
                r.madvise(libc::MADV_POPULATE_WRITE)
                    .map_err(os("madvise"))?;
                // Command round trip on a page the device already maps.
                device_touch(&ctx, &[r.page(n)], 1)?;
                let mut nofault = Vec::with_capacity(n);
                let mut fault = Vec::with_capacity(n);
                for i in 0..n {
                    nofault.push(us(device_touch(&ctx, &[r.page(n)], 1)?));
                    fault.push(us(device_touch(&ctx, &[r.page(i)], 1)?));
                }
                let (m, p) = (median(&mut fault), p99(&mut fault));
                let (nm, np) = (median(&mut nofault), p99(&mut nofault));
                let (_, um, up) = *uffd.iter().find(|u| u.0 == placement).unwrap();
                let tgt = if mode == ServiceMode::Polling {
                    target("p50 <= 10 us and < uffd round trip", m <= 10.0 && m < um)
                } else {
                    target("p50 < uffd round trip", m < um)
                };
                self.fig(Figure {
                    group: "latency".into(),
                    name: "single device fault (CPU page present), command submit -> completion"
                        .into(),
                    mode: mode_name(mode).into(),
                    placement: placement.name().into(),
                    value: m,
                    p99: Some(p),
                    unit: "us".into(),
                    baseline_name: "uffd MISSING round trip".into(),
                    baseline: Some(um),
                    ratio: Some(m / um),
                    target: tgt,
                    note: format!(
                        "uffd p99 {up:.1} us; includes the command round trip (next row)"
                    ),
                });
                self.fig(Figure {
                    group: "latency".into(),
                    name: "command round trip, no fault (page already mapped)".into(),
                    mode: mode_name(mode).into(),
                    placement: placement.name().into(),
                    value: nm,
                    p99: Some(np),
                    unit: "us".into(),
                    note: "subtract from the fault row for the fault service alone".into(),
                    ..Default::default()
                });
            }
        }
        Ok(())
    }

    fn invalidation(&mut self) -> Result<(), Error> {
        let n = self.sizes.lat_iters;
        // Baselines without any mirror: no runtime (and so no address space) exists here.
        sys::pin(&[0]).map_err(os("sched_setaffinity"))?;
        let mut raw1 = Vec::new();
        for _ in 0..n {
            let r = Region::new(1).map_err(os("mmap"))?;
            r.touch();
            raw1.push(us(r.munmap_timed()));
        }
        let (raw_m, raw_p) = (median(&mut raw1), p99(&mut raw1));
        let mut raw_range = Vec::new();
        for &k in &self.sizes.range_pages {
            let mut v = Vec::new();
            for _ in 0..self.sizes.repeats {
                let r = Region::new(k).map_err(os("mmap"))?;
                r.touch();
                v.push(r.munmap_timed().as_nanos() as f64 / k as f64);
            }
            raw_range.push(median(&mut v));
        }
        for placement in [Placement::Same, Placement::Cross] {
            let (_rt, ctx) = open(ServiceMode::Polling, 256, placement, false)?;
            let mm = ctx.address_space().clone();
            let fences0 = ctx.stats().tlb_fences;
            let mut one = Vec::with_capacity(n);
            for _ in 0..n {
                let r = Region::new(1).map_err(os("mmap"))?;
                r.touch();
                device_touch(&ctx, &[r.addr()], 1)?;
                one.push(us(sys::mirror_munmap(&mm, r.forget())?));
            }
            let fences = (ctx.stats().tlb_fences - fences0) as f64 / n as f64;
            let (m, p) = (median(&mut one), p99(&mut one));
            self.fig(Figure {
                group: "invalidation".into(),
                name: "1-page munmap -> device PTE cleared -> TLB fence".into(),
                mode: "polling".into(),
                placement: placement.name().into(),
                value: m,
                p99: Some(p),
                unit: "us".into(),
                baseline_name: "munmap 1 page, no mirror".into(),
                baseline: Some(raw_m),
                ratio: Some(m / raw_m),
                target: if placement == Placement::Same {
                    target("p50 <= 10 us same-core", m <= 10.0)
                } else {
                    None
                },
                note: format!("{fences:.2} TLB fences per munmap; baseline p99 {raw_p:.1} us; strict mirror munmap wrapper"),
            });
            if placement == Placement::Cross {
                continue;
            }
            let mut line = Vec::new();
            let mut base = Vec::new();
            for (i, &k) in self.sizes.range_pages.clone().iter().enumerate() {
                let mut v = Vec::new();
                let mut fence = 0.0;
                for _ in 0..self.sizes.repeats {
                    let r = Region::new(k).map_err(os("mmap"))?;
                    r.madvise(libc::MADV_POPULATE_WRITE)
                        .map_err(os("madvise"))?;
                    ctx.prefault(r.addr(), r.len() as u64, true)?;
                    let f0 = ctx.stats().tlb_fences;
                    v.push(sys::mirror_munmap(&mm, r.forget())?.as_nanos() as f64 / k as f64);
                    fence = (ctx.stats().tlb_fences - f0) as f64;
                }
                let m = median(&mut v);
                line.push((k as f64, m));
                base.push((k as f64, raw_range[i]));
                self.fig(Figure {
                    group: "invalidation".into(),
                    name: format!("range munmap, {k} pages"),
                    mode: "polling".into(),
                    placement: "same-core".into(),
                    value: m,
                    unit: "ns/page".into(),
                    baseline_name: "munmap, no mirror".into(),
                    baseline: Some(raw_range[i]),
                    ratio: Some(m / raw_range[i]),
                    target: (k >= 256)
                        .then(|| {
                            target(
                                "added over plain munmap <= 100 ns/page, one TLB command per range",
                                m - raw_range[i] <= 100.0 && fence <= 1.0,
                            )
                        })
                        .flatten(),
                    note: format!(
                        "added {:.0} ns/page over plain munmap; {fence:.0} TLB fences for the range (last repeat)",
                        m - raw_range[i]
                    ),
                    ..Default::default()
                });
            }
            self.report.plots.push(Plot {
                file: "invalidation_range".into(),
                title: "munmap cost per page, mirrored vs not (same-core)".into(),
                x_label: "pages in the range".into(),
                y_label: "ns/page".into(),
                log_x: true,
                log_y: true,
                lines: vec![("mirrored".into(), line), ("no mirror".into(), base)],
            });
        }
        Ok(())
    }

    fn walk(&mut self) -> Result<(), Error> {
        let (_rt, ctx) = open(ServiceMode::Polling, 256, Placement::Same, false)?;
        let mm = ctx.address_space().clone();
        let n = self.sizes.walk_pages;
        let r = Region::new(n).map_err(os("mmap"))?;
        r.madvise(libc::MADV_POPULATE_WRITE)
            .map_err(os("madvise"))?;
        let range = mirror::VaRange::new(r.addr(), r.len() as u64).map_err(Error::Mirror)?;
        let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(os("open pagemap"))?;
        let reps = self.sizes.repeats * 3;
        let time = |f: &mut dyn FnMut()| {
            let mut v: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_nanos() as f64 / n as f64
                })
                .collect();
            median(&mut v)
        };
        let scan = time(&mut || {
            std::hint::black_box(mirror::sys::baseline::pagemap_scan_present(&pagemap, range).ok());
        });
        let snap = time(&mut || {
            std::hint::black_box(mm.snapshot(range).ok());
        });
        let fast = time(&mut || {
            std::hint::black_box(mm.snapshot_fast(range).ok());
        });
        for (name, v) in [("snapshot", snap), ("snapshot_fast", fast)] {
            self.fig(Figure {
                group: "walk".into(),
                name: format!("CPU walk: {name}, {n} populated 4 KiB pages"),
                mode: "-".into(),
                placement: "same-core".into(),
                value: v,
                unit: "ns/page".into(),
                baseline_name: "raw PAGEMAP_SCAN".into(),
                baseline: Some(scan),
                ratio: Some(v / scan),
                target: target("<= 2x PAGEMAP_SCAN", v <= 2.0 * scan),
                note: "same approach as mirror/examples/walk_bench.rs".into(),
                ..Default::default()
            });
        }
        Ok(())
    }

    fn overhead(&mut self) -> Result<(), Error> {
        let n = self.sizes.overhead_pages;
        for large in [false, true] {
            let (_rt, ctx) = open(ServiceMode::Polling, 256, Placement::Same, large)?;
            let r = if large {
                // 2 MiB-aligned THP-backed memory: over-allocate and let the device map large pages.
                let r = Region::new(n + 512).map_err(os("mmap"))?;
                r.madvise(libc::MADV_HUGEPAGE).map_err(os("madvise"))?;
                r
            } else {
                Region::new(n).map_err(os("mmap"))?
            };
            r.madvise(libc::MADV_POPULATE_WRITE)
                .map_err(os("madvise"))?;
            let s0 = ctx.stats();
            ctx.prefault(r.addr(), (n * PAGE) as u64, true)?;
            let s = ctx.stats();
            let registry = ctx.address_space().stats().registry_bytes as f64;
            let mapped = (s.mapped_bytes - s0.mapped_bytes).max(1) as f64;
            let table = ((s.table_pages - s0.table_pages) * PAGE) as f64;
            let pages = if large {
                "THP, large pages"
            } else {
                "4 KiB pages"
            };
            let mappings = s.mappings - s0.mappings;
            let rows = [
                (
                    "device page-table",
                    table,
                    format!(
                        "{} MiB mirrored, {} small + {} large leaves, {mappings} DMA mappings",
                        (mapped / (1 << 20) as f64).round(),
                        s.small_leaves - s0.small_leaves,
                        s.large_leaves - s0.large_leaves,
                    ),
                ),
                (
                    "mirror registry",
                    registry,
                    format!(
                        "{registry:.0} B in all, fixed: one whole-address-space subscription per context (mirror::Stats::registry_bytes); the driver's per-mapping records in the subscriber state ({mappings} entries) are the driver's, not counted"
                    ),
                ),
            ];
            for (what, bytes, note) in rows {
                let per_gib = bytes / mapped * (1u64 << 30) as f64;
                self.fig(Figure {
                    group: "overhead".into(),
                    name: format!("{what} bytes per mirrored GiB ({pages})"),
                    mode: "-".into(),
                    placement: "-".into(),
                    value: per_gib,
                    unit: "bytes/GiB".into(),
                    baseline_name: "mirrored bytes".into(),
                    baseline: Some((1u64 << 30) as f64),
                    ratio: Some(per_gib / (1u64 << 30) as f64),
                    target: target(
                        "<= 0.5% of mirrored memory",
                        per_gib <= 0.005 * (1u64 << 30) as f64,
                    ),
                    note,
                    ..Default::default()
                });
            }
        }
        Ok(())
    }

    /// The emulator's idle-worker spin (`AcceleratorConfig::idle_spin_us`) against parking at
    /// once, polling mode, same-core and cross-core: command round trip, single fault, 1-page
    /// invalidation and populated-page throughput with each setting, in this run.
    fn idle_spin(&mut self) -> Result<(), Error> {
        let n = self.sizes.lat_iters / 2;
        let pages = self.sizes.fault_pages;
        let default = AcceleratorConfig::default().idle_spin_us;
        let mut spins = vec![0, 20, default, 200];
        spins.sort_unstable();
        spins.dedup();
        let mut lines = Vec::new();
        for placement in [Placement::Same, Placement::Cross] {
            let (mut rt_line, mut fault_line) = (Vec::new(), Vec::new());
            for &spin in &spins {
                let device = AcceleratorConfig {
                    idle_spin_us: spin,
                    ..Default::default()
                };
                let (_rt, ctx) = open_device(device, ServiceMode::Polling, 256, placement, false)?;
                let mm = ctx.address_space().clone();
                let r = Region::new(n + 1).map_err(os("mmap"))?;
                r.madvise(libc::MADV_POPULATE_WRITE)
                    .map_err(os("madvise"))?;
                device_touch(&ctx, &[r.page(n)], 1)?;
                // As in the latency rows: commands back to back, then invalidations apart (an
                // invalidation between commands would let the watching worker run out of time).
                let (mut nofault, mut fault, mut inval) = (Vec::new(), Vec::new(), Vec::new());
                for i in 0..n {
                    nofault.push(us(device_touch(&ctx, &[r.page(n)], 1)?));
                    fault.push(us(device_touch(&ctx, &[r.page(i)], 1)?));
                }
                for _ in 0..n {
                    let one = Region::new(1).map_err(os("mmap"))?;
                    one.touch();
                    device_touch(&ctx, &[one.addr()], 1)?;
                    inval.push(us(sys::mirror_munmap(&mm, one.forget())?));
                }
                let mut rates = Vec::new();
                for _ in 0..self.sizes.repeats {
                    let r = Region::new(pages).map_err(os("mmap"))?;
                    r.madvise(libc::MADV_POPULATE_WRITE)
                        .map_err(os("madvise"))?;
                    let d = device_touch(&ctx, &pages_of(&r, pages), 1000)?;
                    rates.push(pages as f64 / d.as_secs_f64());
                }
                let label = if spin == default {
                    format!("idle_spin_us {spin} (default)")
                } else {
                    format!("idle_spin_us {spin}")
                };
                let rows: [(&str, &mut Vec<f64>, &str); 4] = [
                    ("command round trip, no fault", &mut nofault, "us"),
                    ("single device fault", &mut fault, "us"),
                    (
                        "1-page munmap -> PTE cleared -> TLB fence",
                        &mut inval,
                        "us",
                    ),
                    (
                        "populated-page fault throughput, batch 256",
                        &mut rates,
                        "pages/s",
                    ),
                ];
                rt_line.push((f64::from(spin), median(rows[0].1)));
                fault_line.push((f64::from(spin), median(rows[1].1)));
                for (what, v, unit) in rows {
                    let latency = unit == "us";
                    self.fig(Figure {
                        group: "idle spin".into(),
                        name: format!("{what}, {label}"),
                        mode: "polling".into(),
                        placement: placement.name().into(),
                        value: median(v),
                        p99: latency.then(|| p99(v)),
                        unit: unit.into(),
                        note: if spin == 0 {
                            "emulator workers park on the condvar at once (idle_spin_us 0)".into()
                        } else {
                            format!("emulator workers spin {spin} us before parking on the condvar")
                        },
                        ..Default::default()
                    });
                }
            }
            let at = placement.name();
            lines.push((format!("command, {at}"), rt_line));
            lines.push((format!("fault, {at}"), fault_line));
        }
        self.report.plots.push(Plot {
            file: "idle_spin".into(),
            title: "Round trip vs the emulator's idle spin (polling, p50)".into(),
            x_label: "idle_spin_us".into(),
            y_label: "us".into(),
            log_x: false,
            log_y: false,
            lines,
        });
        Ok(())
    }

    fn scaling(&mut self) -> Result<(), Error> {
        let (_rt, ctx) = open(ServiceMode::Polling, 256, Placement::Same, false)?;
        // Mirrored pages: device fault-in cost per page and table pages as the mirror grows.
        let mut line = Vec::new();
        let mut kept = Vec::new();
        for &k in &self.sizes.scale_pages.clone() {
            let r = Region::new(k).map_err(os("mmap"))?;
            r.madvise(libc::MADV_POPULATE_WRITE)
                .map_err(os("madvise"))?;
            let d = device_touch(&ctx, &pages_of(&r, k), 1000)?;
            let rate = k as f64 / d.as_secs_f64();
            line.push((k as f64, rate));
            self.fig(Figure {
                group: "scaling".into(),
                name: format!("populated-page fault throughput, {k} mirrored pages"),
                mode: "polling".into(),
                placement: "same-core".into(),
                value: rate,
                unit: "pages/s".into(),
                note: "single run (no repeats)".into(),
                ..Default::default()
            });
            // Keep these pages mirrored so the next size sees a bigger mirror.
            kept.push(r);
        }
        self.report.plots.push(Plot {
            file: "scaling_pages".into(),
            title: "Populated-page fault throughput vs mirrored pages".into(),
            x_label: "pages in the run".into(),
            y_label: "pages/s".into(),
            log_x: true,
            log_y: true,
            lines: vec![("polling, batch 256".into(), line)],
        });
        // VMAs: every other page PROT_NONE, so k accessible 1-page VMAs.
        let mm = ctx.address_space().clone();
        let mut vline = Vec::new();
        for &k in &self.sizes.scale_vmas.clone() {
            let r = Region::new(2 * k).map_err(os("mmap"))?;
            r.madvise(libc::MADV_POPULATE_WRITE)
                .map_err(os("madvise"))?;
            for i in 0..k {
                r.protect_none(2 * i + 1).map_err(os("mprotect"))?;
            }
            let range = r.forget();
            let addrs: Vec<u64> = (0..k)
                .map(|i| range.start() + (2 * i * PAGE) as u64)
                .collect();
            let d = device_touch(&ctx, &addrs, 1000)?;
            let t = Instant::now();
            let _ = mm.snapshot(range);
            let walk = t.elapsed().as_nanos() as f64 / k as f64;
            let rate = k as f64 / d.as_secs_f64();
            // The same faults again on fresh VMAs, the service's CPU accounted (the clock reads
            // would slow the timed pass above).
            let split = {
                let r = Region::new(2 * k).map_err(os("mmap"))?;
                r.madvise(libc::MADV_POPULATE_WRITE)
                    .map_err(os("madvise"))?;
                for i in 0..k {
                    r.protect_none(2 * i + 1).map_err(os("mprotect"))?;
                }
                let again: Vec<u64> = (0..k).map(|i| r.page(2 * i)).collect();
                let (_, cpu) = cost::accounted(&_rt, || device_touch(&ctx, &again, 1000))?;
                sys::mirror_munmap(&mm, r.forget())?;
                cost::PerPage::of(&cpu, k)
            };
            vline.push((k as f64, rate));
            self.fig(Figure {
                group: "scaling".into(),
                name: format!("{k} VMAs: fault throughput (1 page per VMA)"),
                mode: "polling".into(),
                placement: "same-core".into(),
                value: rate,
                unit: "pages/s".into(),
                note: format!(
                    "snapshot over the span: {walk:.0} ns per VMA; single run; service CPU per page {:.0} ns ({})",
                    split.total,
                    split.split()
                ),
                ..Default::default()
            });
            sys::mirror_munmap(&mm, range)?;
        }
        self.report.plots.push(Plot {
            file: "scaling_vmas".into(),
            title: "Fault throughput vs number of VMAs (1 page each)".into(),
            x_label: "VMAs".into(),
            y_label: "pages/s".into(),
            log_x: true,
            log_y: true,
            lines: vec![("polling, batch 256".into(), vline)],
        });
        drop(kept);
        drop(ctx);
        // Device address spaces: k contexts all mapping one page; 1-page munmap must clear all.
        let rt = _rt;
        let asids = rt.device().caps().asids as usize;
        let mut aline = Vec::new();
        // The first size measured is the baseline of the others (the sizes start at 1).
        let mut single_asid_munmap: Option<f64> = None;
        for &k in &self.sizes.scale_asids.clone() {
            if k > asids {
                self.report.not_measured.push((
                    format!("{k} device address spaces"),
                    format!("the device has {asids}"),
                ));
                continue;
            }
            let ctxs: Vec<Context> = (0..k)
                .map(|_| rt.create_context())
                .collect::<Result<_, _>>()?;
            let n = self.sizes.lat_iters / 2;
            let mut v = Vec::with_capacity(n);
            let before = rt.device().tlbi_queue_counts();
            for _ in 0..n {
                let r = Region::new(1).map_err(os("mmap"))?;
                r.touch();
                for c in &ctxs {
                    device_touch(c, &[r.addr()], 1)?;
                }
                v.push(us(sys::mirror_munmap(&mm, r.forget())?));
            }
            let after = rt.device().tlbi_queue_counts();
            let (m, p) = (median(&mut v), p99(&mut v));
            aline.push((k as f64, m));
            let per = |a: u64, b: u64| (a - b) as f64 / n as f64;
            let note = if after.entries == 0 {
                format!(
                    "no invalidation queue: {:.1} register invalidations (one fence each) per munmap",
                    per(after.unqueued, before.unqueued)
                )
            } else {
                format!(
                    "two-pass: {:.1} invalidations queued and {:.2} doorbells (one fence each) per munmap",
                    per(after.posted, before.posted),
                    per(after.doorbells, before.doorbells)
                )
            };
            let single = *single_asid_munmap.get_or_insert(m);
            let target = (k == 64).then(|| Target {
                text: "<= 2x the 1-address-space time".into(),
                met: m <= 2.0 * single,
            });
            self.fig(Figure {
                group: "scaling".into(),
                name: format!("1-page munmap with {k} device address spaces mapping it"),
                mode: "polling".into(),
                placement: "same-core".into(),
                value: m,
                p99: Some(p),
                unit: "us".into(),
                baseline_name: "the same with 1 address space".into(),
                baseline: Some(single),
                ratio: Some(m / single),
                target,
                note,
            });
        }
        self.report.plots.push(Plot {
            file: "scaling_asids".into(),
            title: "1-page invalidation vs device address spaces".into(),
            x_label: "device address spaces mapping the page".into(),
            y_label: "us (median)".into(),
            log_x: true,
            log_y: false,
            lines: vec![("polling, same-core".into(), aline)],
        });
        Ok(())
    }
}
