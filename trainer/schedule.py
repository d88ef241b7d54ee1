"""Learning-rate schedules: one formula shared by the training loop and the UI chart.

Public API
----------
SCHEDULES
    The schedule names a user can pick.
ScheduleConfig(name="cosine", warmup_steps=0, warmup_ratio=0.05, min_lr_ratio=0.0, cycles=1, power=1.0)
    Frozen, validated on construction (raises ConfigError naming the field). These defaults are
    the Optimizer node's widget defaults (the node reads them from here).
warmup_steps_for(config, total_steps) -> int
    Warmup length in optimizer steps (`warmup_ratio` resolved as round(ratio * total_steps)).
lr_multiplier(config, step, total_steps) -> float
    Factor applied to each param group's base lr for 0-based optimizer step `step`, i.e. the lr used
    by update number step + 1.
preview(config, base_lr, total_steps, points=200) -> list[tuple[int, float]]
    (step, lr) pairs for a chart, computed with `lr_multiplier` so the chart is exactly what trains.

Conventions (W = warmup steps, T = total optimizer steps, s = 0-based step)
---------------------------------------------------------------------------
Warmup, s < W:        m = (s + 1) / (W + 1)
    The first update already moves the weights (an lr of exactly 0 would waste it), and the ramp
    ends just below 1 so the first post-warmup step is the peak.
After warmup, s >= W: p = min(1, (s - W) / (T - W)) is the progress through the decay, and
    m = min_lr_ratio + (1 - min_lr_ratio) * f(p), with
        constant, constant_with_warmup   f = 1 (no decay; min_lr_ratio, cycles and power unused)
        linear                           f = 1 - p
        cosine                           f = 0.5 * (1 + cos(pi * p))
        cosine_with_restarts             f = 0.5 * (1 + cos(pi * ((cycles * p) mod 1))) for p < 1,
                                         f = 0 at p = 1
        polynomial                       f = (1 - p) ** power
    p reaches 1 at s = T, one step after the last update (s = T - 1), so the last update is not
    spent at the floor either. Steps past T stay at the floor.
Warmup is given one way: warmup_steps > 0 takes precedence over warmup_ratio (so the ratio's
default never clashes with a step count the user typed). 'constant' has no warmup at all: its
warmup fields are set to 0 on construction, which the LR preview shows. These two rules live here
only; callers pass the user's values through unchanged.
T counts optimizer updates: with gradient accumulation pass the number of updates, not micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from .errors import ConfigError

SCHEDULES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)

_DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")
_MAX_WARMUP_RATIO = 0.5


def _is_int(value) -> bool:
    # bool is an Integral, but True as a step count is a bug, not a choice.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ScheduleConfig:
    """How the learning rate moves over training; see the module docstring for the formulas."""

    name: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    cycles: int = 1
    power: float = 1.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ConfigError(
                "scheduler",
                f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}.",
            )
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(
                "warmup_steps",
                f"expected a whole number of steps >= 0, got {self.warmup_steps!r}; use 0 for no warmup.",
            )
        if not _is_number(self.warmup_ratio) or not 0.0 <= self.warmup_ratio <= _MAX_WARMUP_RATIO:
            raise ConfigError(
                "warmup_ratio",
                f"expected a fraction of the total steps between 0 and {_MAX_WARMUP_RATIO}, got "
                f"{self.warmup_ratio!r}; typical values are 0.02-0.1, use 0 for no warmup.",
            )
        if self.name == "constant":  # no warmup at all (see the module docstring)
            object.__setattr__(self, "warmup_steps", 0)
            object.__setattr__(self, "warmup_ratio", 0.0)
        elif self.warmup_steps > 0:  # a step count wins over the ratio
            object.__setattr__(self, "warmup_ratio", 0.0)
        if not _is_number(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                "min_lr_ratio",
                f"expected a fraction of the base lr between 0 and 1, got {self.min_lr_ratio!r}; "
                "0 decays to zero, 0.1 keeps 10% of the lr at the end.",
            )
        if not _is_int(self.cycles) or self.cycles < 1:
            raise ConfigError(
                "cycles",
                f"expected a whole number of cosine cycles >= 1, got {self.cycles!r}; 1 is a plain cosine.",
            )
        if not _is_number(self.power) or self.power <= 0:
            raise ConfigError(
                "power",
                f"expected a polynomial power > 0, got {self.power!r}; 1.0 is linear decay, "
                "2.0 decays faster early on.",
            )


def _check_total_steps(total_steps) -> None:
    if not _is_int(total_steps) or total_steps < 1:
        raise ConfigError(
            "steps",
            f"expected a whole number of training steps >= 1, got {total_steps!r}.",
        )


def warmup_steps_for(config: ScheduleConfig, total_steps: int) -> int:
    """Number of warmup steps for a run of `total_steps` optimizer updates.

    `warmup_ratio` is resolved with Python's round (half to even). Warmup must leave at least one
    step after it, otherwise the whole run would be spent ramping up.
    """
    _check_total_steps(total_steps)
    if config.warmup_ratio > 0:
        # ratio <= 0.5 keeps this below total_steps for every total_steps >= 1.
        return round(config.warmup_ratio * total_steps)
    if config.warmup_steps >= total_steps:
        raise ConfigError(
            "warmup_steps",
            f"warmup of {config.warmup_steps} steps does not fit in a run of {total_steps} steps; "
            f"use fewer warmup steps (typically 2-10% of the run, here about {max(1, total_steps // 20)}).",
        )
    return config.warmup_steps


def _multiplier(config: ScheduleConfig, step: int, total_steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.name not in _DECAYING:
        return 1.0

    decay_steps = total_steps - warmup  # >= 1, guaranteed by warmup_steps_for
    done = min(step - warmup, decay_steps)
    p = done / decay_steps
    if config.name == "linear":
        f = 1.0 - p
    elif config.name == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    elif config.name == "cosine_with_restarts":
        if done >= decay_steps:
            f = 0.0
        else:
            # Integer modulo puts each restart exactly at phase 0 by construction, instead of
            # relying on float rounding of (cycles * p) % 1 near a whole number.
            phase = (config.cycles * done % decay_steps) / decay_steps
            f = 0.5 * (1.0 + math.cos(math.pi * phase))
    else:  # polynomial
        f = (1.0 - p) ** config.power
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * f


def lr_multiplier(config: ScheduleConfig, step: int, total_steps: int) -> float:
    """Factor on the base lr for 0-based optimizer step `step` (see the module docstring)."""
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be a whole number >= 0, got {step!r}")
    return _multiplier(config, step, total_steps, warmup_steps_for(config, total_steps))


def _corner_steps(config: ScheduleConfig, total_steps: int, warmup: int) -> set[int]:
    """Steps where the curve changes direction, so a sampled chart still shows them sharply."""
    corners = set()
    if warmup > 0:
        corners.update((warmup - 1, warmup))
    if config.name == "cosine_with_restarts":
        decay_steps = total_steps - warmup
        for k in range(1, config.cycles):
            # First step whose phase wraps to 0 (restart) and the step just before it (trough).
            restart = warmup + -(-k * decay_steps // config.cycles)
            corners.update((restart - 1, restart))
    return {s for s in corners if 0 <= s < total_steps}


def preview(
    config: ScheduleConfig, base_lr: float, total_steps: int, points: int = 200
) -> list[tuple[int, float]]:
    """The lr at each trained step, as (step, lr) pairs sorted by step, for a UI chart.

    Runs of up to `points` steps give every step; longer runs give `points` evenly spaced steps
    (first and last included) plus the end of warmup and each restart, so the corners stay sharp.
    """
    _check_total_steps(total_steps)
    if not _is_number(base_lr) or base_lr <= 0:
        raise ConfigError("lr", f"expected a learning rate > 0, got {base_lr!r}.")
    if not _is_int(points) or points < 2:
        raise ValueError(f"points must be a whole number >= 2, got {points!r}")

    warmup = warmup_steps_for(config, total_steps)
    if total_steps <= points:
        steps = set(range(total_steps))
    else:
        last = total_steps - 1
        steps = {round(i * last / (points - 1)) for i in range(points)}
        steps |= _corner_steps(config, total_steps, warmup)
    return [(s, base_lr * _multiplier(config, s, total_steps, warmup)) for s in sorted(steps)]
