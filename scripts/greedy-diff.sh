#!/usr/bin/env bash
# Compares the greedy text of two `embody` binaries on the three real models,
# a raw and a chat prompt each, 64 tokens: a refactor of the forward pass
# must leave every byte in place. EMBODY_CPU_LEVEL applies to both.
# Usage: scripts/greedy-diff.sh NEW_EMBODY OLD_EMBODY
set -euo pipefail
NEW=$1 OLD=$2
M="${EMBODY_MODELS:-$HOME/.cache/embody/models}"
status=0
for model in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf \
             qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
  for mode in raw chat; do
    args=(generate -m "$M/$model" --temperature 0 -n 64 -t 2)
    if [ "$mode" = chat ]; then
      args+=(--chat -p "Name three sensors a robot uses and what each is for.")
    else
      args+=(-p "The robot arm moved the red block onto")
    fi
    a=$("$NEW" "${args[@]}" 2>/dev/null)
    b=$("$OLD" "${args[@]}" 2>/dev/null)
    if [ "$a" = "$b" ]; then
      echo "$model $mode: identical (${#a} bytes)"
    else
      echo "$model $mode: DIFFERENT"; status=1
    fi
  done
done
exit $status
