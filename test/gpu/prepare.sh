#!/usr/bin/env bash
# Builds, on the CPU machine, everything test/gpu/run.sh needs on the GPU
# machine (which has no LLVM/MLIR): l4-run, l4-compare, libl4rt and the
# runtime tests, CUDA plans (sm_90a cubins from NVRTC) for the golden cases,
# an odd-shaped model and timing models, CPU reference outputs, and the
# artifacts of the HF checkpoint check. Usage: test/gpu/prepare.sh [BUILD]
# Output: BUILD/gpu and BUILD/gpu.tar.gz (carry the archive to the GPU
# machine; see test/gpu/README.md).
set -euo pipefail
build=${1:-build}
b=$build/gpu
l4c=$build/bin/l4c
run=$build/bin/l4-run
rm -rf "$b" && mkdir -p "$b/bin" "$b/lib" "$b/plans" "$b/refs"
cp "$build/bin/l4-run" "$build/bin/l4-compare" "$build/bin/l4-tune" "$b/bin/"
cp "$build/runtime/l4c_runtime_tests" "$b/bin/"
cp -P "$build"/runtime/libl4rt.so* "$b/lib/"

compile() { # NAME MODEL PROGRAM B T [FLAGS...]
  local name=$1 model=$2 program=$3 B=$4 T=$5
  shift 5
  "$l4c" compile "$model" --program="$program" --target=cuda --max-batch="$B" \
    --max-seq="$T" "$@" -o "$b/plans/$name.plan" 2>&1 | sed 's/^/  /'
}

ids() { # NAME SEED B T [VOCAB]: random token ids (vocabulary 1001) as safetensors
  python3 - "$b/refs/$1.safetensors" "$2" "$3" "$4" "${5:-1001}" <<'PY'
import json, random, struct, sys
random.seed(int(sys.argv[2]))
B, T = int(sys.argv[3]), int(sys.argv[4])
ids = [random.randrange(int(sys.argv[5])) for _ in range(B * T)]
h = json.dumps({"input_ids": {"dtype": "I64", "shape": [B, T],
                              "data_offsets": [0, 8 * len(ids)]}}).encode()
h += b" " * (-(8 + len(h)) % 8)
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h +
                              struct.pack("<%dq" % len(ids), *ids))
PY
}

echo "== golden cases: forward and generate plans"
# name dir B T G (T: the golden prompt length; G: new tokens compared)
cat >"$b/cases.txt" <<CASES
scout-tiny test/data/golden/scout-tiny 2 40 12
maverick-tiny test/data/golden/maverick-tiny 2 33 10
topk2-tied-mqa test/data/golden-extra/topk2-tied-mqa 2 20 6
step3-mha-noqk-notemp test/data/golden-extra/step3-mha-noqk-notemp 1 17 8
e16-top3-longchunk test/data/golden-extra/e16-top3-longchunk 3 24 5
CASES
while read -r name dir B T G; do
  compile "$name-forward" "$dir" forward "$B" "$T"
  compile "$name-generate" "$dir" generate "$B" $((T + G))
  compile "$name-forward-bf16" "$dir" forward "$B" "$T" --precision=bf16
  compile "$name-generate-bf16" "$dir" generate "$B" $((T + G)) --precision=bf16
  compile "$name-train" "$dir" train "$B" "$T"
done <"$b/cases.txt"

echo "== odd shapes (hidden 200, 5 heads / 1 kv head of 40, vocab 1001, top-2 of 5 experts, chunk 13)"
odd=test/gpu/configs/odd.json
compile odd-forward "$odd" forward 3 40
compile odd-generate "$odd" generate 3 64
ids odd-inputs 7 3 37
compile odd-train "$odd" train 3 40
# Head dim 48 (whole 16-wide mma steps) and 90 rows: bf16 attention takes
# the tensor-core tiles with two 64-row query tiles; the backward's key
# tiles wait on query tiles of three heads per kv head. The train plans run
# the loss in vocabulary chunks (1001 = 3 x 300 + 101, l4c-chunk-loss), and
# in bf16 the pipelined GEMMs meet a vocabulary that is not a multiple of 8
# (the lm_head's backward products fall back to the generic tiles).
odd16=test/gpu/configs/odd16.json
compile odd16-forward-bf16 "$odd16" forward 3 90 --precision=bf16
compile odd16-train "$odd16" train 3 90 --loss-chunk=300
compile odd16-train-bf16 "$odd16" train 3 90 --precision=bf16 --loss-chunk=300
ids odd16-inputs 8 3 90
# The CPU backend runs the same plans (its semantic ops) for the reference.
"$run" "$b/plans/odd-forward.plan" --random-weights=11 \
  --inputs "$b/refs/odd-inputs.safetensors" --out "$b/refs/odd-forward-cpu.safetensors"
"$run" "$b/plans/odd-generate.plan" --random-weights=11 --max-new-tokens=20 \
  --inputs "$b/refs/odd-inputs.safetensors" --out "$b/refs/odd-generate-cpu.safetensors"

echo "== tile configurations: every candidate (wgmma and TMA among them), and plans that choose them"
# l4-tune compares each candidate with its kernel on the GPU; the wgmma
# tiles have only run on the emulator so far. llama4-tiny's GEMMs all have
# wgmma tiles (its routed experts' too); odd16's 90 rows end mid-tile.
compile tiny-forward-bf16-cand llama4-tiny forward 2 40 --precision=bf16 --tune-candidates
compile tiny-train-bf16-cand llama4-tiny train 2 40 --precision=bf16 --tune-candidates
compile odd16-forward-bf16-cand "$odd16" forward 3 90 --precision=bf16 --tune-candidates
# Decode at batch 12: the GEMVs (vU: U steps of loads in flight) and the
# routed experts' decode kernels (gN: each expert's entries in tiles of 4
# rows; c64: per token) as candidates of one another.
compile tiny-generate-bf16-cand llama4-tiny generate 12 16 --precision=bf16 --tune-candidates
ids tiny-inputs 9 2 40 256
for prog in forward train; do
  # Tuning files that pick the deepest wgmma tiles (cp.async copies by
  # every thread: w...), and the widest warp-specialised TMA ones (tma...),
  # wherever a GEMM has them.
  for kind in wgmma tma; do
    "$l4c" compile llama4-tiny --program=$prog --precision=bf16 --target=cuda \
      --max-batch=2 --max-seq=40 --emit=cuda | python3 -c '
import json, re, sys
prefix = {"wgmma": "w", "tma": "tma"}[sys.argv[2]]
e = []
for m in re.finditer(r"tiles (\S+) of (\S+) \(signature (\S+)\)", sys.stdin.read()):
    w = [c for c in m.group(2).split("|") if c.startswith(prefix)]
    if w:
        e.append({"arch": "sm_90a", "signature": m.group(3), "config": w[-1]})
json.dump({"format": "l4c-tuning", "version": 1, "entries": e}, open(sys.argv[1], "w"))
' "$b/refs/$kind-$prog.json" $kind
    compile tiny-$prog-bf16-$kind llama4-tiny $prog 2 40 --precision=bf16 \
      --tuning="$b/refs/$kind-$prog.json"
  done
done

echo "== timing models: llama4-tiny and a 313M-parameter config (test/gpu/configs/mid.json)"
compile tiny-generate llama4-tiny generate 1 256
compile mid-generate test/gpu/configs/mid.json generate 1 256

echo "== HF checkpoint check: a checkpoint l4c trained and saved"
STEPS=${HF_STEPS:-20} bash test/gpu/prepare_hf_check.sh "$build" "$b/hf" >/dev/null
compile hf-forward "$b/hf/ckpt" forward 2 16
# HF reads config.json and model.safetensors; the optimizer state only
# costs carry bytes (the bundle must stay under the device tool's 64 MiB).
rm -f "$b/hf/ckpt/optimizer.safetensors"

echo "== llama4-scout and llama4-maverick generate plans (batch 1, seq 8192)"
compile scout-generate llama4-scout generate 1 8192
compile maverick-generate llama4-maverick generate 1 8192

du -sh "$b"
# The device tool carries at most 64 MiB; the plans' cubins and sources
# compress about 6:1 (279 MiB into 47, measured 2026-12-07).
tar -C "$build" -czf "$build/gpu.tar.gz" gpu
du -sh "$build/gpu.tar.gz"
size=$(stat -c %s "$build/gpu.tar.gz")
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "prepare: $build/gpu.tar.gz is $((size >> 20)) MiB, past the 64 MiB a device call carries" >&2
  exit 1
fi
echo "prepare: wrote $b and $build/gpu.tar.gz (carry the archive)"
