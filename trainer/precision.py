"""Numeric precision settings: which dtype training computes in, on which device.

The guarded optimizer step (loss scaling, clipping, finiteness) is `trainer.optim_step`; fp8
storage of the base weights is `trainer.fp8`.

Public API:
    PrecisionConfig(mixed_precision="auto", fp8_base=False, gradient_checkpointing=True,
                    save_dtype="fp16", max_grad_norm=1.0)   (the Precision node's defaults)
    compute_dtype(config) -> torch.dtype          dtype the forward pass computes in
    autocast(config, device) -> context manager   torch.autocast for bf16/fp16, no-op for fp32
    for_device(config, device) -> PrecisionConfig   mixed_precision "auto" -> bf16 / fp16 / fp32 for the device
    check_device_support(config, device) -> str | None
        warning text for a slow-but-working combination; raises ConfigError for an unusable one

Mixed precision keeps the LoRA parameters in fp32: autocast casts them to the compute dtype inside
each op, and their gradients and optimizer state stay fp32. Small LoRA updates would otherwise be
rounded away in bf16 (8 mantissa bits) or underflow in fp16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import ContextManager

import torch

from .errors import ConfigError

MIXED_PRECISIONS = ("bf16", "fp16", "fp32")
AUTO = "auto"  # the node's default: resolved per device by `for_device` before training
SAVE_DTYPES = ("fp16", "bf16", "fp32")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



@dataclass(frozen=True)
class PrecisionConfig:
    """How the training step handles numeric precision.

    mixed_precision: dtype the forward/backward pass computes in ("fp32", "bf16", "fp16"), or
        "auto" (pass the config through `for_device` before training).
    fp8_base: store the frozen base model's Linear/Conv2d weights as float8 to save memory.
    gradient_checkpointing: recompute activations in backward instead of keeping them (read by
        the model adapter; recorded here because it is part of the same memory/speed trade-off).
    save_dtype: dtype the LoRA file is written in.
    max_grad_norm: clip the total gradient norm to this value; 0 turns clipping off.
    """

    mixed_precision: str = AUTO
    fp8_base: bool = False
    gradient_checkpointing: bool = True
    save_dtype: str = "fp16"
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISIONS + (AUTO,):
            raise ConfigError(
                "mixed_precision",
                f"expected one of {', '.join(MIXED_PRECISIONS + (AUTO,))}, got {self.mixed_precision!r}; "
                "pick bf16 on recent NVIDIA GPUs, fp16 on older ones, fp32 on CPU",
            )
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(
                "save_dtype",
                f"expected one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}; "
                "fp16 is what most LoRA loaders expect",
            )
        for name in ("fp8_base", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"expected true or false, got {getattr(self, name)!r}")
        norm = self.max_grad_norm
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm < 0:
            raise ConfigError(
                "max_grad_norm",
                f"expected a finite number >= 0, got {norm!r}; use 1.0 for the usual clipping or 0 to turn it off",
            )


def for_device(config: PrecisionConfig, device: str | torch.device) -> PrecisionConfig:
    """`config` with mixed_precision "auto" made concrete for the device: bf16 on GPUs with native
    bf16 (NVIDIA Ampere / RTX 30xx and newer), fp16 with loss scaling on older GPUs, fp32 on CPU
    (and Apple MPS), where there is no fast half-precision matrix multiply. Others pass through."""
    if config.mixed_precision != AUTO:
        return config
    dev = torch.device(device)
    if dev.type == "cuda":
        chosen = "bf16" if _cuda_has_native_bf16(dev) else "fp16"
    else:
        chosen = "fp32"
    return dataclasses.replace(config, mixed_precision=chosen)


def compute_dtype(config: PrecisionConfig) -> torch.dtype:
    """The dtype the forward and backward pass compute in."""
    return _DTYPES[config.mixed_precision]


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def autocast(config: PrecisionConfig, device: str | torch.device) -> ContextManager:
    """Context for the forward pass (and loss): torch.autocast in bf16/fp16, a no-op in fp32.

    Run backward outside it, as torch recommends. Parameters are not converted: fp32 LoRA
    parameters are cast per op, so their gradients arrive in fp32.
    """
    if config.mixed_precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=compute_dtype(config))


def _cuda_has_native_bf16(device: torch.device) -> bool:
    # Recent torch reports bf16 as "supported" on pre-Ampere GPUs through slow emulation; only
    # native support is worth training in.
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        return bool(torch.cuda.is_bf16_supported())


def check_device_support(config: PrecisionConfig, device: str | torch.device) -> str | None:
    """Check the precision settings against the device.

    Returns a warning to show the user when the combination works but is a poor choice (None when
    all is well); raises ConfigError when it cannot work.
    """
    dev = torch.device(device)
    warnings: list[str] = []
    if config.mixed_precision == "bf16" and dev.type == "cuda" and not _cuda_has_native_bf16(dev):
        raise ConfigError(
            "mixed_precision",
            "this GPU has no native bf16 support (it needs an NVIDIA Ampere / RTX 30xx or newer); "
            "choose fp16 (with loss scaling) or fp32",
        )
    if dev.type == "cpu" and config.mixed_precision in ("bf16", "fp16"):
        warnings.append(
            f"mixed_precision {config.mixed_precision} on CPU: most CPUs have no fast "
            f"{config.mixed_precision} matrix multiply, so training can be many times slower than "
            "in fp32; fp32 is recommended on CPU"
        )
    if config.fp8_base and dev.type == "mps":
        raise ConfigError(
            "fp8_base", "Apple MPS devices do not support float8 tensors; turn fp8_base off"
        )
    return "\n".join(warnings) if warnings else None
