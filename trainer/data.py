"""Training examples and the order they are visited in.

An `Example` is one training image after encoding: its latent(s) and conditioning(s). Several
*variants* can be cached per image (the h-flipped latent, shuffled captions), and each visit picks
one, so augmentations cost one encode per variant instead of one per step.

Repeats follow kohya: an image in a folder named `10_name` is visited 10 times per epoch.

Batches are made inside buckets (examples whose latents have the same shape), because latents of
different aspect ratios cannot be stacked. The order is a pure function of (seed, epoch), so a
resumed run visits exactly the batches an uninterrupted one would.

Public API:
    Example(latents, conds, repeats=1, name="", extra={}, loss_weight=1.0, regularisation=False)
        a regularisation example (kohya's reg folder: class images) trains alongside the concept at
        its `loss_weight` (prior_loss_weight) and is never held out for validation
    most_common_bucket(examples) -> int   index of an example of the bucket seen most per epoch
    epoch_batches(examples, batch_size, seed, epoch) -> list[list[int]]
    batches_per_epoch(examples, batch_size) -> int
    collate(examples, picks) -> (latents [B,...], list of conds)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError


@dataclass
class Example:
    latents: list[torch.Tensor]  # variants, each [C, H, W] (or [C, T, H, W])
    conds: list[Any]  # variants of the conditioning; the model adapter knows their structure
    repeats: int = 1
    name: str = ""
    extra: dict = field(default_factory=dict)
    loss_weight: float = 1.0  # this example's share in the loss (kohya's prior_loss_weight for reg images)
    regularisation: bool = False

    def __post_init__(self):
        if not self.latents or not self.conds:
            raise ConfigError("dataset", f"example {self.name or '?'} has no latent or no conditioning.")
        shapes = {tuple(l.shape) for l in self.latents}
        if len(shapes) != 1:
            raise ConfigError("dataset", f"example {self.name}: latent variants differ in shape {sorted(shapes)}.")
        if self.repeats < 1:
            raise ConfigError("repeats", f"example {self.name}: repeats must be >= 1, got {self.repeats}.")
        if not self.loss_weight >= 0.0:
            raise ConfigError("prior_loss_weight", f"example {self.name}: a loss weight must be >= 0, got {self.loss_weight}.")

    @property
    def bucket(self) -> tuple[int, ...]:
        return tuple(self.latents[0].shape)


def _buckets(examples: list[Example]) -> dict[tuple[int, ...], list[int]]:
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, ex in enumerate(examples):
        buckets.setdefault(ex.bucket, []).extend([i] * ex.repeats)
    return buckets


def most_common_bucket(examples: list[Example]) -> int:
    """Index of the first example of the bucket visited most per epoch (repeats counted; ties:
    the larger bucket): the size a control image is generated at."""
    buckets = _buckets(examples)
    shape = max(buckets, key=lambda b: (len(buckets[b]), b))
    return buckets[shape][0]


def batches_per_epoch(examples: list[Example], batch_size: int) -> int:
    # Ragged last batches of each bucket are kept (a smaller batch), never dropped: with 8 images
    # dropping would lose data every epoch.
    return sum(-(-len(idx) // batch_size) for idx in _buckets(examples).values())


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of example indices for one epoch; deterministic in (seed, epoch)."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}.")
    g = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
    batches: list[list[int]] = []
    buckets = _buckets(examples)
    for key in sorted(buckets):
        idx = buckets[key]
        order = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        batches.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def collate(examples: list[Example], indices: list[int], picks: list[int]) -> tuple[torch.Tensor, list[Any]]:
    """Stacks the chosen variant of each example's latent; conds are returned as a list for the adapter."""
    latents = torch.stack([examples[i].latents[p % len(examples[i].latents)] for i, p in zip(indices, picks)])
    conds = [examples[i].conds[p % len(examples[i].conds)] for i, p in zip(indices, picks)]
    return latents, conds


def _mix(*values: int) -> int:
    """A stable 63-bit seed from several integers (Python's hash() is salted per process)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class EncodedDataset:
    """What the Dataset node hands to the Train node: encoded examples and what the user should know.

    Latents are the VAE's raw latents (what VAEEncode gives); conds are dicts with "cross_attn"
    [tokens, dim], optional "pooled_output" [dim] and "extra" (per-image size/crop conditioning).
    """

    examples: list[Example]
    fingerprint: str  # changes whenever any image, caption or encoding setting changes
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    # The control set (concept bleed): each control prompt's conditioning, in the format of conds
    # above, for the Train node to sample once with the base model; empty when turned off.
    control_prompts: list[str] = field(default_factory=list)
    control_conds: list[dict] = field(default_factory=list)
