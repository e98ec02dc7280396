# Sourced by the scripts that cross-build for aarch64: installs the cross
# toolchain (Debian packages, named one by one), checks that every file the
# build and qemu read comes from them, and exports the cargo settings.
#
# rustup has no aarch64 standard library here; Debian's rustc-web ships one.
# The build goes to its own target directory: with a different RUSTC, sharing
# the host's would rebuild everything there on the next host build.

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# libc6-dev-arm64-cross (crti.o, libc.so for the cross link) is only a
# Recommends of the cross compiler: it is named, since recommends are off.
# binutils-aarch64-linux-gnu's strip makes the arm64 package (scripts/package.sh).
packages=(rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    binutils-aarch64-linux-gnu qemu-user-static)
missing=()
for pkg in "${packages[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "== installing ${missing[*]}"
    dpkg --print-foreign-architectures | grep -qx arm64 || $sudo dpkg --add-architecture arm64
    $sudo apt-get update
    $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Every file the cross build and qemu read comes from a package named above or
# one it Depends on, never from something this machine happens to have.
cross_files=(/usr/bin/rustc /usr/bin/qemu-aarch64-static /lib/aarch64-linux-gnu/libc.so.6
    /usr/bin/aarch64-linux-gnu-strip)
for f in crt1.o crti.o crtn.o libc.so libm.so libgcc_s.so libgcc.a; do
    cross_files+=("$(aarch64-linux-gnu-gcc -print-file-name="$f")")
done
cross_files+=(/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib/libstd-*.rlib)
python3 scripts/check-packages.py --packages "${packages[@]}" --files "${cross_files[@]}"

export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# `-L /`: the arm64 libc of the multiarch install. With the cross toolchain's
# (/usr/aarch64-linux-gnu) every thread spawn hangs under qemu.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /"
# Sourced again by a script this one runs: the folder is appended once.
case "${CARGO_TARGET_DIR:-target}" in
    */aarch64-cross) ;;
    *) export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/aarch64-cross" ;;
esac
