//! The committed header is what cbindgen makes of the source now, and it compiles as strict C11
//! and C++17.

#[path = "../support/header.rs"]
mod header;

use std::path::Path;
use std::process::Command;

#[test]
fn the_committed_header_is_current() {
    let committed = std::fs::read_to_string(header::header_path()).expect("read the header");
    let generated = header::generate();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "include/mirrordrv.h is not what cbindgen generates from the source now (first \
             difference at line {}): run `cargo run -p driver-capi --example gen-header` and \
             commit the header",
            first + 1
        );
    }
}

/// Compile `source` (a file including the header) with `compiler` and `flags`, syntax only.
fn compiles(compiler: &str, flags: &[&str], source: &Path) {
    let include = header::crate_dir().join("include");
    let out = Command::new(compiler)
        .args(flags)
        .arg("-fsyntax-only")
        .arg("-I")
        .arg(&include)
        .arg(source)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {compiler}: {e} (scripts/test-all.sh installs gcc and g++)")
        });
    assert!(
        out.status.success(),
        "{compiler} {flags:?} rejected the header:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scratch(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mirrordrv-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const USES: &str = r#"#include "mirrordrv.h"
int main(void) {
    mdrv_open_options o;
    mdrv_stats s;
    mdrv_device_entry e;
    (void)mdrv_open_options_init(&o, sizeof o);
    s.size = sizeof s;
    e.size = sizeof e;
    (void)s; (void)e;
    return mdrv_abi_version() == MDRV_ABI_VERSION ? MDRV_OK : MDRV_ERR_PANIC;
}
"#;

#[test]
fn the_header_compiles_as_strict_c11() {
    let src = scratch("c11.c", USES);
    compiles(
        "cc",
        &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"],
        &src,
    );
}

#[test]
fn the_header_compiles_as_cpp17() {
    let src = scratch("cpp17.cpp", USES);
    compiles("c++", &["-std=c++17", "-Wall", "-Wextra", "-Werror"], &src);
}
