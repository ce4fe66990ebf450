#!/usr/bin/env python3
"""The peers and the roofline of bench/run.sh, measured on this GPU.

HF transformers' Llama4ForCausalLM (eager attention; then torch.compile of the
same model unless NO_COMPILE=1) in bf16 with random weights on
bench/configs/scout-slice4.json: prefill of 2048 tokens (logits of the last
token only, as generation needs), decode at batch 1 and 32 after a 128-token
prompt (ms per step, KV cache); a training step (forward, backward, AdamW)
on bench/configs/train-2048.json at 4 x 2048 tokens. Roofline: a device-to-
device copy's bandwidth (bytes read + written) and an 8192^3 bf16 GEMM's rate,
and the floors they give for the three inference measures. Medians of CUDA-
event timings after a warm-up. Writes JSON (--out) and prints summary lines.
"""
import argparse
import json
import os
import statistics
import sys

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def config(name):
    raw = json.load(open(os.path.join(HERE, "configs", name)))
    raw = {k: v for k, v in raw.items() if k != "architectures"}
    cfg = Llama4TextConfig(**raw)
    cfg._attn_implementation = "eager"
    return cfg


def model_of(cfg):
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Llama4ForCausalLM(cfg).to(torch.bfloat16).eval()


def roofline(res):
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), repeats=10)
    res["bandwidth_gbs"] = 2 * n / (ms * 1e-3) / 1e9
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = timed(lambda: a @ b, repeats=10)
    res["gemm_tflops"] = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    del x, y, a, b


def floors(cfg, res):
    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd, H, KV = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    I, E = cfg.intermediate_size, cfg.num_local_experts
    attn = D * (H * hd + 2 * KV * hd) + H * hd * D
    expert = 3 * D * I
    head = V * D
    bw, rate = res["bandwidth_gbs"] * 1e9, res["gemm_tflops"] * 1e12
    # Decode: every byte a step needs, read once (bf16).
    b1 = 2 * (L * (attn + 2 * expert + E * D) + head)
    distinct = E * (1 - (1 - 1 / E) ** 32)
    b32 = 2 * (L * (attn + (1 + distinct) * expert + E * D) + head)
    res["floor_decode_b1_ms"] = b1 / bw * 1e3
    res["floor_decode_b32_ms"] = b32 / bw * 1e3
    # Prefill 2048: all weights once, or the projections' and attention's FLOPs.
    T = 2048
    flops = 2 * T * L * (attn + 2 * expert) + 2 * 2 * T * T / 2 * H * hd * L + 2 * D * V
    weights = 2 * (L * (attn + (E + 1) * expert) + 2 * head)
    res["floor_prefill_ms"] = max(flops / rate, weights / bw) * 1e3


def inference(model, res, key):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    with torch.no_grad():
        res[key]["prefill_2048_ms"] = timed(
            lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), repeats=5)
        for batch in (1, 32):
            prompt = torch.randint(0, cfg.vocab_size, (batch, 128), device="cuda")

            def decode():
                out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
                pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(32):
                    out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
                    pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                b.record()
                torch.cuda.synchronize()
                return a.elapsed_time(b) / 32

            decode()
            res[key]["decode_b%d_ms" % batch] = statistics.median(decode() for _ in range(3))


def training(res, key, compile_model):
    cfg = config("train-2048.json")
    model = model_of(cfg).train()
    if compile_model:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (4, 2048), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timed(step, repeats=3, warmup=2)
    res[key]["train_tokens_per_s"] = 4 * 2048 / (ms * 1e-3)
    del model, opt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "eager": {}, "compile": {}}
    roofline(res)
    cfg = config("scout-slice4.json")
    floors(cfg, res)
    print("roofline: %.0f GB/s, %.0f TFLOP/s; floors prefill %.2f ms, decode b1 %.3f ms, b32 %.3f ms"
          % (res["bandwidth_gbs"], res["gemm_tflops"], res["floor_prefill_ms"],
             res["floor_decode_b1_ms"], res["floor_decode_b32_ms"]), flush=True)
    model = model_of(cfg)
    inference(model, res, "eager")
    print("peer eager:", json.dumps(res["eager"]), flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
    training(res, "eager", False)
    print("peer eager train:", json.dumps(res["eager"]), flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
    if os.environ.get("NO_COMPILE") != "1":
        try:
            inference(torch.compile(model), res, "compile")
            print("peer compile:", json.dumps(res["compile"]), flush=True)
            json.dump(res, open(a.out, "w"), indent=1)
            del model
            torch.cuda.empty_cache()
            training(res, "compile", True)
            print("peer compile train:", json.dumps(res["compile"]), flush=True)
        except Exception as e:  # a peer that fails to compile is reported, not fatal
            print("peer compile: failed: %s" % e, flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
