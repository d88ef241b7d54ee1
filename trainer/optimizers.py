"""Optimizers for LoRA weights, built from one validated config.

Public API
----------
OPTIMIZERS
    The optimizer names a user can pick: AdamW, AdamW8bit, Lion, Lion8bit, SGD, Prodigy.
TYPICAL_LR
    A sensible starting lr for each optimizer (shown in error messages; nodes may offer it too).
OptimizerConfig(name="AdamW", unet_lr=1e-4, text_encoder_lr=5e-5, weight_decay=0.01,
                betas=(0.9, 0.999), eps=1e-8, momentum=0.9)
    Frozen, validated on construction (raises ConfigError naming the field).
check_available(name, device="cpu") -> str | None
    None when the optimizer can run on `device`; otherwise a message for the user that names the
    alternative and how to install the missing library. Imports the library and runs one real
    step on a small tensor, so a broken install is caught before training starts.
build_optimizer(config, param_groups, device="cpu") -> torch.optim.Optimizer
    `param_groups` maps "unet" and/or "text_encoder" to lists of parameters; empty lists are
    skipped. Each group gets its lr from the config and a "name" key ("unet"/"text_encoder").

What each name builds
---------------------
AdamW      torch.optim.AdamW (decoupled weight decay: w <- w * (1 - lr * weight_decay)).
AdamW8bit  bitsandbytes.optim.AdamW8bit. Tensors under 4096 elements keep 32-bit state (the
           library's default: quantising a few hundred values saves nothing and costs accuracy).
Lion       lion_pytorch.Lion (sign updates: wants a 3-10x smaller lr than AdamW; eps unused).
Lion8bit   bitsandbytes.optim.Lion8bit (as Lion, 8-bit state; eps unused).
SGD        torch.optim.SGD with Nesterov momentum (betas and eps unused; L2 weight decay).
Prodigy    prodigyopt.Prodigy: estimates the step size itself, so lr is a multiplier (1.0).
           It accepts only one lr for all trained weights, and is built with the settings its
           authors recommend for diffusion models (bias correction, safeguarded warmup,
           decoupled weight decay).
The optional libraries are imported only when their optimizer is used.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from numbers import Real

import torch

from .errors import ConfigError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGD", "Prodigy")

TYPICAL_LR = {
    "AdamW": 1e-4,
    "AdamW8bit": 1e-4,
    "Lion": 3e-5,
    "Lion8bit": 3e-5,
    "SGD": 1e-2,
    "Prodigy": 1.0,
}

GROUPS = ("unet", "text_encoder")

# name -> (module to import, pip package, what to pick instead)
_OPTIONAL = {
    "AdamW8bit": ("bitsandbytes", "bitsandbytes", "AdamW"),
    "Lion8bit": ("bitsandbytes", "bitsandbytes", "Lion"),
    "Lion": ("lion_pytorch", "lion-pytorch", "AdamW (with a 3-10x larger lr)"),
    "Prodigy": ("prodigyopt", "prodigyopt", "AdamW"),
}

# Large enough that bitsandbytes really uses its 8-bit path in the probe (its min_8bit_size).
_PROBE_NUMEL = 4096


def _lr_hint() -> str:
    return (
        "typical values: 1e-4 for AdamW/AdamW8bit, about 3e-5 for Lion/Lion8bit (Lion wants a 3-10x "
        "smaller lr), 1e-2 for SGD, 1.0 for Prodigy"
    )


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer choice and its settings; fields unused by the chosen optimizer are ignored."""

    name: str = "AdamW"
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                "optimizer",
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}.",
            )
        for field in ("unet_lr", "text_encoder_lr"):
            value = getattr(self, field)
            if not _is_number(value) or value <= 0:
                raise ConfigError(field, f"expected a learning rate > 0, got {value!r}; {_lr_hint()}.")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(
                "weight_decay",
                f"expected a value >= 0, got {self.weight_decay!r}; 0.01 is typical, 0 turns it off.",
            )
        betas = self.betas
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ConfigError(
                "betas",
                f"expected two numbers in [0, 1), got {betas!r}; (0.9, 0.999) is typical for AdamW, "
                "(0.9, 0.99) for Lion.",
            )
        # Lists arrive from JSON workflows; store a tuple so the config stays hashable and comparable.
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if not _is_number(self.eps) or self.eps <= 0:
            raise ConfigError("eps", f"expected a small value > 0, got {self.eps!r}; 1e-8 is typical.")
        # Nesterov momentum is undefined without momentum, hence the open lower bound.
        if not _is_number(self.momentum) or not 0.0 < self.momentum < 1.0:
            raise ConfigError(
                "momentum",
                f"expected a value in (0, 1) for SGD's Nesterov momentum, got {self.momentum!r}; "
                "0.9 is typical.",
            )


def _import(module: str):
    return importlib.import_module(module)


def _construct(name: str, groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    """Build optimizer `name` over `groups` (each with its own lr); imports lazily."""
    lr = groups[0]["lr"]  # the constructors require a default; every group overrides it
    wd = config.weight_decay
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps, weight_decay=wd)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True, weight_decay=wd)
    if name == "AdamW8bit":
        bnb = _import("bitsandbytes")
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=config.betas, eps=config.eps, weight_decay=wd)
    if name == "Lion8bit":
        bnb = _import("bitsandbytes")
        return bnb.optim.Lion8bit(groups, lr=lr, betas=config.betas, weight_decay=wd)
    if name == "Lion":
        lion = _import("lion_pytorch")
        return lion.Lion(groups, lr=lr, betas=config.betas, weight_decay=wd)
    if name == "Prodigy":
        prodigy = _import("prodigyopt")
        return prodigy.Prodigy(
            groups,
            lr=lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=wd,
            decouple=True,
            use_bias_correction=True,
            safeguard_warmup=True,
        )
    raise ConfigError("optimizer", f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def check_available(name: str, device: torch.device | str = "cpu") -> str | None:
    """None if optimizer `name` can run on `device`, else a message saying what to do instead."""
    if name not in OPTIMIZERS:
        return f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}."
    if name not in _OPTIONAL:
        return None  # part of torch itself
    module, package, alternative = _OPTIONAL[name]
    try:
        _import(module)
    except Exception as error:  # a broken install can fail with more than ImportError
        return (
            f"{name} needs the '{package}' library, which could not be loaded "
            f"({type(error).__name__}: {error}). Install it into ComfyUI's Python with "
            f"`pip install {package}`, or choose {alternative} instead."
        )
    try:
        param = torch.nn.Parameter(torch.zeros(_PROBE_NUMEL, device=device))
        optimizer = _construct(name, [{"params": [param], "lr": 1e-3}], OptimizerConfig())
        param.grad = torch.ones_like(param)
        optimizer.step()
    except Exception as error:  # e.g. a bitsandbytes build without kernels for this device
        return (
            f"{name} cannot run on {device} ({type(error).__name__}: {error}). Choose {alternative} "
            f"instead, or update the library with `pip install -U {package}`."
        )
    return None


def build_optimizer(
    config: OptimizerConfig,
    param_groups: dict[str, list[torch.nn.Parameter]],
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """The optimizer for the LoRA weights in `param_groups` ("unet" / "text_encoder" lists)."""
    unknown = set(param_groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"param_groups keys must be among {GROUPS}, got {sorted(unknown)}")
    lrs = {"unet": config.unet_lr, "text_encoder": config.text_encoder_lr}
    groups = [
        {"params": list(param_groups[key]), "lr": lrs[key], "name": key}
        for key in GROUPS
        if key in param_groups and len(param_groups[key]) > 0
    ]
    if not groups:
        raise ValueError("param_groups has no parameters to train; pass at least one non-empty group")

    if config.name == "Prodigy" and len({g["lr"] for g in groups}) > 1:
        raise ConfigError(
            "text_encoder_lr",
            f"Prodigy uses one learning rate for all trained weights (it estimates the step size "
            f"itself), but unet_lr is {config.unet_lr} and text_encoder_lr is {config.text_encoder_lr}; "
            "set both to the same value, typically 1.0.",
        )
    problem = check_available(config.name, device)
    if problem is not None:
        raise ConfigError("optimizer", problem)
    return _construct(config.name, groups, config)
