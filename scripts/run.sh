#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1) and chats with it.
# Usage: scripts/run.sh ["your question"]  (extra flags after the question go to `embody generate`)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
MODELS="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
scripts/fetch-models.sh smollm2 >&2
cargo build --release --quiet -p embodyd --bin embody
question="${1:-What should a robot do when its battery is low? Answer in two sentences.}"
shift || true
exec "${CARGO_TARGET_DIR:-target}/release/embody" generate \
  --model "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" --chat --prompt "$question" \
  --temperature 0 --max-tokens 128 "$@"
