#!/usr/bin/env python3
"""How far HF transformers' own bf16 run lands from its float64 goldens: the
band l4c's bf16 results are judged in (test/golden/bf16.test).

usage: python3 test/gpu/hf_bf16_band.py CASE_DIR... (each with config.json,
model.safetensors and golden.safetensors: input_ids, logits, greedy_ids)

For each case: Llama4ForCausalLM in bfloat16 (eager attention) on the
golden's input_ids; prints the max |logits - golden| / max |golden| over all
rows, how many rows are within 3e-2 of max |golden|, and how many greedy
tokens (after the prompt) equal the golden's. Informational: exits 0 unless
a case cannot run.
"""
import sys

import torch
from safetensors import safe_open
from transformers import Llama4ForCausalLM


def main():
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    for case in sys.argv[1:]:
        with safe_open(case + "/golden.safetensors", framework="pt") as f:
            ids = f.get_tensor("input_ids")
            gold = f.get_tensor("logits").to(torch.float64)
            greedy = f.get_tensor("greedy_ids")
        model = Llama4ForCausalLM.from_pretrained(
            case, dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
        ids = ids.cuda()
        logits = model(input_ids=ids, use_cache=False).logits.double().cpu()
        err = (logits - gold).abs()
        max_ref = gold.abs().max().item()
        rows = err.amax(-1).flatten() / max_ref
        T = ids.shape[1]
        G = greedy.shape[1] - T
        out = model.generate(ids, max_new_tokens=G, min_new_tokens=G, do_sample=False,
                             pad_token_id=0).cpu()
        same = (out[:, T:] == greedy[:, T:]).sum().item()
        print("hf_bf16_band: %s: worst row %.3e, %d of %d rows within 3e-2, greedy "
              "%d of %d identical" % (case.rstrip("/").split("/")[-1], rows.max().item(),
                                      int((rows <= 3e-2).sum()), rows.numel(), same,
                                      greedy[:, T:].numel()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
