"""The guarded optimizer step: fp16 loss scaling, gradient clipping and the finiteness check.

Public API:
    DynamicLossScaler(init_scale=2**16, growth_factor=2.0, backoff_factor=0.5,
                      growth_interval=2000, enabled=True)
        .scale(loss), .unscale_and_check(params) -> bool, .update(found_inf),
        .current_scale, .state_dict(), .load_state_dict(state)
    make_loss_scaler(config) -> DynamicLossScaler | None   a scaler for fp16, None otherwise
    optimizer_step(optimizer, params, scaler, max_grad_norm) -> StepResult(skipped, grad_norm, scale)
    all_finite(tensors) -> bool                    no inf/nan anywhere, one pass over all tensors
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .errors import ConfigError, TrainingError
from .precision import PrecisionConfig

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
