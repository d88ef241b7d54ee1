"""A toy denoiser that follows the engine's Denoiser protocol, for fast CPU tests.

It has the structure the target presets look for — transformer-like blocks with attention and MLP
Linears, a 1x1 projection and a residual block with a 3x3 conv — in a few thousand parameters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from trainer.data import Example
from trainer.monitor import History
from trainer.network import LoRANetwork, NetworkConfig, find_targets


class ToyAttention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, ctx):
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.to_out(att @ v)


class ToyTransformer(nn.Module):
    def __init__(self, dim: int, ctx_dim: int):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.attn = ToyAttention(dim, ctx_dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, h, ctx):
        b, c, hh, ww = h.shape
        x = self.proj_in(h).flatten(2).transpose(1, 2)  # [B, HW, C]
        x = x + self.attn(x, ctx)
        x = x + self.ff(x)
        return h + self.proj_out(x.transpose(1, 2).reshape(b, c, hh, ww))


class ToyResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.emb = nn.Linear(1, dim)

    def forward(self, h, t):
        return h + torch.tanh(self.conv(h) + self.emb(t)[:, :, None, None])


class ToyUNet(nn.Module):
    def __init__(self, channels=4, dim=16, ctx_dim=8):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, dim, 3, padding=1)
        self.res = ToyResBlock(dim)
        self.block = ToyTransformer(dim, ctx_dim)
        self.conv_out = nn.Conv2d(dim, channels, 3, padding=1)

    def forward(self, x, t, ctx):
        h = self.conv_in(x)
        h = self.res(h, t)
        h = self.block(h, ctx)
        return self.conv_out(h)


class ToyDenoiser:
    """eps / v models in k-diffusion form over 1000 discrete sigmas; flow with sigma = u."""

    def __init__(self, prediction="eps", seed=0, device="cpu"):
        torch.manual_seed(seed)
        self.prediction = prediction
        self.device = torch.device(device)
        self.unet = ToyUNet().to(self.device).requires_grad_(False)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().to(self.device)

    def sigma_from_u(self, u):
        if self.prediction == "flow":
            return u.float()
        idx = (u * 1000).long().clamp(0, 999)
        return self.sigmas[idx]

    def noise_input(self, x0, noise, sigma):
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        if self.prediction == "flow":
            return (1 - s) * x0 + s * noise
        return x0 + s * noise

    def denoise(self, x, sigma, conds):
        ctx = torch.stack(conds).to(x.device)
        s = sigma.view(-1, 1, 1, 1)
        t = sigma.view(-1, 1).log() if self.prediction != "flow" else sigma.view(-1, 1)
        if self.prediction == "flow":
            return x - s * self.unet(x, t, ctx)  # velocity model: x0 = x - sigma * v
        c_in = 1 / (s**2 + 1).sqrt()
        out = self.unet(x * c_in, t, ctx)
        if self.prediction == "eps":
            return x - s * out
        # v-prediction in k-diffusion form
        c_skip, c_out = 1 / (s**2 + 1), -s / (s**2 + 1).sqrt()
        return c_skip * x + c_out * out

    def targets(self, config: NetworkConfig):
        return find_targets(self.unet, "lora_unet", ["ToyTransformer"], ["ToyResBlock"], config)


def make_network(denoiser: ToyDenoiser, **kw) -> LoRANetwork:
    config = NetworkConfig(**{"rank": 4, "alpha": 4.0, **kw})
    return LoRANetwork(denoiser.targets(config), config)


def make_examples(n=6, seed=1, shape=(4, 8, 8), repeats=1, ctx=(3, 8)) -> list[Example]:
    """Structured latents (smooth patterns) with a per-image conditioning vector."""
    g = torch.Generator().manual_seed(seed)
    out = []
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, shape[1]), torch.linspace(-1, 1, shape[2]), indexing="ij")
    for i in range(n):
        phase = torch.rand(shape[0], 1, 1, generator=g) * 6.28
        lat = torch.sin(3 * xx * (1 + i % 3) + phase) * torch.cos(2 * yy + phase) * 1.5
        out.append(Example([lat], [torch.randn(*ctx, generator=g)], repeats=repeats, name=f"img{i}"))
    return out


def frozen(module: nn.Module) -> nn.Module:
    """`module` with every parameter frozen (a base model's layers)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# --- synthetic loss histories (monitor and diagnosis tests) --------------------------------------

STEPS = 400
T = np.arange(1, STEPS + 1)  # the steps of a synthetic history


def noisy(level, seed, rel=0.45):
    """Per-step diffusion-like loss: the level times log-normal noise of `rel` relative spread."""
    rng = np.random.default_rng(seed)
    s = math.sqrt(math.log(1 + rel**2))
    return np.asarray(level) * np.exp(s * rng.standard_normal(len(level)) - s * s / 2)


def history_of(losses, lr=1e-4, val=()):
    h = History()
    for i, (step, loss) in enumerate(zip(T, losses)):
        h.record(int(step), float(loss), lr, i // 40)
    for step, loss in val:
        h.record_validation(step, loss)
    return h


@torch.no_grad()
def sample_like_base(denoiser, conds, shape, seed: int, steps: int = 12) -> list[torch.Tensor]:
    """What the base model draws for each conditioning: Euler steps from pure noise down the
    toy's noise schedule (the toy's stand-in for ComfyUI's sampler), one seed per image."""
    out = []
    for i, cond in enumerate(conds):
        g = torch.Generator().manual_seed(seed + i)
        us = torch.linspace(0.999, 0.0, steps + 1)
        sigmas = torch.cat([denoiser.sigma_from_u(us[:-1]), torch.zeros(1)])
        x = denoiser.noise_input(torch.zeros(1, *shape), torch.randn(1, *shape, generator=g), sigmas[:1])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x0 = denoiser.denoise(x, s.view(1), [cond])
            if denoiser.prediction == "flow":
                x = x + (s_next - s) * (x - x0) / s
            else:
                x = x0 + s_next * (x - x0) / s
        out.append(x[0])
    return out
