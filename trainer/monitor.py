"""What training is doing: loss history, smoothing, validation plans and a diagnosis of the curve.

The diagnosis reads the loss curve the way a LoRA tutorial teaches people to read it:
"falling then flat" is good, "rising or jagged" means the learning rate is too high, "flat but high,
like a student who always scores 61" means the LoRA is not learning, and validation loss rising
while training loss falls means it is memorising the training images.

Public API:
    History                         per-step loss, lr, smoothed loss, epoch, validation loss
        .record(step, loss, lr, epoch)   a non-finite loss goes to `nan_steps` only
        .record_validation(step, loss)
        .epoch_means() -> dict[int, float]
        .to_dict() / History.from_dict(d)  JSON-safe, round-trips exactly
        .tail(n) -> dict                   like to_dict(), only the last n training points
    Diagnosis                       verdict, headline, advice, evidence
    VERDICTS                        every verdict `diagnose` can give
    diagnose(history, total_steps=None) -> Diagnosis
    ValidationSample                (item_index, u, noise_seed)
    fixed_validation_plan(n_items, seed, sigma_fractions=(0.2, 0.4, 0.6, 0.8))
        -> list[ValidationSample]
    split_validation(n_items, fraction, seed) -> (train_idx, val_idx)

Smoothing is an exponential moving average with bias correction (the "debiased" EMA TensorBoard
shows): s_t = beta * s_{t-1} + (1 - beta) * x_t with s_0 = 0, and the smoothed value shown at the
t-th finite loss is s_t / (1 - beta**t). Without the correction the first points would be pulled
towards zero. Non-finite losses are skipped, so they neither count towards t nor poison the curve.

How the diagnosis reads a curve. Per-step diffusion loss is very noisy, because every step draws a
random noise level, so nothing looks at single points:
  * all comparisons happen on log-loss, where that noise is roughly multiplicative and even;
  * the per-point noise is measured robustly (MAD of log-loss around each chunk's mean), and every
    change must exceed both a size threshold and SIGNIFICANCE_Z standard errors of that noise;
  * "drop" compares the mean log-loss of the first and last WINDOW_FRACTION of the points;
  * "tail change" is a least-squares line through the log-loss of the last half of the points,
    read as the relative change across that half (still falling / flat / rising);
  * "rise from best" compares the last of up to CHUNKS equal chunks with the lowest chunk;
  * "noise ratio" is the median absolute step-to-step change over the median loss in the last
    window; independent 100 % relative noise gives about 0.8, a see-saw gives far more.
With at least MIN_VAL_POINTS validation losses, "still falling" and overfitting are judged on them,
because a fixed validation plan (same items, timesteps and noise) removes most of that noise.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import ConfigError

# --- thresholds of the diagnosis (relative changes are fractions: 0.10 = 10 %) ---
MIN_POINTS = 20  # fewer finite losses than this: too early to say anything
MIN_WINDOW = 5  # smallest number of points in a window or chunk
WINDOW_FRACTION = 0.2  # first / last window for the overall drop: 20 % of the points each
NAN_RECENT_FRACTION = 0.1  # a NaN within the last 10 % of the points makes the verdict "nan"
CHUNKS = 10  # the curve is cut into at most this many chunks to find its best stretch
# A change must be this many standard errors to count as real. The diagnosis is re-read live many
# times per run, so a loose test would make the verdict flicker on noise alone.
SIGNIFICANCE_Z = 3.0
MIN_DROP = 0.10  # overall drop below this (and flat) is a plateau, above it the run learned
STILL_FALLING = 0.03  # the last half must fall at least this much to count as still falling
DIVERGE_RISE = 0.25  # last chunk this much above the best chunk (and climbing) is divergence
OSCILLATION_NOISE_RATIO = 1.0  # typical step-to-step jump above the loss level itself
PLATEAU_MIN_POINTS = 50  # a plateau is only called once there are this many points...
PLATEAU_MIN_PROGRESS = 0.2  # ...and (when the run length is known) this share of it is done
MIN_VAL_POINTS = 3  # from this many validation losses on, they decide falling / flat
VAL_PRECISION = 0.01  # assumed relative noise of one fixed-plan validation loss
OVERFIT_MARGIN = 0.05  # validation this much above its best while training holds: overfitting
ENDING_PROGRESS = 0.9  # past this share of total_steps, "keep training" becomes "train longer"

VERDICTS = (
    "warming_up",
    "converging",
    "converged",
    "plateau_high",
    "oscillating",
    "diverging",
    "nan",
    "overfitting",
)

_TINY = 1e-12  # keeps log() finite for a zero loss


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
        out["nan_steps"] = [s for s in self.nan_steps if first is None or s >= first]
        return out


@dataclass(frozen=True)
class Diagnosis:
    """One reading of the loss curve.

    verdict: one of VERDICTS. headline: one short sentence in the user's terms. advice: concrete
    things to change. evidence: the numbers behind the verdict (JSON-safe floats and ints).
    """

    verdict: str
    headline: str
    advice: list[str]
    evidence: dict


@dataclass(frozen=True)
class _Trend:
    """Shape of one curve, on log-loss. Changes are relative (exp of the log change, minus 1)."""

    drop: float  # overall fall from the first to the last window (negative: it rose)
    drop_z: float  # that fall in standard errors
    tail_change: float  # fitted change across the last half (negative: still falling)
    tail_z: float
    rise: float  # last chunk above the best chunk
    rise_z: float
    best_step: int  # middle of the best chunk


def _fit_change(x: np.ndarray, y: np.ndarray, point_se: float) -> tuple[float, float]:
    """Least-squares line through (x, y); returns its change from x[0] to x[-1] and that change's
    standard error for independent points of standard error `point_se`."""
    sxx = float(np.sum((x - x.mean()) ** 2))
    if sxx <= 0.0:
        return 0.0, math.inf
    slope = float(np.sum((x - x.mean()) * (y - y.mean()))) / sxx
    span = float(x[-1] - x[0])
    return slope * span, point_se * abs(span) / math.sqrt(sxx)


def _z(value: float, se: float) -> float:
    if se == math.inf:
        return 0.0
    return value / max(se, _TINY)


def _train_trend(steps: np.ndarray, losses: np.ndarray) -> tuple[_Trend, float]:
    """Trend of the noisy per-step training loss; also returns the per-point log noise."""
    n = len(losses)
    y = np.log(np.maximum(losses, _TINY))
    chunk_count = max(2, min(CHUNKS, n // MIN_WINDOW))
    chunks = np.array_split(np.arange(n), chunk_count)
    residuals = np.concatenate([y[c] - y[c].mean() for c in chunks])
    sigma = max(1.4826 * float(np.median(np.abs(residuals - np.median(residuals)))), 1e-9)

    window = max(MIN_WINDOW, int(n * WINDOW_FRACTION))
    drop_log = float(y[:window].mean() - y[-window:].mean())
    drop_se = sigma * math.sqrt(2.0 / window)

    half = n // 2
    tail_log, tail_se = _fit_change(steps[half:].astype(float), y[half:], sigma)

    means = np.array([y[c].mean() for c in chunks])
    best = int(np.argmin(means))
    rise_log = float(means[-1] - means[best])
    rise_se = sigma * math.sqrt(1.0 / len(chunks[-1]) + 1.0 / len(chunks[best]))
    best_step = int(steps[chunks[best][len(chunks[best]) // 2]])

    trend = _Trend(
        drop=1.0 - math.exp(-drop_log),
        drop_z=_z(drop_log, drop_se),
        tail_change=math.exp(tail_log) - 1.0,
        tail_z=_z(tail_log, tail_se),
        rise=math.exp(rise_log) - 1.0,
        rise_z=_z(rise_log, rise_se),
        best_step=best_step,
    )
    return trend, sigma


def _val_trend(steps: np.ndarray, losses: np.ndarray) -> _Trend:
    """Trend of fixed-plan validation losses: few points, little noise, so no chunking."""
    y = np.log(np.maximum(losses, _TINY))
    n = len(y)
    drop_log = float(y[0] - y[-1])
    half = min(n // 2, n - 2)
    tail_log, tail_se = _fit_change(steps[half:].astype(float), y[half:], VAL_PRECISION)
    best = int(np.argmin(y))
    rise_log = float(y[-1] - y[best])
    return _Trend(
        drop=1.0 - math.exp(-drop_log),
        drop_z=_z(drop_log, VAL_PRECISION * math.sqrt(2.0)),
        tail_change=math.exp(tail_log) - 1.0,
        tail_z=_z(tail_log, tail_se),
        rise=math.exp(rise_log) - 1.0,
        rise_z=_z(rise_log, VAL_PRECISION * math.sqrt(2.0)),
        best_step=int(steps[best]),
    )


def _noise_ratio(losses: np.ndarray) -> float:
    window = losses[-max(MIN_WINDOW, int(len(losses) * WINDOW_FRACTION)) :]
    level = float(np.median(window))
    if level <= 0.0 or len(window) < 2:
        return 0.0
    return float(np.median(np.abs(np.diff(window)))) / level


def _fmt_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _lr_change(history: History, factor: float) -> str:
    peak = max(history.lr) if history.lr else 0.0
    if peak <= 0.0:
        return "1e-4 -> 5e-5" if factor < 1 else "1e-4 -> 2e-4"
    return f"{_fmt_lr(peak)} -> {_fmt_lr(peak * factor)}"


def _recent_nan(history: History) -> int | None:
    """The last NaN step if it is in the last NAN_RECENT_FRACTION of the run, else None."""
    if not history.nan_steps:
        return None
    last_nan = max(history.nan_steps)
    n = len(history.step)
    if n == 0:
        return last_nan
    window = max(MIN_WINDOW, int(n * NAN_RECENT_FRACTION))
    window_start = history.step[max(0, n - window)]
    return last_nan if last_nan >= window_start else None


def diagnose(history: History, total_steps: int | None = None) -> Diagnosis:
    """Read the loss curve and say, in the user's terms, what training is doing and what to change.

    Checks run in order and the first that matches wins: NaN, too few points, diverging,
    overfitting, converging, oscillating, converged, (too early for a plateau), plateau_high.
    `total_steps` (the planned run length) lets it tell "keep going" from "train longer next time".
    """
    nan_step = _recent_nan(history)
    n = len(history.loss)
    evidence: dict = {"points": n, "nan_count": len(history.nan_steps)}
    if total_steps and n:
        evidence["progress"] = history.step[-1] / total_steps

    if nan_step is not None:
        evidence["last_nan_step"] = nan_step
        return Diagnosis(
            "nan",
            f"The loss became NaN at step {nan_step}: training blew up.",
            [
                f"lower unet_lr (e.g. {_lr_change(history, 0.5)})",
                "train in bf16 instead of fp16 (fp16 overflows more easily)",
                "keep gradient clipping on (max_grad_norm 1.0)",
                f"resume from a checkpoint saved before step {nan_step}",
            ],
            evidence,
        )
    if n < MIN_POINTS:
        return Diagnosis(
            "warming_up",
            "Too early to judge: collecting more steps.",
            [f"keep training; the diagnosis needs at least {MIN_POINTS} steps ({n} so far)"],
            evidence,
        )

    steps = np.asarray(history.step, dtype=float)
    losses = np.asarray(history.loss, dtype=float)
    train, sigma = _train_trend(steps, losses)
    noise = _noise_ratio(losses)
    evidence.update(
        level=float(np.median(losses[-max(MIN_WINDOW, int(n * WINDOW_FRACTION)) :])),
        relative_drop=train.drop,
        drop_z=train.drop_z,
        tail_change=train.tail_change,
        tail_z=train.tail_z,
        rise_from_best=train.rise,
        rise_z=train.rise_z,
        best_step=train.best_step,
        noise_ratio=noise,
        log_noise=sigma,
    )

    val = None
    if len(history.val_loss) >= MIN_VAL_POINTS:
        val = _val_trend(np.asarray(history.val_step), np.asarray(history.val_loss, dtype=float))
        evidence.update(
            val_points=len(history.val_loss),
            val_relative_drop=val.drop,
            val_tail_change=val.tail_change,
            val_rise_from_best=val.rise,
            val_best_step=val.best_step,
        )
    # Validation decides whether the curve is still falling; whether the run learned anything at
    # all is read from either curve, since the first validation often comes after the big drop.
    primary = val if val is not None else train
    lower_lr = f"lower unet_lr (e.g. {_lr_change(history, 0.5)})"

    train_rising = train.tail_z >= SIGNIFICANCE_Z
    # A loss that jumped up and stays up is as diverged as one still climbing.
    worse_than_start = train.drop_z <= -SIGNIFICANCE_Z
    high_above_best = train.rise >= DIVERGE_RISE and train.rise_z >= SIGNIFICANCE_Z
    if high_above_best and (train_rising or worse_than_start):
        return Diagnosis(
            "diverging",
            "The loss is climbing instead of falling: training is diverging, "
            "the learning rate is too high.",
            [
                lower_lr,
                "lower text_encoder_lr too, or stop training the text encoder",
                "use more warmup steps",
                f"pick the checkpoint at step {train.best_step} (lowest loss so far)",
                "enable min-SNR gamma 5",
            ],
            evidence,
        )

    if (
        val is not None
        and val.best_step < history.val_step[-1]
        and val.rise >= OVERFIT_MARGIN
        and val.rise_z >= SIGNIFICANCE_Z
        and not train_rising
    ):
        return Diagnosis(
            "overfitting",
            "Validation loss is rising while training loss keeps falling: "
            "the LoRA is memorising the training images (overfitting).",
            [
                f"pick the checkpoint at step {val.best_step} (lowest validation loss)",
                f"train fewer epochs: stop around step {val.best_step}",
                lower_lr,
                "add more (and more varied) training images",
                "lower rank (network_dim)",
            ],
            evidence,
        )

    if primary.tail_change <= -STILL_FALLING and primary.tail_z <= -SIGNIFICANCE_Z:
        progress = evidence.get("progress", 0.0)
        advice = (
            ["more epochs or repeats: the loss was still falling when the run ended"]
            if progress >= ENDING_PROGRESS
            else ["keep training: the loss is still falling"]
        )
        advice.append("compare samples from the next checkpoints; stop when they stop improving")
        return Diagnosis(
            "converging",
            "The loss is falling steadily: training is working.",
            advice,
            evidence,
        )

    if noise >= OSCILLATION_NOISE_RATIO:
        return Diagnosis(
            "oscillating",
            "The loss jumps up and down without a trend: the learning rate is probably too high.",
            [
                lower_lr,
                "raise batch size or gradient accumulation to average out the noise",
                "enable min-SNR gamma 5",
            ],
            evidence,
        )

    learned = any(t.drop >= MIN_DROP and t.drop_z >= SIGNIFICANCE_Z for t in (train, val) if t)
    if learned:
        return Diagnosis(
            "converged",
            "The loss fell and has levelled off: training has converged.",
            [
                "compare samples from the last few checkpoints and keep the best",
                "training much longer now mostly risks overfitting",
            ],
            evidence,
        )

    too_early = n < PLATEAU_MIN_POINTS or (
        total_steps and history.step[-1] < PLATEAU_MIN_PROGRESS * total_steps
    )
    if too_early:
        return Diagnosis(
            "warming_up",
            "No clear trend yet: collecting more steps.",
            ["keep training; flat loss early in a run is normal"],
            evidence,
        )

    return Diagnosis(
        "plateau_high",
        "The loss is flat but high, like a student who always scores 61: "
        "the LoRA is barely learning.",
        [
            f"raise unet_lr (e.g. {_lr_change(history, 2.0)})",
            "raise rank (network_dim)",
            "more epochs or repeats",
            "check the captions: they should describe each image and include the trigger word",
            "check the dataset: enough images, sharp, varied, at the training resolution",
        ],
        evidence,
    )


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
