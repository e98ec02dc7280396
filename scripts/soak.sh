#!/usr/bin/env bash
# Soak: embodyd on the default model under CLIENTS clients across the Unix
# socket, HTTP and zenoh for SECONDS seconds, plain clients mixed with slow
# readers, clients that leave mid-answer and oversized inputs
# (tests/examples/soak.rs). Prints the daemon's RSS, open files and threads
# over time and the requests by door and outcome; fails when a request ended
# without a terminal event or RSS or open files grew.
# Usage: [SOAK_SECONDS=1800] [CLIENTS=64] [EVERY=10] [PROFILE=release] scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${SOAK_SECONDS:-1800}"
CLIENTS="${CLIENTS:-64}"
EVERY="${EVERY:-10}"
PROFILE="${PROFILE:-release}"
scripts/fetch-models.sh smollm2 >&2
flag=()
[ "$PROFILE" = release ] && flag=(--release)
echo "== building embodyd and the soak driver ($PROFILE)" >&2
cargo build "${flag[@]}" -p embodyd --bins
cargo build "${flag[@]}" -p embody-tests --example soak
target="${CARGO_TARGET_DIR:-target}/$PROFILE"

dir=$(mktemp -d "${TMPDIR:-/tmp}/embodyd-soak.XXXXXX")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
zenoh_port=$(free_port)
cat >"$dir/embodyd.toml" <<EOF
[model]
path = "SmolLM2-135M-Instruct.Q4_1.gguf"

[http]
bind = "127.0.0.1:$http_port"

[zenoh]
listen = ["tcp/127.0.0.1:$zenoh_port"]
connect = []
node = "soak"

[ros2]
enabled = false
EOF
export XDG_RUNTIME_DIR="$dir"
unset RUNTIME_DIRECTORY EMBODY_SOCKET NOTIFY_SOCKET
"$target/embodyd" --config "$dir/embodyd.toml" 2>"$dir/embodyd.log" &
daemon=$!
stop() {
  if kill -0 "$daemon" 2>/dev/null; then
    kill -TERM "$daemon"
    wait "$daemon" || true
  fi
  echo "daemon log: $dir/embodyd.log" >&2
}
trap stop EXIT
for _ in $(seq 600); do
  "$target/embody" status >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$dir/embodyd.log" >&2; exit 1; }
  sleep 0.1
done
# The zenoh key space comes up just after the socket.
sleep 2

echo "== soak: $CLIENTS clients for $SECONDS_TO_RUN s (socket, HTTP, zenoh in turn)" >&2
"$target/examples/soak" --pid "$daemon" --socket "$dir/embodyd.sock" \
  --http "127.0.0.1:$http_port" --zenoh "tcp/127.0.0.1:$zenoh_port" \
  --prefix embody/soak --model SmolLM2-135M-Instruct.Q4_1 \
  --clients "$CLIENTS" --seconds "$SECONDS_TO_RUN" --every "$EVERY"
