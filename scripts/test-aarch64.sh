#!/usr/bin/env bash
# Cross-builds the engine's quant kernel tests for aarch64 and runs them under
# qemu: the NEON and dotprod kernels against the scalar reference.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/aarch64-env.sh

echo "== cargo test (aarch64 under qemu: quant kernels and attention)"
# Emulation is slow: only the quant and attention tests, optimized. Extra
# arguments go to the test binary (e.g. `--nocapture`).
cargo test --release -p embody-engine --target aarch64-unknown-linux-gnu --lib \
    -- quant backend::cpu::attention "$@"
