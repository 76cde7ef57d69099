//! Regenerates include/mirrordrv.h from the Rust source with cbindgen:
//! `cargo run -p driver-capi --example gen-header`.

#[path = "../support/header.rs"]
mod header;

fn main() {
    let path = header::header_path();
    header::write(&path, &header::generate());
    println!("wrote {}", path.display());
}
