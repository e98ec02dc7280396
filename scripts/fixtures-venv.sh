#!/usr/bin/env bash
# Creates the Python environment scripts/gen-fixtures.py runs in: torch and
# transformers from PyPI in a venv outside the repo. Prints the venv's python.
# Idempotent: a working venv is reused.
#
# PyPI's Linux torch wheel links against the CUDA libraries, which come as
# separate packages (several GB); they are installed too, and torch then runs
# on the CPU when no GPU is present.
set -euo pipefail
VENV="${EMBODY_VENV:-$HOME/.cache/embody/venv}"
PY="$VENV/bin/python"
ok() { "$PY" -c "import torch, transformers, safetensors, tokenizers, sentencepiece, PIL" 2>/dev/null; }
if [ -x "$PY" ] && ok; then echo "$PY"; exit 0; fi
python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "torch==2.15.0" "transformers==5.24.0" "tokenizers==0.23.3" "safetensors==0.8.0" numpy sentencepiece "pillow==13.0.0" >&2
ok || { echo "torch/transformers do not import in $VENV" >&2; exit 1; }
echo "$PY"
