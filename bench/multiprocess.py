"""Images per second of the multi-process command at 1 vs 2 processes (CPU, gloo), same global batch.

    COMFYUI_PATH=/path/to/ComfyUI python bench/multiprocess.py [--steps 40] [--reps 2] [--global-batch 4]

Each run is `python <pack> train --processes P --batch-size G/P` on the tiny SD1.5 checkpoint
(8 images at 64 px, fp32, seed 5): the same global batch G, so the same training. The figure is
the training loop's own time (rank 0, first step to last; ComfyUI's import, model load and dataset
encoding are left out), images/s = steps x G / seconds. Configurations, interleaved per repetition:
    1 process, 1 thread      the baseline (ratios below are against it)
    1 process, all threads   torch's intra-op threads over every core
    P processes, 1 thread each (torchrun's default OMP_NUM_THREADS=1)
On a CPU the processes share the cores, so this shows the cost of the collectives and of splitting
the batch, not a GPU's speed-up; the machine's core count is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Assets, comfyui_path, loadavg  # noqa: E402


def run(assets: Assets, root: Path, processes: int, threads: int, global_batch: int, steps: int) -> float:
    out = root / f"p{processes}t{threads}"
    cmd = [sys.executable, str(REPO), "train", "--comfyui", str(assets.comfyui), "--checkpoint", str(assets.checkpoint),
           "--dataset", str(assets.dataset(8)), "--steps", str(steps), "--batch-size", str(global_batch // processes),
           "--resolution", "64", "--mixed-precision", "fp32", "--seed", "5", "--device", "cpu", "--processes", str(processes),
           "--cache-dir", str(root / "cache"), "--output", str(out / "lora"), "--rank-dump", str(out / "dump")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{r.stderr[-3000:]}")
    info = json.loads((out / "dump" / "rank0.json").read_text())
    return info["steps"] * info["global_batch"] / info["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    a = parser.parse_args()
    cores = os.cpu_count()
    configs = [(1, 1), (1, cores), (a.processes, 1)]
    with tempfile.TemporaryDirectory(prefix="lora_lab_bench_mp_") as tmp:
        assets = Assets(Path(tmp), comfyui_path())
        assets.build_checkpoint()
        results: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        for _ in range(a.reps):
            for processes, threads in configs:
                results[(processes, threads)].append(run(assets, Path(tmp), processes, threads, a.global_batch, a.steps))
    base = statistics.median(results[configs[0]])
    print(f"\n{cores} CPU cores, load average {loadavg()}; global batch {a.global_batch}, {a.steps} steps, {a.reps} repetitions\n")
    print("| processes x threads | images/s (median) | runs | vs 1 process, 1 thread |")
    print("| --- | --- | --- | --- |")
    for (processes, threads), values in results.items():
        med = statistics.median(values)
        print(f"| {processes} x {threads} | {med:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
