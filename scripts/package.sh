#!/usr/bin/env bash
# Builds the Debian package of the daemon: embodyd_<version>_<arch>.deb with
# embodyd and embody in /usr/bin, the unit, /etc/embodyd/embodyd.toml (a
# conffile: an edited config survives upgrades), the embodyd user made at
# install (sysusers.d), /var/lib/embodyd/models, and the docs.
#
# Usage: scripts/package.sh [amd64|arm64]   (default: this machine's)
# Env: PROFILE=release (default) or debug: a quick package whose layout is the
#      same (what the tests check); OUT=<dir> for the .deb (default:
#      $CARGO_TARGET_DIR/debian); BINS=<dir>: take embodyd and embody from
#      there instead of building them. Prints the .deb's path.
# arm64 cross-builds with the recipe of scripts/aarch64-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${1:-$(dpkg --print-architecture)}"
PROFILE="${PROFILE:-release}"
case "$ARCH" in
  amd64) triple=x86_64-unknown-linux-gnu ;;
  arm64) triple=aarch64-unknown-linux-gnu ;;
  *) echo "package.sh: unknown architecture '$ARCH' (amd64, arm64)" >&2; exit 2 ;;
esac
case "$PROFILE" in
  release) flags=(--release) ;;
  debug) flags=() ;;
  *) echo "package.sh: PROFILE is release or debug, not '$PROFILE'" >&2; exit 2 ;;
esac
OUT="${OUT:-${CARGO_TARGET_DIR:-$PWD/target}/debian}"

# strip and readelf come from binutils (dpkg-deb comes with dpkg).
if ! command -v readelf >/dev/null || ! command -v strip >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends binutils; } >&2
fi

if [ -n "${BINS:-}" ]; then
  bins="$BINS"
elif [ "$ARCH" = "$(dpkg --print-architecture)" ]; then
  echo "== cargo build ($PROFILE, $ARCH)" >&2
  cargo build "${flags[@]}" -p embodyd --bins >&2
  bins="${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE"
else
  [ "$ARCH" = arm64 ] || { echo "package.sh: cross builds go to arm64 only" >&2; exit 2; }
  source scripts/aarch64-env.sh >&2
  echo "== cargo build ($PROFILE, $ARCH, cross)" >&2
  cargo build "${flags[@]}" -p embodyd --bins --target "$triple" >&2
  bins="$CARGO_TARGET_DIR/$triple/$PROFILE"
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
install -Dm755 "$bins/embodyd" "$root/usr/bin/embodyd"
install -Dm755 "$bins/embody" "$root/usr/bin/embody"
install -Dm644 configs/default.toml "$root/etc/embodyd/embodyd.toml"
install -Dm644 configs/embodyd.service "$root/usr/lib/systemd/system/embodyd.service"
install -Dm644 packaging/sysusers.d/embodyd.conf "$root/usr/lib/sysusers.d/embodyd.conf"
install -d -m755 "$root/var/lib/embodyd/models"
doc="$root/usr/share/doc/embodyd"
install -Dm644 README.md "$doc/README.md"
for f in docs/*.md; do install -Dm644 "$f" "$doc/$(basename "$f")"; done
# The hardened zenoh configuration, to copy to /etc/embodyd (docs/SECURITY.md).
install -Dm644 configs/zenoh-secure.json5 "$doc/examples/zenoh-secure.json5"
# The unit's drop-in for GPU backends (docs/gpu.md).
install -Dm644 configs/embodyd-gpu.conf "$doc/examples/embodyd-gpu.conf"
# Debug info stays in the build; the package carries the code.
strip_tool=strip
[ "$ARCH" = arm64 ] && strip_tool=aarch64-linux-gnu-strip
"$strip_tool" --strip-debug "$root/usr/bin/embodyd" "$root/usr/bin/embody"

# Depends: the C libraries the binaries link, the glibc at least as new as
# the newest symbol version they use.
glibc=$(readelf --dyn-syms -W "$root/usr/bin/embodyd" "$root/usr/bin/embody" \
  | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
depends="libc6 (>= $glibc)"
if readelf -d "$root/usr/bin/embodyd" "$root/usr/bin/embody" | grep -q 'libgcc_s.so.1'; then
  depends="$depends, libgcc-s1"
fi
if readelf -d "$root/usr/bin/embodyd" "$root/usr/bin/embody" | grep -q 'libstdc++'; then
  depends="$depends, libstdc++6"
fi

mkdir -p "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$ARCH/" -e "s/@DEPENDS@/$depends/" \
    -e "s/@SIZE@/$size/" packaging/deb/control > "$root/DEBIAN/control"
echo /etc/embodyd/embodyd.toml > "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m755 "packaging/deb/$s" "$root/DEBIAN/$s"; done

mkdir -p "$OUT"
deb="$OUT/embodyd_${version}_${ARCH}.deb"
# xz for the package that ships; a debug one, made to be unpacked by the
# tests, is not worth the time.
compress=-Zxz
[ "$PROFILE" = release ] || compress=-Znone
dpkg-deb --root-owner-group "$compress" --build "$root" "$deb" >&2
echo "$deb"
