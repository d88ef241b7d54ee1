"""fp8 (e4m3fn) storage of a model's frozen Linear / Conv2d weights, to halve their memory.

Public API:
    FP8_DTYPE, FP8_MAX
    store_base_fp8(modules, keep_original=False) -> Fp8Handle   (.restore(), .modules)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .errors import TrainingError

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite float8_e4m3fn value; weights are scaled so their largest magnitude lands here.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
_SCALE_BUFFER = "weight_fp8_scale"


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
