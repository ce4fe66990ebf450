#!/usr/bin/env bash
# The main job on the built-in default model (llama4-tiny, a byte-vocabulary
# Llama 4): explain it, compile a generation plan, run it on the CPU backend.
set -euo pipefail
build=${1:-build}
model=llama4-tiny
plan="$build/$model-generate.plan"

echo "== l4c explain $model"
"$build/bin/l4c" explain "$model"
echo
echo "== l4c compile $model --program=generate --target=cpu --max-batch=1 --max-seq=128"
"$build/bin/l4c" compile "$model" --program=generate --target=cpu \
  --max-batch=1 --max-seq=128 -o "$plan"
"$build/bin/l4-run" --info "$plan"
echo
echo "== l4-run (CPU backend, random weights: the text is noise until trained)"
"$build/bin/l4-run" "$plan" --random-weights=1 --prompt "Llama 4 says: " \
  --max-new-tokens=32
