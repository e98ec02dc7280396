#!/usr/bin/env bash
# Prefill and decode speed of embody and llama.cpp on the same GGUF file, same
# threads and sizes, runs alternated so both see the same machine state.
#
# Usage: scripts/bench-vs-llamacpp.sh [MODEL.gguf ...]   (default: the three real models)
# Env: THREADS (2), PROMPT (512), GEN (128), ROUNDS (3)
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
    "$EMBODY" bench -m "$model" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r 1 --json \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); d["tool"]="embody"; d["model"]=sys.argv[1]; print(json.dumps(d))' "$model" >> "$results"
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys, os
rows = [json.loads(l) for l in open(sys.argv[1])]
models = sorted({r["model"] for r in rows}, key=lambda m: [r["model"] for r in rows].index(m))
def med(tool, model, key):
    v = [r[key] for r in rows if r["tool"] == tool and r["model"] == model and key in r]
    return statistics.median(v) if v else float("nan")
print(f"{'model':<42} {'figure':<14} {'embody':>10} {'llama.cpp':>10} {'ratio':>7}")
for m in models:
    name = os.path.basename(m)
    for key, label in [("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")]:
        a, b = med("embody", m, key), med("llama.cpp", m, key)
        print(f"{name:<42} {label:<14} {a:>10.1f} {b:>10.1f} {a / b:>6.2f}x")
    a, b = med("embody", m, "peak_rss_mb"), med("llama.cpp-rss", m, "peak_rss_mb")
    print(f"{name:<42} {'peak RSS MiB':<14} {a:>10.0f} {b:>10.0f} {a / b:>6.2f}x")
    print(f"{name:<42} {'TTFT ms':<14} {med('embody', m, 'ttft_ms'):>10.0f}")
PY
rm -f "$results" "$results.rss"
