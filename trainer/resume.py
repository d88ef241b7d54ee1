"""Resumable training states on disk: a session's whole state in one safetensors file, no pickle.

A LoRA file holds only the weights; a state also holds what continuing needs — the optimizer's
moments, the step, the schedule's cycles, the loss scaler, the history, the spec that trained —
plus the fingerprint of what it was trained on (model, dataset, settings) and the step the run was
heading for. Every random draw of a step is derived from (seed, step), so no generator state is
needed: resuming gives the loss sequence of an uninterrupted run.

Tensors are the safetensors payload; everything else is JSON in the header. States are written
atomically (temp file + rename) into a folder of their own, so they never appear among LoRAs.

Public API:
    STATE_SUFFIX
    save_state(path, session, fingerprint, target_step) -> Path
    load_state(path) -> SavedState(tensors, metadata, fingerprint, target_step, step)
    changed_parts(saved, current) -> list[str]     the fingerprint parts that differ
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import LoRALabError
from .io import atomic_write

STATE_SUFFIX = ".state.safetensors"
_FINGERPRINT = "lora_lab_fingerprint"
_TARGET = "lora_lab_target_step"
_STATE = "lora_lab_state"


@dataclass(frozen=True)
class SavedState:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]  # what Session.load_state_dict reads
    fingerprint: dict[str, str]
    target_step: int
    step: int


def save_state(path: str | os.PathLike, session, fingerprint: dict[str, str], target_step: int) -> Path:
    path = Path(path)
    tensors, meta = session.state_dict()
    header = {**meta, _FINGERPRINT: json.dumps(fingerprint, sort_keys=True), _TARGET: str(int(target_step))}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, safetensors_bytes(tensors, header))
    return path


def load_state(path: str | os.PathLike) -> SavedState:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        fingerprint = json.loads(header[_FINGERPRINT])
        target = int(header[_TARGET])
        step = int(json.loads(header[_STATE])["step"])
    except FileNotFoundError:
        raise LoRALabError(f"{path.name} does not exist any more; refresh the page and pick again.") from None
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise LoRALabError(f"{path.name} is not a LoRA Lab training state or is damaged ({type(e).__name__}); pick another one.") from None
    return SavedState(tensors, {_STATE: header[_STATE]}, fingerprint, target, step)


def changed_parts(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    return [k for k in current if saved.get(k) != current[k]] + [k for k in saved if k not in current]
