//! `mirrorctl`: the command-line front end.
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::{Parser, Subcommand};
use driver::fault::ServiceMode;
use driver::runtime::{DeviceSpec, Op, Runtime, RuntimeOptions};
use driver::{Context, Error};
use mirror::{Mapping, VaRange};

#[derive(Parser)]
#[command(
    name = "mirrorctl",
    version,
    about = "Userspace HMM mirror driver for the MXA-1 accelerator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mirror this process into the embedded emulated accelerator and run a workload over
    /// malloc'd and mmap'd memory that the device faults in; then unmap part of it and show the
    /// device entries gone.
    Demo {
        /// Busy-poll the fault buffer instead of waiting for interrupts.
        #[arg(long)]
        polling: bool,
        /// Size of each buffer in MiB.
        #[arg(long, default_value_t = 8)]
        mib: usize,
    },
    /// Run the benchmarks (each beside a kernel baseline measured in the same run) and write
    /// results.json, results.md and SVG plots into the results directory.
    Bench {
        /// CI smoke run (seconds): small sizes, few repeats.
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// Full run (the default): all sizes, more repeats.
        #[arg(long)]
        full: bool,
        /// Results directory.
        #[arg(long, default_value = "results")]
        out: std::path::PathBuf,
        /// No progress bars.
        #[arg(long)]
        no_progress: bool,
    },
    /// List PCI devices bound to vfio-pci and their IOMMU groups.
    Devices,
    /// Serve the emulated accelerator as a vfio-user device on a UNIX socket until SIGTERM or
    /// SIGINT: one client at a time (another gets EBUSY), one device for all of them (a client
    /// that disconnects leaves its DMA maps unmapped and its interrupts disconnected, the rest
    /// of the device state to the next client).
    Emulate {
        /// Path of the socket to create.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Exit when the first client disconnects.
        #[arg(long)]
        once: bool,
        /// Most DMA maps a client may have at once (a DMA_MAP beyond it is refused, ENOSPC).
        #[arg(long, default_value_t = firmware_stubs::vfio_user_server::DEFAULT_MAX_DMA_MAPS,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_dma_maps: u32,
    },
    /// A benchmark client process (started by `mirrorctl bench` itself).
    #[command(hide = true)]
    BenchClient {
        /// The daemon's socket.
        #[arg(long)]
        socket: std::path::PathBuf,
        /// Rounds.
        #[arg(long)]
        rounds: usize,
        /// Arena pages.
        #[arg(long)]
        pages: usize,
    },
    /// Run the daemon: own one device and serve client processes over a UNIX socket, each
    /// mirrored into its own device address space (docs/daemon.md), until SIGTERM or SIGINT.
    Serve {
        /// Socket path [default: $XDG_RUNTIME_DIR/mirrord.sock, /run/mirrord.sock for root,
        /// else /tmp/mirrord-UID/mirrord.sock in a private directory (0700, checked)].
        #[arg(long)]
        socket: Option<std::path::PathBuf>,
        /// Allow this uid to connect (repeatable) [default: the daemon's own uid only].
        #[arg(long = "allow-uid", value_name = "UID")]
        allow_uid: Vec<u32>,
        /// Serve a device reached through this vfio-user socket instead of the embedded
        /// emulator.
        #[arg(long, conflicts_with = "vfio")]
        vfio_user: Option<std::path::PathBuf>,
        /// Serve a device bound to vfio-pci, by PCI address (0000:00:03.0).
        #[arg(long)]
        vfio: Option<String>,
        /// Busy-poll the fault buffer instead of waiting for interrupts.
        #[arg(long)]
        polling: bool,
        /// Most clients at once.
        #[arg(long, default_value_t = 64)]
        max_clients: usize,
        /// Most clients of one uid at once [default: --max-clients].
        #[arg(long)]
        max_clients_per_uid: Option<usize>,
        /// Most commands in flight per client.
        #[arg(long, default_value_t = 32)]
        max_in_flight: u32,
        /// Most MiB mapped (pinned) per client.
        #[arg(long, default_value_t = 256)]
        max_mapped_mib: u64,
        /// Pin budget per client in MiB: past it the client's cold mappings are evicted
        /// (they fault back when used) instead of its commands being cancelled; 0: none.
        #[arg(long, default_value_t = 256)]
        pin_budget_mib: u64,
        /// Most arenas registered at once per client.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
        max_arenas_per_client: u32,
        /// Most MiB of arenas registered at once per client.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
        max_arena_mib_per_client: u64,
        #[command(flatten)]
        resources: ResourceFlags,
    },
}

/// `mirrorctl serve`'s daemon-wide resource limits (docs/daemon.md, "Quotas and
/// back-pressure").
#[derive(clap::Args, Debug)]
struct ResourceFlags {
    /// Most connections before HELLO (handshakes) at once; they hold no client slot.
    #[arg(long, default_value_t = 64)]
    max_handshakes: usize,
    /// Most connections before HELLO of one uid at once.
    #[arg(long, default_value_t = 16)]
    max_handshakes_per_uid: usize,
    /// Seconds a connection may take to complete HELLO.
    #[arg(long, default_value_t = 10)]
    hello_timeout_secs: u64,
    /// Seconds a frame may take to arrive once its first byte has.
    #[arg(long, default_value_t = 10)]
    frame_timeout_secs: u64,
    /// Most MiB of arenas all clients of one uid may hold at once.
    #[arg(long, default_value_t = 8192)]
    max_arena_mib_per_uid: u64,
    /// Most MiB of arenas all clients together may hold at once.
    #[arg(long, default_value_t = 16384)]
    max_arena_mib_total: u64,
    /// MiB of one client's commands on the device at once (a larger command runs alone), so
    /// that a heavy client's queue does not delay everybody's small commands; 0: no bound.
    #[arg(long, default_value_t = mirrord::DEFAULT_DEVICE_BYTES_PER_CLIENT >> 20)]
    device_mib_per_client: u64,
}

impl ResourceFlags {
    fn apply(&self, config: &mut mirrord::DaemonConfig) {
        config.max_handshakes = self.max_handshakes;
        config.max_handshakes_per_uid = self.max_handshakes_per_uid;
        config.hello_timeout = std::time::Duration::from_secs(self.hello_timeout_secs);
        config.frame_timeout = std::time::Duration::from_secs(self.frame_timeout_secs);
        config.max_arena_bytes_per_uid = self.max_arena_mib_per_uid << 20;
        config.max_arena_bytes_total = self.max_arena_mib_total << 20;
        config.device_bytes_per_client = self.device_mib_per_client << 20;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its lifecycle (clients, releases, shutdown) by default.
    let default_filter = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::BenchClient {
            socket,
            rounds,
            pages,
        } => driver_bench::daemon::client_main(&socket, rounds, pages),
        Command::Serve {
            socket,
            allow_uid,
            vfio_user,
            vfio,
            polling,
            max_clients,
            max_clients_per_uid,
            max_in_flight,
            max_mapped_mib,
            pin_budget_mib,
            max_arenas_per_client,
            max_arena_mib_per_client,
            resources,
        } => {
            // Before the device (and its queue memfds) exists: no other process of this uid
            // may open them through /proc/PID/fd.
            if let Err(e) = mirrord::forbid_dumping() {
                eprintln!("mirrorctl: {e}");
                return ExitCode::FAILURE;
            }
            let spec = match (vfio_user, vfio) {
                (Some(path), _) => DeviceSpec::VfioUser(path),
                (None, Some(address)) => DeviceSpec::KernelVfio(address),
                (None, None) => DeviceSpec::emulated(),
            };
            let socket = match socket
                .map(Ok)
                .unwrap_or_else(mirrord_client::checked_default_socket_path)
            {
                Ok(path) => path,
                Err(e) => {
                    eprintln!("mirrorctl: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut config = mirrord::DaemonConfig::new(socket);
            config.allowed_uids = allow_uid;
            config.max_clients = max_clients;
            config.max_clients_per_uid = max_clients_per_uid.unwrap_or(max_clients);
            config.limits.max_in_flight = max_in_flight;
            config.limits.max_mapped_bytes = max_mapped_mib << 20;
            config.pin_budget_per_client = (pin_budget_mib > 0).then_some(pin_budget_mib << 20);
            config.limits.max_arenas = max_arenas_per_client;
            config.limits.max_arena_bytes = max_arena_mib_per_client << 20;
            resources.apply(&mut config);
            serve(spec, polling, config)
        }
        Command::Demo { polling, mib } => demo(polling, mib),
        Command::Bench {
            quick,
            full: _,
            out,
            no_progress,
        } => bench(quick, out, !no_progress),
        Command::Devices => devices(),
        Command::Emulate {
            socket,
            once,
            max_dma_maps,
        } => {
            return match emulate(&socket, once, max_dma_maps) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mirrorctl emulate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirrorctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(spec: DeviceSpec, polling: bool, config: mirrord::DaemonConfig) -> Result<(), Error> {
    let options = RuntimeOptions {
        mode: if polling {
            ServiceMode::Polling
        } else {
            ServiceMode::Interrupt
        },
        ..RuntimeOptions::default()
    };
    let runtime = Runtime::open(spec, options)?;
    let daemon = mirrord::Daemon::new(runtime, config)?;
    let os = |what| move |source| Error::Os { what, source };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(os("start the tokio runtime"))?;
    tokio.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(os("watch SIGTERM"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(os("watch SIGINT"))?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        };
        daemon.serve(stop).await
    })
}

fn bench(quick: bool, out: std::path::PathBuf, progress: bool) -> Result<(), Error> {
    let options = driver_bench::BenchOptions {
        quick,
        out: out.clone(),
        progress,
        client_exe: std::env::current_exe().ok(),
    };
    let report = driver_bench::Bench::run(&options)?;
    print!("{}", report.to_markdown());
    println!("\nwritten to {}", out.display());
    Ok(())
}

fn emulate(socket: &std::path::Path, once: bool, max_dma_maps: u32) -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;
    // Block the stop signals in every thread (threads inherit the mask) and read them from a
    // signalfd, so the accept loop sees them as a readable descriptor.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&stop), None)?;
    let sfd = SignalFd::with_flags(&stop, SfdFlags::SFD_CLOEXEC)?;
    // The path appears only once the socket listens: a peer that waits for it never races.
    let listener = sys_util::socket::listen_at(socket, 0o600)?;
    eprintln!(
        "mirrorctl emulate: serving the MXA-1 on {}",
        socket.display()
    );
    let result = firmware_stubs::vfio_user_server::serve_with(
        &listener,
        &firmware_stubs::AcceleratorConfig::default(),
        &firmware_stubs::vfio_user_server::ServerOptions {
            max_dma_maps,
            ..Default::default()
        },
        sfd.as_fd(),
        once,
    );
    if let Err(e) = std::fs::remove_file(socket) {
        eprintln!("mirrorctl emulate: removing {}: {e}", socket.display());
    }
    result
}

fn devices() -> Result<(), Error> {
    let found = driver::backend::vfio::list_vfio_devices().map_err(|e| Error::Os {
        what: "reading /sys/bus/pci/drivers/vfio-pci",
        source: e,
    })?;
    if found.is_empty() {
        println!(
            "No PCI device is bound to vfio-pci on this machine{}.\n\
             To use one: load vfio-pci, then `echo vfio-pci > /sys/bus/pci/devices/ADDR/driver_override` \
             and `echo ADDR > /sys/bus/pci/drivers_probe`.\n\
             The embedded emulator needs none of this: `mirrorctl demo`.",
            if std::path::Path::new("/dev/vfio").exists() { "" } else { " (and there is no /dev/vfio)" }
        );
        return Ok(());
    }
    println!("{:<14} {:<11} iommu group", "address", "id");
    for d in found {
        let group = d.iommu_group.map_or("none".to_string(), |g| g.to_string());
        println!("{:<14} {:04x}:{:04x}  {group}", d.address, d.id.0, d.id.1);
    }
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn demo(polling: bool, mib: usize) -> Result<(), Error> {
    if !(1..=4096).contains(&mib) {
        return Err(Error::InvalidArgument("--mib must be between 1 and 4096"));
    }
    let mode = if polling {
        ServiceMode::Polling
    } else {
        ServiceMode::Interrupt
    };
    let options = RuntimeOptions {
        mode,
        ..Default::default()
    };
    let rt = Runtime::open(DeviceSpec::emulated(), options)?;
    let caps = rt.device().caps();
    step("device");
    println!(
        "MXA-1 (emulated, in this process): {} address spaces, {}-level page table over {} bits, \
         {} fault-buffer entries max; fault service: {mode:?}",
        caps.asids, caps.pt_levels, caps.va_bits, caps.fault_entries
    );
    let ctx = rt.create_context()?;
    println!(
        "context mirrors this process into device address space {}",
        ctx.asid()
    );

    let len = mib << 20;
    step(&format!(
        "device FILL over {mib} MiB of plain malloc'd memory (never touched by the CPU)"
    ));
    let mut heap = vec![0u8; len];
    let t = Instant::now();
    ctx.fill(&mut heap, 0x5a5a_5a5a_5a5a_5a5a)?;
    let ok = heap.iter().all(|b| *b == 0x5a);
    println!(
        "{:.1} ms, CPU sees the device's bytes: {ok}",
        t.elapsed().as_secs_f64() * 1e3
    );
    show(&ctx);

    step(&format!(
        "device COPY malloc -> {mib} MiB of mmap'd memory (2 MiB aligned, THP advised)"
    ));
    let map = Mapping::anonymous_aligned(len, 2 << 20, libc::PROT_READ | libc::PROT_WRITE)
        .map_err(Error::Mirror)?;
    // SAFETY: advice on a mapping we own.
    unsafe { libc::madvise(map.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    for (i, b) in heap.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let t = Instant::now();
    // SAFETY: `map` is reached only through raw pointers, `heap` is borrowed for the whole
    // submit-to-wait window.
    let ticket = unsafe {
        ctx.submit(Op::Copy {
            dst: map.addr(),
            src: heap.as_ptr() as u64,
            len: len as u64,
        })?
    };
    ctx.wait(ticket)?;
    let same = (0..len)
        .step_by(4093)
        .all(|i| map.read_byte(i) == (i % 251) as u8);
    println!(
        "{:.1} ms, copy verified by the CPU: {same}",
        t.elapsed().as_secs_f64() * 1e3
    );
    let dev_sum = ctx.checksum(&heap)?;
    let cpu_sum = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &heap);
    println!(
        "device checksum {dev_sum:#018x} == CPU checksum {cpu_sum:#018x}: {}",
        dev_sum == cpu_sum
    );
    show(&ctx);

    step("1000 device atomic adds on a counter on the stack");
    let counter = AtomicU64::new(0);
    let mut rounds: Vec<f64> = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        ctx.atomic_add(&counter, 3)?;
        rounds.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rounds.sort_by(|a, b| a.total_cmp(b));
    println!(
        "counter = {} (expected 3000); submit-to-completion round trip p50 {:.1} us, p99 {:.1} us \
         ({mode:?}; emulator workers on either core)",
        counter.load(Ordering::SeqCst),
        rounds[rounds.len() / 2],
        rounds[rounds.len() * 99 / 100]
    );

    step("munmap the second half of the mmap'd buffer through the mirror (strict coherence)");
    let half = (len / 2) as u64;
    let range = map.forget();
    let tail = VaRange::new(range.start() + half, half).map_err(Error::Mirror)?;
    let probe = tail.start() + 4096;
    println!(
        "before: device entry for {probe:#x}: {:?}",
        ctx.device_translation(probe).map(|t| t.size)
    );
    let fences = ctx.stats().tlb_fences;
    // SAFETY: the tail belongs to the forgotten mapping and nothing refers into it.
    unsafe { ctx.address_space().munmap(tail).map_err(Error::Mirror)? };
    println!(
        "after:  device entry for {probe:#x}: {:?} (TLB fences issued: {})",
        ctx.device_translation(probe).map(|t| t.size),
        ctx.stats().tlb_fences - fences
    );
    // SAFETY: the address is unmapped; the device must fail cleanly, touching nothing.
    let ticket = unsafe {
        ctx.submit(Op::Fill {
            dst: probe,
            len: 8,
            pattern: 1,
        })?
    };
    match ctx.wait(ticket) {
        Err(e) => println!("device write to the unmapped page: {e}"),
        Ok(_) => println!("device write to the unmapped page unexpectedly succeeded"),
    }
    println!(
        "the head is still mirrored: device entry for {:#x}: {:?}",
        range.start(),
        ctx.device_translation(range.start()).map(|t| t.size)
    );

    step("munmap the head with a plain munmap(2): only the userfaultfd UNMAP event reports it");
    let head = range.start();
    // SAFETY: the head belongs to the forgotten mapping and nothing refers into it.
    unsafe { libc::munmap(head as *mut libc::c_void, half as usize) };
    let settled = ctx.address_space().settle();
    println!(
        "after settle ({}): device entry for {head:#x}: {:?}",
        if settled.is_ok() {
            "events handled"
        } else {
            "no userfaultfd"
        },
        ctx.device_translation(head).map(|t| t.size)
    );
    show(&ctx);
    let s = rt.service().stats();
    step("fault service");
    println!(
        "records {} ({} lookahead), batches {}, pages serviced {}, replays {}, cancels {}, overflows {}",
        s.records.load(Ordering::Relaxed),
        s.lookahead_records.load(Ordering::Relaxed),
        s.batches.load(Ordering::Relaxed),
        s.pages_serviced.load(Ordering::Relaxed),
        s.replays.load(Ordering::Relaxed),
        s.cancels.load(Ordering::Relaxed),
        s.overflows.load(Ordering::Relaxed),
    );
    let m = ctx.address_space().stats();
    println!("mirror: {m:?}");
    Ok(())
}

fn show(ctx: &Context) {
    let s = ctx.stats();
    println!(
        "  faults {} | DMA mappings {} ({} KiB mapped, {} KiB pinned) | device leaves 4K {} / 2M {} | \
         table pages {} | invalidations {} | TLB fences {} | retries {}",
        s.faults,
        s.mappings,
        s.mapped_bytes >> 10,
        s.pinned_bytes >> 10,
        s.small_leaves,
        s.large_leaves,
        s.table_pages,
        s.invalidations,
        s.tlb_fences,
        s.retries
    );
}
