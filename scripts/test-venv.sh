#!/usr/bin/env bash
# Creates the Python environment the interop tests drive embodyd from: the
# official openai client, eclipse-zenoh, rosbags and jsonschema from PyPI, in
# a venv outside the repo (scripts/requirements-test.txt pins them). Prints
# the venv's python. Idempotent: a venv holding the pinned set is reused.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQ="$HERE/requirements-test.txt"
VENV="${EMBODY_TEST_VENV:-$HOME/.cache/embody/test-venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.requirements"
if [ -x "$PY" ] && cmp -s "$REQ" "$STAMP"; then echo "$PY"; exit 0; fi
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet -r "$REQ" >&2
cp "$REQ" "$STAMP"
echo "$PY"
