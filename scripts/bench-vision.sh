#!/usr/bin/env bash
# Image encode time and time to first token, embody against llama.cpp's
# llama-mtmd-cli on the same files, same images, same threads, runs alternated.
#
# The files: a random-weight vision encoder with Qwen2-VL-2B's shapes (depth
# 32, width 1280; scripts/make-vision-bench-model.py writes it and converts it
# with llama.cpp's converter to F16 and Q8_0 mmproj files) paired with
# Qwen2.5-Coder-0.5B (Q4_K_M), whose vocabulary holds Qwen's image tokens.
# No vision-language weights are downloadable here; speed does not depend on
# the weights' values. Both sides answer greedily; the script prints whether
# their first tokens agree.
#
# Usage: scripts/bench-vision.sh
# Env: THREADS (2), ROUNDS (3), EMBODY_CPU_LEVEL=avx2 (our AVX2 path on an
#      AVX-512 machine; llama.cpp keeps its native build).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"; ROUNDS="${ROUNDS:-3}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
OUT="${EMBODY_BENCH_VISION:-$HOME/.cache/embody/bench-vision}"
LLM="$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
[ -f "$LLM" ] || scripts/fetch-models.sh all >&2
BIN="$(scripts/build-llamacpp.sh llama-mtmd-cli)"
PY="$(scripts/fixtures-venv.sh)"
if [ ! -f "$OUT/mmproj-f16.gguf" ]; then
  echo "== making the random-weight encoder in $OUT" >&2
  "$PY" scripts/make-vision-bench-model.py "$OUT" >&2
fi
if [ ! -f "$OUT/mmproj-q8_0.gguf" ]; then
  SRC="$(dirname "$(dirname "$BIN")")"
  "$PY" -c "
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src + '/gguf-py', src]
sys.argv[0] = src + '/convert_hf_to_gguf.py'
runpy.run_path(sys.argv[0], run_name='__main__')
" "$SRC" "$OUT/folder" --mmproj --outtype q8_0 --outfile "$OUT/mmproj-q8_0.gguf" >/dev/null 2>&1
fi
cargo build --release --quiet -p embodyd --bin embody
EMBODY="${CARGO_TARGET_DIR:-target}/release/embody"
echo "== CPU path: ${EMBODY_CPU_LEVEL:-best available}; $THREADS threads" >&2

results=$(mktemp)
for mm in mmproj-f16.gguf mmproj-q8_0.gguf; do
  for img in 448x448.png 640x480.png; do
    for round in $(seq "$ROUNDS"); do
      out=$("$EMBODY" generate -m "$LLM" --mmproj "$OUT/$mm" --image "$OUT/$img" \
        -p "Describe the image." --chat -n 4 -t "$THREADS" --temperature 0 2>/tmp/bench-vision.err)
      enc=$(grep -oE 'encoded in [0-9]+ ms' /tmp/bench-vision.err | grep -oE '[0-9]+')
      pre=$(grep -oE 'prefilled in [0-9]+ ms' /tmp/bench-vision.err | grep -oE '[0-9]+')
      echo "$mm $img embody $enc $((enc + pre)) $(echo "$out" | head -c 40 | tr ' \n' '__')" >> "$results"
      lout=$("$BIN/llama-mtmd-cli" -m "$LLM" --mmproj "$OUT/$mm" --image "$OUT/$img" \
        -p "Describe the image." -n 4 -t "$THREADS" --temp 0 -c 4096 -lv 4 2>/tmp/bench-vision.err)
      enc=$(grep -oE 'encoding done in [0-9]+ ms' /tmp/bench-vision.err | grep -oE '[0-9]+')
      ttft=$(grep -oE 'prompt eval time = +[0-9]+' /tmp/bench-vision.err | grep -oE '[0-9]+$')
      echo "$mm $img llama.cpp $enc $ttft $(echo "$lout" | sed 's/^ *//' | head -c 40 | tr ' \n' '__')" >> "$results"
    done
  done
done
python3 - "$results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for mm, img, tool, enc, ttft, *text in rows:
    by.setdefault((mm, img, tool), []).append((int(enc), int(ttft), text[0].strip("_") if text else ""))
print(f"{'file':18} {'image':12} {'encode ms':>20} {'first token ms':>22} {'encode':>7} {'TTFT':>6}  same answer")
print(f"{'':18} {'':12} {'embody':>9} {'llama.cpp':>10} {'embody':>10} {'llama.cpp':>11} {'ratio':>7} {'ratio':>6}")
for (mm, img, tool) in sorted(by):
    if tool != "embody":
        continue
    ours, theirs = by[(mm, img, "embody")], by[(mm, img, "llama.cpp")]
    e = statistics.median(r[0] for r in ours); le = statistics.median(r[0] for r in theirs)
    t = statistics.median(r[1] for r in ours); lt = statistics.median(r[1] for r in theirs)
    same = ours[0][2].strip("_") == theirs[0][2].strip("_")
    print(f"{mm:18} {img:12} {e:9.0f} {le:10.0f} {t:10.0f} {lt:11.0f} {e / le:7.2f} {t / lt:6.2f}  {'yes' if same else 'no: ' + ours[0][2] + ' / ' + theirs[0][2]}")
PY
rm -f "$results"
