"""Records the corpus of real training curves the diagnosis is tested on.

    python -m tests.trainer.curves.record        (from the repository root; a few minutes on a CPU)

A toy denoiser is first pretrained on synthetic images (gratings and blobs, each with a
conditioning vector that describes it), so that, like a real checkpoint, it already denoises
well before any LoRA is trained. Then LoRAs are trained on a new concept (ring patterns, marked
by a trigger token in the conditioning) through the engine's `Session`, with the settings of a
new user (8 images, rank 8, validation_split 0.25), and each run's History is written as JSON
next to this file with the verdict it must get. Runs with `held_out: true` were not looked at
while the thresholds in trainer/diagnosis.py were chosen.

Every run also measures concept bleed on a control set: 4 images the pretrained model itself
samples for grating and blob conditionings (what a LoRA for rings should leave alone); runs with
`reg: true` train 8 regularisation images beside the rings (the model's own samples of other
grating and blob conditionings, as kohya's class images are the base model's), at prior_loss_weight 1.

Everything is seeded: running it again writes the same files (on the same torch build).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tests.toys import ToyDenoiser, ToyUNet, make_network, sample_like_base
from trainer.data import Example
from trainer.errors import TrainingError
from trainer.loop import Session, TrainConfig
from trainer.objective import ObjectiveConfig, per_sample_loss
from trainer.optimizers import OptimizerConfig
from trainer.schedule import ScheduleConfig

HERE = Path(__file__).parent
SIZE, CHANNELS, CTX = 8, 4, (3, 8)
PRETRAIN_STEPS, PRETRAIN_BATCH = 1500, 32


def _grid():
    return torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")


def _pattern(kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic latent and the conditioning that describes it (its kind and parameters)."""
    yy, xx = _grid()
    p = torch.rand(6, generator=g)
    amp = 0.6 + 0.8 * torch.rand(CHANNELS, 1, 1, generator=g)
    phase = 6.28 * torch.rand(CHANNELS, 1, 1, generator=g)
    if kind == "grating":
        angle, freq = p[0] * 3.14, 1.5 + 3 * p[1]
        lat = amp * torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) * 3 + phase)
    elif kind == "blob":
        cx, cy, w = p[0] * 1.2 - 0.6, p[1] * 1.2 - 0.6, 0.2 + 0.4 * p[2]
        lat = amp * (2 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / w**2) - 0.5) * torch.cos(phase)
    else:  # "ring": the concept the LoRAs learn, never seen in pretraining
        cx, cy, freq = p[0] * 0.6 - 0.3, p[1] * 0.6 - 0.3, 4 + 3 * p[2]
        lat = amp * torch.cos(freq * ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() * 3 + phase)
    ctx = torch.zeros(CTX)
    ctx[0, :6] = p * 2 - 1
    ctx[1, :4] = phase.flatten() / 3.14 - 1
    ctx[1, 4:] = amp.flatten() - 1
    ctx[2, ["grating", "blob", "ring"].index(kind)] = 1.0  # the kind (the ring's trigger token)
    return lat, ctx + 0.05 * torch.randn(CTX, generator=g)


def pretrained_denoiser(steps: int = PRETRAIN_STEPS) -> ToyDenoiser:
    """A toy denoiser trained on gratings and blobs until it denoises them well."""
    d = ToyDenoiser(seed=0)
    torch.manual_seed(0)
    d.unet = ToyUNet(channels=CHANNELS, dim=32, ctx_dim=CTX[1])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(d.unet.parameters(), lr=2e-3)
    objective = ObjectiveConfig()
    for step in range(steps):
        pairs = [_pattern("grating" if i % 2 else "blob", g) for i in range(PRETRAIN_BATCH)]
        x0 = torch.stack([p[0] for p in pairs])
        conds = [p[1] for p in pairs]
        u = torch.rand(PRETRAIN_BATCH, generator=g)
        sigma = d.sigma_from_u(u)
        x = d.noise_input(x0, torch.randn(x0.shape, generator=g), sigma)
        loss = per_sample_loss(d.denoise(x, sigma, conds), x0, sigma, d.prediction, objective).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay: a settled model, like a released checkpoint
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    d.unet.requires_grad_(False)
    return d


def concept_images(n: int, seed: int = 7) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [Example([lat], [ctx], name=f"ring{i}") for i, (lat, ctx) in (enumerate(_pattern("ring", g) for _ in range(n)))]


def base_samples(denoiser: ToyDenoiser, n: int, seed: int, regularisation: bool = False) -> list[Example]:
    """What the pretrained model draws for `n` grating and blob conditionings: a control set, or
    regularisation images (class images the base model made, as kohya's usually are)."""
    g = torch.Generator().manual_seed(seed)
    conds = [_pattern("grating" if i % 2 else "blob", g)[1] for i in range(n)]
    latents = sample_like_base(denoiser, conds, (CHANNELS, SIZE, SIZE), seed * 1000)
    return [Example([lat], [c], name=f"base{i}", regularisation=regularisation) for i, (lat, c) in enumerate(zip(latents, conds))]


# name: (what it must be diagnosed as, held out from tuning, settings)
RUNS = {
    "healthy_2e-4_cosine": ("learning", False, dict(lr=2e-4)),
    "healthy_4e-4_cosine": ("learning", False, dict(lr=4e-4)),
    "healthy_2e-4_seed1": ("learning", True, dict(lr=2e-4, seed=1)),
    "converged_1e-3_constant_800_steps": ("converged", False, dict(lr=1e-3, steps=800, schedule="constant", reg=True)),
    "converged_1e-3_constant_seed1": ("converged", True, dict(lr=1e-3, steps=800, schedule="constant", seed=1, reg=True)),
    "diverged_0.5_constant": ("diverged", False, dict(lr=0.5, schedule="constant")),
    "diverged_0.2_constant_seed1": ("diverged", True, dict(lr=0.2, schedule="constant", seed=1)),
    "overfitting_6_images": ("overfitting", False, dict(lr=3e-3, steps=600, images=6, validation_split=0.34, rank=8)),
    "overfitting_5_images_seed1": ("overfitting", True, dict(lr=3e-3, steps=600, images=5, validation_split=0.4, rank=8, seed=1)),
    "not_learning_1e-7": ("not_learning", False, dict(lr=1e-7)),
    "not_learning_1e-7_seed1": ("not_learning", True, dict(lr=1e-7, seed=1)),
    "nan_1e8": ("nan", False, dict(lr=1e8, schedule="constant")),
    "healthy_2e-4_no_validation": ("no_trend", False, dict(lr=2e-4, validation_split=0.0)),
    "bleeding_1e-3_300_steps": ("bleeding", True, dict(lr=1e-3, steps=300)),
    "reg_images_1e-3_300_steps": ("learning", False, dict(lr=1e-3, steps=300, reg=True)),
}


def record(name: str, settings: dict, denoiser: ToyDenoiser) -> dict:
    s = dict(steps=80, images=8, validation_split=0.25, rank=8, seed=0, schedule="cosine", reg=False)
    s.update(settings)
    torch.manual_seed(s["seed"])
    network = make_network(denoiser, rank=s["rank"], alpha=float(s["rank"]))
    schedule = ScheduleConfig(name="cosine", warmup_ratio=0.05) if s["schedule"] == "cosine" else ScheduleConfig(name="constant")
    session = Session(
        denoiser,
        concept_images(s["images"]) + (base_samples(denoiser, 8, seed=5, regularisation=True) if s["reg"] else []),
        network,
        optimizer=OptimizerConfig(name="AdamW", unet_lr=s["lr"]),
        schedule=schedule,
        train=TrainConfig(steps=s["steps"], seed=s["seed"], validation_split=s["validation_split"]),
        control=base_samples(denoiser, 4, seed=99),
    )
    stopped = None
    try:
        session.run()
    except TrainingError as e:  # the NaN guard gave up: the history up to there is the record
        stopped = str(e)
    return {"name": name, "settings": s, "total_steps": session.total_steps, "stopped": stopped, "history": session.history.to_dict()}


def main() -> None:
    torch.set_num_threads(1)  # the toy is too small to gain from threads; they only contend
    denoiser = pretrained_denoiser()
    for name, (expected, held_out, settings) in RUNS.items():
        out = record(name, settings, denoiser)
        out.update(expected=expected, held_out=held_out)
        (HERE / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
        h = out["history"]
        print(f"{name:32s} base {h['base_val_loss']} val {[round(v, 4) for v in h['val_loss']]} nan {len(h['nan_steps'])} "
              f"bleed {[round(v / h['base_bleed_loss'] - 1, 3) for v in h['bleed_loss']]}")


if __name__ == "__main__":
    main()
