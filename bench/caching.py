"""Re-queue speed (dataset cache + continued session), and step time vs dataset size and rank (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python bench/caching.py [--steps 10] [--reps 1]

Re-queue: LoRA Lab's graph (every widget at its default, 8 images at 64 px, mode 'continue') trains
one step per prompt, so a prompt's time is its time to the first step. Timed by the server:
    first          fresh ComfyUI, empty dataset cache: load the checkpoint, encode, build the session, 1 step
    requeue        the same prompt again: ComfyUI keeps the loaded model and the Dataset node's output,
                   the Train node continues its session
    after_free     after POST /free (models unloaded, node outputs dropped): the checkpoint is loaded
                   again and the Dataset node runs again, reading every image from the disk cache
    restarted      a new ComfyUI process on the same folders: nothing in memory, the disk cache only
Goal: requeue at least 2x faster than first.

Scaling: seconds per steady-state step ((T(2N) - T(N)) / N, see common.py) in one server, for
datasets of 8, 32 and 128 images (rank 16) and ranks 4, 16 and 64 (alpha = rank, 8 images); all
other widgets at their defaults. Per step the dataset size should not matter (the cached latents
are indexed, never re-read), and the LoRA's own cost grows with the rank.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Assets, Defaults, cached_nodes, comfyui_path, dataset_name, lab_prompt, loadavg, run_timed, summary  # noqa: E402

SIZES = (8, 32, 128)
RANKS = (4, 16, 64)
GOAL = 2.0


def _dataset_note(entry) -> str:
    if "2" in cached_nodes(entry):
        return "not run: output kept by ComfyUI"
    out = entry["outputs"].get("2", {}).get("text", [""])
    return str(out[0]).splitlines()[-1] if out and out[0] else "(no summary)"


def requeue(assets: Assets, base: Path, log=print) -> dict:
    srv = assets.server(base)
    prompt = None
    out = {}
    try:
        srv.start()
        prompt = lab_prompt(Defaults(srv), dataset_name(8), 1)
        for name, before in (("first", None), ("requeue", None), ("after_free", "free")):
            if before == "free":
                srv.free()
            seconds, entry = run_timed(srv, prompt)
            out[name] = {"seconds": seconds, "dataset": _dataset_note(entry), "load": loadavg()}
            log(f"  {name:10s} {seconds:7.2f} s  dataset: {out[name]['dataset']}")
    finally:
        srv.stop()
    srv = assets.server(base, fresh=False)
    try:
        srv.start()
        seconds, entry = run_timed(srv, prompt)
        out["restarted"] = {"seconds": seconds, "dataset": _dataset_note(entry), "load": loadavg()}
        log(f"  {'restarted':10s} {seconds:7.2f} s  dataset: {out['restarted']['dataset']}")
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
    speedup = out["first"]["seconds"] / out["requeue"]["seconds"]
    out["speedup_requeue"] = {"value": speedup, "goal": GOAL, "met": speedup >= GOAL}
    out["speedup_after_free"] = out["first"]["seconds"] / out["after_free"]["seconds"]
    out["speedup_restarted"] = out["first"]["seconds"] / out["restarted"]["seconds"]
    return out


def scaling(assets: Assets, base: Path, steps=10, reps=1, warmup=2, log=print) -> dict:
    cases = [("images", n, {"network": {"rank": 16, "alpha": 16.0}}) for n in SIZES]
    cases += [("rank", r, {"network": {"rank": r, "alpha": float(r)}}) for r in RANKS]
    srv = assets.server(base, datasets=SIZES)
    times: dict[str, list[float]] = {f"{k}={v}": [] for k, v, _ in cases}
    try:
        srv.start()
        d = Defaults(srv)

        def prompt(kind, value, kw, n):
            ds = dataset_name(value if kind == "images" else 8)
            p = lab_prompt(d, ds, n, train={"mode": "restart"}, **kw)
            p["6"]["inputs"]["output_name"] = f"{kind}{value}"
            return p

        for kind, value, kw in cases:  # encode every dataset once, before anything is timed
            run_timed(srv, prompt(kind, value, kw, warmup))
        for rep in range(reps):
            for kind, value, kw in cases:
                t_n, _ = run_timed(srv, prompt(kind, value, kw, steps))
                t_2n, _ = run_timed(srv, prompt(kind, value, kw, 2 * steps))
                times[f"{kind}={value}"].append((t_2n - t_n) / steps)
                log(f"  rep {rep + 1}/{reps} {kind}={value:<4d} {times[f'{kind}={value}'][-1]:.3f} s/step, load {loadavg()[0]}")
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {"steps": steps, "reps": reps, "step_s": {k: summary(v) for k, v in times.items()}, "load": loadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lora_lab_bench_"))
    try:
        assets = Assets(work / "assets", comfyui_path())
        assets.build_checkpoint()
        res = {"requeue": requeue(assets, work / "requeue"), "scaling": scaling(assets, work / "scaling", a.steps, a.reps)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
