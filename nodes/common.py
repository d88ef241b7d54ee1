"""What every LoRA Lab node shares: type names, and turning engine errors into node errors."""

from __future__ import annotations

import functools

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
