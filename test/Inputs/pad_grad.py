#!/usr/bin/env python3
"""pad_token_id (nn.Embedding's padding_idx) in train plans: helpers for
test/l4-run/train-pad-token.test. Only the standard library is used.

usage:
  pad_grad.py setpad SRC DST PAD INPUTS
      DST/config.json = SRC/config.json with pad_token_id = PAD and
      DST/model.safetensors a link to SRC's; fails unless PAD occurs in
      INPUTS' input_ids (a pad id that never occurs would test nothing).
  pad_grad.py check CKPT PADDED PLAIN
      PADDED and PLAIN are l4-run train outputs for the same weights and
      inputs, with and without pad_token_id (read from CKPT/config.json).
      Checks that the gradient row PAD of model.embed_tokens.weight is zero
      in PADDED (untied) or still carries lm_head's part (tied: nonzero and
      different from PLAIN's), that PLAIN's row is nonzero, and that every
      other value (loss, other rows, every other gradient) is bit-identical.
"""
import json
import os
import struct
import sys

EMBED = "grad.model.embed_tokens.weight"


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    out = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        fmt = {"F32": "f", "I64": "q", "F64": "d", "I32": "i"}[t["dtype"]]
        raw = data[b:e]
        out[name] = (t["shape"], struct.unpack("<%d%s" % (len(raw) // struct.calcsize(fmt), fmt), raw))
    return out


def fail(msg):
    print("pad_grad: FAIL: " + msg)
    sys.exit(1)


def setpad(src, dst, pad, inputs):
    pad = int(pad)
    ids = read(inputs)["input_ids"][1]
    count = ids.count(pad)
    if count == 0:
        fail("pad id %d does not occur in %s" % (pad, inputs))
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if "text_config" in config:
        config["text_config"]["pad_token_id"] = pad
    else:
        config["pad_token_id"] = pad
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    link = os.path.join(dst, "model.safetensors")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(os.path.join(src, "model.safetensors")), link)
    print("pad_token_id %d occurs %d times in input_ids" % (pad, count))


def check(ckpt, padded_path, plain_path):
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    text = config.get("text_config", config)
    pad = text["pad_token_id"]
    tied = bool(text.get("tie_word_embeddings", False))
    padded, plain = read(padded_path), read(plain_path)
    if sorted(padded) != sorted(plain):
        fail("the two outputs hold different keys")
    for name in sorted(plain):
        if name == EMBED or not (name == "loss" or name.startswith("grad.")):
            continue
        if padded[name] != plain[name]:
            fail("%s differs between the padded and the plain run" % name)
    shape, a = padded[EMBED]
    _, b = plain[EMBED]
    vocab, dim = shape
    for r in range(vocab):
        if r != pad and a[r * dim:(r + 1) * dim] != b[r * dim:(r + 1) * dim]:
            fail("row %d of %s differs (only row %d should)" % (r, EMBED, pad))
    row, plain_row = a[pad * dim:(pad + 1) * dim], b[pad * dim:(pad + 1) * dim]
    if not any(plain_row):
        fail("row %d is already zero without pad_token_id" % pad)
    nonzero = sum(1 for x in row if x != 0.0)
    if tied:
        if nonzero == 0 or row == plain_row:
            fail("tied: row %d should keep lm_head's gradient only" % pad)
        print("pad row %d (tied): lm_head's part only, %d of %d nonzero" % (pad, nonzero, dim))
    else:
        if nonzero:
            fail("row %d has %d nonzero values" % (pad, nonzero))
        print("pad row %d (untied): zero, %d of %d nonzero" % (pad, nonzero, dim))
    print("other rows, loss and other gradients: bit-identical")


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "setpad":
        setpad(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "check":
        check(*sys.argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
