"""What every LoRA Lab node shares: type names, and turning engine errors into node errors."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from ..trainer.errors import ConfigError, LoRALabError

CATEGORY = "LoRA Lab"

DATASET = "LORALAB_DATASET"
NETWORK = "LORALAB_NETWORK"
OPTIMIZER = "LORALAB_OPTIMIZER"
PRECISION = "LORALAB_PRECISION"
LORA = "LORALAB_LORA"
HISTORY = "LORALAB_HISTORY"

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoRALabNodeError(Exception):
    """A user-facing error: ComfyUI shows its message on the node."""


def user_errors(fn):
    """Re-raises engine errors with their message only.

    ComfyUI logs the traceback of any exception a node raises; for a wrong input the message says
    everything and a stack of engine frames would only hide it, so it is raised afresh, short.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoRALabError as e:
            error = LoRALabNodeError(str(e))
        raise error

    return wrapper


def default_of(config_class) -> dict:
    """The defaults of an engine config dataclass, by field: widgets read theirs from here, so a
    default is written once, in the engine."""
    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


def save_into_loras(name: str, weights: dict, metadata: dict, save_dtype: str, field: str, overwrite: bool = False) -> Path:
    """Writes a LoRA as <loras folder>/<name>.safetensors (sub-folders allowed, never outside the
    folder; an existing file gets _2, _3... unless `overwrite`). `field` names the input on error."""
    import folder_paths

    from ..trainer.io import save_lora
    from ..trainer.paths import next_free, safe_child_path, write_error

    path = safe_child_path(folder_paths.get_folder_paths("loras")[0], name, field=field)
    try:
        if not overwrite:
            path = next_free(path, field=field)
        save_lora(path, weights, dict(metadata, ss_output_name=path.stem), dtype=SAVE_DTYPES[save_dtype])  # creates the folder
    except OSError as e:  # save_lora reports its own write errors; this is the rest (a file where a folder goes)
        raise write_error(path, e, field) from None
    return path


def loras_file(name: str, field: str) -> str:
    """Full path of a file picked from ComfyUI's loras folder in the input `field`."""
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ConfigError(field, f"{name!r} is not in the loras folder any more; refresh the page and pick again.")
    return path


def validation_message(build, *inputs) -> bool | str:
    """For VALIDATE_INPUTS: True when `build()` accepts the inputs, else the error text.

    `inputs` are the values `build` checks. An input linked to another node's output (a String
    node feeding `folder`) arrives as None before anything has run: it passes here and is checked
    when the node runs.
    """
    if any(value is None for value in inputs):
        return True
    try:
        build()
    except LoRALabError as e:
        return str(e)
    return True


class TrainedLoRA:
    """The LORALAB_LORA value: kohya-format weights plus what a saved file should say about them."""

    def __init__(self, weights: dict, metadata: dict, family: str, save_dtype: str = "fp16", session_key: str | None = None, name: str = "lora"):
        self.weights = weights
        self.metadata = metadata
        self.family = family
        self.save_dtype = save_dtype
        self.session_key = session_key
        self.name = name


class TrainingRecord:
    """The LORALAB_HISTORY value: a snapshot of the run for reports (it doesn't change later)."""

    def __init__(self, history, diagnosis, lr_plan: list, title: str):
        self.history = history
        self.diagnosis = diagnosis
        self.lr_plan = lr_plan
        self.title = title
