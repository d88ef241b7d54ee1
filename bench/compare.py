"""LoRA Lab vs ComfyUI's built-in TrainLoraNode on CPU: seconds per steady-state step and peak RSS.

    COMFYUI_PATH=/path/to/ComfyUI python bench/compare.py [--steps 20] [--reps 3] [--family qwen_image]

--family qwen_image runs both trainers on the tests' tiny seeded Qwen-Image (ComfyUI's own
QwenImage classes, stand-in text encoder and VAE of the real widths) instead of the tiny SD1.5.

Configurations (same tiny SD1.5 checkpoint, same 8 captioned 64x64 images, batch 1):
    lab_default      LoRA Lab Train + Network/Optimizer/Precision nodes, every widget at its default
    builtin_default  VAEEncode + TrainLoraNode, every widget at its default
    lab_matched      LoRA Lab at the built-in's rank (8, alpha 1 = its scale), fp32, its lr and
                     constant schedule, with 3x3 convs adapted too (the built-in adapts every weight)
    builtin_matched  TrainLoraNode with training_dtype and lora_dtype fp32
Both trainers keep gradient checkpointing at their (shared) default, on.

Each configuration runs in a fresh ComfyUI process (so its peak RSS is its own), in interleaved
repetitions (A B C D, A B C D, ...), and in each: a warm-up prompt of `warmup` steps (model load,
encoding), then prompts of N and 2N steps; seconds per step = (T(2N) - T(N)) / N from the
server's own timestamps (see common.py). Peak RSS is the server's VmHWM at the end (whole process:
the full-size CLIP and VAE of the checkpoint are most of it), and the training increment is the
VmHWM over the N/2N prompts above the RSS right before them (VmHWM reset via clear_refs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Assets, Defaults, ExecutionFailed, builtin_prompt, comfyui_path, dataset_name, failure_text, for_family, lab_prompt, loadavg,
    proc_status_bytes, reset_peak_rss, run_timed, summary,
)

MATCHED_RANK = 8

CONFIGS = {
    "lab_default": ("lab", {}),
    "builtin_default": ("builtin", {}),
    "lab_matched": ("lab", {
        "network": {"rank": MATCHED_RANK, "alpha": 1.0, "conv_rank": MATCHED_RANK, "conv_alpha": 1.0},
        "precision": {"mixed_precision": "fp32"},
        "optimizer": {"unet_lr": 5e-4, "scheduler": "constant"},
    }),
    "builtin_matched": ("builtin", {"overrides": {"training_dtype": "fp32", "lora_dtype": "fp32"}}),
}
GOALS = {"default": 1.5, "matched": 1.2}


def prompt_for(cfg: str, d: Defaults, steps: int, dataset: str, family: str = "sd15") -> dict:
    kind, kw = CONFIGS[cfg]
    if kind == "lab":
        p = lab_prompt(d, dataset, steps, train={"mode": "restart"}, **kw)
        p["7"] = {"class_type": "LoRALabSaveLoRA", "inputs": {"lora": ["6", 1], "filename": f"bench_{cfg}", "overwrite": True}}
        return for_family(p, family)
    return for_family(builtin_prompt(d, dataset, steps, save_prefix=f"bench_{cfg}", **kw), family)


def trainable_params(path: Path) -> dict:
    """Counts in a saved LoRA: low-rank factors vs full-size diffs (the built-in's biases and norms)."""
    low_rank = full = modules = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            n = f.get_slice(k).get_shape()
            count = 1
            for s in n:
                count *= s
            if k.endswith((".lora_up.weight", ".lora_down.weight")):
                low_rank += count
                modules += k.endswith(".lora_down.weight")
            elif not k.endswith(".alpha"):
                full += count
    return {"lora_modules": modules, "low_rank_params": low_rank, "full_diff_params": full}


def saved_file(srv, entry) -> Path:
    for out in entry["outputs"].values():
        for text in out.get("text", []):
            if str(text).endswith(".safetensors"):
                return Path(text)
    files = sorted((srv.output_dir / "loras").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    return files[-1]


def measure(assets: Assets, cfg: str, base: Path, steps: int, warmup: int, family: str = "sd15") -> dict:
    srv = assets.server(base, test_nodes=family != "sd15")
    srv.start()
    try:
        d = Defaults(srv)
        ds = dataset_name(8)
        pid = srv.proc.pid
        try:
            first, entry = run_timed(srv, prompt_for(cfg, d, warmup, ds, family))
        except ExecutionFailed as e:  # recorded, not hidden: e.g. the built-in trainer on a family it can't train
            return {"config": cfg, "failed": failure_text(e), "load": loadavg()}
        params = trainable_params(saved_file(srv, entry))
        rss_before = proc_status_bytes(pid, "VmRSS")
        hwm_before = proc_status_bytes(pid, "VmHWM")
        reset_ok = reset_peak_rss(pid)
        t_n, _ = run_timed(srv, prompt_for(cfg, d, steps, ds, family))
        t_2n, _ = run_timed(srv, prompt_for(cfg, d, 2 * steps, ds, family))
        hwm_train = proc_status_bytes(pid, "VmHWM")
        return {
            "config": cfg, "startup_s": srv.startup_seconds, "first_prompt_s": first, "t_n_s": t_n, "t_2n_s": t_2n,
            "step_s": (t_2n - t_n) / steps, "peak_rss": max(hwm_before, hwm_train), "rss_before_train": rss_before,
            "train_peak_increment": (hwm_train - rss_before) if reset_ok else None, "load": loadavg(), **params,
            "settings": d["TrainLoraNode"] if CONFIGS[cfg][0] == "builtin" else {
                k: d[c] for k, c in (("network", "LoRALabNetwork"), ("optimizer", "LoRALabOptimizer"), ("precision", "LoRALabPrecision"))},
        }
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def run(assets: Assets, work: Path, steps=20, reps=3, warmup=2, configs=tuple(CONFIGS), log=print, family="sd15") -> dict:
    runs = {c: [] for c in configs}
    for rep in range(reps):
        for cfg in configs:  # interleaved: every configuration once per repetition
            r = measure(assets, cfg, work / f"{cfg}_{rep}", steps, warmup, family)
            runs[cfg].append(r)
            if "failed" in r:
                log(f"  rep {rep + 1}/{reps} {cfg:16s} FAILED: {r['failed'][:300]}")
                continue
            log(f"  rep {rep + 1}/{reps} {cfg:16s} {r['step_s']:.3f} s/step, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, load {r['load'][0]}")
    failed = {c: rs[0]["failed"] for c, rs in runs.items() if rs and "failed" in rs[0]}
    ok = {c: rs for c, rs in runs.items() if c not in failed}
    return {"family": family, "steps": steps, "reps": reps, "warmup": warmup, "runs": runs, "results": {**analyse(ok), "failed": failed}}


def analyse(runs: dict) -> dict:
    out = {}
    for cfg, rs in runs.items():
        inc = [r["train_peak_increment"] for r in rs if r["train_peak_increment"] is not None]
        out[cfg] = {"step_s": summary([r["step_s"] for r in rs]), "peak_rss": summary([r["peak_rss"] for r in rs]),
                    "train_peak_increment": summary(inc) if inc else None,
                    "params": {k: rs[0][k] for k in ("lora_modules", "low_rank_params", "full_diff_params")}}
    for pair, goal in GOALS.items():
        lab, builtin = f"lab_{pair}", f"builtin_{pair}"
        if lab in runs and builtin in runs:
            per_rep = [b["step_s"] / a["step_s"] for a, b in zip(runs[lab], runs[builtin])]
            mem = [a["peak_rss"] / b["peak_rss"] for a, b in zip(runs[lab], runs[builtin])]
            diff = [a["peak_rss"] - b["peak_rss"] for a, b in zip(runs[lab], runs[builtin])]
            out[f"speedup_{pair}"] = {**summary(per_rep), "goal": goal, "met": summary(per_rep)["median"] >= goal}
            out[f"memory_ratio_{pair}"] = {**summary(mem), "goal": 1.0, "met": summary(mem)["median"] <= 1.0,
                                           "difference_bytes": summary(diff)}
            inc = [(a["train_peak_increment"], b["train_peak_increment"]) for a, b in zip(runs[lab], runs[builtin])]
            if all(x is not None and y for x, y in inc):
                out[f"train_increment_ratio_{pair}"] = {**summary([x / y for x, y in inc]), "goal": 1.0,
                                                        "met": summary([x / y for x, y in inc])["median"] <= 1.0}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="N: the measured prompts train N and 2N steps")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=2, help="steps of the warm-up prompt")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--family", default="sd15", choices=["sd15", "qwen_image"], help="the tiny model both trainers train")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lora_lab_bench_"))
    try:
        assets = Assets(work / "assets", comfyui_path())
        assets.build_checkpoint()
        res = run(assets, work, a.steps, a.reps, a.warmup, tuple(a.configs.split(",")), family=a.family)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text)
    print(json.dumps(res["results"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
