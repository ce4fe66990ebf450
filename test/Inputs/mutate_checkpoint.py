#!/usr/bin/env python3
"""Writes a broken copy of a checkpoint folder for the l4c/l4-run error tests.

usage: mutate_checkpoint.py SRC DST MODE [ARG...]
  rename OLD NEW   rename a tensor
  drop NAME        remove a tensor
  halve NAME       keep the first half of a tensor's first dimension
  truncate N       cut model.safetensors to N bytes
  retype NAME DT   relabel a tensor's dtype (e.g. I32) keeping its bytes
  nan-rows NAME R..  set rows R.. of an F32 matrix to NaN
  same-rows NAME   set every row of an F32 matrix to its first
  bf16             store every F32 tensor as BF16 (round to nearest even):
                   the model a bf16 plan runs, as a checkpoint
  one-router S     every F32 router weight's rows become its first row
                   times S: a token's router logits share one sign and, for
                   a large S, saturate the sigmoid, so about half the
                   tokens get every expert's score exactly 0 (no expert)
Only the standard library is used (the safetensors layout is simple).
"""
import json
import os
import shutil
import struct
import sys


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    data = blob[8 + n:]
    tensors = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        tensors[name] = (t["dtype"], t["shape"], data[b:e])
    return tensors, meta


def write(path, tensors, meta):
    header, chunks, at = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        chunks.append(raw)
        at += len(raw)
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


def main():
    src, dst, mode, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    model = os.path.join(dst, "model.safetensors")
    if mode == "truncate":
        with open(os.path.join(src, "model.safetensors"), "rb") as f:
            blob = f.read()
        with open(model, "wb") as f:
            f.write(blob[: int(args[0])])
        return
    tensors, meta = read(os.path.join(src, "model.safetensors"))
    if mode == "rename":
        tensors = {(args[1] if k == args[0] else k): v for k, v in tensors.items()}
    elif mode == "drop":
        del tensors[args[0]]
    elif mode == "halve":
        dtype, shape, raw = tensors[args[0]]
        shape = [shape[0] // 2] + shape[1:]
        tensors[args[0]] = (dtype, shape, raw[: len(raw) // 2])
    elif mode == "bf16":
        for k, (dtype, shape, raw) in list(tensors.items()):
            if dtype != "F32":
                continue
            out = bytearray()
            for (u,) in struct.iter_unpack("<I", raw):
                if (u & 0x7FFFFFFF) > 0x7F800000:
                    h = (u >> 16) | 0x40
                else:
                    h = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
                out += struct.pack("<H", h)
            tensors[k] = ("BF16", shape, bytes(out))
    elif mode == "one-router":
        for k, (dtype, shape, raw) in list(tensors.items()):
            if not k.endswith(".router.weight") or dtype != "F32":
                continue
            row = [v * float(args[0]) for (v,) in struct.iter_unpack("<f", raw[: 4 * shape[1]])]
            tensors[k] = (dtype, shape, struct.pack("<%df" % len(row), *row) * shape[0])
    elif mode in ("nan-rows", "same-rows"):
        dtype, shape, raw = tensors[args[0]]
        width = 4 * shape[1]
        rows = [raw[i * width:(i + 1) * width] for i in range(shape[0])]
        for r in range(shape[0]):
            if mode == "same-rows":
                rows[r] = rows[0]
            elif str(r) in args[1:]:
                rows[r] = struct.pack("<f", float("nan")) * shape[1]
        tensors[args[0]] = (dtype, shape, b"".join(rows))
    elif mode == "retype":
        dtype, shape, raw = tensors[args[0]]
        tensors[args[0]] = (args[1], shape, raw)
    else:
        sys.exit("unknown mode " + mode)
    write(model, tensors, meta)


if __name__ == "__main__":
    main()
