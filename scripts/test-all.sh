#!/usr/bin/env bash
# The project's one test command: every test of every crate, on a fresh Debian machine with only
# the Rust toolchain. Steps that need system packages install them here.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== unit, integration and doc tests (all crates) =="
cargo test --workspace --all-targets
cargo test --workspace --doc

echo "== benchmarks: quick smoke run (every benchmark runs, daemon client processes included; figures not judged) =="
cargo run -q -p driver --bin mirrorctl -- bench --quick --no-progress --out target/bench-smoke > /dev/null

echo "== mirror: sequence-protocol model check (loom) =="
CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" cargo test -p mirror --release --lib loom

echo "== kernel VFIO: QEMU's edu device in a guest with an emulated IOMMU (tests/qemu/run.sh) =="
./tests/qemu/run.sh

echo "== kernel VFIO: MXA-1 in a QEMU 11 guest through vfio-user-pci, the whole faulting driver (tests/qemu/mxa-run.sh) =="
./tests/qemu/mxa-run.sh
