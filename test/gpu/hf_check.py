#!/usr/bin/env python3
"""Checks an l4c-trained checkpoint against Hugging Face transformers.

usage: python3 test/gpu/hf_check.py CKPT_DIR L4C_OUT.safetensors INPUTS.safetensors [--tol REL]

CKPT_DIR is a checkpoint written by `l4-run --save` (config.json with
model_type llama4_text + model.safetensors, see docs/training.md). It is loaded
with transformers' Llama4ForCausalLM in float64 with eager attention; the
input_ids of INPUTS (int64 [B, T]) are run through it and HF's logits are
compared with the `logits` of L4C_OUT, which `l4-run FORWARD_PLAN --weights
CKPT_DIR --inputs INPUTS --out L4C_OUT` wrote. test/gpu/prepare_hf_check.sh
makes all three on a machine without torch.

Passes when from_pretrained reports no missing, unexpected or mismatched keys
and max|l4c - hf| / max|hf| <= REL (default 1e-4, the CPU f32 logits limit of
ARCHITECTURE.md). Prints one line starting `hf_check: PASS` or
`hf_check: FAIL`; exit status 0 or 1 (2 for a usage error).

Needs python3, torch, transformers (5.x; 4.5x works too) and safetensors.
"""
import argparse
import json
import os
import sys


def fail(msg):
    print("hf_check: FAIL: " + msg)
    sys.exit(1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("l4c_out", help="l4-run forward output holding `logits`")
    p.add_argument("inputs", help="safetensors holding `input_ids` (int64 [B, T])")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="limit on max|l4c - hf| / max|hf| (default 1e-4)")
    return p.parse_args()


def load_config(ckpt):
    """The text config as Llama4ForCausalLM wants it (a Llama4TextConfig)."""
    from transformers import Llama4TextConfig
    with open(os.path.join(ckpt, "config.json")) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    print("hf_check: config.json model_type %r, architectures %r"
          % (model_type, raw.get("architectures")))
    if model_type == "llama4_text":
        return Llama4TextConfig.from_pretrained(ckpt)
    if model_type == "llama4" and "text_config" in raw:
        # A multimodal config: its tensors would carry a language_model.
        # prefix that Llama4ForCausalLM does not expect; l4-run never writes
        # one, so say so rather than guess.
        fail("%s/config.json is a multimodal Llama4Config; expected the "
             "text-only llama4_text config that l4-run --save writes" % ckpt)
    fail("%s/config.json has model_type %r, expected 'llama4_text'"
         % (ckpt, model_type))


def load_model(ckpt, config, torch):
    import transformers
    from transformers import Llama4ForCausalLM
    major = int(transformers.__version__.split(".")[0])
    # transformers 5 renamed torch_dtype to dtype.
    dtype_kw = {"dtype": torch.float64} if major >= 5 else {"torch_dtype": torch.float64}
    model, info = Llama4ForCausalLM.from_pretrained(
        ckpt, config=config, attn_implementation="eager",
        output_loading_info=True, **dtype_kw)
    problems = []
    # A dict in every release so far (missing_keys, unexpected_keys,
    # mismatched_keys, error_msgs, ...); any non-empty entry is a failure.
    entries = dict(info) if isinstance(info, dict) else dict(vars(info))
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        entries.setdefault(kind, [])
    for kind, items in sorted(entries.items()):
        items = sorted(map(str, items or []))
        print("hf_check: %s: %d%s" % (kind, len(items),
                                       "" if not items else " " + repr(items)))
        if items:
            problems.append("%d %s" % (len(items), kind))
    model = model.to(torch.float64)
    model.eval()
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float64}:
        problems.append("parameters are %s, expected float64" % sorted(map(str, dtypes)))
    return model, problems


def main():
    args = parse_args()
    import torch
    import transformers
    from safetensors import safe_open

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    print("hf_check: torch %s, transformers %s"
          % (torch.__version__, transformers.__version__))

    with safe_open(args.inputs, framework="pt") as f:
        if "input_ids" not in f.keys():
            fail("%s has no tensor 'input_ids'" % args.inputs)
        ids = f.get_tensor("input_ids")
    if ids.dtype != torch.int64 or ids.dim() != 2:
        fail("input_ids must be int64 [B, T], got %s %s" % (ids.dtype, list(ids.shape)))
    with safe_open(args.l4c_out, framework="pt") as f:
        if "logits" not in f.keys():
            fail("%s has no tensor 'logits'" % args.l4c_out)
        ours = f.get_tensor("logits").to(torch.float64)

    config = load_config(args.ckpt)
    model, problems = load_model(args.ckpt, config, torch)
    if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
        fail("input_ids outside [0, %d)" % config.vocab_size)

    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.to(torch.float64)
    if list(ours.shape) != list(ref.shape):
        fail("l4c logits have shape %s, HF's %s" % (list(ours.shape), list(ref.shape)))

    finite = bool(torch.isfinite(ours).all()) and bool(torch.isfinite(ref).all())
    max_abs = (ours - ref).abs().max().item()
    max_ref = ref.abs().max().item()
    rel = max_abs / max_ref if max_ref > 0 else max_abs
    agree = (ours.argmax(-1) == ref.argmax(-1)).double().mean().item()
    print("hf_check: input_ids %s, logits %s" % (list(ids.shape), list(ref.shape)))
    print("hf_check: max abs diff %.3e, max |hf| %.3e, relative error %.3e "
          "(limit %.1e); argmax agreement %.4f" % (max_abs, max_ref, rel, args.tol, agree))
    if not finite:
        problems.append("non-finite logits")
    if rel > args.tol:
        problems.append("relative error %.3e > %.1e" % (rel, args.tol))
    if problems:
        print("hf_check: FAIL: " + "; ".join(problems))
        return 1
    print("hf_check: PASS (relative error %.3e <= %.1e, %d-layer model, %d parameters)"
          % (rel, args.tol, config.num_hidden_layers,
             sum(p.numel() for p in model.parameters())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
