#!/usr/bin/env bash
# The edu guest test: boots Debian's kernel in QEMU (TCG) with an emulated Intel IOMMU and QEMU's
# edu device, binds edu to vfio-pci and runs the static `edu-guest-test` binary there, which
# drives edu through the driver's kernel VFIO backend and the mirror.
#
# On a fresh Debian machine it installs qemu-system-x86 and busybox-static (apt-get) when
# missing and downloads the current kernel package once (cached under target/qemu-guest/).
# Without apt-get and QEMU it skips with what to install, except in CI (CI=true), where it fails.
#
# Environment: EDU_GUEST_KVM=1 uses KVM (default TCG: a writable /dev/kvm may still be unusable),
# EDU_GUEST_TIMEOUT (seconds, default 120) bounds the boot.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$ROOT/target/qemu-guest
mkdir -p "$OUT"
START=$SECONDS

TAG=qemu-guest
# shellcheck source=tests/qemu/lib.sh
. "$ROOT/tests/qemu/lib.sh"

# 1. Host packages.
if ! command -v qemu-system-x86_64 >/dev/null || ! have_busybox; then
    if command -v apt-get >/dev/null; then
        say "installing qemu-system-x86 busybox-static"
        as_root apt-get update -qq || skip_or_fail "apt-get update failed: install qemu-system-x86 and busybox-static"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            qemu-system-x86 busybox-static >/dev/null ||
            skip_or_fail "apt-get install failed: install qemu-system-x86 and busybox-static"
    else
        skip_or_fail "no apt-get: install QEMU (qemu-system-x86_64 >= 7.2) and a static busybox at \
/bin/busybox (Debian: apt-get install qemu-system-x86 busybox-static), and put a Debian \
linux-image-6.1.*-amd64 .deb in $OUT/"
    fi
fi
have_busybox || skip_or_fail "no static busybox at $BUSYBOX: install busybox-static"

# The static test binary, built while the kernel downloads. Its own target dir (RUSTFLAGS would
# rebuild the workspace's); the dev profile without debug info builds in half the time of release
# and keeps debug assertions.
say "building edu-guest-test (static) in the background"
BUILD_LOG=$OUT/build.log
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$OUT/cargo" CARGO_PROFILE_DEV_DEBUG=0 \
    cargo build -q --target x86_64-unknown-linux-gnu -p integration-tests --bin edu-guest-test \
    >"$BUILD_LOG" 2>&1 &
BUILD_PID=$!
trap 'kill $BUILD_PID 2>/dev/null || true' EXIT
BIN=$OUT/cargo/x86_64-unknown-linux-gnu/debug/edu-guest-test

# 2. The guest kernel: resolved from the linux-image-amd64 metapackage, downloaded once.
resolve_kernel() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
KPKG=
if command -v apt-cache >/dev/null; then
    KPKG=$(resolve_kernel)
    # A fresh machine may have empty package lists.
    if [ -z "$KPKG" ] && command -v apt-get >/dev/null; then
        as_root apt-get update -qq || true
        KPKG=$(resolve_kernel)
    fi
fi
DEB=
if [ -z "$KPKG" ]; then
    # Without apt: a cached kernel, else a kernel package put here by hand.
    cached=$(ls -d "$OUT"/linux-image-*/done 2>/dev/null | head -1 || true)
    DEB=$(ls "$OUT"/linux-image-*_amd64.deb 2>/dev/null | head -1 || true)
    if [ -n "$cached" ]; then
        KPKG=$(basename "$(dirname "$cached")")
    elif [ -n "$DEB" ]; then
        KPKG=$(basename "$DEB" | cut -d_ -f1)
    fi
fi
[ -n "$KPKG" ] || skip_or_fail "cannot resolve the kernel package (apt-cache depends linux-image-amd64); \
without apt, put a Debian linux-image-6.1.*-amd64 .deb in $OUT/"
KDIR=$OUT/$KPKG
if [ ! -f "$KDIR/done" ]; then
    say "downloading $KPKG (once; cached in $KDIR)"
    rm -rf "$KDIR" "$OUT/dl"
    mkdir -p "$OUT/dl" "$KDIR/modules"
    if [ -n "$DEB" ]; then
        cp "$DEB" "$OUT/dl/"
    else
        sandbox=()
        [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root) # else _apt cannot write here
        (cd "$OUT/dl" && apt-get download -q "${sandbox[@]}" "$KPKG" >/dev/null) ||
            skip_or_fail "apt-get download $KPKG failed"
    fi
    dpkg-deb -x "$OUT"/dl/"$KPKG"_*.deb "$OUT/dl/root"
    vmlinuz=$(ls "$OUT"/dl/root/boot/vmlinuz-* | head -1)
    # The bzImage's xz payload is an ELF vmlinux, which QEMU boots directly (PVH) and faster.
    python3 "$ROOT/tests/qemu/extract-vmlinux.py" "$vmlinuz" "$KDIR/vmlinux" || cp "$vmlinuz" "$KDIR/vmlinux"
    copy_modules "$OUT/dl/root/lib/modules" "$KDIR/modules" \
        irqbypass vfio vfio_virqfd vfio_iommu_type1 vfio-pci-core vfio-pci # vfio_virqfd: built in from 6.2
    rm -rf "$OUT/dl"
    touch "$KDIR/done"
    # Older kernels the archive no longer has.
    for old in "$OUT"/linux-image-*/; do
        [ "${old%/}" = "$KDIR" ] || rm -rf "$old"
    done
fi

# 3. The initramfs.
if ! wait "$BUILD_PID"; then
    cat "$BUILD_LOG"
    say "FAIL: building edu-guest-test failed"
    exit 1
fi
trap - EXIT

entries=("init=$ROOT/tests/qemu/init" "bin/busybox=$BUSYBOX" "edu-guest-test=$BIN" proc/ sys/ dev/)
for ko in "$KDIR"/modules/*.ko; do
    [ -e "$ko" ] && entries+=("lib/modules/$(basename "$ko")=$ko")
done
python3 "$ROOT/tests/qemu/mkinitramfs.py" "$OUT/initramfs.cpio" "${entries[@]}"

# 4. Boot.
if [ "${EDU_GUEST_KVM:-0}" = 1 ]; then
    ACCEL=(-machine q35,accel=kvm,kernel-irqchip=split -cpu host)
else
    ACCEL=(-machine q35,accel=tcg -cpu max)
fi
LOG=$OUT/serial.log
rm -f "$LOG"
say "booting $KPKG (log: $LOG)"
set +e
timeout "${EDU_GUEST_TIMEOUT:-120}" qemu-system-x86_64 "${ACCEL[@]}" -smp 1 -m 512 \
    -device intel-iommu,intremap=on,aw-bits=48 \
    -device edu,dma_mask=0xffffffffffffffff \
    -device isa-debug-exit,iobase=0xf4,iosize=0x01 \
    -kernel "$KDIR/vmlinux" -initrd "$OUT/initramfs.cpio" \
    -append "console=ttyS0 intel_iommu=on panic=-1 quiet" \
    -display none -nodefaults -serial "file:$LOG" -monitor none -no-reboot 2>"$OUT/qemu.stderr"
rc=$?
set -e
result=$(grep -a '^EDU-GUEST-TEST:' "$LOG" | tail -1 | tr -d '\r' || true)
# isa-debug-exit: QEMU exits with (guest code << 1) | 1, so 1 means the guest test returned 0.
if [ "$rc" = 1 ] && [[ "$result" == "EDU-GUEST-TEST: PASS"* ]]; then
    grep -a '^\[.*DMAR: \[' "$LOG" | head -2 | sed 's/^/qemu-guest: guest kernel: /' || true
    say "PASS: ${result#EDU-GUEST-TEST: PASS }, $((SECONDS - START)) s in all"
    exit 0
fi
echo "----- guest serial log ($LOG) -----"
cat "$LOG" || true
echo "----- QEMU stderr -----"
cat "$OUT/qemu.stderr" || true
echo "-----------------------------------"
case $rc in
124) why="timed out after ${EDU_GUEST_TIMEOUT:-120} s" ;;
1 | 3) why="guest test failed" ;;
0) why="guest powered off without reporting (kernel panic or init failure?)" ;;
134) why="QEMU aborted (an edu programming error kills QEMU 7.2)" ;;
*) why="QEMU exit status $rc (guest code $(((rc - 1) / 2)))" ;;
esac
say "FAIL: $why${result:+: $result}"
exit 1
