#!/usr/bin/env bash
# Prefill and decode speed of embody and llama.cpp on the same GGUF file, same
# threads and sizes, runs alternated so both see the same machine state.
#
# Usage: scripts/bench-vs-llamacpp.sh [MODEL.gguf ...]   (default: the three real models)
# Env: THREADS (2), PROMPT (512), GEN (128), ROUNDS (3);
#      BASELINE=<git revision>: also build that revision's embody and run it in
#      the same rounds, so two versions get their ratios from one run;
#      EMBODY_CPU_LEVEL=avx2: our AVX2 path on an AVX-512 machine (llama.cpp
#      keeps its native build).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"; PROMPT="${PROMPT:-512}"; GEN="${GEN:-128}"; ROUNDS="${ROUNDS:-3}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
if [ $# -eq 0 ]; then
  scripts/fetch-models.sh all >&2
  set -- "$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODELS_DIR/gemma-3-270m-q4_k_m.gguf" \
         "$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
fi
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time; } >&2
BIN="$(scripts/build-llamacpp.sh)"
cargo build --release --quiet -p embodyd --bin embody
EMBODY="${CARGO_TARGET_DIR:-target}/release/embody"
TOOLS=(embody)
if [ -n "${BASELINE:-}" ]; then
  rev=$(git rev-parse --short "$BASELINE")
  tree=$(mktemp -d)
  git worktree add --quiet --detach "$tree" "$rev"
  echo "== building embody at $rev (baseline)" >&2
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/baseline" \
    cargo build --release --quiet --manifest-path "$tree/Cargo.toml" -p embodyd --bin embody
  cp "${CARGO_TARGET_DIR:-$PWD/target}/baseline/release/embody" "$tree.embody"
  git worktree remove --force "$tree"
  TOOLS+=("embody@$rev")
fi
echo "== CPU path: ${EMBODY_CPU_LEVEL:-best available}" >&2

results=$(mktemp)
for model in "$@"; do
  for round in $(seq "$ROUNDS"); do
    # Prefill from an empty context; decode after the prompt (depth PROMPT),
    # as `embody bench` measures it.
    { "$BIN/llama-bench" -m "$model" -t "$THREADS" -p "$PROMPT" -n 0 -r 1 -o json 2>/dev/null
      "$BIN/llama-bench" -m "$model" -t "$THREADS" -p 0 -n "$GEN" -d "$PROMPT" -r 1 -o json 2>/dev/null
    } | python3 -c '
import json, sys
out = {"tool": "llama.cpp", "model": sys.argv[1]}
text, dec, rows = sys.stdin.read(), json.JSONDecoder(), []
i = 0
while i < len(text):
    if text[i].isspace():
        i += 1
        continue
    part, i = dec.raw_decode(text, i)
    rows += part
for r in rows:
    key = "prefill_tok_s" if r["n_prompt"] > 0 else "decode_tok_s"
    out[key] = r["avg_ts"]
print(json.dumps(out))' "$model" >> "$results"
    /usr/bin/time -f '%M' -o "$results.rss" "$BIN/llama-bench" -m "$model" -t "$THREADS" -p "$PROMPT" -n 0 -r 1 >/dev/null 2>&1 || true
    echo "{\"tool\": \"llama.cpp-rss\", \"model\": \"$model\", \"peak_rss_mb\": $(( $(cat "$results.rss" 2>/dev/null || echo 0) / 1024 ))}" >> "$results"
    for tool in "${TOOLS[@]}"; do
      bin="$EMBODY"; [ "$tool" = embody ] || bin="$tree.embody"
      "$bin" bench -m "$model" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r 1 --json \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); d["tool"]=sys.argv[2]; d["model"]=sys.argv[1]; print(json.dumps(d))' "$model" "$tool" >> "$results"
    done
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys, os
rows = [json.loads(l) for l in open(sys.argv[1])]
models = sorted({r["model"] for r in rows}, key=lambda m: [r["model"] for r in rows].index(m))
def med(tool, model, key):
    v = [r[key] for r in rows if r["tool"] == tool and r["model"] == model and key in r]
    return statistics.median(v) if v else float("nan")
ours = [t for t in dict.fromkeys(r["tool"] for r in rows) if t.startswith("embody")]
print(f"{'model':<42} {'figure':<14} {'tool':<16} {'ours':>10} {'llama.cpp':>10} {'ratio':>7}")
for m in models:
    name = os.path.basename(m)
    for tool in ours:
        for key, label in [("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")]:
            a, b = med(tool, m, key), med("llama.cpp", m, key)
            print(f"{name:<42} {label:<14} {tool:<16} {a:>10.1f} {b:>10.1f} {a / b:>6.2f}x")
        a, b = med(tool, m, "peak_rss_mb"), med("llama.cpp-rss", m, "peak_rss_mb")
        print(f"{name:<42} {'peak RSS MiB':<14} {tool:<16} {a:>10.0f} {b:>10.0f} {a / b:>6.2f}x")
        print(f"{name:<42} {'TTFT ms':<14} {tool:<16} {med(tool, m, 'ttft_ms'):>10.0f}")
PY
rm -f "$results" "$results.rss" ${tree:+"$tree.embody"}
