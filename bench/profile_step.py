"""Where one steady-state LoRA Lab step spends its time (CPU, in-process, the overhead.py setup).

    COMFYUI_PATH=/path/to/ComfyUI python bench/profile_step.py CHECKPOINT.safetensors [--steps 5]

Two views of the same steps (after 3 warm-up steps):
  - torch.profiler: the operators with the most self CPU time (the UNet's own math shows up as
    aten::convolution / addmm / bmm / softmax ... and their backward twins);
  - cProfile: Python self time grouped by where the code lives (LoRA Lab's trainer/, ComfyUI's
    comfy/, torch's Python), i.e. the interpreter overhead each layer adds around the operators.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import REPO, loadavg  # noqa: E402
from overhead import setup  # noqa: E402


def _area(filename: str) -> str:
    f = filename.replace("\\", "/")
    if f.startswith(str(REPO / "trainer")):
        return "LoRA Lab trainer/"
    if "/comfy/" in f:
        return "ComfyUI comfy/"
    if "/torch/" in f:
        return "torch (Python)"
    if f.startswith("~") or f.startswith("<"):
        return "built-in / C calls"
    return "other Python"


def python_time_by_area(session, steps: int) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    session.run(until_step=session.step + steps)
    prof.disable()
    stats = pstats.Stats(prof)
    areas: dict[str, float] = {}
    ours: list[tuple[float, str]] = []
    for (filename, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        area = _area(filename)
        areas[area] = areas.get(area, 0.0) + tt
        if area == "LoRA Lab trainer/":
            ours.append((tt, f"{Path(filename).name}:{line} {func}"))
    total = sum(areas.values())
    ours.sort(reverse=True)
    return {"self_seconds_per_step": {k: v / steps for k, v in sorted(areas.items(), key=lambda kv: -kv[1])},
            "total_seconds_per_step": total / steps,
            "top_trainer_functions": [{"function": name, "self_s_per_step": tt / steps} for tt, name in ours[:8]]}


def torch_profile(session, steps: int, rows: int = 15) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        session.run(until_step=session.step + steps)
    wall = (time.perf_counter() - t0) / steps
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    top = [{"op": e.key, "calls_per_step": e.count / steps, "self_s_per_step": e.self_cpu_time_total / 1e6 / steps,
            "share": e.self_cpu_time_total / 1e6 / steps / total_self if total_self else 0.0} for e in events[:rows]]
    return {"wall_s_per_step_profiled": wall, "op_self_s_per_step": total_self, "top": top, "torch": torch.__version__}


def run(checkpoint: Path, steps=5, log=print) -> dict:
    import torch

    with torch.inference_mode(False):
        _, session, _ = setup(checkpoint)
        session.run(until_step=3)
        t0 = time.perf_counter()
        session.run(until_step=session.step + steps)
        plain = (time.perf_counter() - t0) / steps
        ops = torch_profile(session, steps)
        py = python_time_by_area(session, steps)
    log(f"  {plain:.4f} s/step unprofiled; top op {ops['top'][0]['op']} {ops['top'][0]['share']:.0%} of op time")
    return {"steps": steps, "wall_s_per_step": plain, "load": loadavg(), "operators": ops, "python": py}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch compute threads")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    common.THREADS[0] = a.threads
    res = run(a.checkpoint, a.steps)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    else:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
