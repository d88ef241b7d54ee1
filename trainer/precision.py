"""Numeric precision: autocast, dynamic loss scaling, guarded optimizer steps, fp8 base weights.

Public API:
    PrecisionConfig(mixed_precision="fp32", fp8_base=False, gradient_checkpointing=False,
                    save_dtype="fp16", max_grad_norm=1.0)
    compute_dtype(config) -> torch.dtype          dtype the forward pass computes in
    save_torch_dtype(config) -> torch.dtype       dtype LoRA weights are written in
    autocast(config, device) -> context manager   torch.autocast for bf16/fp16, no-op for fp32
    for_device(config, device) -> PrecisionConfig   mixed_precision "auto" -> bf16 / fp16 / fp32 for the device
    check_device_support(config, device) -> str | None
        warning text for a slow-but-working combination; raises ConfigError for an unusable one
    DynamicLossScaler(init_scale=2**16, growth_factor=2.0, backoff_factor=0.5,
                      growth_interval=2000, enabled=True)
        .scale(loss), .unscale_and_check(params) -> bool, .update(found_inf),
        .current_scale, .state_dict(), .load_state_dict(state)
    make_loss_scaler(config) -> DynamicLossScaler | None   a scaler for fp16, None otherwise
    optimizer_step(optimizer, params, scaler, max_grad_norm) -> StepResult(skipped, grad_norm, scale)
    all_finite(tensors) -> bool                    no inf/nan anywhere, one pass over all tensors
    store_base_fp8(modules, keep_original=False) -> Fp8Handle   (.restore(), .modules)
    parameter_bytes(module) -> int

Mixed precision keeps the LoRA parameters in fp32: autocast casts them to the compute dtype inside
each op, and their gradients and optimizer state stay fp32. Small LoRA updates would otherwise be
rounded away in bf16 (8 mantissa bits) or underflow in fp16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable

import torch
from torch import nn

from .errors import ConfigError, TrainingError

MIXED_PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"  # the node's default: resolved per device by `for_device` before training
SAVE_DTYPES = ("fp32", "fp16", "bf16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite float8_e4m3fn value; weights are scaled so their largest magnitude lands here.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
_SCALE_BUFFER = "weight_fp8_scale"


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

    mixed_precision: str = "fp32"
    fp8_base: bool = False
    gradient_checkpointing: bool = False
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


def save_torch_dtype(config: PrecisionConfig) -> torch.dtype:
    """The dtype LoRA weights are written to disk in."""
    return _DTYPES[config.save_dtype]


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


# ---------------------------------------------------------------------------------------------
# Loss scaling and the optimizer step
# ---------------------------------------------------------------------------------------------


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 training.

    fp16 gradients underflow to zero below ~6e-8; multiplying the loss by a large scale keeps them
    representable. The scale halves whenever a step produces inf/nan gradients (that step is
    skipped) and doubles after `growth_interval` clean steps in a row, so it settles just below the
    overflow point.

    Written here instead of using torch.amp.GradScaler because GradScaler binds to optimizer
    objects and some of its paths need CUDA; this one works on plain parameter lists on any device.
    When `enabled` is False it scales by 1 and only checks gradients for inf/nan.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ):
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ConfigError("init_scale", f"expected a finite number > 0, got {init_scale!r}")
        if not (math.isfinite(growth_factor) and growth_factor > 1):
            raise ConfigError("growth_factor", f"expected a number > 1, got {growth_factor!r}")
        if not (0 < backoff_factor < 1):
            raise ConfigError("backoff_factor", f"expected a number between 0 and 1, got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ConfigError("growth_interval", f"expected a whole number >= 1, got {growth_interval!r}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.enabled = bool(enabled)
        self._scale = float(init_scale) if self.enabled else 1.0
        self._growth_tracker = 0

    @property
    def current_scale(self) -> float:
        """The factor the loss is multiplied by (1.0 when disabled)."""
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the current scale; call backward on this."""
        if not self.enabled:
            return loss
        return loss * self._scale

    def unscale_and_check(self, params: Iterable[torch.Tensor]) -> bool:
        """Divide each parameter's .grad by the scale in place; False if any grad is inf/nan.

        Call exactly once per optimizer step, after all accumulated backward passes.
        """
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        if self.enabled:
            inv = 1.0 / self._scale
            for g in grads:
                g.mul_(inv)
        return all_finite(grads)

    def update(self, found_inf: bool) -> None:
        """Back off after an overflowing step; grow after `growth_interval` clean steps."""
        if not self.enabled:
            return
        if found_inf:
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker >= self.growth_interval:
            self._scale *= self.growth_factor
            self._growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale, "growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("scale", "growth_tracker") if k not in state]
        if missing:
            raise TrainingError(
                f"the saved loss scaler state lacks {', '.join(missing)}; "
                "resume from a checkpoint written by LoRA Lab or start a new run"
            )
        scale = float(state["scale"])
        if not (math.isfinite(scale) and scale > 0):
            raise TrainingError(f"the saved loss scale {scale!r} is not a positive number; start a new run")
        if self.enabled:
            self._scale = scale
        self._growth_tracker = int(state["growth_tracker"])


def make_loss_scaler(config: PrecisionConfig) -> DynamicLossScaler | None:
    """A loss scaler for fp16 training; None for fp32/bf16, whose exponent range needs none."""
    return DynamicLossScaler() if config.mixed_precision == "fp16" else None


def _norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Norm of all tensors as one vector, in one foreach pass (per device and dtype) instead of one
    kernel per tensor: a LoRA has a hundred-odd small tensors, and per-tensor calls dominated."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(tensors, norm_type=norm_type)
    norms = [torch.linalg.vector_norm(t.detach().float(), norm_type) for t in tensors]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no element of any tensor is inf or nan (one host sync for all of them).

    The largest magnitude is finite exactly when every element is: a nan propagates through it.
    """
    tensors = [t.detach() for t in tensors]
    return not tensors or math.isfinite(float(_norm(tensors, math.inf)))


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return _norm([g.detach() for g in grads], 2.0)


def _clip(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients so their total norm is at most max_norm, reusing the norm already computed."""
    clip_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if clip_with_norm is not None:
        clip_with_norm(params, max_norm, total_norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did.

    skipped: the gradients were not finite, so the parameters were left unchanged.
    grad_norm: total gradient norm before clipping (unscaled); nan when the step was skipped.
    scale: the loss scale this step's gradients were computed with (1.0 without a scaler).
    """

    skipped: bool
    grad_norm: float
    scale: float


def _zero_grads(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    scaler: DynamicLossScaler | None,
    max_grad_norm: float,
) -> StepResult:
    """Unscale, check, clip, step and zero the gradients of `params`.

    A step whose gradients (or their total norm) are not finite is skipped: the parameters and the
    optimizer state stay as they were, the gradients are cleared and the scaler backs off. The
    caller decides when too many skipped steps in a row mean training has diverged.
    """
    params = list(params)
    scale = scaler.current_scale if scaler is not None else 1.0
    grads = [p.grad for p in params if p.grad is not None]
    # Without a scaler the total norm is the finiteness check: it is nan/inf exactly when some
    # gradient is, and also when every grad is finite but their squared sum overflows (clipping
    # would then multiply them by 0 yet still advance the optimizer's moments): skip either way.
    finite = scaler.unscale_and_check(params) if scaler is not None else True

    norm = 0.0
    if finite and grads:
        total = _total_norm(grads)
        norm = float(total)
        finite = math.isfinite(norm)
    if not finite:
        _zero_grads(optimizer, params)
        if scaler is not None:
            scaler.update(found_inf=True)
        return StepResult(skipped=True, grad_norm=math.nan, scale=scale)

    if max_grad_norm > 0 and grads:
        _clip(params, max_grad_norm, total)
    optimizer.step()
    _zero_grads(optimizer, params)
    if scaler is not None:
        scaler.update(found_inf=False)
    return StepResult(skipped=False, grad_norm=norm, scale=scale)


# ---------------------------------------------------------------------------------------------
# fp8 base weights
# ---------------------------------------------------------------------------------------------


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (persistent or not)."""
    return sum(t.nbytes for t in module.parameters()) + sum(t.nbytes for t in module.buffers())


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().float()
    amax = w.abs().max()
    # Per-tensor scale maps the largest magnitude to FP8_MAX, so weights larger than 448 do not
    # saturate and small ones do not sink into e4m3's coarse subnormals. An all-zero tensor keeps
    # scale 1 to avoid dividing by zero.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16:
        # A small scale (tiny weights) is not representable in fp16; multiply in fp32 first.
        return q.float().mul_(scale.float()).to(dtype)
    return q.to(dtype).mul_(scale.to(dtype))


def _forward_dtype(weight: torch.Tensor, original: torch.dtype) -> torch.dtype:
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        # Upcast straight to the autocast dtype: no intermediate full-precision copy.
        return torch.get_autocast_dtype(device_type)
    return original


class _Fp8Entry:
    def __init__(self, module: nn.Module, original_dtype: torch.dtype, original: torch.Tensor | None):
        self.module = module
        self.original_dtype = original_dtype
        self.original = original
        self.stored: nn.Parameter | None = None  # the fp8 weight while a forward call is running
        self.handles: list[Any] = []


class Fp8Handle:
    """The modules whose weights `store_base_fp8` put in float8; `restore()` undoes it."""

    def __init__(self, entries: list[_Fp8Entry]):
        self._entries = entries

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """The converted modules (empty after restore)."""
        return tuple(e.module for e in self._entries)

    def restore(self) -> None:
        """Put full-precision weights back and remove the hooks; safe to call twice.

        Without keep_original the weights are dequantized from fp8 and so differ from the
        originals by fp8 rounding (about 3 significant bits); with it they are bit-identical.
        """
        for entry in self._entries:
            module = entry.module
            for h in entry.handles:
                h.remove()
            q = module.weight
            if q.dtype != FP8_DTYPE:
                raise TrainingError(
                    "a base weight stored in fp8 was changed while training (its dtype is now "
                    f"{q.dtype}); reload the model"
                )
            scale = getattr(module, _SCALE_BUFFER)
            if entry.original is not None:
                restored = entry.original.to(q.device)
            else:
                restored = _dequantize(q.detach(), scale, entry.original_dtype)
            module.weight = nn.Parameter(restored, requires_grad=False)
            delattr(module, _SCALE_BUFFER)
        self._entries = []


def _pre_hook(entry: _Fp8Entry):
    def hook(module: nn.Module, args):
        q = module.weight
        if q.dtype != FP8_DTYPE:
            raise TrainingError(
                f"a base weight stored in fp8 was converted to {q.dtype} behind LoRA Lab's back "
                "(for example by casting the model); restore it before changing the model's dtype"
            )
        entry.stored = q
        w = _dequantize(q.detach(), getattr(module, _SCALE_BUFFER), _forward_dtype(q, entry.original_dtype))
        # The module's own forward reads self.weight, so swap the upcast copy in for this call only.
        # It is frozen; gradients still flow through the op to the input (and so to LoRA layers
        # before it) because the input, not the weight, carries requires_grad.
        module.weight = nn.Parameter(w, requires_grad=False)

    return hook


def _post_hook(entry: _Fp8Entry):
    def hook(module: nn.Module, args, output):
        if entry.stored is not None:
            module.weight = entry.stored
            entry.stored = None

    return hook


def store_base_fp8(modules: Iterable[nn.Module], keep_original: bool = False) -> Fp8Handle:
    """Store the weights of frozen nn.Linear / nn.Conv2d modules as float8_e4m3fn (1 byte/element).

    Pass e.g. `model.modules()`. Other module types, modules with a trainable weight (LoRA's own
    layers are nn.Linear too) and weights already in fp8 are left alone. The modules are not
    replaced, so names, state_dict keys and other hooks stay valid: a forward pre-hook swaps in a
    weight upcast to the autocast dtype (or the original dtype outside autocast) for the call and a
    forward hook puts the fp8 weight back, even when the call raises. Biases stay as they were.

    Each weight gets a per-tensor scale (amax / 448, 448 being e4m3fn's largest value), kept as a
    non-persistent buffer `weight_fp8_scale` beside it; the model's state_dict therefore holds
    unscaled fp8 weights, so save LoRA weights, never the base model, while fp8 is on. Don't cast
    the model's dtype while stored (e.g. `model.to(torch.bfloat16)`); move devices freely.

    The upcast weight is saved for backward (it is needed for the input's gradient), so it lives
    as long as the autograd graph: gradient checkpointing frees it block by block.

    keep_original: keep a bit-identical copy of each original weight in CPU memory so `restore()`
    is exact (costs host RAM of the original size); otherwise restore dequantizes the fp8 copy.
    Matters when the base model is shared with the rest of the workflow.
    """
    entries: list[_Fp8Entry] = []
    seen: set[int] = set()
    for module in modules:
        if id(module) in seen or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        seen.add(id(module))
        weight = module.weight
        if weight is None or weight.requires_grad or weight.dtype == FP8_DTYPE:
            continue
        if not weight.is_floating_point():
            continue
        original = weight.detach().to("cpu", copy=True) if keep_original else None
        q, scale = _quantize(weight)
        entry = _Fp8Entry(module, weight.dtype, original)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer(_SCALE_BUFFER, scale, persistent=False)
        entry.handles = [
            module.register_forward_pre_hook(_pre_hook(entry)),
            module.register_forward_hook(_post_hook(entry), always_call=True),
        ]
        entries.append(entry)
    return Fp8Handle(entries)
