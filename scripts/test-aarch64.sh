#!/usr/bin/env bash
# Cross-builds the engine's quant kernel tests for aarch64 and runs them under
# qemu (the NEON and dotprod kernels against the scalar reference), then the
# arm64 package's daemon on the real model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/aarch64-env.sh

echo "== cargo test (aarch64 under qemu: quant kernels and attention)"
# Emulation is slow: only the quant and attention tests, optimized. Extra
# arguments go to the test binary (e.g. `--nocapture`).
cargo test --release -p embody-engine --target aarch64-unknown-linux-gnu --lib \
    -- quant backend::cpu::attention "$@"

echo "== the arm64 package under qemu: IPC chat, HTTP chat, zenoh chat, SIGTERM drain"
# The daemon and the CLI as the package installs them, on the real model.
deb=$(OUT="$CARGO_TARGET_DIR/debian" scripts/package.sh arm64)
root=$(mktemp -d)
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
run() { qemu-aarch64-static -L / "$@"; }
zport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$root/embodyd.toml" <<TOML
[model]
path = "${EMBODY_MODELS:-$HOME/.cache/embody/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
threads = 2
[http]
bind = "127.0.0.1:0"
[zenoh]
listen = ["tcp/127.0.0.1:$zport"]
connect = []
node = "arm64"
[ros2]
enabled = false
TOML
sock="$root/embodyd.sock"
# qemu itself in the background, so that $! is the process SIGTERM goes to.
qemu-aarch64-static -L / "$root/usr/bin/embodyd" --config "$root/embodyd.toml" \
    --socket "$sock" 2> "$root/log" &
pid=$!
for _ in $(seq 240); do
    run "$root/usr/bin/embody" status --socket "$sock" > /dev/null 2>&1 && break
    kill -0 "$pid" || { cat "$root/log"; exit 1; }
    sleep 0.5
done
run "$root/usr/bin/embody" status --socket "$sock"
answer=$(run "$root/usr/bin/embody" chat --socket "$sock" -n 8 --temperature 0 "Name a robot sensor.")
echo "IPC answer: $answer"
[ -n "$answer" ] || { echo "no IPC answer"; cat "$root/log"; exit 1; }
addr=$(grep -o 'http: listening on [0-9.:]*' "$root/log" | awk '{print $4}')
python3 - "$addr" <<'PY'
import json, sys, urllib.request
body = json.dumps({"model": "SmolLM2-135M-Instruct.Q4_1",
                   "messages": [{"role": "user", "content": "Name a robot sensor."}],
                   "max_tokens": 8, "temperature": 0}).encode()
req = urllib.request.Request(f"http://{sys.argv[1]}/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=300))
text = reply["choices"][0]["message"]["content"]
assert text and reply["usage"]["completion_tokens"] > 0, reply
print("HTTP answer:", text)
PY
# zenoh chat with the Python zenoh client (the interop tests' venv).
"$(scripts/test-venv.sh)" - "$zport" <<'PY'
import json, sys, time, zenoh
c = zenoh.Config()
c.insert_json5("mode", '"peer"')
c.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{sys.argv[1]}"]))
c.insert_json5("scouting/multicast/enabled", "false")
s = zenoh.open(c)
deadline = time.time() + 120
while not list(s.liveliness().get("embody/arm64/alive", timeout=2)):
    assert time.time() < deadline, "the arm64 daemon's zenoh key space never appeared"
    time.sleep(0.2)
ask = json.dumps({"messages": [{"role": "user", "content": "Name a robot sensor."}],
                  "max_tokens": 8, "temperature": 0})
events = [json.loads(r.ok.payload.to_string()) for r in
          s.get("embody/arm64/chat", payload=ask, consolidation=zenoh.ConsolidationMode.NONE, timeout=300)]
assert events and events[-1]["type"] == "finished", events
print("zenoh answer:", "".join(e.get("text", "") for e in events if e["type"] == "delta"))
s.close()
PY
kill -TERM "$pid"
wait "$pid" || { echo "embodyd exited $? on SIGTERM"; cat "$root/log"; exit 1; }
grep -q "drained" "$root/log" || { echo "no drain in the log"; cat "$root/log"; exit 1; }
echo "arm64 daemon: ready, answered over IPC, HTTP and zenoh, drained on SIGTERM"
