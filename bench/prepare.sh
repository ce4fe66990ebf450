#!/usr/bin/env bash
# Builds on the CPU machine what bench/run.sh runs on the GPU machine: the
# runtime binaries and bf16 CUDA plans of the Scout 4-layer slice
# (configs/scout-slice4.json: Scout's real layer shapes) and a train plan
# of configs/train-2048.json. Output: BUILD/bench, and BUILD/bench.tar.gz to
# carry to the GPU machine (the plans with tuning candidates take the folder
# past the 64 MiB a device call carries; compressed it is about 31 MB,
# measured 2026-12-07 with the grouped TMA candidates; the script took 25
# minutes on the 2-core machine, 13 of them the training plan's candidates).
# Usage: bench/prepare.sh [BUILD]
set -euo pipefail
build=${1:-build}
b=$build/bench
rm -rf "$b" && mkdir -p "$b/bin" "$b/lib" "$b/plans"
cp "$build/bin/l4-run" "$build/bin/l4-tune" "$b/bin/"
cp -P "$build"/runtime/libl4rt.so* "$b/lib/"
# TUNING=FILE[,FILE] (tuning files l4-tune wrote on the GPU machine, e.g.
# $OUT/tuning-*.json of an earlier bench/run.sh) generates the kernels with
# their choices.
tuning=()
[ -n "${TUNING:-}" ] && tuning=(--tuning="$TUNING")
compile() { # NAME BATCH SEQ [ARGS...]
  local name=$1 batch=$2 seq=$3
  shift 3
  "$build/bin/l4c" compile bench/configs/scout-slice4.json --program=generate \
    --precision=bf16 --target=cuda --max-batch="$batch" --max-seq="$seq" \
    ${tuning[@]+"${tuning[@]}"} "$@" -o "$b/plans/$name.plan" 2>&1 | sed 's/^/  /'
}
# Prefill of 2048 tokens (then 32 decode steps at ~2k context), batch 1.
compile scout4-b1-2k 1 2080
# Prefill of 8192 tokens: attention at T = 8192 against cuDNN (kernels.py).
compile scout4-b1-8k 1 8200
# Decode at batch 1 and 32 after a 128-token prompt.
compile scout4-b1 1 192
compile scout4-b32 32 192
# A training step of the 4-layer, 2048-wide, 8-expert model at 4 x 2048.
train() { # NAME [ARGS...]
  local name=$1
  shift
  "$build/bin/l4c" compile bench/configs/train-2048.json --program=train \
    --precision=bf16 --target=cuda --max-batch=4 --max-seq=2048 \
    ${tuning[@]+"${tuning[@]}"} "$@" -o "$b/plans/$name.plan" 2>&1 | sed 's/^/  /'
}
train train-2048
# The same step with the logits stored whole (--loss-chunk=none: 4.95 instead
# of 2.27 GiB of arena, and no recomputed lm_head GEMM: about 6.8 of the
# step's ~43 TFLOP), to measure what the default's chunking costs.
train train-2048-whole --loss-chunk=none
# For l4-tune (bench/run.sh): every other tile configuration of the tunable
# GEMMs as candidates, prefill, decode at batch 1 and 32, and training.
compile scout4-b1-2k-tune 1 2080 --tune-candidates
compile scout4-b1-tune 1 192 --tune-candidates
compile scout4-b32-tune 32 192 --tune-candidates
train train-2048-tune --tune-candidates
tar -C "$build" -czf "$build/bench.tar.gz" bench
du -sh "$b" "$build/bench.tar.gz"
# The device tool carries at most 64 MiB in all.
size=$(stat -c %s "$build/bench.tar.gz")
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "prepare: $build/bench.tar.gz is $((size >> 20)) MiB, past the 64 MiB a device call carries" >&2
  exit 1
fi
