#!/usr/bin/env python3
"""Times Hugging Face transformers' Llama4ForCausalLM (eager attention) on a
config, as the peer of `l4-run PLAN --prompt ... --device=cuda`: a prompt of
P tokens, then G greedy tokens with the KV cache, batch 1, on the GPU.

usage: python3 test/gpu/peer_decode.py CONFIG.json [--dtype float32|bfloat16]
         [--prompt-len P] [--new-tokens G] [--repeats R]

Prints one line: `peer_decode: <config> <dtype> prefill_ms=.. decode_ms_per_token=..`
(medians over R runs after a warm-up). TF32 is off for float32, matching l4c's
f32 kernels. Random weights (HF's init): speed does not depend on values
except through MoE routing, which HF computes densely over all experts.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    raw = json.load(open(a.config))
    cfg = Llama4TextConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    cfg._attn_implementation = "eager"
    dtype = getattr(torch, a.dtype)
    with torch.device("cuda"):
        model = Llama4ForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, a.prompt_len), device="cuda")

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(4)  # warm-up
    pre, full = [], []
    for _ in range(a.repeats):
        pre.append(timed(1))
        full.append(timed(a.new_tokens))
    prefill = statistics.median(pre)
    decode = (statistics.median(full) - prefill) / (a.new_tokens - 1)
    print("peer_decode: %s %s prefill_ms=%.2f decode_ms_per_token=%.3f"
          % (a.config, a.dtype, prefill * 1e3, decode * 1e3))


if __name__ == "__main__":
    sys.exit(main())
