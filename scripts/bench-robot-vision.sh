#!/usr/bin/env bash
# The robot scenario: a zenoh camera at 30 Hz, a perception task every
# second, results with frame age; then the same frame asked about twice.
# Runs embodyd on the files scripts/bench-vision.sh makes (Qwen2.5-Coder-0.5B
# with the random-weight Qwen2-VL-2B-shaped encoder, Q8_0 mmproj).
#
# Usage: scripts/bench-robot-vision.sh   Env: SECONDS_RUN (30), THREADS (2), MMPROJ (mmproj-q8_0.gguf)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${EMBODY_BENCH_VISION:-$HOME/.cache/embody/bench-vision}"
MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
[ -f "$OUT/mmproj-q8_0.gguf" ] || { echo "run scripts/bench-vision.sh first (it makes the files)" >&2; exit 1; }
PY="$(scripts/test-venv.sh)"
cargo build --release --quiet -p embodyd --bin embodyd
EMBODYD="${CARGO_TARGET_DIR:-target}/release/embodyd"
dir=$(mktemp -d)
zport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
hport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/embodyd.toml" <<TOML
[model]
path = "$MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
mmproj = "$OUT/${MMPROJ:-mmproj-q8_0.gguf}"
threads = ${THREADS:-2}

[zenoh]
mode = "peer"
connect = []
listen = ["tcp/127.0.0.1:$zport"]
node = "bench"

[http]
bind = "127.0.0.1:$hport"

[[cameras]]
name = "front"
key = "bench/front"
format = "png"

[[tasks]]
name = "look"
camera = "front"
prompt = "Is the door open? Answer yes or no."
period_ms = 1000
max_tokens = 4
max_age_ms = 1000
TOML
XDG_RUNTIME_DIR="$dir" "$EMBODYD" --config "$dir/embodyd.toml" 2> "$dir/embodyd.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$hport/v1/models" >/dev/null 2>&1 && break
  sleep 0.5
done
"$PY" scripts/bench_robot_vision.py "tcp/127.0.0.1:$zport" "http://127.0.0.1:$hport" \
  "$OUT/448x448.png" "${SECONDS_RUN:-30}"
