#!/usr/bin/env bash
# Builds llama.cpp, the peer we measure against and the correctness oracle, from the
# pinned llama-cpp-python sdist into a cache outside the repo. Prints the bin folder.
# Idempotent: a finished build is reused. Extra targets may be named as arguments
# (scripts/bench-vision.sh asks for llama-mtmd-cli).
set -euo pipefail
VERSION=0.3.36
ROOT="${EMBODY_LLAMACPP:-$HOME/.cache/embody/llamacpp}"
SRC="$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin"
TARGETS=(llama-bench llama-server llama-perplexity llama-tokenize llama-simple "$@")
have_all() { for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  apt-get update -qq >&2 && apt-get install -y -qq cmake ninja-build g++ >&2
fi
mkdir -p "$ROOT"
if [ ! -d "$SRC" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$ROOT" "llama-cpp-python==$VERSION" >&2
  tar xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
fi
cd "$SRC"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build build -j"$(nproc)" --target "${TARGETS[@]}" >&2
echo "$BIN"
