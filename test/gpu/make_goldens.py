#!/usr/bin/env python3
"""Makes extra golden cases with Hugging Face transformers (run on the GPU
machine, which has torch and transformers; the math runs in float64 on the
CPU, like ../../shared/golden). Each case covers configuration fields the
two shared goldens do not: top-k > 1, tied embeddings, other MoE interleave
steps and NoPE intervals, MHA and MQA, QK norm and temperature tuning off,
llama3 RoPE with a smoothed band, chunks longer than the sequence.

usage: make_goldens.py OUT_DIR
Writes OUT_DIR/<case>/{config.json, model.safetensors, golden.safetensors,
golden.json} with the same keys as the shared goldens.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Llama4ForCausalLM, Llama4TextConfig

CASES = {
    "topk2-tied-mqa": dict(
        cfg=dict(vocab_size=96, hidden_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                 intermediate_size=48, intermediate_size_mlp=80,
                 num_local_experts=4, num_experts_per_tok=2,
                 interleave_moe_layer_step=1, no_rope_layer_interval=3,
                 attention_chunk_size=8, use_qk_norm=True,
                 attn_temperature_tuning=True, floor_scale=5, attn_scale=0.2,
                 tie_word_embeddings=True, max_position_embeddings=256,
                 rope_parameters=dict(rope_type="llama3", rope_theta=10000.0,
                                      factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0,
                                      original_max_position_embeddings=32)),
        batch=2, seq=20, gen=6),
    "step3-mha-noqk-notemp": dict(
        cfg=dict(vocab_size=80, hidden_size=48, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                 intermediate_size=40, intermediate_size_mlp=72,
                 num_local_experts=3, num_experts_per_tok=1,
                 interleave_moe_layer_step=3, no_rope_layer_interval=2,
                 attention_chunk_size=5, use_qk_norm=False,
                 attn_temperature_tuning=False, tie_word_embeddings=False,
                 max_position_embeddings=256,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        batch=1, seq=17, gen=8),
    "e16-top3-longchunk": dict(
        cfg=dict(vocab_size=112, hidden_size=72, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                 intermediate_size=32, intermediate_size_mlp=64,
                 num_local_experts=16, num_experts_per_tok=3,
                 interleave_moe_layer_step=2, no_rope_layer_interval=2,
                 attention_chunk_size=64, use_qk_norm=True,
                 attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
                 tie_word_embeddings=False, max_position_embeddings=256,
                 rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
        batch=3, seq=24, gen=5),
}

ADAMW = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def init_weights(model, gen):
    # Larger than HF's default init so that every path changes the result
    # (as for the shared goldens): normal(0, 1/sqrt(fan_in)), norms U[0.5, 1.5].
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                fan_in = p.shape[-2] if "experts." in name else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def make_case(name, spec, out):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    cfg = Llama4TextConfig(**spec["cfg"], attn_implementation="eager")
    model = Llama4ForCausalLM(cfg).float()
    init_weights(model, gen)
    model.save_pretrained(d)
    model = model.double().eval()

    B, T, G = spec["batch"], spec["seq"], spec["gen"]
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=G, do_sample=False,
                                min_new_tokens=G, eos_token_id=None,
                                pad_token_id=0)
        # The same continuation without the cache, token by token.
        cur = ids
        for _ in range(G):
            nxt = model(cur, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], 1)
        agree = (cur == greedy).double().mean().item()

    model.train()
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    out_t = {"input_ids": ids, "logits": logits.float(), "greedy_ids": greedy,
             "loss": loss.detach().float()}
    for n, p in model.named_parameters():
        out_t["grad." + n] = p.grad.float()
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"],
                            betas=(ADAMW["beta1"], ADAMW["beta2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    opt.step()
    for n, p in model.named_parameters():
        out_t["adamw." + n] = p.detach().float()
    save_file({k: v.contiguous() for k, v in out_t.items()},
              os.path.join(d, "golden.safetensors"))
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump({"case": name, "batch": B, "seq": T, "gen": G,
                   "loss": loss.item(), "adamw": ADAMW,
                   "reference": "transformers Llama4ForCausalLM, eager attention, float64 on CPU",
                   "cache_nocache_agreement": agree}, f, indent=1)
    print(f"{name}: loss {loss.item():.6f}, cache/no-cache agreement {agree}")


def main():
    torch.set_grad_enabled(True)
    out = sys.argv[1]
    for name, spec in CASES.items():
        make_case(name, spec, out)


if __name__ == "__main__":
    main()
