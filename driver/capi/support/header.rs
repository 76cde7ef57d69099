//! Generating include/mirrordrv.h with cbindgen: shared by the generator
//! (`cargo run -p driver-capi --example gen-header`) and the test that checks the committed
//! header is current.

use std::path::{Path, PathBuf};

/// The package directory.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the committed header lives.
pub fn header_path() -> PathBuf {
    crate_dir().join("include").join("mirrordrv.h")
}

/// The header cbindgen makes of the source now.
pub fn generate() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.join("cbindgen.toml").display()));
    let bindings = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen on {}: {e}", dir.display()));
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("cbindgen writes UTF-8")
}

/// Write `text` to `path` (the generator).
#[allow(dead_code)]
pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
