"""On-disk cache of encoded training images (latents + text conditioning), keyed by content.

Re-queueing a workflow, restarting ComfyUI or adding one image to a folder must not re-encode the
others: each image's variants are stored in one safetensors file named by a hash of its content,
its settings and the VAE/CLIP that encoded it. A cache file is trusted only if it verifies: its
recorded key and tensor checksum match and every tensor is finite; anything else (a partial write,
a tampered or foreign file) is ignored and rebuilt. safetensors only: nothing is unpickled.

Public API:
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

def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

def _path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"

def save_entry(cache_dir: str | os.PathLike, key: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = _path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
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
