#!/usr/bin/env bash
# A fuzzing campaign on the parsers: scripts/fuzz.sh [target] [seconds]  (default: gguf, 300; targets: gguf, hf, ipc_frame, cdr, openai_request, image, tokenizer, chat_template, camera, zenoh_chat)
# Needs nightly (installed here) and cargo-fuzz, which this script installs.
# New inputs land in fuzz/corpus/<target>; crashes in fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target="${1:-gguf}"
secs="${2:-300}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -max_len=65536
