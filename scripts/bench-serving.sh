#!/usr/bin/env bash
# Serving benchmark: embodyd against llama.cpp's llama-server (-np 8), same
# model, same threads, same requests through the OpenAI API
# (/v1/chat/completions, streamed), in the same run. Three loads (see
# scripts/bench_serving.py): sequential requests behind a ~1,000-token system
# prompt (cold and warm time to first token), 8 concurrent requests behind it,
# and 8 concurrent short prompts of 128 tokens. Prints each figure for both and
# the ratio. Not a test: run it on a machine as quiet as you can get.
#
# Usage: scripts/bench-serving.sh [MODEL.gguf]   (default: SmolLM2-135M-Instruct Q4_1)
# Env: THREADS (2), ROUNDS (1), SHARED_TOKENS (64, tokens per request of load 2),
#      DRAFT_TOKENS (embodyd's model.draft_tokens; its default when unset)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"; ROUNDS="${ROUNDS:-1}"; SHARED_TOKENS="${SHARED_TOKENS:-64}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
MODEL="${1:-$MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$MODEL" ] || scripts/fetch-models.sh all >&2
PY="$(scripts/test-venv.sh)"
BIN="$(scripts/build-llamacpp.sh)"
cargo build --release --quiet -p embodyd --bin embodyd
EMBODYD="${CARGO_TARGET_DIR:-target}/release/embodyd"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_http() { # url, pid, log
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "server died; its log:" >&2; tail -20 "$3" >&2; exit 1; }
    sleep 0.2
  done
  echo "server at $1 not ready; its log:" >&2; tail -20 "$3" >&2; exit 1
}

results="$work/results.jsonl"
for round in $(seq "$ROUNDS"); do
  # llama-server: 8 slots sharing a 16k context (2k each), continuous batching.
  port=$(free_port)
  "$BIN/llama-server" -m "$MODEL" -t "$THREADS" -c 16384 -np 8 --host 127.0.0.1 --port "$port" \
    >"$work/llama.log" 2>&1 &
  pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$port" "$pid" "$work/llama.log"
  "$PY" scripts/bench_serving.py --url "http://127.0.0.1:$port" --label llama-server \
    --shared-tokens "$SHARED_TOKENS" >>"$results"
  kill "$pid"; wait "$pid" 2>/dev/null || true

  # embodyd: 8 decoding slots, a KV pool for 8 x (1,000 + 128) tokens and more.
  port=$(free_port)
  cat >"$work/embodyd.toml" <<EOF
[model]
path = "$MODEL"
threads = $THREADS
context_length = 2048
${DRAFT_TOKENS:+draft_tokens = $DRAFT_TOKENS}

[cache]
kv_cache_mb = 512

[decoder]
max_running = 8

[http]
bind = "127.0.0.1:$port"

[zenoh]
enabled = false
EOF
  "$EMBODYD" --config "$work/embodyd.toml" --socket "$work/embodyd.sock" >"$work/embodyd.log" 2>&1 &
  pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$port" "$pid" "$work/embodyd.log"
  "$PY" scripts/bench_serving.py --url "http://127.0.0.1:$port" --label embodyd \
    --shared-tokens "$SHARED_TOKENS" >>"$results"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

echo "load average before and after: $(cat /proc/loadavg)"
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(label, key):
    v = [r[key] for r in rows if r["label"] == label and key in r]
    return statistics.median(v) if v else float("nan")
figures = [
    ("seq_cold_ttft_s", "sequential: cold TTFT (s)", "lower"),
    ("seq_warm_ttft_s", "sequential: warm TTFT (s)", "lower"),
    ("shared8_median_ttft_s", "8 shared-prompt: median TTFT (s)", "lower"),
    ("shared8_tok_s", "8 shared-prompt: aggregate tok/s", "higher"),
    ("short1_tok_s", "1 short prompt: tok/s", "higher"),
    ("short8_tok_s", "8 short prompts: aggregate tok/s", "higher"),
]
print(f"{'figure':<36} {'embodyd':>10} {'llama-server':>13} {'ratio':>8}")
for key, label, better in figures:
    a, b = med("embodyd", key), med("llama-server", key)
    ratio = a / b if b else float("nan")
    print(f"{label:<36} {a:>10.3f} {b:>13.3f} {ratio:>7.2f}x  ({better} is better)")
for key in ("shared8_tokens", "short8_tokens"):
    print(f"tokens generated, {key}: embodyd {med('embodyd', key):.0f}, llama-server {med('llama-server', key):.0f}")
PY
