"""On-disk cache of encoded training images (latents + text conditioning), keyed by content.

Re-queueing a workflow, restarting ComfyUI or adding one image to a folder must not re-encode the
others: each image's variants are stored in one safetensors file named by a hash of its content,
its settings and the VAE/CLIP that encoded it. A cache file is trusted only if it verifies: its
recorded key and tensor checksum match and every tensor is finite; anything else (a partial write,
a tampered or foreign file) is ignored and rebuilt. safetensors only: nothing is unpickled.

Public API:
    CACHE_FORMAT                                   part of every key: a new layout never reads old entries
    pack_conditioning(cond, v) -> dict[str, Tensor]    one variant's text-encoder output, for an entry
    unpack_conditioning(tensors, v) -> (cross_attn, pooled | None, extras)
    cache_key(*parts) -> str
    save_entry(cache_dir, key, tensors) -> Path        atomic (temp file + rename)
    load_entry(cache_dir, key) -> dict[str, Tensor] | None   None when missing or not verifiable
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

# 2: every entry of the conditioning is kept (attention masks, token counts, second text
# embeddings: what a model's extra_conds may read), not only cross_attn and pooled_output.
CACHE_FORMAT = "2"


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join((f"format{CACHE_FORMAT}",) + parts).encode()).hexdigest()


def pack_conditioning(cond: list, v: int) -> dict[str, torch.Tensor]:
    """A CLIP's conditioning ([[cross_attn [1, T, D], {name: value}]]) as cache tensors of variant v.

    cross_attn and pooled_output lose their batch dimension; other tensors are kept as they are
    (extra_conds reads them batched) and numbers become 0-d tensors. Values of other kinds (lists,
    strings) are not image conditioning a caption makes and are left out."""
    cross_attn, extras = cond[0][0], cond[0][1]
    out = {f"cross_attn.{v}": cross_attn[0].detach().cpu()}
    for name, value in extras.items():
        if name == "pooled_output":
            if value is not None:
                out[f"pooled.{v}"] = value[0].detach().cpu()
        elif isinstance(value, torch.Tensor):
            out[f"cond.{name}.{v}"] = value.detach().cpu()
        elif isinstance(value, (bool, int, float)):
            out[f"num.{name}.{v}"] = torch.tensor(value)
    return out


def unpack_conditioning(tensors: dict[str, torch.Tensor], v: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(cross_attn [T, D], pooled [D] or None, the other entries by name) of variant v."""
    extras = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        name, _, variant = rest.rpartition(".")
        if kind in ("cond", "num") and variant == str(v):
            extras[name] = t.item() if kind == "num" else t
    return tensors[f"cross_attn.{v}"], tensors.get(f"pooled.{v}"), extras

def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

def _path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"

def save_entry(cache_dir: str | os.PathLike, key: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Own copies: variants with the same caption share their conditioning tensors, which
    # safetensors refuses to write twice.
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"key": key, "checksum": _checksum(tensors)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

def load_entry(cache_dir: str | os.PathLike, key: str) -> dict[str, torch.Tensor] | None:
    path = _path(cache_dir, key)
    if not path.is_file():
        return None
    try:

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if meta.get("key") != key or meta.get("checksum") != _checksum(tensors):
        return None
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        return None
    return tensors
