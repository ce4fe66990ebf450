#!/usr/bin/env bash
# Makes the artifacts test/gpu/hf_check.py compares, on a machine without
# torch: trains llama4-tiny from random weights for a few steps on the GPL v3
# (as scripts/train-demo.sh does), saves the checkpoint, compiles a forward
# plan from it, writes input_ids [2, 16] and runs the plan on them.
# Usage: test/gpu/prepare_hf_check.sh BUILD OUTDIR   (STEPS=N, default 20)
# Then, where torch and transformers are installed:
#   python3 test/gpu/hf_check.py OUTDIR/ckpt OUTDIR/l4c_out.safetensors OUTDIR/inputs.safetensors
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BUILD OUTDIR" >&2; exit 2; }
build=$1
out=$2
steps=${STEPS:-20}
data=/usr/share/common-licenses/GPL-3
[ -r "$data" ] || { echo "prepare_hf_check: $data is missing (package base-files)" >&2; exit 1; }
mkdir -p "$out"
rm -rf "$out/ckpt"

"$build/bin/l4c" compile llama4-tiny --program=train --target=cpu \
  --max-batch=8 --max-seq=64 -o "$out/train.plan"
"$build/bin/l4-run" "$out/train.plan" --random-weights=1 \
  --train-data "$data" --data-format=bytes --batch 8 --seq 64 --steps "$steps" \
  --adamw=lr=3e-3,beta1=0.9,beta2=0.95,eps=1e-8,weight_decay=0.1 \
  --save "$out/ckpt" --log "$out/loss.log"

"$build/bin/l4c" compile "$out/ckpt" --program=forward --target=cpu \
  --max-batch=2 --max-seq=16 -o "$out/fwd.plan"

# input_ids [2, 16]: two 16-byte windows of the training text (int64).
python3 - "$data" "$out/inputs.safetensors" <<'PY'
import json, struct, sys
text = open(sys.argv[1], "rb").read()
ids = list(text[1000:1016]) + list(text[20000:20016])
header = json.dumps({"input_ids": {"dtype": "I64", "shape": [2, 16],
                                   "data_offsets": [0, 8 * len(ids)]}}).encode()
header += b" " * (-(8 + len(header)) % 8)
with open(sys.argv[2], "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + struct.pack("<%dq" % len(ids), *ids))
PY

"$build/bin/l4-run" "$out/fwd.plan" --weights "$out/ckpt" \
  --inputs "$out/inputs.safetensors" --out "$out/l4c_out.safetensors"
echo "prepare_hf_check: wrote $out/ckpt, $out/inputs.safetensors, $out/l4c_out.safetensors"
echo "next: python3 test/gpu/hf_check.py $out/ckpt $out/l4c_out.safetensors $out/inputs.safetensors"
