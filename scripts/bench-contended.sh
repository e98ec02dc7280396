#!/usr/bin/env bash
# Decode while other processes use the cores, as on a robot whose perception
# and control share the computer: our decode and llama.cpp's, each quiet and
# then with BUSY competing processes (`yes > /dev/null`, one per core by
# default) running, in the same run. Prints each tool's decode tok/s quiet and
# loaded, the share of its quiet speed it keeps, and ours against theirs.
# Not a test: run it on a machine as quiet as you can get.
#
# Usage: scripts/bench-contended.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct Q4_1)
# Env: THREADS (2), BUSY (one per core), PROMPT (64), GEN (128), ROUNDS (3),
#      EMBODY_CPU_LEVEL=avx2 to measure our AVX2 path on an AVX-512 machine.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"; BUSY="${BUSY:-$(nproc)}"; PROMPT="${PROMPT:-64}"; GEN="${GEN:-128}"
ROUNDS="${ROUNDS:-3}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
MODEL="${1:-$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$MODEL" ] || scripts/fetch-models.sh all >&2
BIN="$(scripts/build-llamacpp.sh)"
echo "building embody (release)..." >&2
cargo build --release --quiet -p embodyd --bin embody
EMBODY="${CARGO_TARGET_DIR:-target}/release/embody"
echo "== CPU path: ${EMBODY_CPU_LEVEL:-best available}; $THREADS threads; $BUSY busy processes" >&2

busy=()
stop_busy() { for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done; busy=(); }
trap stop_busy EXIT

ours() {
  "$EMBODY" bench -m "$MODEL" -t "$THREADS" -p "$PROMPT" -n "$GEN" --reps 1 --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tok_s"])'
}
theirs() {
  "$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n "$GEN" -d "$PROMPT" -r 1 -o json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])'
}
median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

work=$(mktemp -d)
for round in $(seq "$ROUNDS"); do
  ours >>"$work/ours_quiet"; theirs >>"$work/llama_quiet"
  for _ in $(seq "$BUSY"); do yes >/dev/null & busy+=("$!"); done
  sleep 1
  ours >>"$work/ours_busy"; theirs >>"$work/llama_busy"
  stop_busy
  sleep 1
done
oq=$(median <"$work/ours_quiet"); ob=$(median <"$work/ours_busy")
lq=$(median <"$work/llama_quiet"); lb=$(median <"$work/llama_busy")
rm -rf "$work"
printf '%-10s %10s %10s %7s\n' tool quiet busy kept
printf '%-10s %10.1f %10.1f %6.0f%%\n' embody "$oq" "$ob" "$(echo "100 * $ob / $oq" | bc -l)"
printf '%-10s %10.1f %10.1f %6.0f%%\n' llama.cpp "$lq" "$lb" "$(echo "100 * $lb / $lq" | bc -l)"
printf 'busy decode, ours / llama.cpp: %.2fx   (decode tok/s at depth %s, %s tokens, %s threads, %s busy processes, median of %s)\n' \
  "$(echo "$ob / $lb" | bc -l)" "$PROMPT" "$GEN" "$THREADS" "$BUSY" "$ROUNDS"
