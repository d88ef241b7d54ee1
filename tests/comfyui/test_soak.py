"""Soak: 2,000 training steps with a preview every 100, in a real ComfyUI on CPU, must not leak.

The tiny SD1.5-format model at 64 px. While it trains, the server's resident memory (VmRSS from
/proc/<pid>/status) is sampled with the live step (GET /lora_lab/sessions). After warm-up the
memory must stay flat: the most it uses over steps 300-400 and over the last 100 steps differ by
less than 5 %. Each window holds previews, so sampling during training is part of what is
measured. The figures are printed (run with -s) and written to test-artifacts/soak.json.

It runs with the other real-ComfyUI tests (marker comfyui) and takes several minutes on an idle
2-core CPU. LORA_LAB_SOAK_STEPS shortens it while working on it (previews and windows scale with
it: every STEPS/20 steps, 15-20 % of the run against the last 5 %); a short run proves less.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
for p in (str(HERE), str(REPO_ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from tiny_models import DATASET_DIR_NAME, TINY_CKPT_NAME  # noqa: E402
from headless.workflow import CKPT, DATASET, LATENT, NEG, NETWORK, OPTIMIZER, POS, PRECISION, PREVIEW, TRAIN, TrainingOptions, training_prompt  # noqa: E402

STEPS = int(os.environ.get("LORA_LAB_SOAK_STEPS", "2000"))
PREVIEW_EVERY = max(1, STEPS // 20)  # 100 for 2,000 steps
WARM = (STEPS * 3 // 20, STEPS // 5)  # steps whose peak memory is the baseline: 300-400 of 2,000
MAX_GROWTH = 0.05
NODE = "91"
ARTIFACT = REPO_ROOT / "test-artifacts" / "soak.json"


def soak_prompt() -> dict:
    full = training_prompt(TrainingOptions(
        checkpoint=TINY_CKPT_NAME, dataset=DATASET_DIR_NAME, output_name="soak", resolution=64, steps=STEPS,
        mixed_precision="fp32", gradient_checkpointing=False, unet_lr=1e-3, scheduler="cosine", warmup_ratio=0.05,
        test_size=64, test_steps=4, test_cfg=2.0, test_prompt="a photo of sks object", preview_every=PREVIEW_EVERY,
    ))
    prompt = {k: full[k] for k in (CKPT, DATASET, NETWORK, OPTIMIZER, PRECISION, POS, NEG, LATENT, PREVIEW)}
    prompt[NODE] = dict(full[TRAIN], inputs=dict(full[TRAIN]["inputs"], mode="restart"))
    return prompt


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Sampler(threading.Thread):
    """(live step, resident bytes) of the server, every `every` seconds, until stopped."""

    def __init__(self, srv, every=0.5):
        super().__init__(daemon=True)
        self.srv, self.every, self.samples, self.error = srv, every, [], None
        self.stopped = threading.Event()

    def step(self) -> int | None:
        for s in self.srv.get_json("/lora_lab/sessions")["sessions"]:
            if s["key"] == f"train:{NODE}":
                return s["step"]
        return None

    def run(self):
        while not self.stopped.wait(self.every):
            try:
                step = self.step()
                if step is not None:
                    self.samples.append((step, rss_bytes(self.srv.proc.pid)))
            except Exception as e:  # reported by the test, not lost in a thread
                self.error = e
                return


def peak(samples, lo, hi) -> int:
    inside = [rss for step, rss in samples if lo <= step <= hi]
    assert len(inside) >= 3, f"only {len(inside)} memory samples between steps {lo} and {hi}"
    return max(inside)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_soak_2000_steps_with_previews_does_not_grow_memory(comfy_server):
    srv = comfy_server
    sampler = Sampler(srv)
    sampler.start()
    started = time.monotonic()
    try:
        entry = srv.run(soak_prompt(), timeout=3600)
    finally:
        sampler.stopped.set()
        sampler.join()
    seconds = time.monotonic() - started
    assert sampler.error is None, sampler.error
    ui = entry["outputs"][NODE]["lora_lab"][0]
    assert ui["step"] == STEPS
    previews = entry["outputs"][NODE]["images"]
    assert len(previews) == STEPS // PREVIEW_EVERY
    samples = sampler.samples
    warm = peak(samples, *WARM)
    end = peak(samples, STEPS - STEPS // 20, STEPS)
    growth = end / warm - 1
    figures = {
        "steps": STEPS, "seconds": round(seconds, 1), "seconds_per_step": round(seconds / STEPS, 4),
        "rss_warm_peak_mib": round(warm / 2**20, 1), "rss_end_peak_mib": round(end / 2**20, 1),
        "growth": round(growth, 4), "samples": len(samples),
        "rss_max_mib": round(max(r for _, r in samples) / 2**20, 1),
    }
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(dict(figures, trace=[[s, round(r / 2**20, 1)] for s, r in samples]), indent=1))
    print(f"\n[soak] {json.dumps(figures)}")
    assert growth < MAX_GROWTH, figures
