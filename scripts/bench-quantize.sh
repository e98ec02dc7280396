#!/usr/bin/env bash
# `embody quantize` against llama.cpp's `llama-quantize` on the same source:
# an F16 GGUF made from a real model by llama-quantize itself, requantized by
# both to each type, then the perplexity of every file measured by one tool
# (embody perplexity, and llama-perplexity for the cross-check), with sizes
# and quantization times.
#
# Usage: scripts/bench-quantize.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct Q4_1)
# Env: TYPES ("Q8_0 Q4_K_M"), CHUNKS (8), THREADS (2); EMBODY: an embody
# binary to use instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
TYPES="${TYPES:-Q8_0 Q4_K_M}"; CHUNKS="${CHUNKS:-8}"; THREADS="${THREADS:-2}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
SRC="${1:-$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$SRC" ] || scripts/fetch-models.sh all >&2
BIN="$(scripts/build-llamacpp.sh llama-quantize)"
if [ -z "${EMBODY:-}" ]; then
  cargo build --release --quiet -p embodyd --bin embody
  EMBODY="${CARGO_TARGET_DIR:-target}/release/embody"
fi
TEXT=tests/fixtures/gpl-3.0.txt
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

"$BIN/llama-quantize" --allow-requantize "$SRC" "$work/f16.gguf" F16 "$THREADS" >/dev/null 2>&1
ppl() { "$EMBODY" perplexity -m "$1" -f "$TEXT" --chunks "$CHUNKS" -t "$THREADS" 2>&1 | awk '/^PPL = /{print $3}'; }
lppl() { "$BIN/llama-perplexity" -m "$1" -f "$TEXT" -c 512 --chunks "$CHUNKS" -t "$THREADS" 2>&1 \
          | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'; }
# Tensor lines of `embody inspect` (name, type, shape), and the bytes of each file.
types() { "$EMBODY" inspect "$1" | awk '/^  [a-z_]+[.0-9a-z_]*weight /{print $1, $2}'; }
secs() { local s=$EPOCHREALTIME; "$@" >/dev/null 2>&1; awk "BEGIN{print $EPOCHREALTIME - $s}"; }

echo "source: $SRC (made F16 by llama-quantize); text: $TEXT, $CHUNKS chunks of 512"
printf "%-8s %-14s %10s %8s %14s %16s\n" type quantizer "size MiB" "time s" "PPL (embody)" "PPL (llama.cpp)"
printf "%-8s %-14s %10s %8s %14s %16s\n" F16 - $(( $(stat -c %s "$work/f16.gguf") >> 20 )) - "$(ppl "$work/f16.gguf")" "$(lppl "$work/f16.gguf")"
for t in $TYPES; do
  tl=$(secs "$BIN/llama-quantize" "$work/f16.gguf" "$work/llama-$t.gguf" "$t" "$THREADS")
  te=$(secs "$EMBODY" quantize -m "$work/f16.gguf" -t "$t" -o "$work/embody-$t.gguf")
  for q in llama embody; do
    f="$work/$q-$t.gguf"
    tq=$tl; [ $q = embody ] && tq=$te
    name=llama-quantize; [ $q = embody ] && name="embody quantize"
    printf "%-8s %-14s %10s %8.1f %14s %16s\n" "$t" "$name" $(( $(stat -c %s "$f") >> 20 )) "$tq" "$(ppl "$f")" "$(lppl "$f")"
  done
  differ=$(diff <(types "$work/llama-$t.gguf") <(types "$work/embody-$t.gguf") | grep -c '^>' || true)
  same=$(cmp -s "$work/llama-$t.gguf" "$work/embody-$t.gguf" && echo "identical files" || echo "files differ")
  echo "$t: $differ tensors typed differently; $same"
done
