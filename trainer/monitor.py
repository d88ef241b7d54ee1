"""What training is doing: loss history, smoothing, and the fixed validation plan.

Public API:
    History                         per-step loss, lr, smoothed loss, epoch, validation loss,
                                    base_val_loss (the reference), bleed loss and base_bleed_loss
                                    (the control set), rollbacks of the NaN guard
        .record(step, loss, lr, epoch)   a non-finite loss goes to `nan_steps` only
        .record_validation(step, loss)
        .record_bleed(step, loss)        a non-finite one is not recorded (the step shows it already)
        .record_rollback(step, to_step, lr_scale)
        .epoch_means() -> dict[int, float]
        .to_dict() / History.from_dict(d)  JSON-safe, round-trips exactly
        .tail(n) -> dict                   like to_dict(), only the last n training points
    ValidationSample                (item_index, u, noise_seed)
    fixed_validation_plan(n_items, seed, sigma_fractions=(0.2, 0.4, 0.6, 0.8))
        -> list[ValidationSample]
    split_validation(n_items, fraction, seed) -> (train_idx, val_idx)
    (the diagnosis of a History is in trainer/diagnosis.py)

Smoothing is an exponential moving average with bias correction (the "debiased" EMA TensorBoard
shows): s_t = beta * s_{t-1} + (1 - beta) * x_t with s_0 = 0, shown as s_t / (1 - beta**t).
Non-finite losses are skipped, so they neither count towards t nor poison the curve.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import ConfigError


@dataclass
class History:
    """Everything recorded about one training run's loss, in step order.

    `lr` is the learning rate of the main (UNet / transformer) group. `ema_state` is the
    not-yet-debiased running average, saved so that a resumed run continues the same smoothed curve.
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    nan_steps: list[int] = field(default_factory=list)
    ema_beta: float = 0.9
    ema_state: float = 0.0
    # Validation loss of the model without the LoRA (strength 0): the reference every verdict is
    # judged against. Measured once per session and kept, because after start_from_lora or a
    # resume the first validation of a run is not the base model.
    base_val_loss: float | None = None
    # One entry per NaN-guard rollback: the bad step, the step whose weights came back, and the
    # LR factor (lr_scale) in force from then on.
    rollbacks: list[dict] = field(default_factory=list)
    # Concept bleed: the fixed-noise loss on the base model's own samples of control prompts, and
    # its value without the LoRA. Rising above that, the LoRA changes images it should leave alone.
    bleed_step: list[int] = field(default_factory=list)
    bleed_loss: list[float] = field(default_factory=list)
    base_bleed_loss: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.ema_beta < 1.0:
            raise ConfigError("ema_beta", f"must be in [0, 1), got {self.ema_beta}")

    def record(self, step: int, loss: float, lr: float, epoch: int) -> None:
        """Add one training step. A NaN or infinite loss is only noted in `nan_steps`."""
        loss = float(loss)
        if not math.isfinite(loss):
            self.nan_steps.append(int(step))
            return
        self.ema_state = self.ema_beta * self.ema_state + (1.0 - self.ema_beta) * loss
        count = len(self.loss) + 1
        self.step.append(int(step))
        self.loss.append(loss)
        self.lr.append(float(lr))
        self.epoch.append(int(epoch))
        self.smoothed.append(self.ema_state / (1.0 - self.ema_beta**count))

    def record_validation(self, step: int, loss: float) -> None:
        """Add one validation loss. A non-finite one goes to `nan_steps`, like a training step."""
        loss = float(loss)
        if not math.isfinite(loss):
            self.nan_steps.append(int(step))
            return
        self.val_step.append(int(step))
        self.val_loss.append(loss)

    def record_bleed(self, step: int, loss: float) -> None:
        """Add one bleed measurement (the control set's fixed-noise loss)."""
        loss = float(loss)
        if math.isfinite(loss):
            self.bleed_step.append(int(step))
            self.bleed_loss.append(loss)

    def record_rollback(self, step: int, to_step: int, lr_scale: float) -> None:
        """Note that the NaN guard rolled back from `step` to the weights of `to_step` and lowered
        the LR to `lr_scale` times the planned LR."""
        self.rollbacks.append({"step": int(step), "to_step": int(to_step), "lr_scale": float(lr_scale)})

    def epoch_means(self) -> dict[int, float]:
        """Mean finite training loss of each epoch, in epoch order."""
        sums: dict[int, list[float]] = {}
        for epoch, loss in zip(self.epoch, self.loss):
            sums.setdefault(epoch, []).append(loss)
        return {epoch: sum(values) / len(values) for epoch, values in sorted(sums.items())}

    def to_dict(self) -> dict:
        """Plain lists and numbers, safe for JSON (the history never holds a non-finite value)."""
        return {
            "step": list(self.step),
            "loss": list(self.loss),
            "lr": list(self.lr),
            "smoothed": list(self.smoothed),
            "epoch": list(self.epoch),
            "val_step": list(self.val_step),
            "val_loss": list(self.val_loss),
            "nan_steps": list(self.nan_steps),
            "ema_beta": self.ema_beta,
            "ema_state": self.ema_state,
            "base_val_loss": self.base_val_loss,
            "rollbacks": [dict(r) for r in self.rollbacks],
            "bleed_step": list(self.bleed_step),
            "bleed_loss": list(self.bleed_loss),
            "base_bleed_loss": self.base_bleed_loss,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        """Inverse of `to_dict`; keys missing from older saves come back empty."""
        return cls(
            step=[int(v) for v in d.get("step", [])],
            loss=[float(v) for v in d.get("loss", [])],
            lr=[float(v) for v in d.get("lr", [])],
            smoothed=[float(v) for v in d.get("smoothed", [])],
            epoch=[int(v) for v in d.get("epoch", [])],
            val_step=[int(v) for v in d.get("val_step", [])],
            val_loss=[float(v) for v in d.get("val_loss", [])],
            nan_steps=[int(v) for v in d.get("nan_steps", [])],
            ema_beta=float(d.get("ema_beta", 0.9)),
            ema_state=float(d.get("ema_state", 0.0)),
            base_val_loss=None if d.get("base_val_loss") is None else float(d["base_val_loss"]),
            rollbacks=[
                {"step": int(r["step"]), "to_step": int(r["to_step"]), "lr_scale": float(r["lr_scale"])}
                for r in d.get("rollbacks", [])
            ],
            bleed_step=[int(v) for v in d.get("bleed_step", [])],
            bleed_loss=[float(v) for v in d.get("bleed_loss", [])],
            base_bleed_loss=None if d.get("base_bleed_loss") is None else float(d["base_bleed_loss"]),
        )

    def tail(self, n: int) -> dict:
        """Like `to_dict()` but only the last `n` training points, and the validation losses and
        NaN steps from the first of them on: what a live chart needs to catch up."""
        if n <= 0:
            start = len(self.step)
        else:
            start = max(0, len(self.step) - n)
        first = self.step[start] if start < len(self.step) else None
        keep_val = [i for i, s in enumerate(self.val_step) if first is None or s >= first]
        out = self.to_dict()
        for key in ("step", "loss", "lr", "smoothed", "epoch"):
            out[key] = out[key][start:]
        out["val_step"] = [self.val_step[i] for i in keep_val]
        out["val_loss"] = [self.val_loss[i] for i in keep_val]
        keep_bleed = [i for i, s in enumerate(self.bleed_step) if first is None or s >= first]
        out["bleed_step"] = [self.bleed_step[i] for i in keep_bleed]
        out["bleed_loss"] = [self.bleed_loss[i] for i in keep_bleed]
        out["nan_steps"] = [s for s in self.nan_steps if first is None or s >= first]
        out["rollbacks"] = [r for r in out["rollbacks"] if first is None or r["step"] >= first]
        return out



class ValidationSample(NamedTuple):
    """One fixed validation measurement: which item, at which noise level, with which noise.

    `u` is the position on the noise schedule in (0, 1): 0.2 is timestep 200 of 1000 for SD-style
    models, sigma 0.2 for flow models.
    """

    item_index: int
    u: float
    noise_seed: int


def fixed_validation_plan(
    n_items: int, seed: int, sigma_fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
) -> list[ValidationSample]:
    """Every validation item at every noise level, each with its own fixed noise seed.

    The same plan is used at every validation, so the loss changes only because the LoRA changed
    (per-step training loss also changes because of the random timestep and noise).
    """
    if n_items < 1:
        raise ConfigError("validation_split", "no validation images to build a plan from")
    if not sigma_fractions:
        raise ConfigError("validation_timesteps", "needs at least one noise level")
    for u in sigma_fractions:
        if not 0.0 < float(u) < 1.0:
            raise ConfigError(
                "validation_timesteps", f"noise levels must be strictly between 0 and 1, got {u}"
            )
    rng = random.Random(seed)
    return [
        ValidationSample(item, float(u), rng.randrange(2**31))
        for item in range(n_items)
        for u in sigma_fractions
    ]


def split_validation(n_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out a random, reproducible share of the dataset for validation.

    Returns sorted (train_idx, val_idx). With fraction > 0 at least one item is held out and at
    least one is kept for training; fraction 0 holds out nothing.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError("validation_split", f"must be at least 0 and below 1, got {fraction}")
    if fraction == 0.0:
        return list(range(n_items)), []
    if n_items < 2:
        raise ConfigError(
            "validation_split",
            f"the dataset has {n_items} image(s); holding one out for validation needs at least 2. "
            "Add images or set validation_split to 0.",
        )
    n_val = min(n_items - 1, max(1, round(n_items * fraction)))
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])
