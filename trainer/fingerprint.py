"""A cheap identity of a model's weights that still covers every tensor.

"Is this the model this LoRA was trained on?" and "were these latents encoded by this VAE?" are
asked on every queue. Hashing gigabytes each time is too slow, and hashing a few tensors misses a
merge or a fine-tune that changed only the middle of the model. This hashes every tensor's name,
shape and an evenly strided sample of its values (at least SAMPLES_MIN per tensor, one in
SAMPLE_STRIDE for large ones): any realistic change of a weight tensor (a merge, a fine-tune, a
re-saved file with other values) changes the sample, and the cost stays far below reading the
whole model (see bench/fingerprint.py).

Values are compared at fp16 precision with the storage dtype left out, so a model that was cast
fp32 -> fp16 on load (ComfyUI does this for text encoders on some devices) is still the same model.

`originals` replaces tensors by the values they had before someone patched them in place:
ComfyUI writes a LoRA's delta into the shared weights when a patched clone is loaded and keeps
the unpatched tensor in a backup; the identity of the model is the unpatched one.

Public API:
    weights_fingerprint(tensors, originals=None, skip=()) -> str     16 hex digits
    sample_stride(numel) -> int                                       every how many values are sampled
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

SAMPLES_MIN = 64  # every tensor contributes at least this many values (all of a smaller one)
SAMPLE_STRIDE = 1024  # large tensors: one value in this many


def sample_stride(numel: int) -> int:
    """Every this many values of a flattened tensor are sampled (1: all of them)."""
    count = min(numel, max(SAMPLES_MIN, numel // SAMPLE_STRIDE))
    return max(1, numel // max(count, 1))


def _sample_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    # A strided view (no index tensor to build), and the last value, so both ends are covered.
    picked = torch.cat([flat[:: sample_stride(flat.numel())], flat[-1:]])
    if picked.is_complex():
        picked = torch.view_as_real(picked)
    if picked.is_floating_point():
        # fp16 precision, storage dtype left out: an fp32 -> fp16 cast is not another model.
        return picked.to("cpu", torch.float16).view(torch.int16).numpy().tobytes()
    return picked.to("cpu", torch.int64).numpy().tobytes()


def weights_fingerprint(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    originals: Mapping[str, torch.Tensor] | None = None,
    skip: tuple[str, ...] = (),
) -> str:
    """Identity of a set of named tensors (a state dict); see the module docstring.

    originals: name -> the unpatched tensor, used instead of the current one.
    skip: tensors whose name contains any of these parts are left out (e.g. weights a loader
    leaves uninitialised, whose bytes differ from one load to the next).
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    originals = originals or {}
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        if any(part in name for part in skip):
            continue
        t = originals.get(name, t)
        h.update(f"{name}{tuple(t.shape)}\x1f".encode())
        h.update(_sample_bytes(t))
    return h.hexdigest()[:16]
