"""What concept bleed costs a run, and what regularisation images do to it: the engine on the
pretrained toy of tests/trainer/curves/record.py (CPU, one thread), 300 steps, validation_split
0.25, with no control set, 2 control images (the default) and 4, with and without 8 reg images.

    python bench/bleed.py        (from the repository root; about a minute)

The bleed measurement is images x 4 noise levels forward passes (no backward) at each of the
run's 11 validations plus one at strength 0 (2 images: 96 forwards) against 300 steps x (forward
+ backward); a run of more steps validates as often (10 times), so its share shrinks with length. Generating the control images (ComfyUI's sampler, 8 steps each) happens once per
session in the Train node and is reported in its notes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.toys import make_network  # noqa: E402
from tests.trainer.curves import record  # noqa: E402
from trainer.loop import Session, TrainConfig  # noqa: E402
from trainer.optimizers import OptimizerConfig  # noqa: E402
from trainer.schedule import ScheduleConfig  # noqa: E402


def run(denoiser, control: int, reg: bool, repeats: int = 3) -> tuple[float, float | None]:
    best, rise = float("inf"), None
    for _ in range(repeats):
        torch.manual_seed(0)
        session = Session(
            denoiser, record.concept_images(8) + (record.base_samples(denoiser, 8, seed=5, regularisation=True) if reg else []),
            make_network(denoiser, rank=8, alpha=8.0), optimizer=OptimizerConfig(name="AdamW", unet_lr=1e-3),
            schedule=ScheduleConfig(name="cosine", warmup_ratio=0.05), train=TrainConfig(steps=300, seed=0, validation_split=0.25),
            control=record.base_samples(denoiser, control, seed=99) if control else None,
        )
        started = time.perf_counter()
        h = session.run()
        best = min(best, time.perf_counter() - started)
        rise = h.bleed_loss[-1] / h.base_bleed_loss - 1 if control else None
    return best, rise


def main() -> None:
    torch.set_num_threads(1)
    denoiser = record.pretrained_denoiser()
    plain, _ = run(denoiser, control=0, reg=False)
    for n in (2, 4):
        seconds, rise = run(denoiser, control=n, reg=False)
        _, rise_reg = run(denoiser, control=n, reg=True, repeats=1)
        print(f"{n} control images: 300 steps {seconds:.2f} s against {plain:.2f} s without (+{seconds / plain - 1:.1%}); "
              f"bleed at the end {rise:+.1%} without regularisation images, {rise_reg:+.1%} with 8 (prior_loss_weight 1.0)")


if __name__ == "__main__":
    main()
