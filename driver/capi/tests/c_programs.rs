//! The C programs, compiled with the system `cc`/`c++` against the library this build made
//! (`libmirrordrv.so` beside the test executable's `deps/`, or `libmirrordrv.a`), and run:
//! examples/c/fill.c, tests/c/capi_test.c case by case (in-process, vfio-user, two daemon client
//! processes at once), and the C++ smoke test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

// The daemon tests' helpers (a scratch directory, the daemon served on a thread, waiting for a
// socket), shared with mirrorctl's daemon tests.
#[path = "../../mirrorctl/tests/daemon_support/mod.rs"]
mod daemon_support;
use daemon_support::{serve_on_a_thread, wait_for_socket, TempDir};

/// Where cargo put the libmirrordrv.{so,a} this test was built with: beside the test executable,
/// in `<target>/<profile>/deps` (`cargo build` also copies them up to `<target>/<profile>`, but
/// `cargo test` does not, so the copies there may be stale).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .expect("the test executable sits in <target>/<profile>/deps")
        .to_path_buf();
    for lib in ["libmirrordrv.so", "libmirrordrv.a"] {
        assert!(
            dir.join(lib).exists(),
            "{} missing: cargo builds it with the tests (crate-type cdylib + staticlib)",
            dir.join(lib).display()
        );
    }
    dir
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compile `source` into `<lib dir>/capi-c/<name>`, linked against the shared library (with
/// an rpath) or the static one.
fn build(compiler: &str, std_flags: &[&str], source: &Path, name: &str, shared: bool) -> PathBuf {
    let lib = lib_dir();
    let out_dir = lib.join("..").join("capi-c");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(name);
    // Built under a name of this process's, then renamed: another test process running the
    // previous build keeps its file.
    let building = out_dir.join(format!("{name}.{}", std::process::id()));
    let mut cmd = Command::new(compiler);
    cmd.args(std_flags)
        .args(["-Wall", "-Werror", "-g", "-I"])
        .arg(crate_dir().join("include"))
        .arg(source)
        .arg("-o")
        .arg(&building);
    if shared {
        cmd.arg(format!("-L{}", lib.display()))
            .arg("-lmirrordrv")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
    } else {
        cmd.arg(lib.join("libmirrordrv.a"));
    }
    // What a Rust static library needs from the C library (rustc --print native-static-libs).
    cmd.args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-lgcc_s"]);
    let result = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e} (scripts/test-all.sh installs g++)"));
    assert!(
        result.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&building, &out).unwrap();
    out
}

fn capi_test() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        build(
            "cc",
            &["-std=c11", "-Wextra", "-pthread"],
            &crate_dir().join("tests/c/capi_test.c"),
            "capi_test",
            true,
        )
    })
}

/// Run a built program; its output, asserting it exited 0 and printed "0 failed" if it is the
/// test program.
fn run(program: &Path, args: &[&str]) -> Output {
    // cargo test puts <target>/<profile> on LD_LIBRARY_PATH, ahead of the program's rpath (a
    // RUNPATH): the library there may be an older `cargo build`'s.
    let out = Command::new(program)
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_case(args: &[&str]) {
    let out = run(capi_test(), args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.ends_with(" 0 failed") && !last.contains(": 0 passed"),
        "unexpected summary: {last}"
    );
}

#[test]
fn the_example_fills_malloc_memory_through_the_static_library() {
    let exe = build(
        "cc",
        &["-std=c11", "-Wextra"],
        &crate_dir().join("../../examples/c/fill.c"),
        "fill",
        false,
    );
    let out = run(&exe, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("checked on the CPU"), "{stdout}");
    assert!(stdout.contains("faults "), "{stdout}");
}

#[test]
fn c_data_on_malloc_mmap_and_stack_memory() {
    run_case(&["data"]);
}

#[test]
fn c_strict_munmap_then_device_access_fails() {
    run_case(&["strict"]);
}

#[test]
fn c_bad_arguments_return_their_codes() {
    run_case(&["args"]);
}

#[test]
fn c_quota_and_a_timed_out_wait() {
    run_case(&["limits"]);
}

#[test]
fn c_threads_submit_at_once_on_one_context() {
    run_case(&["threads"]);
}

/// One ticket waited for by two threads (the second is refused BUSY, not told "collected"),
/// and a destroy while another thread waits (it returns after that wait, so a close right
/// after it is not refused).
#[test]
fn c_one_ticket_two_threads_and_destroy_while_waiting() {
    run_case(&["contended"]);
}

#[test]
fn cpp_smoke() {
    let exe = build(
        "c++",
        &["-std=c++17", "-Wextra"],
        &crate_dir().join("tests/c/smoke.cpp"),
        "smoke",
        true,
    );
    let out = run(&exe, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("c++ smoke: ok"));
}

#[test]
fn c_data_on_a_vfio_user_device() {
    let dir = TempDir::new("capi-vfio-user");
    let socket = dir.0.join("mxa.sock");
    let listener = sys_util::socket::listen_at(&socket, 0o600).expect("listen");
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        firmware_stubs::vfio_user_server::serve_connection(
            stream,
            &firmware_stubs::AcceleratorConfig::default(),
        )
    });
    run_case(&["data", "vfio-user", socket.to_str().unwrap()]);
    // The client process has exited: the server sees its connection close.
    let served = server.join().expect("server thread");
    assert!(served.is_ok(), "the vfio-user server failed: {served:?}");
}

#[test]
fn two_c_client_processes_through_the_daemon() {
    let dir = TempDir::new("capi-daemon");
    let socket = dir.0.join("mirrord.sock");
    let runtime = driver::Runtime::open(
        driver::DeviceSpec::emulated(),
        driver::RuntimeOptions::default(),
    )
    .expect("open the emulated device for the daemon");
    let daemon = Arc::new(
        mirrord::Daemon::new(runtime, mirrord::DaemonConfig::new(&socket)).expect("daemon"),
    );
    let (stop, thread) = serve_on_a_thread(daemon);
    wait_for_socket(&socket, "the test daemon");
    let program = capi_test().to_path_buf();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (program, socket) = (program.clone(), socket.clone());
            std::thread::spawn(move || run_case_at(&program, &socket))
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let _ = stop.send(());
    thread
        .join()
        .expect("daemon thread")
        .expect("the daemon served");
}

fn run_case_at(program: &Path, socket: &Path) {
    let out = run(program, &["daemon", socket.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or_default()
            .ends_with(" 0 failed"),
        "{stdout}"
    );
}
