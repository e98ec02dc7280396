#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1), starts embodyd on it,
# streams one answer through the client library (`embody chat`), then stops the
# daemon.
# Usage: scripts/run.sh ["your question"]  (extra flags after the question go to `embody chat`)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
scripts/fetch-models.sh smollm2 >&2
# Cargo's own progress shows: the first build takes about ten minutes on 2 cores.
echo "== building embodyd and embody (release)" >&2
cargo build --release -p embodyd --bins
bin="${CARGO_TARGET_DIR:-target}/release"
question="${1:-What should a robot do when its battery is low? Answer in two sentences.}"
shift || true

# A private runtime folder, so this daemon and its client find each other and
# nothing else (a system embodyd keeps its own socket in /run/embodyd).
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/embodyd-run.XXXXXX")
export XDG_RUNTIME_DIR="$run_dir"
unset RUNTIME_DIRECTORY EMBODY_SOCKET NOTIFY_SOCKET
"$bin/embodyd" --config configs/default.toml 2>"$run_dir/embodyd.log" &
daemon=$!
stop() {
  if kill -0 "$daemon" 2>/dev/null; then
    kill -TERM "$daemon"
    wait "$daemon" || true
  fi
  rm -rf "$run_dir"
}
trap stop EXIT

# Wait until the daemon answers `embody status` as ready.
for _ in $(seq 600); do
  "$bin/embody" status >/dev/null 2>&1 && break
  if ! kill -0 "$daemon" 2>/dev/null; then
    echo "embodyd failed to start:" >&2
    cat "$run_dir/embodyd.log" >&2
    exit 1
  fi
  sleep 0.1
done
mapfile -t status < <("$bin/embody" status)
printf '%s\n' "${status[@]:0:2}" >&2
echo "> $question" >&2
# Greedy and 128 tokens unless the flags given say otherwise.
defaults=()
[[ " $* " == *" --temperature"* ]] || defaults+=(--temperature 0)
[[ " $* " == *" --max-tokens"* || " $* " == *" -n "* ]] || defaults+=(--max-tokens 128)
"$bin/embody" chat "$question" "${defaults[@]}" "$@"
