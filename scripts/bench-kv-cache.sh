#!/usr/bin/env bash
# The KV cache types (f16, q8_0, q4_0) side by side with llama.cpp's
# (`-ctk/-ctv`, flash attention on, which its quantized V cache needs):
# perplexity of each, the memory one token's keys and values take, and
# decode at a long depth, where reading the cache is most of the work.
#
# Usage: scripts/bench-kv-cache.sh [MODEL.gguf ...]   (default: the three real models)
# Env: THREADS (2), DEPTH (4096), GEN (64), CHUNKS (8), TYPES ("f16 q8_0 q4_0");
#      EMBODY_CPU_LEVEL=avx2: our AVX2 path on an AVX-512 machine.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"; DEPTH="${DEPTH:-4096}"; GEN="${GEN:-64}"; CHUNKS="${CHUNKS:-8}"
TYPES="${TYPES:-f16 q8_0 q4_0}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
if [ $# -eq 0 ]; then
  scripts/fetch-models.sh all >&2
  set -- "$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODELS_DIR/gemma-3-270m-q4_k_m.gguf" \
         "$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
fi
BIN="$(scripts/build-llamacpp.sh)"
cargo build --release --quiet -p embodyd --bin embody
EMBODY="${CARGO_TARGET_DIR:-target}/release/embody"
TEXT=tests/fixtures/gpl-3.0.txt
echo "== CPU path: ${EMBODY_CPU_LEVEL:-best available}; $THREADS threads; decode at depth $DEPTH" >&2

ppl() { "$EMBODY" perplexity -m "$1" -f "$TEXT" --chunks "$CHUNKS" -t "$THREADS" --kv-cache-type "$2" 2>&1 \
          | awk '/^PPL = /{print $3}'; }
lppl() { "$BIN/llama-perplexity" -m "$1" -f "$TEXT" -c 512 --chunks "$CHUNKS" -t "$THREADS" -fa on \
          -ctk "$2" -ctv "$2" 2>&1 | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'; }
# Decode tok/s after DEPTH positions, and the KV bytes of one token.
ours() { "$EMBODY" bench -m "$1" -t "$THREADS" -p "$DEPTH" -n "$GEN" -r 1 --kv-cache-type "$2" --json 2>/dev/null \
          | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["decode_tok_s"], 1))'; }
theirs() { "$BIN/llama-bench" -m "$1" -t "$THREADS" -p 0 -n "$GEN" -d "$DEPTH" -r 1 -fa 1 -ctk "$2" -ctv "$2" \
          -o json 2>/dev/null | python3 -c 'import json,sys; print(round(json.load(sys.stdin)[0]["avg_ts"], 1))'; }
kv_bytes() { "$EMBODY" inspect "$1" | python3 -c '
import re, sys
meta = sys.stdin.read()
def key(name):
    m = re.search(r"^\s*\S*\." + name + r"\s+(?:=\s*)?(\d+)", meta, re.M)
    return int(m.group(1)) if m else None
layers, heads, kv_heads = key("block_count"), key("attention.head_count"), key("attention.head_count_kv")
width = key("embedding_length")
hd = key("attention.key_length") or width // heads
per32 = {"f16": 64, "q8_0": 34, "q4_0": 18}[sys.argv[1]]
print(2 * layers * kv_heads * hd * per32 // 32)' "$2"; }

printf "%-32s %-5s %10s %12s %14s %11s %13s %8s\n" model type "KV B/tok" "PPL embody" "PPL llama.cpp" \
  "dec embody" "dec llama.cpp" ratio
for model in "$@"; do
  for t in $TYPES; do
    a=$(ours "$model" "$t"); b=$(theirs "$model" "$t")
    printf "%-32s %-5s %10s %12s %14s %11s %13s %7sx\n" "$(basename "$model" .gguf)" "$t" "$(kv_bytes "$model" "$t")" \
      "$(ppl "$model" "$t")" "$(lppl "$model" "$t")" "$a" "$b" "$(awk "BEGIN{printf \"%.2f\", $a / $b}")"
  done
done
