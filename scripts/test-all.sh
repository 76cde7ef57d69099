#!/usr/bin/env bash
# The project's one test command: every test of every crate, on a fresh Debian machine with only
# the Rust toolchain. Steps that need system packages install them here.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format and lints (cargo fmt --check, clippy with warnings as errors) =="
# rustup's default profile has both; a minimal one gets them here.
for tool in rustfmt clippy; do
    if ! cargo "${tool/rustfmt/fmt}" --version > /dev/null 2>&1; then
        rustup component add "$tool"
    fi
done
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The public API's documentation: no broken link, no link to a private item.
RUSTDOCFLAGS="-D warnings" cargo doc -q --no-deps --workspace

echo "== packages by who links them (docs/architecture.md): forbidden dependency arrows =="
# Each line: package, cargo tree flags, crates its normal dependency tree must not contain.
forbidden() {
    local package=$1 flags=$2 crates=$3 found
    # shellcheck disable=SC2086
    found=$(cargo tree -q -p "$package" $flags -e normal --prefix none | awk '{print $1}' | sort -u |
        grep -xE "$crates" || true)
    if [ -n "$found" ]; then
        echo "FAIL: $package ($flags) depends on: $found" >&2
        exit 1
    fi
}
forbidden driver "" "tokio|clap|indicatif|tracing-subscriber"
forbidden driver "--no-default-features" "tokio|clap|indicatif|tracing-subscriber|firmware-stubs|vfio-ioctls"
forbidden mirrord-client "" "tokio|vfio-ioctls|firmware-stubs|clap|indicatif|tracing-subscriber"
forbidden mirror "" "driver|firmware-stubs|accel-abi|vfio-user-protocol|vfio-ioctls|tokio"
forbidden firmware-stubs "" "driver|mirror|tokio|vfio-ioctls"
forbidden sys-util "" "driver|mirror|firmware-stubs|accel-abi|vfio-user-protocol|tokio"
forbidden driver-capi "" "tokio|clap|indicatif|tracing-subscriber|mirrord"
# The library without the emulator and without kernel VFIO builds and passes its lints.
cargo clippy -q -p driver --no-default-features --all-targets -- -D warnings

echo "== C and C++ compilers for the C ABI's tests (driver-capi compiles C and C++ programs) =="
# rustc links with cc, so gcc is there; g++ may not be. In a subshell: the helper's skip exits.
if ! command -v cc > /dev/null || ! command -v c++ > /dev/null; then
    (TAG=test-all; . tests/qemu/lib.sh; apt_install gcc g++)
fi

echo "== unit, integration and doc tests (all crates) =="
cargo test --workspace --all-targets
cargo test --workspace --doc

echo "== benchmarks: quick smoke run (every benchmark runs, daemon client processes included; figures not judged) =="
cargo run -q -p mirrorctl -- bench --quick --no-progress --out target/bench-smoke > /dev/null

echo "== mirror: sequence-protocol model check (loom) =="
CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" cargo test -p mirror --release --lib loom

echo "== kernel VFIO: QEMU's edu device in a guest with an emulated IOMMU (tests/qemu/run.sh) =="
./tests/qemu/run.sh

echo "== kernel VFIO: MXA-1 in a QEMU 11 guest through vfio-user-pci, the whole faulting driver (tests/qemu/mxa-run.sh) =="
./tests/qemu/mxa-run.sh
