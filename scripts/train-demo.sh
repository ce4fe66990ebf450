#!/usr/bin/env bash
# Trains llama4-tiny (a byte-vocabulary Llama 4, ~1M parameters) from random
# weights on the text of the GPL v3 with the CPU backend, saves a checkpoint,
# then compiles a generation plan and continues a prompt from that checkpoint.
# About 2 minutes on 2 cores. Usage: scripts/train-demo.sh [BUILD] [OUT]
# (STEPS=N overrides the step count; docs/training.md shows a run's curve).
set -euo pipefail
build=${1:-build}
out=${2:-$build/train-demo}
steps=${STEPS:-600}
data=/usr/share/common-licenses/GPL-3 # Debian's base-files; verbatim copies are allowed
model=llama4-tiny
[ -r "$data" ] || { echo "train-demo: $data is missing (package base-files)" >&2; exit 1; }
mkdir -p "$out"

echo "== l4c compile $model --program=train --max-batch=8 --max-seq=64"
"$build/bin/l4c" compile "$model" --program=train --target=cpu \
  --max-batch=8 --max-seq=64 -o "$out/train.plan"

echo "== l4-run: $steps steps of 8 x 64 bytes of $(basename "$data"), from random weights"
start=$(date +%s)
"$build/bin/l4-run" "$out/train.plan" --random-weights=1 \
  --train-data "$data" --data-format=bytes --batch 8 --seq 64 --steps "$steps" \
  --adamw=lr=3e-3,beta1=0.9,beta2=0.95,eps=1e-8,weight_decay=0.1 \
  --save "$out/ckpt" --save-every 250 --log "$out/loss.log"
echo "trained in $(( $(date +%s) - start )) s; loss every 50 steps (step loss tokens/s):"
awk 'NR == 1 || $1 % 50 == 0' "$out/loss.log"

echo "== l4c compile $out/ckpt --program=generate (the trained checkpoint)"
"$build/bin/l4c" compile "$out/ckpt" --program=generate --target=cpu \
  --max-batch=1 --max-seq=256 -o "$out/generate.plan"
echo "== l4-run: greedy continuation from the trained weights"
"$build/bin/l4-run" "$out/generate.plan" --weights "$out/ckpt" \
  --prompt "The GNU General Public License is" --max-new-tokens 64
