#!/usr/bin/env bash
# The speed benchmark (issue: Speed on the H100), run on the GPU machine from
# the repository root on what bench/prepare.sh built: l4c on the Scout
# 4-layer slice in bf16 with random weights, HF transformers (eager, and
# torch.compile unless NO_COMPILE=1) on the same configs in the same run,
# and the roofline floors from this device's measured copy bandwidth and
# bf16 GEMM rate; a bf16 training step of configs/train-2048.json (4 x 2048
# tokens) against the peers' (for tokens/s the ratio column is l4c / eager,
# higher is better; for times lower is better); then the prefills' kernels
# against cuBLAS and cuDNN (bench/kernels.py). Writes $OUT/bench.md (the
# tables for docs/performance.md); bench.log also holds every kernel's GPU
# time (l4-run --profile), and $OUT/profile-*.json the prefills' in full.
# Usage: bench/run.sh [BUNDLE]   (default build/bench)
# PARTS="l4c kernels peers" (the default; "tune" too with TUNE=1) picks the
# parts to run: a device command may run 10 minutes at most, so a session
# can run them in several calls on the same warm machine with the same OUT.
# Each call appends to bench.log and rebuilds bench.md from all that the
# calls so far measured (the latest figure of each row).
set -uo pipefail
b=${1:-build/bench}
out=${OUT:-bench-results}
parts=${PARTS:-l4c kernels peers}
[ "${TUNE:-0}" = 1 ] && parts="$parts tune"
part() { [[ " $parts " == *" $1 "* ]]; }
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/$b/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export L4C_CACHE_DIR="$out/cache"
run=$b/bin/l4-run
log=$out/bench.log
touch "$log"
l4c() { # NAME PLAN ARGS...
  local name=$1 plan=$2
  shift 2
  echo "== l4c $name" | tee -a "$log"
  timeout 300 "$run" "$b/plans/$plan.plan" --device=cuda --random-weights=1 --bench --profile "$@" \
    2>&1 | tee -a "$log" | grep -E '^(bench|profile):'

}
if part l4c; then
  # Each kernel's registers, local memory (spills) and static shared memory
  # as the device's driver reports them, for the prefill and decode plans.
  for plan in scout4-b1-2k scout4-b1 train-2048; do
    echo "== code $plan" >>"$log"
    timeout 120 "$run" --info --kernels --device=cuda "$b/plans/$plan.plan" >>"$log" 2>&1
  done
  l4c prefill-2048 scout4-b1-2k --batch 1 --seq 2048 --max-new-tokens 32 --repeats 5 \
    --profile-json "$out/profile-prefill-2048.json"
  l4c prefill-8192 scout4-b1-8k --batch 1 --seq 8192 --max-new-tokens 1 --repeats 3 \
    --profile-json "$out/profile-prefill-8192.json"
  l4c decode-b1 scout4-b1 --batch 1 --seq 128 --max-new-tokens 64 --repeats 5
  # The same with every kernel launched plainly (no programmatic dependent
  # launch): what overlapping each launch with the previous kernel saves.
  L4C_PDL=0 l4c decode-b1-plain scout4-b1 --batch 1 --seq 128 --max-new-tokens 64 --repeats 5
  l4c decode-b32 scout4-b32 --batch 32 --seq 128 --max-new-tokens 64 --repeats 5
  l4c train-4x2048 train-2048 --batch 4 --seq 2048 --repeats 3
  l4c train-4x2048-whole train-2048-whole --batch 4 --seq 2048 --repeats 3
fi
# Kernel tuning (TUNE=1; it can take minutes of device time): every tile
# configuration of the tunable GEMMs, timed and checked; the files go back
# to the CPU machine (TUNING=... bench/prepare.sh).
tune() { # NAME PLAN ARGS...
  local name=$1 plan=$2
  shift 2
  echo "== l4-tune $name" | tee -a "$log"
  timeout 300 "$b/bin/l4-tune" "$b/plans/$plan.plan" --device=cuda --random-weights=1 \
    --skip-mismatches -o "$out/tuning-$name.json" "$@" 2>&1 | tee -a "$log" | grep -E '^l4-tune'
}
if part tune; then
  tune prefill scout4-b1-2k-tune --batch 1 --seq 2048 --repeats 10
  # One decode step (the GEMVs and the routed experts' decode kernels have candidates).
  tune decode-b1 scout4-b1-tune --program=decode --batch 1 --seq 1 --repeats 20
  tune decode-b32 scout4-b32-tune --program=decode --batch 32 --seq 1 --repeats 20
  tune train train-2048-tune --batch 4 --seq 2048 --repeats 5
fi
# Kernel by kernel against cuBLAS and cuDNN (issue 6: GEMMs within 10%,
# attention within 30%), from the two prefills' profiles.
if part kernels; then
  echo "== kernels against the libraries" | tee -a "$log"
  timeout 600 python3 bench/kernels.py --profile "$out/profile-prefill-2048.json" \
    --profile "$out/profile-prefill-8192.json" 2>&1 | tee "$out/kernels.md" | tee -a "$log"
fi
if part peers; then
  echo "== peers and roofline" | tee -a "$log"
  timeout 900 python3 bench/peer.py --out "$out/peer.json" 2>&1 | tee -a "$log" | grep -E '^peer|^roofline'
fi
python3 - "$log" "$out/peer.json" >"$out/bench.md" <<'PY'
import json, re, sys, datetime
log = open(sys.argv[1]).read()
try:
    peer = json.load(open(sys.argv[2]))
except Exception:
    peer = {}
def l4c(name, key):
    # The latest run of that row (the log gathers every call's).
    # (not past the next section's header: a failed run has no figure).
    m = re.findall(r"== l4c %s\n(?:(?!== ).*\n)*?bench: .*?%s=([0-9.]+)" % (name, key), log)
    return float(m[-1]) if m else None
rows = [
    ("prefill 2048 (ms)", l4c("prefill-2048", "prefill_ms"), "prefill_2048_ms", "floor_prefill_ms"),
    ("decode b1 (ms/token)", l4c("decode-b1", "decode_ms_per_step"), "decode_b1_ms", "floor_decode_b1_ms"),
    ("decode b1, plain launches (`L4C_PDL=0`)", l4c("decode-b1-plain", "decode_ms_per_step"), "decode_b1_ms", "floor_decode_b1_ms"),
    ("decode b32 (ms/step)", l4c("decode-b32", "decode_ms_per_step"), "decode_b32_ms", "floor_decode_b32_ms"),
]
f = lambda x: "n/a" if x is None else "%.3f" % x
print("Scout 4-layer slice, bf16, random weights, %s, %s" % (peer.get("device", "?"), datetime.date.today()))
print()
print("| measure | l4c | HF eager | torch.compile | floor | l4c / eager |")
print("| --- | --- | --- | --- | --- | --- |")
for name, ours, key, floor in rows:
    e = peer.get("eager", {}).get(key); c = peer.get("compile", {}).get(key)
    print("| %s | %s | %s | %s | %s | %s |" % (name, f(ours), f(e), f(c), f(peer.get(floor)),
          "n/a" if not (ours and e) else "%.2f" % (ours / e)))
train = l4c("train-4x2048", "train_tokens_per_s")
e = peer.get("eager", {}).get("train_tokens_per_s")
print("| train step 4x2048, 2048 wide (tokens/s) | %s | %s | %s | | %s |"
      % (f(train), f(e), f(peer.get("compile", {}).get("train_tokens_per_s")),
         "n/a" if not (train and e) else "%.2f" % (train / e)))
whole = l4c("train-4x2048-whole", "train_tokens_per_s")
print("| the same, logits whole (`--loss-chunk=none`) | %s | | | | %s |"
      % (f(whole), "n/a" if not (whole and e) else "%.2f" % (whole / e)))
print()
print("copy bandwidth %s GB/s, bf16 GEMM %s TFLOP/s (measured in this run)"
      % (f(peer.get("bandwidth_gbs")), f(peer.get("gemm_tflops"))))
PY
if [ -s "$out/kernels.md" ]; then
  echo >>"$out/bench.md"
  cat "$out/kernels.md" >>"$out/bench.md"
fi
cat "$out/bench.md"
