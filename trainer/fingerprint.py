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
    patcher_fingerprint(patcher) -> str        a ComfyUI ModelPatcher: unpatched weights + its own patches
    encoder_fingerprint(encoder, module_name)  a CLIP / VAE (or a stand-in without a patcher)
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


# --- ComfyUI's model objects (read by attribute: this module imports no ComfyUI) -------------------


# SD1.5 files carry no CLIP text_projection: ComfyUI leaves that weight uninitialised, so its
# bytes differ from one load to the next (seen: NaN, then zeros). It never says which model it is.
UNINITIALISED = ("text_projection",)


def patcher_fingerprint(patcher) -> str:
    """Identity of what a ModelPatcher (MODEL, clip.patcher, vae.patcher) computes with: the
    unpatched weights plus this patcher's own patches.

    Loading a patched clone (Apply LoRA, a sweep, the Train node's MODEL output) writes its LoRA
    into the shared weights in place; ComfyUI keeps the original in the backup every clone shares,
    so the backup is what describes the base model.
    """
    originals = {k: b.weight for k, b in (getattr(patcher, "backup", None) or {}).items()}
    originals.update((k, v[0]) for k, v in (getattr(patcher, "hook_backup", None) or {}).items())
    base = weights_fingerprint(patcher.model.state_dict(keep_vars=True), originals, skip=UNINITIALISED)
    patches = getattr(patcher, "patches", None) or {}
    if not patches:
        return base
    described = []
    for key in sorted(patches, key=str):
        for n, patch in enumerate(patches[key]):
            numbers = [x for x in patch if isinstance(x, (int, float))]  # strengths
            described.append((f"{key}#{n}:{numbers}", torch.zeros(0)))
            described += [(f"{key}#{n}.{i}", t) for i, t in enumerate(_patch_tensors(patch))]
    return hashlib.sha256(f"{base}:{weights_fingerprint(described)}".encode()).hexdigest()[:16]


def encoder_fingerprint(encoder, module_name: str) -> str:
    """`patcher_fingerprint` of a CLIP or VAE (module_name: its "cond_stage_model" /
    "first_stage_model"); a stand-in without a patcher is described by that module alone."""
    patcher = getattr(encoder, "patcher", None)
    if patcher is not None and getattr(patcher, "model", None) is getattr(encoder, module_name):
        return patcher_fingerprint(patcher)
    return weights_fingerprint(getattr(encoder, module_name).state_dict(keep_vars=True), skip=UNINITIALISED)


def _patch_tensors(value, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor inside one of ComfyUI's patch entries (tuples, lists, weight adapters)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 4:
        return []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _patch_tensors(v, depth + 1)]
    inner = getattr(value, "weights", None)
    return _patch_tensors(inner, depth + 1) if inner is not None else []
