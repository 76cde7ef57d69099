# Shell functions shared by the guest runners (run.sh: edu; mxa-run.sh: MXA-1). Source it after
# setting TAG (the prefix of every line the runner prints).

say() { echo "$TAG: $*"; }

# A step that cannot run: a failure in CI (CI=true: nothing skips there), else a skip that says
# what to install.
skip_or_fail() {
    if [ "${CI:-}" = true ]; then
        say "FAIL: $*"
        exit 1
    fi
    say "SKIP: $*"
    exit 0
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi
}

# A static busybox (busybox-static); Debian's plain busybox is dynamic and cannot run in an
# initramfs without a libc.
BUSYBOX=/bin/busybox
have_busybox() { [ -x "$BUSYBOX" ] && ! ldd "$BUSYBOX" >/dev/null 2>&1; }

# apt_install PKG...: install Debian packages (apt-get update first when the lists are empty or
# the install fails), or skip/fail saying what to install.
apt_install() {
    command -v apt-get >/dev/null || skip_or_fail "no apt-get: install $*"
    say "installing $*"
    local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@")
    if ! as_root "${install[@]}" >/dev/null 2>&1; then
        as_root apt-get update -qq || skip_or_fail "apt-get update failed: install $*"
        as_root "${install[@]}" >/dev/null || skip_or_fail "apt-get install failed: install $*"
    fi
}

# copy_modules DIR OUTDIR NAME...: the named kernel modules found under DIR, decompressed (busybox
# insmod cannot read .ko.xz) into OUTDIR/NAME.ko; a module not found is built in.
copy_modules() {
    local dir=$1 out=$2 m f
    shift 2
    mkdir -p "$out"
    for m in "$@"; do
        f=$(find "$dir" \( -name "$m.ko" -o -name "$m.ko.xz" \) | head -1)
        case "$f" in
        "") ;;
        *.xz) xz -dc "$f" >"$out/$m.ko" ;;
        *) cp "$f" "$out/$m.ko" ;;
        esac
    done
}
