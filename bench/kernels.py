#!/usr/bin/env python3
"""l4c's kernels against the libraries, on this GPU (bench/run.sh).

Reads the kernel times `l4-run --bench --profile-json` wrote for prefills of
the Scout slice (bench/configs/scout-slice4.json) and measures, for the same
shapes in bf16, what users would otherwise get:

- every projection GEMM of a prefill (q, k, v, o; the shared expert's
  gate+up and down) against cuBLAS (torch's F.linear: x [M, K] times w
  [N, K] transposed, f32 accumulation); l4c's kernels carry their fusions
  (the RMSNorm prologue, SwiGLU, the residual adds), cuBLAS's do not;
- the routed experts' grouped GEMMs against torch's grouped GEMM
  (torch._grouped_mm, CUTLASS) when this torch has one, else a loop of
  per-expert cuBLAS GEMMs, with the tokens split evenly over the experts
  (l4c's routing of random weights is near even, not exactly);
- attention (causal; at T = 8192 the RoPE layers' 8192-token chunks cover
  the whole sequence) against cuDNN's and FlashAttention's through torch's
  scaled_dot_product_attention, GQA as the model has it.

Each l4c figure is the median over the slice's layers of one kernel's GPU
time (CUDA events between launches); each library figure the median of
CUDA-event timings of 20 calls after a warm-up. Prints a markdown table, with
issue 6's targets (GEMMs within 10% of cuBLAS, attention within 30% of
cuDNN) marked per row. --dry-run (no torch, no GPU) prints l4c's side only:
which kernels matched which shapes (test/cuemu/profile.test runs it).
"""
import argparse
import datetime
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, calls=20, repeats=5):
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def gemm_shapes(cfg):
    """(pattern on the kernel name, what, N, K, grouped) of the prefill GEMMs."""
    D, hd = cfg["hidden_size"], cfg["head_dim"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    I, Imlp = cfg["intermediate_size"], cfg.get("intermediate_size_mlp", cfg["intermediate_size"])
    return [
        # Plans of at most 32 rows join q, k and v (l4c-fuse's qkv).
        (r"\.self_attn\.qkv_proj", "q+k+v", (H + 2 * KV) * hd, D, False),
        (r"\.self_attn\.q_proj", "q_proj", H * hd, D, False),
        (r"\.self_attn\.k_proj", "k_proj", KV * hd, D, False),
        (r"\.self_attn\.v_proj", "v_proj", KV * hd, D, False),
        (r"\.self_attn\.o_proj", "o_proj", D, H * hd, False),
        (r"\.shared_expert\.gate_proj\+up_proj", "shared gate+up", 2 * I, D, False),
        (r"\.shared_expert\.down_proj", "shared down", D, I, False),
        (r"\.feed_forward\.gate_proj\+up_proj", "dense gate+up", 2 * Imlp, D, False),
        (r"\.feed_forward\.down_proj", "dense down", D, Imlp, False),
        (r"\.experts\.gate_up$", "experts gate_up", 2 * I, D, True),
        (r"\.experts\.down$", "experts down", D, I, True),
    ]


def l4c_times(profile, program, pattern, kind):
    """Per-layer times (ms) of the program's kernels matching the name."""
    out = []
    for p in profile["programs"]:
        if p["program"] != program:
            continue
        for k in p["kernels"]:
            if k["kind"] == kind and re.search(pattern, k["name"]):
                out.append(k["ms"])
    return out


def cublas_gemm(M, N, K):
    import torch
    import torch.nn.functional as F
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02
    return timed(lambda: F.linear(x, w))


def grouped_gemm(M, N, K, E):
    """E GEMMs of M / E rows each (N x K weights per expert): torch's grouped
    GEMM if it has one, else a loop of cuBLAS calls. Returns (ms, how)."""
    import torch
    import torch.nn.functional as F
    rows = M // E
    x = torch.randn(rows * E, K, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(E, N, K, dtype=torch.bfloat16, device="cuda") * 0.02
    gm = getattr(torch, "_grouped_mm", None)
    if gm is not None:
        try:
            offs = torch.arange(rows, rows * E + 1, rows, dtype=torch.int32, device="cuda")
            wt = w.transpose(-2, -1)
            gm(x, wt, offs=offs)
            return timed(lambda: gm(x, wt, offs=offs)), "torch._grouped_mm"
        except Exception as e:  # not on this build or device: the loop
            print("kernels: torch._grouped_mm unavailable (%s); a cuBLAS loop instead" % e,
                  flush=True)
    xs = x.view(E, rows, K)

    def loop():
        for e in range(E):
            F.linear(xs[e], w[e])
    return timed(loop, calls=5), "cuBLAS loop"


def sdpa(B, T, H, KV, hd, backend):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(B, H, T, hd, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(B, KV, T, hd, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(B, KV, T, hd, dtype=torch.bfloat16, device="cuda")
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel([be]):
        try:
            f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            f()
            return timed(f, calls=5), "GQA"
        except Exception:
            # A backend without GQA: the kv heads repeated beforehand (not timed).
            kr = k.repeat_interleave(H // KV, dim=1)
            vr = v.repeat_interleave(H // KV, dim=1)
            f = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
            f()
            return timed(f, calls=5), "kv repeated"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=os.path.join(HERE, "configs", "scout-slice4.json"))
    p.add_argument("--profile", action="append", default=[],
                   help="l4-run --profile-json output of a prefill (repeatable)")
    p.add_argument("--attention-profile",
                   help="the prefill whose attention is compared (default: the longest)")
    p.add_argument("--dry-run", action="store_true",
                   help="l4c's side only: no torch, no GPU")
    a = p.parse_args()
    device = "dry run"
    if not a.dry_run:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        device = torch.cuda.get_device_name()
    cfg = json.load(open(a.config))
    profiles = [json.load(open(f)) for f in a.profile]
    if not profiles:
        print("kernels: no --profile given", file=sys.stderr)
        return 2
    prefill = lambda pr: next(x for x in pr["programs"] if x["program"] == "prefill")
    print("Kernels against the libraries, bf16, %s, %s (l4c: median over the %d layers)"
          % (device, datetime.date.today(), cfg["num_hidden_layers"]))
    print()
    print("| kernel | M x N x K | l4c ms | library ms | library | l4c / library | l4c TFLOP/s | target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    E = cfg["num_local_experts"]
    topk = cfg.get("num_experts_per_tok", 1)
    for pr in profiles:
        pf = prefill(pr)
        M = pf["batch"] * pf["length"]
        for pattern, what, N, K, grouped in gemm_shapes(cfg):
            ours = l4c_times(pr, "prefill", pattern, "moe" if grouped else "gemm")
            if not ours:
                continue
            mine = statistics.median(ours)
            rowsM = M * topk if grouped else M
            if a.dry_run:
                print("| %s (%d tokens) | %d x %d x %d | %.4f | | | | | |"
                      % (what, M, rowsM, N, K, mine))
                continue
            if grouped:
                lib, how = grouped_gemm(rowsM, N, K, E)
            else:
                lib, how = cublas_gemm(rowsM, N, K), "cuBLAS"
            flops = 2.0 * rowsM * N * K
            ratio = mine / lib
            target = "" if grouped else ("ok" if ratio <= 1.10 else "over 1.10")
            print("| %s (%d tokens) | %d x %d x %d | %.4f | %.4f | %s | %.2f | %.0f | %s |"
                  % (what, M, rowsM, N, K, mine, lib, how, ratio,
                     flops / (mine * 1e-3) / 1e12, target), flush=True)
    # Attention, on the longest prefill (or the one asked for).
    if a.attention_profile:
        att = json.load(open(a.attention_profile))
    else:
        att = max(profiles, key=lambda pr: prefill(pr)["length"])
    pf = prefill(att)
    B, T = pf["batch"], pf["length"]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    ours = l4c_times(att, "prefill", r"\.self_attn\.attention$", "attention")
    if ours:
        mine = statistics.median(ours)
        flops = 4.0 * B * H * hd * T * T / 2  # QK^T and PV, causal half
        if a.dry_run:
            print("| attention causal B=%d T=%d, %d q / %d kv heads, d %d | | %.4f | | | | | |"
                  % (B, T, H, KV, hd, mine))
            return 0
        for backend in ("cudnn", "flash"):
            try:
                lib, how = sdpa(B, T, H, KV, hd, backend)
            except Exception as e:
                print("| attention T=%d, %s | failed: %s | | | | | | |" % (T, backend, e))
                continue
            ratio = mine / lib
            target = ("ok" if ratio <= 1.30 else "over 1.30") if backend == "cudnn" else ""
            print("| attention causal B=%d T=%d, %d q / %d kv heads, d %d | | %.4f | %.4f | %s (%s) | %.2f | %.0f | %s |"
                  % (B, T, H, KV, hd, mine, lib, backend, how, ratio,
                     flops / (mine * 1e-3) / 1e12, target), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
