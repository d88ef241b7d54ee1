"""Cost of the weights fingerprint (trainer/fingerprint.py) on an SDXL-sized state dict.

    python bench/fingerprint.py [--params 2.6e9] [--dtype fp16] [--reps 3]

Builds a state dict of random tensors with SDXL-like shapes (UNet attention / feed-forward / conv
weights and their biases) holding about --params values, then times, best of --reps:
    names_only    hashing every name and shape, no values (the floor: what walking the dict costs)
    fingerprint   weights_fingerprint: names, shapes and a strided sample of every tensor
    full_hash     sha256 over every byte of every tensor (what "hash the whole model" costs)
Goal: fingerprint well under a second, and far below full_hash.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.fingerprint import weights_fingerprint  # noqa: E402

# (shape, count) per SDXL-style transformer block at width 1280, plus a ResBlock's convs.
BLOCK = [((1280, 1280), 8), ((1280, 2048), 2), ((10240, 1280), 1), ((1280, 5120), 1), ((1280,), 12)]
RESBLOCK = [((1280, 1280, 3, 3), 2), ((1280, 1280), 1), ((1280,), 6)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sdxl_like(params: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd, total, n = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    while total < params:
        for shape, count in (BLOCK * 10 + RESBLOCK) if n % 2 == 0 else BLOCK:
            for _ in range(count):
                t = torch.empty(shape, dtype=dtype)
                t.view(-1)[:4096].copy_(torch.randn(min(4096, t.numel()), generator=g))  # random head, cheap
                t.view(-1)[4096:].fill_(0.01)
                sd[f"model.diffusion_model.block_{n}.t{len(sd)}"] = t
                total += t.numel()
        n += 1
    return sd


def names_only(sd) -> str:
    h = hashlib.sha256()
    for name, t in sorted(sd.items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
    return h.hexdigest()


def full_hash(sd) -> str:
    h = hashlib.sha256()
    for name, t in sorted(sd.items()):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def best_of(fn, sd, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(sd)
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=2.6e9)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    sd = sdxl_like(args.params, DTYPES[args.dtype])
    count = sum(t.numel() for t in sd.values())
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    print(f"state dict: {len(sd)} tensors, {count / 1e9:.2f} B values, {nbytes / 2**30:.1f} GiB {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    floor = best_of(names_only, sd, args.reps)
    fp = best_of(weights_fingerprint, sd, args.reps)
    full = best_of(full_hash, sd, 1)
    print(f"names_only   {floor:8.3f} s")
    print(f"fingerprint  {fp:8.3f} s   ({fp / floor:.1f}x names_only)")
    print(f"full_hash    {full:8.3f} s   (fingerprint is {full / fp:.0f}x faster)")
    print(f"goal: fingerprint < 1 s: {'met' if fp < 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
