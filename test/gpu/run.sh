#!/usr/bin/env bash
# The GPU checks, run on the GPU machine from the repository root on what
# test/gpu/prepare.sh built on the CPU machine (see test/gpu/README.md):
#   1. the CUDA backend's unit tests, the real-device one included;
#   2. golden parity on the GPU: logits within the GPU f32 tolerance of
#      ARCHITECTURE.md (1e-3 of max |logit|) and identical greedy ids, for the
#      five HF float64 golden cases;
#   2a. one training step of each golden case (loss, gradients, AdamW);
#   2b. the same in bf16, and HF's own bf16 distance from its goldens;
#   3. a differential run of an odd-shaped model (no size a multiple of a
#      tile) against the CPU backend on the same plan, weights and inputs,
#      and against itself launched without programmatic launch;
#   3b. every kernel of those plans against the CPU backend, each on the
#      same inputs (l4-run --check-kernels);
#   3c. every tile configuration of the tunable GEMMs (wgmma's and TMA's
#      too), of the decode GEMVs and of the routed experts' decode kernels
#      against its kernel (l4-tune), and plans that choose wgmma or TMA
#      against the CPU;
#   4. compute-sanitizer memcheck and racecheck on golden plans;
#   5. HF transformers loads a checkpoint l4c trained and saved, and its
#      logits equal l4c's (CPU and GPU);
#   6. decode speed: l4c on the GPU and CPU, HF eager on the same config;
#   7. the llama4-scout and llama4-maverick plans on this device: every
#      kernel loads within the device's limits, and the memory account.
# Prints a table last; logs and the table go to $OUT (or ./gpu-results).
# Usage: [PARTS="1 2 3b"] test/gpu/run.sh [BUNDLE]   (BUNDLE defaults to
# build/gpu; PARTS picks sections by number, all of them by default, so
# that a short device session runs what matters first.)
set -uo pipefail
b=${1:-build/gpu}
all=" 1 2 2a 2b 3 3b 3c 4 5 6 7 "
parts=" ${PARTS:-$all} "
for p in $parts; do
  [[ $all == *" $p "* ]] || { echo "run.sh: no part '$p' (PARTS takes:$all)" >&2; exit 2; }
done
want() { [[ $parts == *" $1 "* ]]; }
out=${OUT:-gpu-results}
mkdir -p "$out/logs"
export LD_LIBRARY_PATH="$PWD/$b/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export L4C_CACHE_DIR="$out/cache"
run="$b/bin/l4-run"
cmp="$b/bin/l4-compare"
table="$out/table.txt"
: >"$table"
fails=0
row() { # CHECK RESULT DETAIL
  printf '%-44s %-5s %s\n' "$1" "$2" "$3" | tee -a "$table" >/dev/null
  [ "$2" != FAIL ] || fails=$((fails + 1))
}
# check NAME LOG CMD...: runs CMD (2 min cap), PASS on exit 0; the detail is
# the log's last line.
check() {
  local name=$1 log="$out/logs/$2.log"
  shift 2
  timeout 120 "$@" >"$log" 2>&1
  local rc=$?
  local last
  last=$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-110)
  if [ $rc -eq 0 ]; then row "$name" PASS "$last"; else row "$name" FAIL "rc=$rc: $last"; fi
  # A failed GPU run is repeated synchronising after every launch, so that
  # the log names the kernel that faulted.
  if [ $rc -ne 0 ] && [ "${1##*/}" = l4-run ] && [[ "$*" == *--device=cuda* ]]; then
    L4C_CUDA_SYNC=1 timeout 120 "$@" >"${log%.log}-sync.log" 2>&1
  fi
  return $rc
}

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"

if want 1; then
echo "== 1. CUDA backend unit tests"
check "unit: Cuda* (fake driver + real device)" unit \
  "$b/bin/l4c_runtime_tests" --gtest_filter='Cuda*' --gtest_brief=1
grep -E "SKIPPED|RunsKernelsOnTheDevice" "$out/logs/unit.log" | head -5
fi

if want 2; then
echo "== 2. golden parity (f32)"
while read -r name dir B T G; do
  p="$b/plans/$name"
  o="$out/$name"
  check "golden $name forward: run" "$name-fwd" "$run" "$p-forward.plan" \
    --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" \
    --out "$o-forward.safetensors" &&
    check "golden $name forward: logits 1e-3" "$name-fwd-cmp" "$cmp" \
      "$o-forward.safetensors" "$dir/golden.safetensors" --tol logits=1e-3
  check "golden $name generate: run" "$name-gen" "$run" "$p-generate.plan" \
    --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" \
    --max-new-tokens="$G" --out "$o-generate.safetensors" &&
    check "golden $name generate: greedy ids" "$name-gen-cmp" "$cmp" \
      "$o-generate.safetensors" "$dir/golden.safetensors" --exact greedy_ids
done <"$b/cases.txt"
fi

if want 2a; then
echo "== 2a. golden training step (f32): loss, gradients, one AdamW step"
while read -r name dir B T G; do
  check "golden $name train: run" "$name-train" "$run" "$b/plans/$name-train.plan" \
    --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" \
    --adamw=lr=0.01,beta1=0.9,beta2=0.95,eps=1e-8,weight_decay=0.1 \
    --out "$out/$name-train.safetensors" &&
    check "golden $name train: loss, grads, adamw" "$name-train-cmp" "$cmp" \
      "$out/$name-train.safetensors" "$dir/golden.safetensors" \
      --tol loss=1e-3 --grads 1e-3,1e-3 --adamw 1e-5
  check "kernels $name train (1e-3)" "$name-train-kernels" "$run" "$b/plans/$name-train.plan" \
    --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" --check-kernels=1e-3
done <"$b/cases.txt"
fi

if want 2b; then
echo "== 2b. golden parity (bf16; limits as test/golden/bf16.test)"
while read -r name dir B T G; do
  p="$b/plans/$name"
  o="$out/$name"
  check "golden $name bf16 forward: run" "$name-fwd16" "$run" "$p-forward-bf16.plan" \
    --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" \
    --out "$o-forward-bf16.safetensors" &&
    check "golden $name bf16 forward: rows 3e-2" "$name-fwd16-cmp" "$cmp" \
      "$o-forward-bf16.safetensors" "$dir/golden.safetensors" --tol-rows logits=3e-2,0.9
  check "golden $name bf16 generate: run" "$name-gen16" "$run" "$p-generate-bf16.plan" \
    --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" \
    --max-new-tokens="$G" --out "$o-generate-bf16.safetensors" &&
    check "golden $name bf16 generate: greedy" "$name-gen16-cmp" "$cmp" \
      "$o-generate-bf16.safetensors" "$dir/golden.safetensors" --match greedy_ids=0.6,"$T"
  # A kernel's bf16 results may differ from the CPU's by a bf16 step or two
  # where its sums run in another order (5e-3 seen under the emulator).
  check "kernels $name bf16 generate (2e-2)" "$name-gen16-kernels" "$run" "$p-generate-bf16.plan" \
    --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" --check-kernels=2e-2
done <"$b/cases.txt"
dirs=$(awk '{print $2}' "$b/cases.txt")
# shellcheck disable=SC2086
check "HF's own bf16 band (informational)" hf-bf16 python3 test/gpu/hf_bf16_band.py $dirs
grep hf_bf16_band "$out/logs/hf-bf16.log" | sed 's/^/  /' | tee -a "$table"
fi

if want 3; then
echo "== 3. odd shapes: GPU against the CPU backend"
check "odd forward: run" odd-fwd "$run" "$b/plans/odd-forward.plan" --device=cuda \
  --random-weights=11 --inputs "$b/refs/odd-inputs.safetensors" --out "$out/odd-forward.safetensors" &&
  check "odd forward: logits vs cpu 1e-3" odd-fwd-cmp "$cmp" "$out/odd-forward.safetensors" \
    "$b/refs/odd-forward-cpu.safetensors" --tol logits=1e-3
check "odd generate: run" odd-gen "$run" "$b/plans/odd-generate.plan" --device=cuda \
  --random-weights=11 --max-new-tokens=20 --inputs "$b/refs/odd-inputs.safetensors" \
  --out "$out/odd-generate.safetensors" &&
  check "odd generate: greedy ids vs cpu" odd-gen-cmp "$cmp" "$out/odd-generate.safetensors" \
    "$b/refs/odd-generate-cpu.safetensors" --exact greedy_ids
# Programmatic dependent launch cannot change a result (each kernel waits
# for its predecessor before touching memory): the same run with plain
# launches must give the same ids. The logs' device lines say how many
# kernels each run launched programmatically.
check "odd generate: plain launches (L4C_PDL=0)" odd-gen-plain env L4C_PDL=0 "$run" \
  "$b/plans/odd-generate.plan" --device=cuda --random-weights=11 --max-new-tokens=20 \
  --inputs "$b/refs/odd-inputs.safetensors" --out "$out/odd-generate-plain.safetensors" &&
  check "odd generate: plain = programmatic ids" odd-gen-plain-cmp "$cmp" \
    "$out/odd-generate-plain.safetensors" "$out/odd-generate.safetensors" --exact greedy_ids
grep -h "l4-run: device" "$out/logs/odd-gen.log" "$out/logs/odd-gen-plain.log" 2>/dev/null | sed 's/^/  /'
fi

if want 3b; then
echo "== 3b. every kernel on the GPU against the CPU backend (same inputs per kernel)"
while read -r name dir B T G; do
  for prog in forward generate; do
    check "kernels $name $prog (1e-3)" "$name-$prog-kernels" "$run" "$b/plans/$name-$prog.plan" \
      --device=cuda --weights "$dir" --inputs "$dir/golden.safetensors" --check-kernels=1e-3
  done
done <"$b/cases.txt"
for prog in forward generate train; do
  check "kernels odd $prog (1e-3)" "odd-$prog-kernels" "$run" "$b/plans/odd-$prog.plan" \
    --device=cuda --random-weights=11 --inputs "$b/refs/odd-inputs.safetensors" --check-kernels=1e-3
done
# Tensor-core attention over two query tiles, and the two-phase backward,
# on tensor cores in bf16 (emulator: forward 1.4e-3 to 2.4e-3, backward
# <= 1.8e-3, a bf16 step; f32 <= 1e-6). The experts' GEMMs that split an
# f32 operand into bf16 hi + lo keep f32's precision: 2e-5 (emulator 5e-6).
for plan in odd16-forward-bf16:2e-2 odd16-train:1e-3 odd16-train-bf16:2e-2; do
  exact=()
  [[ $plan == odd16-train-bf16:* ]] &&
    exact=(--kernel-tol=gate_up_grad_input=2e-5 --kernel-tol=grad_weight=2e-5)
  check "kernels ${plan%%:*} (${plan##*:})" "${plan%%:*}-kernels" "$run" "$b/plans/${plan%%:*}.plan" \
    --device=cuda --random-weights=11 --inputs "$b/refs/odd16-inputs.safetensors" \
    --check-kernels="${plan##*:}" "${exact[@]}"
done
fi

if want 3c; then
echo "== 3c. tile configurations: every candidate against its kernel (l4-tune), wgmma and TMA plans against the CPU"
for plan in tiny-forward-bf16-cand tiny-train-bf16-cand odd16-forward-bf16-cand; do
  check "l4-tune $plan (2e-2)" "tune-$plan" "$b/bin/l4-tune" "$b/plans/$plan.plan" \
    --device=cuda --random-weights=11 --repeats=3 -o "$out/tune-$plan.json"
done
check "l4-tune tiny-generate-bf16-cand decode (2e-2)" tune-tiny-generate-bf16-cand \
  "$b/bin/l4-tune" "$b/plans/tiny-generate-bf16-cand.plan" --device=cuda --random-weights=11 \
  --repeats=3 --program=decode --batch 12 --seq 1 -o "$out/tune-tiny-generate-bf16-cand.json"
for plan in tiny-forward-bf16-wgmma tiny-train-bf16-wgmma tiny-forward-bf16-tma tiny-train-bf16-tma; do
  check "kernels $plan (2e-2)" "$plan-kernels" "$run" "$b/plans/$plan.plan" \
    --device=cuda --random-weights=11 --inputs "$b/refs/tiny-inputs.safetensors" \
    --check-kernels=2e-2
done
fi

if want 4; then
echo "== 4. compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
  d=test/data/golden/scout-tiny
  check "memcheck scout-tiny forward" memcheck-fwd compute-sanitizer --tool memcheck \
    --error-exitcode 9 "$run" "$b/plans/scout-tiny-forward.plan" --device=cuda \
    --weights $d --inputs $d/golden.safetensors --out "$out/mc-fwd.safetensors"
  check "memcheck scout-tiny generate" memcheck-gen compute-sanitizer --tool memcheck \
    --error-exitcode 9 "$run" "$b/plans/scout-tiny-generate.plan" --device=cuda \
    --weights $d --inputs $d/golden.safetensors --max-new-tokens=12 --out "$out/mc-gen.safetensors"
  # Shared-memory races: the emulator switches threads only at barriers, so
  # a missing __syncthreads can hide there; racecheck sees it. The bf16
  # plans run the tensor-core tiles.
  for plan in scout-tiny-forward scout-tiny-generate-bf16; do
    check "racecheck $plan" "racecheck-$plan" compute-sanitizer --tool racecheck \
      --error-exitcode 9 "$run" "$b/plans/$plan.plan" --device=cuda \
      --weights $d --inputs $d/golden.safetensors --max-new-tokens=4 --out "$out/rc-$plan.safetensors"
  done
  # The two-phase attention backward (workspace tickets, a spin wait) and
  # the multi-tile tensor-core forward.
  for plan in odd16-train odd16-forward-bf16; do
    for tool in memcheck racecheck; do
      check "$tool $plan" "$tool-$plan" compute-sanitizer --tool $tool \
        --error-exitcode 9 "$run" "$b/plans/$plan.plan" --device=cuda --random-weights=11 \
        --inputs "$b/refs/odd16-inputs.safetensors" --out "$out/$tool-$plan.safetensors"
    done
  done
  # The wgmma tiles: dynamic shared memory past 48 KiB, swizzled stages;
  # the TMA ones: tensor copies and mbarriers between warpgroups.
  for kind in wgmma tma; do
    for tool in memcheck racecheck synccheck; do
      check "$tool tiny-forward-bf16-$kind" "$tool-tiny-$kind" compute-sanitizer --tool $tool \
        --error-exitcode 9 "$run" "$b/plans/tiny-forward-bf16-$kind.plan" --device=cuda \
        --random-weights=11 --inputs "$b/refs/tiny-inputs.safetensors" --out "$out/$tool-$kind.safetensors"
    done
  done
else
  row "memcheck" SKIP "compute-sanitizer not found"
fi
fi

if want 5; then
echo "== 5. HF transformers loads an l4c checkpoint"
h="$b/hf"
check "hf: l4c cpu logits vs HF (1e-4)" hf-cpu python3 test/gpu/hf_check.py \
  "$h/ckpt" "$h/l4c_out.safetensors" "$h/inputs.safetensors" --tol 1e-4
check "hf: l4c gpu run" hf-gpu-run "$run" "$b/plans/hf-forward.plan" --device=cuda \
  --weights "$h/ckpt" --inputs "$h/inputs.safetensors" --out "$out/hf-gpu.safetensors" &&
  check "hf: l4c gpu logits vs HF (1e-3)" hf-gpu python3 test/gpu/hf_check.py \
    "$h/ckpt" "$out/hf-gpu.safetensors" "$h/inputs.safetensors" --tol 1e-3
fi

if want 6; then
echo "== 6. decode speed (batch 1, greedy, f32)"
prompt="Llama 4 on H100:"
rate() { sed -n 's/^decode: .*(\([0-9.]*\) tokens\/s)/\1/p' "$out/logs/$1.log"; }
for m in tiny mid; do
  for dev in cuda cpu; do
    check "speed $m $dev" "speed-$m-$dev" "$run" "$b/plans/$m-generate.plan" \
      --device=$dev --random-weights=1 --prompt "$prompt" --max-new-tokens=128
    r=$(rate "speed-$m-$dev")
    [ -n "$r" ] && row "  $m $dev decode" INFO "$r tokens/s ($(awk -v r="$r" 'BEGIN{printf "%.3f", 1000/r}') ms/token)"
  done
done
check "speed mid HF eager f32 (peer)" peer-mid python3 test/gpu/peer_decode.py \
  test/gpu/configs/mid.json --dtype float32 --prompt-len 16 --new-tokens 128
fi

if want 7; then
echo "== 7. llama4-scout and llama4-maverick plans (generate, batch 1, seq 8192) on this device"
# Every kernel loads from the plan's cubins and passes the device's limits
# (l4-run --info --device=cuda allocates nothing); the f32 weights (Scout
# 401 GiB, Maverick 1.46 TiB) cannot fit one GPU, so the session is
# expected to be refused with the memory account, not to crash.
for m in scout maverick; do
  [ -f "$b/plans/$m-generate.plan" ] || continue
  check "$m plan: every kernel loads on the GPU" "$m-probe" \
    "$run" --info --kernels --device=cuda "$b/plans/$m-generate.plan"
  row "  $m memory" INFO "$(grep -E '^(plan needs|device memory|fits):' "$out/logs/$m-probe.log" | sed 's/  */ /g' | cut -d'(' -f1 | tr '\n' ' ' | cut -c1-150)"
  row "  $m registers" INFO "$(grep -E '^(registers|local memory):' "$out/logs/$m-probe.log" | sed 's/  */ /g' | tr '\n' ' ' | cut -c1-150)"
  timeout 120 "$run" "$b/plans/$m-generate.plan" --device=cuda --random-weights=1 \
    --prompt "hi" --max-new-tokens=4 >"$out/logs/$m-load.log" 2>&1
  row "$m plan: random weights on the GPU" INFO "rc=$?: $(tail -1 "$out/logs/$m-load.log" | cut -c1-150)"
done
fi

echo
echo "== summary ($(cat "$out/device.txt"), $(date -u +%F))"
cat "$table"
echo "$fails failed"
[ "$fails" -eq 0 ]
