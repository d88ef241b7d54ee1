"""LoRA Lab's training step vs a bare, hand-written LoRA loop on the same frozen UNet (CPU, in-process).

    COMFYUI_PATH=/path/to/ComfyUI python bench/overhead.py CHECKPOINT.safetensors [--steps 20] [--reps 3]

Both loops run in this process on the tiny SD1.5 checkpoint's UNet (loaded by ComfyUI's own
loader, forced to CPU), with the same data (8 seeded 4x8x8 latents = 64 px images, seeded 77x768
text conditioning), batch 1, fp32, no gradient checkpointing, and the same trainable parameters:
the LoRA Lab Network defaults (rank 16, alpha 16, every Linear / 1x1 conv in the transformer
blocks), AdamW (lr 1e-4, weight decay 0.01).

    bare    per step: draw t and noise, x_t = x0 + sigma * noise, eps = unet(x_t / sqrt(sigma^2 + 1), t,
            context), mse(eps, noise), backward, AdamW step, zero grads. Its LoRA is its own:
            a forward hook per target adding scale * B(A(x)).
    lora_lab  Session.run (trainer/loop.py) through trainer/comfy_adapter.py: the engine's step with
            everything it does by default (cosine schedule, gradient clipping at 1.0, finiteness
            checks, loss history, NaN-rollback snapshots), calling ComfyUI's BaseModel.apply_model.

In-process rather than over HTTP so that nothing but the two loops is timed: each repetition times
N steps of one then N steps of the other (interleaved, after 2 warm-up steps each), and the ratio
is taken per repetition.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import REPO, comfyui_path, import_comfy_cpu, loadavg, summary  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

N_EXAMPLES = 8
LATENT = (4, 8, 8)  # 64 px images
TEXT = (77, 768)
GOAL = 1.10


def load_denoiser(checkpoint: Path):
    """The checkpoint's UNet as LoRA Lab's ComfyDenoiser, loaded and trainable (CPU)."""
    import comfy.sd
    from trainer import comfy_adapter

    patcher = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    denoiser = comfy_adapter.ComfyDenoiser(patcher)
    denoiser.load()
    return denoiser


def make_examples(seed: int = 0):
    import torch
    from trainer.data import Example

    g = torch.Generator().manual_seed(seed)
    return [Example([torch.randn(*LATENT, generator=g)], [{"cross_attn": torch.randn(*TEXT, generator=g) * 0.5, "extra": {}}], 1, f"img{i}")
            for i in range(N_EXAMPLES)]


def lab_session(denoiser, examples, rank=16, alpha=16.0, seed=0, **network):
    """A Session from the recipe with the node defaults (LoRA Lab Train with no config nodes on CPU), fp32, no checkpointing."""
    from trainer import comfy_adapter, recipe
    from trainer.network import NetworkConfig
    from trainer.precision import PrecisionConfig
    from trainer.spec import TrainConfig, TrainingSpec

    spec = TrainingSpec(network=NetworkConfig(rank=rank, alpha=alpha, **network), precision=PrecisionConfig(mixed_precision="fp32", gradient_checkpointing=False),
                        train=TrainConfig(steps=100_000, seed=seed))
    return recipe.start_session(denoiser, comfy_adapter.unet_targets(denoiser.model, spec.network), examples, spec)


class BareLoop:
    """The minimal hand-written LoRA training loop (see the module docstring)."""

    def __init__(self, denoiser, examples, targets, rank=16, alpha=16.0, seed=0):
        import torch
        import torch.nn.functional as F

        self.unet = denoiser.model.diffusion_model
        self.sigmas = denoiser.model.model_sampling.sigmas.float()
        self.examples = examples
        self.scale = alpha / rank
        g = torch.Generator().manual_seed(seed)
        self.params, self.hooks, self.targets = [], [], []
        for t in targets:
            m = t.module
            conv = isinstance(m, torch.nn.Conv2d)
            n_in, n_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
            a = torch.nn.Parameter((torch.rand(rank, n_in, generator=g) * 2 - 1) / math.sqrt(n_in))
            b = torch.nn.Parameter(torch.zeros(n_out, rank))
            self.params += [a, b]
            self.targets.append((m, a, b, conv))
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.F = F

    def _hook(self, a, b, conv):
        F, s = self.F, self.scale
        if conv:
            return lambda m, args, out: out + F.conv2d(F.conv2d(args[0], a[:, :, None, None]), b[:, :, None, None]) * s
        return lambda m, args, out: out + F.linear(F.linear(args[0], a), b) * s

    def __enter__(self):
        self.hooks = [m.register_forward_hook(self._hook(a, b, conv)) for m, a, b, conv in self.targets]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def step(self) -> float:
        import torch

        g = self.gen
        ex = self.examples[int(torch.randint(0, len(self.examples), (1,), generator=g))]
        x0, c = ex.latents[0][None], ex.conds[0]["cross_attn"][None]
        t = torch.randint(0, len(self.sigmas), (1,), generator=g)
        sigma = self.sigmas[t]
        noise = torch.randn(x0.shape, generator=g)
        x = (x0 + sigma[:, None, None, None] * noise) / torch.sqrt(sigma**2 + 1)[:, None, None, None]
        eps = self.unet(x, t.float(), context=c)
        loss = self.F.mse_loss(eps, noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def time_bare(bare: BareLoop, n: int) -> float:
    with bare:
        t0 = time.perf_counter()
        for _ in range(n):
            bare.step()
        return (time.perf_counter() - t0) / n


def time_lab(session, n: int) -> float:
    t0 = time.perf_counter()
    session.run(until_step=session.step + n)
    return (time.perf_counter() - t0) / n


def setup(checkpoint: Path):
    import torch

    import_comfy_cpu(comfyui_path())
    torch.manual_seed(0)
    denoiser = load_denoiser(checkpoint)
    examples = make_examples()
    session = lab_session(denoiser, examples)
    bare = BareLoop(denoiser, examples, [t for t in _targets(session)], rank=16, alpha=16.0)
    return denoiser, session, bare


def _targets(session):
    from trainer.network import Target

    return [Target(name, session.network._bases[name], "") for name in session.network.loras]


def run(checkpoint: Path, steps=20, reps=3, warmup=2, log=print) -> dict:
    import torch

    with torch.inference_mode(False):
        _, session, bare = setup(checkpoint)
        lab_params = sum(p.numel() for p in session.params)
        bare_params = sum(p.numel() for p in bare.params)
        assert lab_params == bare_params, (lab_params, bare_params)
        time_bare(bare, warmup)
        time_lab(session, warmup)
        rows = []
        for rep in range(reps):
            b = time_bare(bare, steps)
            a = time_lab(session, steps)
            rows.append({"bare_s": b, "lab_s": a, "ratio": a / b, "load": loadavg()})
            log(f"  rep {rep + 1}/{reps}: bare {b:.4f} s/step, LoRA Lab {a:.4f} s/step, ratio {a / b:.3f}, load {rows[-1]['load'][0]}")
    ratio = summary([r["ratio"] for r in rows])
    return {
        "steps": steps, "reps": reps, "threads": torch.get_num_threads(), "trainable_params": lab_params,
        "lora_modules": len(session.network.loras), "rows": rows,
        "bare_s": summary([r["bare_s"] for r in rows]), "lab_s": summary([r["lab_s"] for r in rows]),
        "ratio": {**ratio, "goal": GOAL, "met": ratio["median"] <= GOAL},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="the tiny SD1.5 checkpoint (tests/comfyui/tiny_models.py writes it)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch compute threads")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    common.THREADS[0] = a.threads
    res = run(a.checkpoint, a.steps, a.reps)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    else:
        print(json.dumps({k: res[k] for k in ("bare_s", "lab_s", "ratio")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
