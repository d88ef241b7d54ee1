"""Every CPU benchmark in one command: prints the tables and writes bench/results/.

    COMFYUI_PATH=/path/to/ComfyUI python bench/run_all.py [--steps 20] [--reps 3] [--sections compare,overhead,caching,profile]

Sections (each module's docstring says exactly what it measures and how):
    compare   bench/compare.py       LoRA Lab vs ComfyUI's TrainLoraNode: s/step and peak RSS, fresh server each
    overhead  bench/overhead.py      LoRA Lab's step vs a bare hand-written LoRA loop, in-process
    caching   bench/caching.py       re-queue time to the first step; step time vs dataset size and rank
    profile   bench/profile_step.py  torch.profiler + cProfile of one steady-state step

Writes bench/results/<UTC time>.json (every raw number, the machine's load average at each
measurement) and bench/results/latest.md (the tables printed at the end). The in-process sections
run in child processes, so this process never imports ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import caching  # noqa: E402
import common  # noqa: E402
import compare  # noqa: E402

SECTIONS = ("overhead", "profile", "compare", "caching")
RESULTS = HERE / "results"


def log(msg: str) -> None:
    print(msg, flush=True)


def in_child(script: str, checkpoint: Path, args: list[str], threads: int) -> dict:
    """Runs an in-process benchmark in a child Python and returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, str(HERE / script), str(checkpoint), *args, "--threads", str(threads), "--json", str(out)]
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in r.stdout.splitlines():
            if line.startswith("  "):
                log(line)
        if r.returncode != 0:
            raise RuntimeError(f"{script} failed (rc={r.returncode}):\n{r.stdout[-4000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------- tables


def _ms(s) -> str:
    return f"{s['median'] * 1000:.0f} ms ({s['min'] * 1000:.0f}–{s['max'] * 1000:.0f})"


def _mib(s) -> str:
    return f"{s['median'] / 2**20:.0f} MiB ({s['min'] / 2**20:.0f}–{s['max'] / 2**20:.0f})"


def _ratio(s) -> str:
    return f"{s['median']:.2f}x ({s['min']:.2f}–{s['max']:.2f})"


def _met(d) -> str:
    return "met" if d["met"] else "NOT met"


def markdown(res: dict) -> str:
    out = [f"Run {res['started']} UTC on {res['machine']['cpus']} CPUs ({res['machine']['cpu']}), torch {res['machine']['torch']}, "
           f"{res['threads']} compute thread(s) per process; load average (1/5/15 min) at start {res['load_start']}, at end {res['load_end']}; "
           f"{res['seconds'] / 60:.1f} min. Medians with (min–max) over the repetitions.", ""]
    if "compare" in res:
        c = res["compare"]
        r = compare.analyse(c["runs"])  # recomputed from the raw runs, so --render shows every figure
        out += [f"### LoRA Lab vs ComfyUI TrainLoraNode ({c['reps']} interleaved repetitions, N = {c['steps']})", "",
                "| configuration | s/step | peak RSS (process) | peak RSS increase while training | trainable params (modules) |",
                "| --- | --- | --- | --- | --- |"]
        for cfg in c["runs"]:
            x = r[cfg]
            inc = _mib(x["train_peak_increment"]) if x["train_peak_increment"] else "n/a"
            p = x["params"]
            params = f"{p['low_rank_params'] + p['full_diff_params']:,} ({p['lora_modules']} LoRA modules" + (
                f" + {p['full_diff_params']:,} bias/norm diffs)" if p["full_diff_params"] else ")")
            out.append(f"| {cfg} | {_ms(x['step_s'])} | {_mib(x['peak_rss'])} | {inc} | {params} |")
        out += [""]
        for pair in ("default", "matched"):
            if f"speedup_{pair}" in r:
                s, m = r[f"speedup_{pair}"], r[f"memory_ratio_{pair}"]
                d = m["difference_bytes"]
                line = (f"- {pair}: built-in s/step ÷ LoRA Lab s/step = {_ratio(s)}, goal ≥ {s['goal']}x: **{_met(s)}**; "
                        f"LoRA Lab peak RSS ÷ built-in = {m['median']:.4f} (LoRA Lab − built-in: median {d['median'] / 2**20:+.1f} MiB, "
                        f"{d['min'] / 2**20:+.1f} to {d['max'] / 2**20:+.1f}), goal ≤ 1: **{_met(m)}**")
                t = r.get(f"train_increment_ratio_{pair}")
                if t:
                    line += f"; peak increase while training, LoRA Lab ÷ built-in = {_ratio(t)}: **{_met(t)}**"
                out.append(line)
        out.append("")
    if "overhead" in res:
        o = res["overhead"]
        out += [f"### Engine overhead vs a bare loop ({o['reps']} interleaved repetitions of {o['steps']} steps)", "",
                "| loop | s/step |", "| --- | --- |",
                f"| bare hand-written LoRA loop | {_ms(o['bare_s'])} |", f"| LoRA Lab Session | {_ms(o['lab_s'])} |", "",
                f"- LoRA Lab ÷ bare = {_ratio(o['ratio'])}, goal ≤ {o['ratio']['goal']}x: **{_met(o['ratio'])}** "
                f"({o['trainable_params']:,} trainable parameters in {o['lora_modules']} modules, both loops)", ""]
    if "caching" in res:
        q = res["caching"]["requeue"]
        out += ["### Re-queue: time to the first step (server-side seconds of a 1-step prompt)", "",
                "| prompt | seconds | dataset node |", "| --- | --- | --- |"]
        for k in ("first", "requeue", "after_free", "restarted"):
            out.append(f"| {k} | {q[k]['seconds']:.2f} | {q[k]['dataset']} |")
        s = q["speedup_requeue"]
        out += ["", f"- first ÷ requeue = {s['value']:.1f}x, goal ≥ {s['goal']}x: **{_met(s)}**; first ÷ after /free = "
                f"{q['speedup_after_free']:.1f}x; first ÷ restarted ComfyUI (disk cache only) = {q['speedup_restarted']:.1f}x", ""]
        sc = res["caching"]["scaling"]
        out += [f"### Step time vs dataset size and rank (N = {sc['steps']}, {sc['reps']} repetition(s))", "",
                "| case | s/step |", "| --- | --- |"]
        out += [f"| {k} | {_ms(v)} |" for k, v in sc["step_s"].items()]
        out.append("")
    if "profile" in res:
        p = res["profile"]
        ops = p["operators"]
        out += [f"### Profile of a steady-state LoRA Lab step ({p['steps']} steps; {p['wall_s_per_step'] * 1000:.0f} ms/step unprofiled)", "",
                "| operator (torch.profiler, self CPU) | calls/step | ms/step | share |", "| --- | --- | --- | --- |"]
        out += [f"| {t['op']} | {t['calls_per_step']:.0f} | {t['self_s_per_step'] * 1000:.1f} | {t['share']:.0%} |" for t in ops["top"]]
        py = p["python"]
        out += ["", "| Python self time (cProfile) by area | ms/step |", "| --- | --- |"]
        out += [f"| {k} | {v * 1000:.1f} |" for k, v in py["self_seconds_per_step"].items()]
        out += ["", "Top LoRA Lab functions by self time: " + "; ".join(
            f"{f['function']} {f['self_s_per_step'] * 1000:.2f} ms" for f in py["top_trainer_functions"][:5]), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="compare: N (prompts of N and 2N steps)")
    ap.add_argument("--reps", type=int, default=3, help="compare and overhead: interleaved repetitions")
    ap.add_argument("--overhead-steps", type=int, default=20)
    ap.add_argument("--scaling-steps", type=int, default=10, help="caching: N of the dataset-size / rank sweep")
    ap.add_argument("--scaling-reps", type=int, default=1)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per benchmark process (see common.THREADS)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, help="only print the tables of an earlier results JSON")
    a = ap.parse_args(argv)
    if a.render:
        log(markdown(json.loads(a.render.read_text())))
        return 0
    sections = [s for s in a.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    common.THREADS[0] = a.threads
    comfy = common.comfyui_path()
    started = time.time()
    res = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "machine": machine(), "threads": a.threads,
           "load_start": common.loadavg(), "args": vars(a) | {"out": str(a.out)}}
    work = Path(tempfile.mkdtemp(prefix="lora_lab_bench_"))
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    partial = a.out / f"{stamp}.partial.json"
    try:
        assets = common.Assets(work / "assets", comfy)
        log("building the tiny SD1.5 checkpoint ...")
        assets.build_checkpoint()
        for section in sections:
            log(f"== {section} (load {common.loadavg()})")
            if section == "overhead":
                res[section] = in_child("overhead.py", assets.checkpoint, ["--steps", str(a.overhead_steps), "--reps", str(a.reps)], a.threads)
            elif section == "profile":
                res[section] = in_child("profile_step.py", assets.checkpoint, ["--steps", str(a.profile_steps)], a.threads)
            elif section == "compare":
                res[section] = compare.run(assets, work, a.steps, a.reps, log=log)
            elif section == "caching":
                res[section] = {"requeue": caching.requeue(assets, work / "requeue", log=log),
                                "scaling": caching.scaling(assets, work / "scaling", a.scaling_steps, a.scaling_reps, log=log)}
            partial.write_text(json.dumps(res, indent=1))  # what is done survives a later failure
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_end"], res["seconds"] = common.loadavg(), time.time() - started
    (a.out / f"{stamp}.json").write_text(json.dumps(res, indent=1))
    partial.unlink(missing_ok=True)
    md = markdown(res)
    (a.out / "latest.md").write_text(md + "\n")
    log("\n" + md)
    log(f"\nwritten: {a.out / (stamp + '.json')} and {a.out / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
