#!/usr/bin/env bash
# Re-checks every CUDA plan the emulator suites built (after
# `lit build/test/cuemu`) with fewer rows and batch entries than it was
# compiled for: `l4-run --check-kernels` on the emulator with one batch
# entry fewer (if it has more than one) and half (generate) or two thirds
# of the rows, random weights and ids, so the NaN poison of dead rows,
# entries and cache positions has something to bite on. Prints one line per
# plan; exits non-zero if any check failed.
#   scripts/cuemu-sweep.sh [BUILD]      (L4C_CUEMU_ORDER is passed through)
set -uo pipefail
build=${1:-build}
export L4C_CUDA_DRIVER=$build/runtime/libl4cuemu.so L4C_CUDA_IMAGE=source
export L4C_CUEMU_DIR=${L4C_CUEMU_DIR:-$build/cuemu-cache}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plans=0 failed=0
for plan in "$build"/test/cuemu/Output/*/*.plan; do
  info=$("$build/bin/l4-run" --info "$plan" 2>&1) || continue
  grep -q "target: *cuda" <<<"$info" || continue
  field() { sed -n "s/^$1: *//p" <<<"$info"; }
  kind=$(field "program kind") prec=$(field precision)
  mb=$(field "max batch") ms=$(field "max seq") V=$(field "vocab size")
  B=$((mb > 1 ? mb - 1 : 1))
  if [ "$kind" = generate ]; then T=$((ms / 2)); else T=$((ms * 2 / 3)); fi
  [ "$T" -ge 1 ] || T=1
  python3 - "$tmp/in.safetensors" "$B" "$T" "$V" <<'PY'
import json, random, struct, sys
path, B, T, V = sys.argv[1], *map(int, sys.argv[2:])
random.seed(3)
raw = struct.pack("<%dq" % (B * T), *(random.randrange(V) for _ in range(B * T)))
h = json.dumps({"input_ids": {"dtype": "I64", "shape": [B, T],
                              "data_offsets": [0, len(raw)]}}).encode()
h += b" " * (-(8 + len(h)) % 8)
open(path, "wb").write(struct.pack("<Q", len(h)) + h + raw)
PY
  tol=1e-3
  [ "$prec" = bf16 ] && tol=2e-2
  out=$("$build/bin/l4-run" "$plan" --device=cuda --random-weights=5 \
    --inputs "$tmp/in.safetensors" --check-kernels=$tol 2>&1)
  plans=$((plans + 1))
  echo "${plan#"$build"/test/cuemu/Output/} $kind $prec B=$B/$mb T=$T/$ms: $(tail -1 <<<"$out")"
  if ! tail -1 <<<"$out" | grep -q ": ok$"; then
    failed=$((failed + 1))
    head -30 <<<"$out"
  fi
done
echo "cuemu-sweep: $plans plans, $failed failed"
[ "$plans" -gt 0 ] && [ "$failed" -eq 0 ]
