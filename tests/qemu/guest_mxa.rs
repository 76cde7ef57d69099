//! The guest cases beyond the two suites (`guest_suites.rs`), on MXA-1 bound to the kernel's
//! vfio-pci inside the QEMU guest of `tests/qemu/mxa-run.sh`:
//! - device operations on every kind of memory a runtime has (malloc, mmap, stack, memfd);
//! - interrupt mode proves its interrupts arrived (counters, not timing), polling mode takes none;
//! - RLIMIT_MEMLOCK without CAP_IPC_LOCK: pins are real here, so the limit is, and nothing leaks;
//! - a device with no reset method (on the root bus) fails to open with an error naming the cause;
//! - the daemon on kernel VFIO with four client processes computing on their own memory.
//!
//! Child roles (the memlock child, the daemon's clients) are this binary run again with
//! `MXA_GUEST_ROLE` set; the `role` case does the work in that process and nothing otherwise.

#[path = "../../driver/tests/suite/mod.rs"]
mod suite;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::fault::{CancelReason, ServiceMode};
use driver::runtime::Runtime;
use driver::{DeviceOps, Error};
use integration_tests::guest;
use mirror::Mapping;
use mirrord_client::DaemonClient;

const PAGE: usize = 4096;
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const ROLE_ENV: &str = "MXA_GUEST_ROLE";

/// Fill, copy, checksum and atomic add on malloc'd, mmap'd, stack and memfd memory, every
/// result checked on the CPU.
fn operations_on_every_kind_of_memory(rt: &Arc<Runtime>) {
    let ctx = rt.create_context().expect("create context");
    // malloc
    let mut heap = vec![0u8; 64 * PAGE + 123];
    ctx.fill(&mut heap, 0x1111_1111_1111_1111).unwrap();
    assert!(heap.iter().all(|b| *b == 0x11), "fill of malloc'd memory");
    // mmap (2 MiB aligned and THP-advised: large leaves where the kernel gives a huge page)
    let mmapped = Mapping::anonymous_aligned(4 << 20, 2 << 20, RW).unwrap();
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(mmapped.as_ptr().cast(), mmapped.len(), libc::MADV_HUGEPAGE) };
    // SAFETY: the mapping is ours, alive until the end of the case, and no Rust reference
    // points into it while the device writes.
    let dst = unsafe { std::slice::from_raw_parts_mut(mmapped.as_ptr(), mmapped.len()) };
    ctx.copy(&mut dst[..heap.len()], &heap).unwrap();
    assert!(
        dst[..heap.len()].iter().all(|b| *b == 0x11),
        "copy malloc -> mmap"
    );
    ctx.fill(dst, 0x2222_2222_2222_2222).unwrap();
    assert!(dst.iter().all(|b| *b == 0x22), "fill of mmap'd memory");
    let want = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, dst);
    assert_eq!(
        ctx.checksum(dst).unwrap(),
        want,
        "checksum of mmap'd memory"
    );
    // stack
    let mut on_stack = [0u8; 3 * PAGE];
    ctx.fill(&mut on_stack, 0x3333_3333_3333_3333).unwrap();
    assert!(on_stack.iter().all(|b| *b == 0x33), "fill of stack memory");
    let counter = AtomicU64::new(5);
    for _ in 0..100 {
        ctx.atomic_add(&counter, 3).unwrap();
    }
    assert_eq!(counter.into_inner(), 305, "atomic adds on a stack counter");
    // memfd
    let (file, m) = suite::memfd_arena("guest-memfd", 8 * PAGE);
    suite::device_fill(&ctx, m.addr(), m.len() as u64, 0x4444_4444_4444_4444).unwrap();
    let mut back = vec![0u8; 8 * PAGE];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0).unwrap();
    assert!(
        back.iter().all(|b| *b == 0x44),
        "the device's bytes are in the memfd"
    );
    let s = ctx.stats();
    assert!(s.faults > 0 && s.pinned_bytes > 0, "{s:?}");
    assert_eq!(s.failures, 0, "{s:?}");
}

#[test]
fn memory_kinds_interrupt_mode() {
    let rt = guest::open(ServiceMode::Interrupt);
    operations_on_every_kind_of_memory(&rt);
    guest::pins_released(rt);
}

#[test]
fn memory_kinds_polling_mode() {
    let rt = guest::open(ServiceMode::Polling);
    operations_on_every_kind_of_memory(&rt);
    guest::pins_released(rt);
}

/// A process closes the device and opens it again (a runtime restarting its device): the
/// second open gets the device, and each runtime's pins are gone with it.
#[test]
fn device_reopens_in_the_same_process() {
    for round in 0..3 {
        let rt = guest::open_nth(0, ServiceMode::Interrupt)
            .unwrap_or_else(|e| panic!("open #{round} of the device: {e}"));
        let ctx = rt.create_context().unwrap();
        let mut buf = vec![0u8; 16 * PAGE];
        ctx.fill(&mut buf, 0x6666_6666_6666_6666).unwrap();
        assert!(buf.iter().all(|b| *b == 0x66), "round {round}");
        drop(ctx);
        guest::pins_released(rt);
    }
}

/// In interrupt mode the fault and completion interrupts really arrive: the service counts
/// them, and it never had to find work by its timeout instead (a silent fallback to timeout
/// polling fails here, whatever the timing).
#[test]
fn interrupts_arrive_in_interrupt_mode() {
    let rt = guest::open(ServiceMode::Interrupt);
    let before = rt.interrupt_stats();
    operations_on_every_kind_of_memory(&rt);
    // A miss is counted once no interrupt followed it within the grace period.
    std::thread::sleep(driver::fault::MISS_GRACE * 2);
    let after = rt.interrupt_stats();
    assert!(after.fault > before.fault, "no fault interrupt: {after:?}");
    assert!(
        after.completion > before.completion,
        "no completion interrupt: {after:?}"
    );
    assert_eq!(
        after.missed_fault, 0,
        "faults found only by timeout: {after:?}"
    );
    assert_eq!(
        after.missed_completion, 0,
        "completions found only by timeout: {after:?}"
    );
    guest::pins_released(rt);
}

/// Polling mode services the same work without interrupts.
#[test]
fn polling_mode_takes_no_interrupts() {
    let rt = guest::open(ServiceMode::Polling);
    operations_on_every_kind_of_memory(&rt);
    let s = rt.interrupt_stats();
    assert_eq!((s.fault, s.missed_fault), (0, 0), "{s:?}");
    guest::pins_released(rt);
}

/// The device on the root bus has no reset method (no FLR, no PM reset, and no bus to reset):
/// opening it fails with an error that names the device and the cause, and leaves nothing held.
#[test]
fn device_without_reset_method_fails_clearly() {
    let bdf = guest::root_bus_device();
    assert!(!bdf.is_empty(), "the guest has no MXA-1 on its root bus");
    let err = Runtime::open(
        driver::DeviceSpec::KernelVfio(bdf.clone()),
        driver::RuntimeOptions::default(),
    )
    .err()
    .expect("a device with no reset method opened");
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            Error::Backend(driver::backend::BackendError::NoResetMethod { device, .. }) if *device == bdf
        ),
        "not the no-reset-method error for {bdf}: {err:?}"
    );
    assert!(
        text.contains(&bdf) && text.contains("reset") && text.contains("root port"),
        "the error does not name the device, the reset and the fix: {text}"
    );
    assert_eq!(guest::locked_bytes(), 0, "the failed open left pins");
    // The device is free again: opening it once more fails the same way, not with EBUSY.
    let again = Runtime::open(
        driver::DeviceSpec::KernelVfio(bdf),
        driver::RuntimeOptions::default(),
    )
    .err()
    .expect("opened on the second try");
    assert_eq!(again.to_string(), text);
}

const CAP_IPC_LOCK: u32 = 14;

/// Without CAP_IPC_LOCK, the pins of the kernel's VFIO count against RLIMIT_MEMLOCK: an
/// over-limit device access fails with the memlock error, leaves nothing mapped or pinned, and
/// work under the limit still runs. In a child process executed without CAP_IPC_LOCK in its
/// bounding set, so that none of its threads has it (the kernel checks the pinning thread's).
#[test]
fn memlock_limit_without_cap_ipc_lock() {
    guest::drop_from_bounding_set(CAP_IPC_LOCK).unwrap();
    run_child("memlock", &[]);
}

fn memlock_child() {
    assert!(!driver::has_cap_ipc_lock(), "CAP_IPC_LOCK still effective");
    let rt = guest::open(ServiceMode::Interrupt);
    let ctx = rt.create_context().unwrap();
    // The runtime's own pins (rings, page-table pages) plus 256 KiB.
    let base = guest::locked_bytes();
    let limit = base + (256 << 10);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK, limit, limit)
        .unwrap();
    let big = Mapping::anonymous(1 << 20, RW).unwrap();
    match ctx.prefault(big.addr(), big.len() as u64, true) {
        Err(e) if e.to_string().contains("RLIMIT_MEMLOCK") => println!("prefault: {e}"),
        other => panic!("over-limit prefault: {other:?}"),
    }
    match suite::device_fill(&ctx, big.addr(), big.len() as u64, 1) {
        Err(Error::Cancelled {
            reason: CancelReason::DmaMap,
        }) => {}
        other => panic!("over-limit device fill: {other:?}"),
    }
    let s = ctx.stats();
    assert!(s.mapped_bytes <= 256 << 10, "over the limit mapped: {s:?}");
    ctx.address_space().settle().unwrap();
    drop(big);
    ctx.address_space().settle().unwrap();
    assert_eq!(
        ctx.stats().mapped_bytes,
        0,
        "pins left after the buffer went"
    );
    assert_eq!(guest::locked_bytes(), base, "VmLck above the runtime's own");
    let mut small = vec![0u8; 4 * PAGE];
    ctx.fill(&mut small, 0x5555_5555_5555_5555).unwrap();
    assert!(small.iter().all(|b| *b == 0x55), "a fill under the limit");
    drop(ctx);
    guest::pins_released(rt);
}

/// A pin budget on kernel VFIO, where mapped means pinned: a device sweep over eight times the
/// budget keeps the pinned bytes (the context's count and the kernel's VmLck) under it, evicting
/// through the aging path (ACCESSED bits the device writes into the guest's table pages), every
/// byte right, DIRTY reported for the written pages; every pin gone afterwards.
#[test]
fn a_pin_budget_bounds_the_pins_on_kernel_vfio() {
    let rt = guest::open(ServiceMode::Polling);
    assert!(
        rt.device().accessed_dirty(),
        "MXA-1 revision 2 with ACCESSED/DIRTY enabled"
    );
    let budget = 1usize << 20;
    let ctx = rt
        .create_context_with(driver::context::ContextOptions {
            pin_budget: Some(budget as u64),
            ..Default::default()
        })
        .unwrap();
    let base = guest::locked_bytes();
    let len = 8 * budget;
    let m = Mapping::anonymous(len, RW).unwrap();
    let chunk = 256 << 10;
    let mut max_pinned = 0;
    let mut max_locked = 0;
    for (i, start) in (0..len).step_by(chunk).enumerate() {
        suite::device_fill(
            &ctx,
            m.addr() + start as u64,
            chunk as u64,
            0x0101_0101_0101_0101 * (i as u64 + 1),
        )
        .unwrap();
        max_pinned = max_pinned.max(ctx.stats().pinned_bytes);
        max_locked = max_locked.max(guest::locked_bytes() - base);
    }
    for (i, start) in (0..len).step_by(chunk).enumerate() {
        assert_eq!(m.read_byte(start + 123), i as u8 + 1, "chunk {i}");
    }
    let s = ctx.stats();
    assert!(
        max_pinned <= budget as u64,
        "pinned {max_pinned} past the budget: {s:?}"
    );
    assert!(
        max_locked <= budget as u64,
        "VmLck grew by {max_locked} past the budget: {s:?}"
    );
    assert!(s.evictions > 0 && s.aging_queries > 0, "{s:?}");
    assert_eq!(s.aging_unavailable, 0, "{s:?}");
    let dirty = ctx.take_dirty(m.addr(), len as u64).unwrap();
    assert_eq!(
        dirty,
        vec![m.addr()..m.addr() + len as u64],
        "every page was written"
    );
    drop(m);
    ctx.address_space().settle().unwrap();
    drop(ctx);
    guest::pins_released(rt);
}

/// The daemon on kernel VFIO (`mirrorctl serve --vfio`) with four client processes, each
/// computing on its own arenas at once; every client's data checked, the daemon's pins gone
/// after the clients.
#[test]
fn daemon_serves_four_client_processes() {
    let socket = std::env::temp_dir().join("mirrord-guest.sock");
    let (daemon, log) = start_daemon(&socket);
    let clients: Vec<_> = (0..4)
        .map(|i| {
            spawn_child(
                "client",
                &[
                    ("MXA_GUEST_SOCKET", socket.to_str().unwrap()),
                    ("MXA_GUEST_CLIENT", &i.to_string()),
                ],
            )
        })
        .collect();
    let mut failures = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "client {i}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let stats = DaemonClient::connect(&socket).and_then(|c| c.stats());
    let (status, log) = stop_daemon(daemon, log);
    eprintln!("{log}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing went wrong behind the clients' backs: no error the device latched (a refused
    // cancel), no failed tear-down of the VFIO group (a device file still open at close).
    for bad in ["device latched an error", "ERROR"] {
        assert!(!log.contains(bad), "the daemon logged {bad:?} (log above)");
    }
    let stats = stats.unwrap();
    assert_eq!(
        stats.mapped_bytes_total, 0,
        "daemon pins after the clients left: {stats:?}"
    );
    assert!(status.success(), "mirrorctl serve exited with {status}");
}

fn client_child() {
    let socket = PathBuf::from(std::env::var("MXA_GUEST_SOCKET").unwrap());
    let me: u64 = std::env::var("MXA_GUEST_CLIENT").unwrap().parse().unwrap();
    let client = DaemonClient::connect(&socket).expect("connect to the daemon");
    let pattern = 0x0101_0101_0101_0101 * (me + 1);
    for round in 0..4u64 {
        let mut arena = client.alloc_arena(256 * PAGE).unwrap();
        client.fill(&mut arena[..], pattern + round).unwrap();
        let want = (pattern + round).to_le_bytes();
        assert!(
            arena.chunks(8).all(|c| c == want),
            "client {me} round {round}: the device's bytes"
        );
        let sum = client.checksum(&arena[..]).unwrap();
        assert_eq!(
            sum,
            accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &arena[..])
        );
    }
    let s = client.stats().unwrap();
    assert!(s.faults > 0, "{s:?}");
    assert_eq!(s.failures, 0, "{s:?}");
    assert!(s.clients >= 1, "{s:?}");
}

/// `mirrorctl serve --vfio` on the first guest device, listening on `socket`; its log is read
/// to the end by a thread (the daemon must never block on a full pipe).
fn start_daemon(
    socket: &std::path::Path,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    let _ = std::fs::remove_file(socket);
    let mut daemon = Command::new(guest::mirrorctl())
        .args(["serve", "--vfio", &guest::devices()[0], "--socket"])
        .arg(socket)
        .env("RUST_LOG", "driver::fault=debug,driver::context=debug,info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mirrorctl serve");
    let log = {
        let mut stderr = daemon.stderr.take().expect("stderr piped");
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!("mirrorctl serve exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not listen in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (daemon, log)
}

/// SIGTERM to the daemon; its exit status and log.
fn stop_daemon(
    mut daemon: std::process::Child,
    log: std::thread::JoinHandle<String>,
) -> (std::process::ExitStatus, String) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    (status, log.join().unwrap())
}

/// A memfd of one shared file, registered as an arena of this process's daemon session:
/// mapped here, its fd handed to the daemon, which maps (and on kernel VFIO pins) its pages.
struct SharedArena {
    file: std::fs::File,
    va: u64,
    len: usize,
}

impl SharedArena {
    fn register(client: &DaemonClient, path: &str, len: usize) -> SharedArena {
        use mirrord_client::protocol::{Reply, Request};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open the shared memfd");
        // SAFETY: a fresh shared mapping of the file; no Rust reference into it is made
        // (the device and the CPU reach it by address only), unmapped in Drop.
        let va = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .expect("map the shared memfd")
        .as_ptr() as u64;
        let req = Request::RegisterArena {
            va,
            len: len as u64,
            offset: 0,
        };
        match client.raw_request(req, &[std::os::fd::AsFd::as_fd(&file)]) {
            Ok(Reply::Arena { .. }) => {}
            other => panic!("register the shared arena: {other:?}"),
        }
        SharedArena { file, va, len }
    }

    /// The device's checksum of the whole arena.
    fn device_checksum(&self, client: &DaemonClient) -> u64 {
        let op = driver::Op::Checksum {
            src: self.va,
            len: self.len as u64,
        };
        // SAFETY: a checksum only reads the mapping, which outlives the wait.
        let t = unsafe { client.submit(op) }.expect("submit the checksum");
        client.wait(t).expect("the checksum")
    }
}

impl Drop for SharedArena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `register`, used by nothing any more.
        let _ = unsafe {
            nix::sys::mman::munmap(
                std::ptr::NonNull::new(self.va as *mut libc::c_void).unwrap(),
                self.len,
            )
        };
    }
}

/// Two daemon clients (this process and a child) register arenas of one memfd; the daemon maps
/// and, on kernel VFIO, pins its pages. This process punches a hole in the first half and sends
/// INVALIDATE: the other client's device view of the hole must go too (its pins released), so
/// its device reads zeroes there, not the old pages a stale pin would still hold.
#[test]
fn a_punched_hole_invalidates_every_sharers_pinned_view() {
    const LEN: usize = 64 * PAGE;
    let socket = std::env::temp_dir().join("mirrord-guest-punch.sock");
    let (daemon, log) = start_daemon(&socket);
    let memfd = nix::sys::memfd::memfd_create(
        c"guest-shared",
        nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .unwrap();
    std::io::Write::write_all(
        &mut std::fs::File::from(memfd.try_clone().unwrap()),
        &[0x5a; LEN],
    )
    .unwrap();
    let path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&memfd)
    );
    let marks = std::env::temp_dir().join(format!("mxa-punch-{}", std::process::id()));
    std::fs::create_dir_all(&marks).unwrap();
    let client = DaemonClient::connect(&socket).expect("connect");
    let mine = SharedArena::register(&client, &path, LEN);
    let whole = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &[0x5a; LEN]);
    assert_eq!(mine.device_checksum(&client), whole);
    let other = spawn_child(
        "sharer",
        &[
            ("MXA_GUEST_SOCKET", socket.to_str().unwrap()),
            ("MXA_GUEST_SHARED", &path),
            ("MXA_GUEST_MARKS", marks.to_str().unwrap()),
        ],
    );
    wait_for_mark(&marks.join("ready"));
    let before = client.stats().unwrap();
    nix::fcntl::fallocate(
        std::os::fd::AsRawFd::as_raw_fd(&mine.file),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        (LEN / 2) as i64,
    )
    .expect("punch a hole");
    client
        .invalidate(mine.va, (LEN / 2) as u64)
        .expect("INVALIDATE");
    let after = client.stats().unwrap();
    std::fs::write(marks.join("punched"), b"").unwrap();
    let out = other.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "sharer child: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Both clients mapped (pinned) the whole file before; the daemon holds less after.
    assert!(
        after.mapped_bytes_total < before.mapped_bytes_total,
        "the daemon's pins did not shrink: {before:?} -> {after:?}"
    );
    let mut expected = vec![0u8; LEN / 2];
    expected.extend(std::iter::repeat_n(0x5a, LEN / 2));
    assert_eq!(
        mine.device_checksum(&client),
        accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &expected)
    );
    drop(mine);
    drop(client);
    let (status, log) = stop_daemon(daemon, log);
    let _ = std::fs::remove_dir_all(&marks);
    assert!(!log.contains("ERROR"), "the daemon logged an ERROR:\n{log}");
    assert!(status.success(), "mirrorctl serve exited with {status}");
}

fn wait_for_mark(mark: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !mark.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            mark.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The other sharer: registers the same memfd, has its device read it all, says so, waits for
/// the hole, then checks its own device view lost the hole (invalidated, pins gone) and reads
/// zeroes there.
fn sharer_child() {
    const LEN: usize = 64 * PAGE;
    let socket = PathBuf::from(std::env::var("MXA_GUEST_SOCKET").unwrap());
    let path = std::env::var("MXA_GUEST_SHARED").unwrap();
    let marks = PathBuf::from(std::env::var("MXA_GUEST_MARKS").unwrap());
    let client = DaemonClient::connect(&socket).expect("connect");
    let arena = SharedArena::register(&client, &path, LEN);
    let whole = accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &[0x5a; LEN]);
    assert_eq!(arena.device_checksum(&client), whole);
    let before = client.stats().unwrap();
    assert_eq!(before.mapped_bytes, LEN as u64, "{before:?}");
    std::fs::write(marks.join("ready"), b"").unwrap();
    wait_for_mark(&marks.join("punched"));
    let after = client.stats().unwrap();
    assert!(
        after.invalidations > before.invalidations && after.mapped_bytes < before.mapped_bytes,
        "the other client's INVALIDATE did not reach this view: {before:?} -> {after:?}"
    );
    let mut expected = vec![0u8; LEN / 2];
    expected.extend(std::iter::repeat_n(0x5a, LEN / 2));
    assert_eq!(
        arena.device_checksum(&client),
        accel_abi::fnv1a_update(accel_abi::FNV_OFFSET, &expected),
        "this client's device still read the old pages of the hole"
    );
}

fn spawn_child(role: &str, env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        guest::CHILD_ROLE_CASE,
        "--test-threads=1",
        "--nocapture",
    ])
    .env(ROLE_ENV, role)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn a child role")
}

fn run_child(role: &str, env: &[(&str, &str)]) {
    let out = spawn_child(role, env).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{role} child: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child role (does nothing unless run by `spawn_child`; the guest's init does not list it).
#[test]
fn child_role_entry() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("memlock") => memlock_child(),
        Ok("client") => client_child(),
        Ok("sharer") => sharer_child(),
        Ok(other) => panic!("unknown role {other}"),
        Err(_) => {}
    }
}
