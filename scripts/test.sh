#!/usr/bin/env bash
# Installs what the tests need and runs every test: formatting, lints, unit
# tests, the fuzz corpora, and the end-to-end tests on the real models.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd-analyze checks the shipped unit (tests/tests/unit_sandbox.rs);
# scripts/package.sh reads the binaries' needs with readelf (binutils).
# The Vulkan backend's tests run on Mesa's lavapipe (a Vulkan driver on the
# CPU) through the Vulkan loader.
need=()
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v readelf >/dev/null || need+=(binutils)
vulkan=(libvulkan1 mesa-vulkan-drivers)
for p in "${vulkan[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi

lavapipe="/usr/share/vulkan/icd.d/lvp_icd.$(uname -m).json"
python3 scripts/check-packages.py --packages "${vulkan[@]}" \
    --files "$lavapipe" "$(ldconfig -p | awk '/libvulkan.so.1 /{print $NF; exit}')"

# The real models (idempotent: verified files are not fetched again).
scripts/fetch-models.sh all

export EMBODY_MODELS="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
# The Python peers of the interop tests (openai, eclipse-zenoh, rosbags).
EMBODY_TEST_PYTHON="$(scripts/test-venv.sh)"
export EMBODY_TEST_PYTHON

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build (the end-to-end tests run these binaries)"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace 2>&1 | tee "${TMPDIR:-/tmp}/embody-test.log"
scripts/test-aarch64.sh 2>&1 | tee -a "${TMPDIR:-/tmp}/embody-test.log"
# One summary line for CI readers.
python3 - "${TMPDIR:-/tmp}/embody-test.log" <<'PY'
import re, sys
passed = failed = ignored = 0
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", line)
    if m:
        passed += int(m[1]); failed += int(m[2]); ignored += int(m[3])
print(f"{passed} passed, {failed} failed, {ignored} skipped")
sys.exit(1 if failed else 0)
PY
