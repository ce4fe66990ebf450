#!/usr/bin/env bash
# The main job on the built-in default model: explain it, then compile it.
set -euo pipefail
build=${1:-build}
model=llama4-tiny
echo "== l4c explain $model"
"$build/bin/l4c" explain "$model"
echo
echo "== l4c compile $model --program=generate --emit=l4 (first lines)"
"$build/bin/l4c" compile "$model" --program=generate --max-batch=1 --max-seq=64 --emit=l4 | head -n 20
