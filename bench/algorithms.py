"""Step time and memory of LoKr, LoHa and DoRA vs plain LoRA at matched parameter count.

Standalone (no ComfyUI): a toy frozen model of `--layers` square Linear layers (width `--width`,
GELU between them) adapted by trainer.network exactly as in training (forward hooks, bypass form),
AdamW on the adapter, batch of `--tokens` tokens. Parameter counts are matched to LoRA at rank r
on a d x d layer (2·d·r):

    lora  rank r                          2·d·r
    dora  rank r                          2·d·r + d          (+ magnitude per input channel)
    loha  rank r/2                        4·d·(r/2) = 2·d·r  (works at rank (r/2)² inside)
    lokr  factor 4, rank (2·d·r − 16)/(d/2)  16 + 2·(d/4)·rank  ≈ 2·d·r

Measured, per algorithm, interleaved over `--reps` repetitions (ratios to LoRA per repetition,
median reported):
- step time: median wall time of `--steps` full steps (forward, backward, optimizer step) after a
  warm-up, one compute thread on CPU (torch.set_num_threads(1)); CUDA timings synchronise.
- saved for backward: bytes autograd keeps between forward and backward (saved_tensors_hooks),
  not counting the frozen weights and the model input: the activation memory the adapter adds.
- peak memory (CUDA only): torch.cuda.max_memory_allocated of one step above the memory before it.

    python bench/algorithms.py                      # CPU, d=1024, 4 layers, 512 tokens, r=16
    python bench/algorithms.py --device cuda --width 3072 --tokens 4096
Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.network import LoRANetwork, NetworkConfig, Target  # noqa: E402

ALGORITHMS = ("lora", "dora", "loha", "lokr")


def configs(width: int, rank: int) -> dict[str, NetworkConfig]:
    lokr_rank = max(1, round((2 * width * rank - 16) / (width // 2)))
    return {
        "lora": NetworkConfig(rank=rank, alpha=rank),
        "dora": NetworkConfig(rank=rank, alpha=rank, algorithm="dora"),
        "loha": NetworkConfig(rank=max(1, rank // 2), alpha=max(1, rank // 2), algorithm="loha"),
        "lokr": NetworkConfig(rank=lokr_rank, alpha=lokr_rank, algorithm="lokr", lokr_factor=4),
    }


def toy_model(width: int, layers: int, device, dtype) -> nn.Sequential:
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods).to(device, dtype).requires_grad_(False)


def saved_bytes(model, network, x) -> int:
    frozen = {t.untyped_storage().data_ptr() for t in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen and ptr not in seen and not isinstance(t, nn.Parameter):
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), network.applied():
        model(x).float().pow(2).mean().backward()
    network.zero_grad(set_to_none=True)
    return total[0]


def measure(config: NetworkConfig, args, device) -> dict:
    torch.manual_seed(0)
    model = toy_model(args.width, args.layers, device, torch.float32)
    targets = [Target(f"lora_unet_l{i}", m, "linear") for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    network = LoRANetwork(targets, config).to(device)
    opt = torch.optim.AdamW(network.parameters(), lr=1e-4)
    x = torch.randn(args.tokens, args.width, device=device)
    target = torch.randn_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        with network.applied():
            loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    return {"params": sum(p.numel() for p in network.parameters()), "step_s": statistics.median(times),
            "saved_bytes": saved_bytes(model, network, x), "peak_bytes": peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cfgs = configs(args.width, args.rank)
    runs = {a: [] for a in ALGORITHMS}
    for _ in range(args.reps):  # interleaved: every algorithm once per repetition
        for a in ALGORITHMS:
            runs[a].append(measure(cfgs[a], args, device))
    rows = {}
    for a in ALGORITHMS:
        ratio = lambda key: statistics.median(r[key] / base[key] for r, base in zip(runs[a], runs["lora"]))  # noqa: E731
        rows[a] = {"params": runs[a][0]["params"], "step_s": statistics.median(r["step_s"] for r in runs[a]),
                   "step_ratio": ratio("step_s"), "saved_bytes": runs[a][0]["saved_bytes"],
                   "saved_ratio": runs[a][0]["saved_bytes"] / runs["lora"][0]["saved_bytes"],
                   "peak_ratio": ratio("peak_bytes") if device.type == "cuda" else None,
                   "step_ratio_range": [min(r["step_s"] / b["step_s"] for r, b in zip(runs[a], runs["lora"])),
                                        max(r["step_s"] / b["step_s"] for r, b in zip(runs[a], runs["lora"]))]}
    print(f"{args.device}: {args.layers} x Linear({args.width}, {args.width}), {args.tokens} tokens, matched to LoRA rank {args.rank}, {args.reps} reps x {args.steps} steps")
    print("| algorithm | params | step time vs LoRA (min-max) | saved for backward vs LoRA | peak memory vs LoRA |")
    print("|---|---|---|---|---|")
    for a, r in rows.items():
        peak = f"{r['peak_ratio']:.2f}x" if r["peak_ratio"] is not None else "n/a (CPU)"
        lo, hi = r["step_ratio_range"]
        print(f"| {a} (rank {cfgs[a].rank}) | {r['params']:,} | {r['step_ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['saved_ratio']:.2f}x | {peak} |")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
