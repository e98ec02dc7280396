#!/usr/bin/env bash
# Speculative decoding by prompt lookup on a workload that repeats its input:
# rewriting a ~300-token JSON perception result with one field changed
# (greedy, 300 tokens generated). For each model, in the same run: our decode
# without drafts and with up to DRAFT drafted tokens per step
# (`embody generate --draft-tokens`), and llama.cpp's prompt-lookup example
# (`llama-lookup`) without drafts and with the same number. Prints each decode
# rate (median of REPS runs), the ratios, the share of drafts accepted, and
# whether our output is the same with and without drafts. Not a test: run it
# on a machine as quiet as you can get.
#
# Usage: scripts/bench-speculation.sh [MODEL.gguf ...]   (default: the three real models)
# Env: THREADS (2), REPS (3), DRAFT (8), TOKENS (300),
#      EMBODY_CPU_LEVEL=avx2 to measure our AVX2 path on an AVX-512 machine.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"; REPS="${REPS:-3}"; DRAFT="${DRAFT:-8}"; TOKENS="${TOKENS:-300}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
if [ $# -eq 0 ]; then
  set -- "$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODELS_DIR/gemma-3-270m-q4_k_m.gguf" \
    "$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
fi
for m in "$@"; do [ -f "$m" ] || { scripts/fetch-models.sh all >&2; break; }; done
BIN="$(scripts/build-llamacpp.sh llama-lookup)"
echo "building embody (release)..." >&2
cargo build --release --quiet -p embodyd --bin embody
EMBODY="${CARGO_TARGET_DIR:-target}/release/embody"
echo "== CPU path: ${EMBODY_CPU_LEVEL:-best available}; $THREADS threads" >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The request: a perception result to copy with one change.
python3 - "$work/request.txt" <<'EOF'
import json, sys
obj = {"robot": "arm-2", "frame": 1842, "timestamp": "2026-12-07T20:41:13Z", "objects": [
    {"label": "red cup", "confidence": 0.93, "box": [112, 48, 176, 131], "graspable": True, "distance_m": 0.42},
    {"label": "blue box", "confidence": 0.88, "box": [301, 90, 402, 188], "graspable": True, "distance_m": 0.67},
    {"label": "screwdriver", "confidence": 0.71, "box": [20, 210, 140, 236], "graspable": True, "distance_m": 0.35},
    {"label": "person", "confidence": 0.97, "box": [480, 12, 620, 470], "graspable": False, "distance_m": 1.90},
    {"label": "table edge", "confidence": 0.64, "box": [0, 300, 640, 330], "graspable": False, "distance_m": 0.30}],
    "gripper": {"state": "open", "force_n": 0.0, "position_mm": 85.0}, "battery": 0.77, "mode": "autonomous"}
open(sys.argv[1], "w").write("Here is a JSON perception result:\n" + json.dumps(obj, indent=2)
    + '\nRewrite it with the gripper state changed to "closed". Answer with the whole JSON object only.')
EOF

median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

printf '%-40s %10s %10s %7s %9s %10s %10s %7s %9s %8s\n' model ours_tok/s +drafts ratio accepted \
  llama_tok/s +lookup ratio accepted vs_llama
for model in "$@"; do
  name=$(basename "$model" .gguf)
  # The model's own chat markup around the request, as one raw prompt both
  # programs read with their special tokens.
  case "$name" in
    gemma*) pre=$'<start_of_turn>user\n'; post=$'<end_of_turn>\n<start_of_turn>model\n' ;;
    *) pre=$'<|im_start|>user\n'; post=$'<|im_end|>\n<|im_start|>assistant\n' ;;
  esac
  printf '%s%s%s' "$pre" "$(cat "$work/request.txt")" "$post" >"$work/prompt.txt"
  for d in 0 "$DRAFT"; do
    : >"$work/ours$d"; : >"$work/llama$d"
    for _ in $(seq "$REPS"); do
      "$EMBODY" generate -m "$model" -p "$(cat "$work/prompt.txt")" --temperature 0 -n "$TOKENS" \
        --threads "$THREADS" --draft-tokens "$d" >"$work/out$d.txt" 2>"$work/err"
      sed -n 's/.* generated at \([0-9.]*\) tok\/s.*/\1/p' "$work/err" >>"$work/ours$d"
      sed -n 's/.*, \([0-9]*\) of \([0-9]*\) drafted tokens accepted.*/\1 \2/p' "$work/err" >"$work/ours_acc$d"
      "$BIN/llama-lookup" -m "$model" -f "$work/prompt.txt" -n "$TOKENS" --temp 0 -t "$THREADS" \
        -c 2048 --spec-draft-n-max "$d" >/dev/null 2>"$work/lerr"
      sed -n 's/.*decoded.*speed: *\([0-9.]*\) t\/s.*/\1/p' "$work/lerr" >>"$work/llama$d"
      awk '/n_drafted/ {d=$NF} /n_accept / {a=$NF} END {print a, d}' "$work/lerr" >"$work/llama_acc$d"
    done
  done
  o0=$(median <"$work/ours0"); o1=$(median <"$work/ours$DRAFT")
  l0=$(median <"$work/llama0"); l1=$(median <"$work/llama$DRAFT")
  same=$(cmp -s "$work/out0.txt" "$work/out$DRAFT.txt" && echo same || echo DIFFERENT)
  read -r oa od <"$work/ours_acc$DRAFT"; read -r la ld <"$work/llama_acc$DRAFT"
  printf '%-40s %10.1f %10.1f %6.2fx %4s/%-4s %10.1f %10.1f %6.2fx %4s/%-4s %7.2fx  output %s\n' \
    "$name" "$o0" "$o1" "$(echo "$o1 / $o0" | bc -l)" "$oa" "$od" "$l0" "$l1" \
    "$(echo "$l1 / $l0" | bc -l)" "$la" "$ld" "$(echo "$o1 / $l1" | bc -l)" "$same"
done
echo "(decode tok/s after a ~520-token prompt, ${TOKENS} tokens, ${THREADS} threads, up to ${DRAFT} drafts per step; median of ${REPS})"
