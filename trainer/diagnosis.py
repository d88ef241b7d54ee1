"""A diagnosis of a training run in the user's words: verdict, headline, advice, evidence.

It judges a LoRA the way it has to be judged on a model that already denoises well: against that
model. Per-step diffusion loss mostly reflects the random noise level of each step, so it jumps
whatever the LoRA does and is nearly flat even when the LoRA learns; a fixed-noise validation
loss, compared with the same validation of the model without the LoRA (strength 0, the
History's base_val_loss), shows what the LoRA changed.

Public API:
    Diagnosis                       verdict, headline, advice, evidence
    VERDICTS                        every verdict `diagnose` can give
    diagnose(history, total_steps=None) -> Diagnosis
        with a control set, "bleeding" when the LoRA raises the control images' loss (BLEED_MARGIN)
        at least as much as it improved the concept's validation

The per-step curve is only read for a blow-up (or, without validation, a clear fall), on
log-loss with its noise measured robustly (MAD around each chunk's mean): "drop" compares the
first and last WINDOW_FRACTION of the points, "tail change" fits a line through the last half,
"rise from best" compares the last of up to CHUNKS chunks with the lowest; each change must also
exceed SIGNIFICANCE_Z standard errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .monitor import History

# --- thresholds of the diagnosis. All are relative (0.10 = 10 %), so they mean the same on any
# model, resolution and loss type. The reference is the validation loss of the base model (the
# model without the LoRA): on a pretrained model a LoRA moves it by a few percent only, so a
# verdict read from absolute loss levels ("high", "low") would be wrong on every real model.
MIN_POINTS = 20  # fewer finite training losses than this: too early to read the training curve
MIN_WINDOW = 5  # smallest number of points in a window or chunk
WINDOW_FRACTION = 0.2  # first / last window for the overall drop: 20 % of the points each
NAN_RECENT_FRACTION = 0.1  # a NaN within the last 10 % of the points makes the verdict "nan"
CHUNKS = 10  # the curve is cut into at most this many chunks to find its best stretch
# A change of the per-step loss must be this many standard errors to count as real. The diagnosis
# is re-read live many times per run, so a loose test would make the verdict flicker on noise alone.
SIGNIFICANCE_Z = 3.0
MIN_DROP = 0.10  # without validation, the per-step loss must fall this much to say it learned
# Per-step loss this much above its start (first window vs last window, each of at least
# TRAIN_WINDOW points) is diverged: per-step loss depends mostly on each step's random noise
# level and spans decades, so only a doubling of the whole curve, over many points, is evidence.
TRAIN_DAMAGE = 1.0
TRAIN_WINDOW = 16
MIN_VAL_POINTS = 3  # validations (the first included) before validation decides anything
# A fixed validation plan (same images, noise levels and noise) gives the same loss for the same
# weights, so every change is the LoRA's; a change under 1 % is too small to matter in samples.
VAL_CHANGE = 0.01
# Healthy LoRAs move held-out validation by a few percent; 25 % worse than the model without
# the LoRA means it is destroying what the model could already do.
VAL_DAMAGE = 0.25
OVERFIT_MARGIN = 0.03  # validation this much above its best (3x VAL_CHANGE): it is rising
# Still learning: across the last half of the validations the loss falls per unit of learning
# rate at least this share of its average rate over the run. Measured against the LR spent, not
# the steps, because a decaying schedule (cosine) flattens every curve as its LR runs out.
STILL_FALLING_SHARE = 0.25
SLOW_GAIN = 0.10  # better than the base model by less than this: "learning (slowly)"
NOT_LEARNING_MIN_STEPS = 50  # "no measurable change" is only said after this many steps...
NOT_LEARNING_MIN_PROGRESS = 0.2  # ...and (when the run length is known) this share of the run
ENDING_PROGRESS = 0.9  # past this share of total_steps, "keep training" becomes "train longer"
# Concept bleed: the control images' fixed-noise loss (the base model's own samples of unrelated
# prompts) this much above the base model's, and at least as much as the concept gained on
# validation: the LoRA changes what it should leave alone as much as what it should learn. 5 %
# is five times VAL_CHANGE: a change that shows in samples of those prompts, not measurement noise.
BLEED_MARGIN = 0.05

VERDICTS = (
    "warming_up",
    "learning",
    "converged",
    "overfitting",
    "not_learning",
    "no_trend",
    "diverged",
    "nan",
    "bleeding",
)

_TINY = 1e-12  # keeps log() finite for a zero loss

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


@dataclass(frozen=True)
class _Validation:
    """The validation curve against its reference. Changes are relative: -0.05 = 5 % lower."""

    reference: float
    reference_name: str  # "the base model", or the step of the first validation
    change: float  # last validation vs the reference (negative: better than the reference)
    best_step: int
    best_loss: float
    rise: float  # last validation above the best one
    rising: bool  # the last validation is the highest so far
    tail_share: float  # fall rate (per unit of LR) of the last half, as a share of the run's average
    damaged_since: int | None  # first validation from which all are VAL_DAMAGE above the reference


def _validation(history: History) -> _Validation:
    steps = np.asarray(history.val_step, dtype=float)
    losses = np.maximum(np.asarray(history.val_loss, dtype=float), _TINY)
    if history.base_val_loss is not None and history.base_val_loss > 0:
        reference, name = float(history.base_val_loss), "the base model"
    else:
        reference, name = float(losses[0]), f"step {history.val_step[0]}"
    n = len(losses)
    half = min(n // 2, n - 2)
    # Learning rate spent up to each validation: the x axis on which "still falling" is read.
    spent = np.concatenate([[0.0], np.cumsum(history.lr)])
    lr_time = spent[np.searchsorted(np.asarray(history.step), steps, side="right")]
    y = np.log(losses)
    total_fall = (y[0] - y[-1]) / max(lr_time[-1] - lr_time[0], _TINY)
    tail_log, _ = _fit_change(lr_time[half:], y[half:], VAL_CHANGE)
    tail_fall = -tail_log / max(lr_time[-1] - lr_time[half], _TINY)
    best = int(np.argmin(losses))
    damaged = losses >= reference * (1.0 + VAL_DAMAGE)
    since = None
    if damaged[-1]:
        first = n - int(np.argmin(damaged[::-1])) if not damaged.all() else 0
        since = int(steps[first])
    return _Validation(
        reference=reference,
        reference_name=name,
        change=float(losses[-1] / reference - 1.0),
        best_step=int(steps[best]),
        best_loss=float(losses[best]),
        rise=float(losses[-1] / losses[best] - 1.0),
        rising=bool(losses[-1] >= losses[:-1].max()),
        tail_share=float(tail_fall / total_fall) if total_fall > 0 else 0.0,
        damaged_since=since,
    )


def _bleed(history: History) -> float | None:
    """The last bleed measurement against the base model's (relative: 0.1 = 10 % higher), once
    there are MIN_VAL_POINTS of them; None without a control set."""
    if len(history.bleed_loss) < MIN_VAL_POINTS or not history.base_bleed_loss:
        return None
    return history.bleed_loss[-1] / max(history.base_bleed_loss, _TINY) - 1.0


def _fmt_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _lr_change(history: History, factor: float) -> str:
    peak = max(history.lr) if history.lr else 0.0
    if peak <= 0.0:
        return "1e-4 -> 5e-5" if factor < 1 else "1e-4 -> 2e-4"
    return f"{_fmt_lr(peak)} -> {_fmt_lr(peak * factor)}"


def _recent_nan(history: History) -> int | None:
    """The last NaN step or NaN-guard rollback if it is in the last NAN_RECENT_FRACTION of the
    run, else None. (A step whose loss was finite but whose gradients were not is only a rollback.)"""
    bad = history.nan_steps + [r["step"] for r in history.rollbacks]
    if not bad:
        return None
    last_nan = max(bad)
    n = len(history.step)
    if n == 0:
        return last_nan
    window = max(MIN_WINDOW, int(n * NAN_RECENT_FRACTION))
    window_start = history.step[max(0, n - window)]
    return last_nan if last_nan >= window_start else None


def _rollback_note(history: History) -> str:
    """" The NaN guard rolled back ..." when it did, else ""."""
    rollbacks = history.rollbacks
    if not rollbacks:
        return ""
    steps = ", ".join(str(r["step"]) for r in rollbacks[:4]) + (", ..." if len(rollbacks) > 4 else "")
    times = "once" if len(rollbacks) == 1 else f"{len(rollbacks)} times"
    return (
        f" The NaN guard rolled back {times} (step {steps}) and lowered the LR to "
        f"{rollbacks[-1]['lr_scale']:g}x the plan."
    )


def _times_worse(change: float) -> str:
    return f"{1.0 + change:.2g}x worse" if change >= 1.0 else f"{change:.0%} worse"


def _pct(fraction: float) -> str:
    """12 %, 5 %, 1.5 %: whole percent, with one decimal below 10 %."""
    return f"{fraction:.0%}" if abs(fraction) >= 0.1 else f"{fraction:.1%}"


NO_VALIDATION_ADVICE = (
    "set validation_split to 0.2 for a real verdict: per-step loss depends mostly on each step's "
    "random noise level, so without validation the run cannot be compared with the base model"
)


def diagnose(history: History, total_steps: int | None = None) -> Diagnosis:
    """Read the run and say, in the user's terms, what training is doing and what to change.

    With validation, every verdict compares the fixed-noise validation loss with the reference
    (`base_val_loss`, else the first validation): diverged (well above it), overfitting (rising from
    its best while training loss does not rise), learning (below it and still falling), converged
    (below it and flat), not_learning (no measurable change after enough steps). Without
    validation only a clear fall or a blow-up of the per-step loss can be read, and the verdict
    says that it is weaker. `total_steps` (the planned run length) tells "keep going" from "train
    longer next time" and when "not learning" may be said.
    """
    n = len(history.loss)
    last_step = history.step[-1] if n else 0
    evidence: dict = {"points": n, "nan_count": len(history.nan_steps), "rollbacks": len(history.rollbacks)}
    progress = last_step / total_steps if total_steps and n else None
    if progress is not None:
        evidence["progress"] = progress
    rolled = _rollback_note(history)
    lower_lr = f"lower unet_lr (e.g. {_lr_change(history, 0.5)})"

    nan_step = _recent_nan(history)
    if nan_step is not None:
        evidence["last_nan_step"] = nan_step
        return Diagnosis(
            "nan",
            f"The loss became NaN at step {nan_step}: training blew up.{rolled}",
            [
                lower_lr,
                "train in bf16 instead of fp16 (fp16 overflows more easily)",
                "keep gradient clipping on (max_grad_norm 1.0)",
                f"resume from a checkpoint saved before step {nan_step}",
            ],
            evidence,
        )

    train = None
    if n >= MIN_POINTS:
        train, sigma = _train_trend(np.asarray(history.step, dtype=float), np.asarray(history.loss, dtype=float))
        evidence.update(
            relative_drop=train.drop, drop_z=train.drop_z, tail_change=train.tail_change, tail_z=train.tail_z,
            rise_from_best=train.rise, rise_z=train.rise_z, best_step=train.best_step, log_noise=sigma,
        )
    val = None
    if len(history.val_loss) >= 2 and history.val_step[-1] > history.val_step[0]:
        val = _validation(history)
        evidence.update(
            val_points=len(history.val_loss), val_reference=val.reference, val_change=val.change,
            val_rise_from_best=val.rise, val_tail_share=val.tail_share, val_best_step=val.best_step,
        )
    train_rising = train is not None and (train.tail_z >= SIGNIFICANCE_Z or train.drop_z <= -SIGNIFICANCE_Z)
    # Per-step loss is judged against its own start, not its best stretch: the lowest of several
    # noisy chunks is low by chance, and per-step diffusion loss is nothing but noisy.
    train_diverged = (
        train is not None and n * WINDOW_FRACTION >= TRAIN_WINDOW
        and -train.drop >= TRAIN_DAMAGE and train.drop_z <= -SIGNIFICANCE_Z
    )
    far = f"lower unet_lr a lot (e.g. {_lr_change(history, 0.1)})"

    # Overfitting: validation got better than the reference, then rose again from that best,
    # while the training loss did not blow up: the LoRA learned, then started memorising.
    if (
        val is not None and len(history.val_loss) >= MIN_VAL_POINTS and not train_diverged
        and val.best_loss <= val.reference * (1.0 - VAL_CHANGE)
        and val.rise >= OVERFIT_MARGIN and val.best_step < history.val_step[-1]
    ):
        return Diagnosis(
            "overfitting",
            f"Overfitting: validation rose {_pct(val.rise)} since its best at step {val.best_step} while the "
            f"training loss did not: the LoRA is memorising its training images.{rolled}",
            [
                f"pick the checkpoint at step {val.best_step} (best validation)",
                "train fewer steps, or add more (and more varied) images",
                "lower rank (network_dim)",
            ],
            evidence,
        )
    # Diverged: validation well above the reference, or per-step loss far above its best stretch
    # and its start.
    if val is not None and val.damaged_since is not None:
        return Diagnosis(
            "diverged",
            f"Diverged: validation is {_times_worse(val.change)} than {val.reference_name} since step "
            f"{val.damaged_since}; the learning rate is {'far ' if val.change >= 1.0 else ''}too high.{rolled}",
            [far if val.change >= 1.0 else lower_lr, f"pick the checkpoint at step {val.best_step} (best validation)", "use more warmup steps"],
            evidence,
        )
    if train_diverged and (val is None or val.change > -VAL_CHANGE):
        return Diagnosis(
            "diverged",
            f"Diverged: the training loss is {_times_worse(-train.drop)} than at its start "
            f"and was lowest around step {train.best_step}; the learning rate is too high.{rolled}",
            [lower_lr, f"pick the checkpoint at step {train.best_step} (lowest loss)", "use more warmup steps"]
            + ([] if val is not None else [NO_VALIDATION_ADVICE]),
            evidence,
        )

    bleed = _bleed(history)
    if bleed is not None:
        evidence["bleed_change"] = bleed
        gain = -val.change if val is not None else 0.0
        if bleed >= BLEED_MARGIN and bleed >= gain:
            concept = f"; validation of the concept improved {_pct(gain)}" if val is not None else ""
            return Diagnosis(
                "bleeding",
                f"Bleeding: your LoRA changes unrelated images as much as your concept: the control images' loss is "
                f"{_pct(bleed)} above the base model's{concept}.{rolled}",
                [f"lower rank or unet_lr (e.g. {_lr_change(history, 0.5)})", "use a trigger word, and keep it out of the control prompts",
                 "add regularisation images (reg_folder): class images of what your concept is"],
                evidence,
            )

    if val is not None and len(history.val_loss) >= MIN_VAL_POINTS:
        return _judge_validation(history, val, train_rising, progress, rolled, lower_lr, evidence)

    if train is None:
        needed = f"{MIN_POINTS} steps ({n} so far)"
        if history.val_loss or history.base_val_loss is not None:
            needed += f" or {MIN_VAL_POINTS} validations ({len(history.val_loss)} so far)"
        return Diagnosis("warming_up", f"Too early to judge: needs {needed}.{rolled}", ["keep training"], evidence)
    weaker = " Weaker verdict: no validation."
    if history.val_loss:
        weaker = f" Weaker verdict: {len(history.val_loss)} of {MIN_VAL_POINTS} validations so far."
    if train.drop >= MIN_DROP and train.drop_z >= SIGNIFICANCE_Z:
        if train.tail_z <= -SIGNIFICANCE_Z:
            return Diagnosis(
                "learning",
                f"Learning: the training loss fell {train.drop:.0%} and is still falling.{weaker}{rolled}",
                [_keep_training(progress), NO_VALIDATION_ADVICE],
                evidence,
            )
        return Diagnosis(
            "converged",
            f"Converged: the training loss fell {train.drop:.0%} and has levelled off.{weaker}{rolled}",
            ["compare samples from the last few checkpoints and keep the best", NO_VALIDATION_ADVICE],
            evidence,
        )
    return Diagnosis(
        "no_trend",
        f"No clear trend in the training loss: normal for a LoRA on a model that already denoises well, "
        f"but per-step loss alone cannot tell whether it learns.{weaker}{rolled}",
        [NO_VALIDATION_ADVICE, "compare preview samples as training goes on"],
        evidence,
    )


def _keep_training(progress: float | None) -> str:
    if progress is not None and progress >= ENDING_PROGRESS:
        return "train more steps next time: validation was still falling when the run ended"
    return "keep training, and compare samples from the next checkpoints"


def _judge_validation(history, val: _Validation, train_rising, progress, rolled, lower_lr, evidence) -> Diagnosis:
    """Verdicts read from at least MIN_VAL_POINTS validations that did not diverge."""
    steps_done = history.val_step[-1]
    gain = -val.change
    if val.change >= VAL_CHANGE and ((val.rising and val.rise >= OVERFIT_MARGIN) or train_rising):
        return Diagnosis(
            "diverged",
            f"Getting worse: validation is {_times_worse(val.change)} than {val.reference_name} and rising; "
            f"the learning rate is too high.{rolled}",
            [lower_lr, f"pick the checkpoint at step {val.best_step} (best validation)", "use more warmup steps"],
            evidence,
        )
    if gain >= VAL_CHANGE:
        if val.tail_share >= STILL_FALLING_SHARE:
            slowly = " (slowly)" if gain < SLOW_GAIN else ""
            return Diagnosis(
                "learning",
                f"Learning{slowly}: validation is {_pct(gain)} better than {val.reference_name} and still falling.{rolled}",
                [_keep_training(progress)],
                evidence,
            )
        return Diagnosis(
            "converged",
            f"Converged: validation is {_pct(gain)} better than {val.reference_name} and has levelled off.{rolled}",
            ["compare samples from the last few checkpoints and keep the best", "training much longer now mostly risks overfitting"],
            evidence,
        )
    enough = steps_done >= NOT_LEARNING_MIN_STEPS and (progress is None or progress >= NOT_LEARNING_MIN_PROGRESS)
    if val.change >= VAL_CHANGE:
        if enough:
            return Diagnosis(
                "diverged",
                f"Damaging: validation is {_pct(val.change)} worse than {val.reference_name} after {steps_done} "
                f"steps and not improving; the learning rate is probably too high.{rolled}",
                [lower_lr, f"pick the checkpoint at step {val.best_step} (best validation)", "use more warmup steps"],
                evidence,
            )
        return Diagnosis(
            "warming_up",
            f"Too early to judge: validation is {_pct(val.change)} worse than {val.reference_name} after "
            f"{steps_done} steps.{rolled}",
            [f"keep training; a verdict needs {NOT_LEARNING_MIN_STEPS} steps and 20 % of the run"],
            evidence,
        )
    if not enough:
        return Diagnosis(
            "warming_up",
            f"No measurable change yet: validation is {val.change:+.1%} against {val.reference_name} after "
            f"{steps_done} steps.{rolled}",
            [f"keep training; 'not learning' is only said after {NOT_LEARNING_MIN_STEPS} steps and 20 % of the run"],
            evidence,
        )
    return Diagnosis(
        "not_learning",
        f"Not learning: no measurable change in {steps_done} steps (validation {val.change:+.1%} against "
        f"{val.reference_name}).{rolled}",
        [
            f"raise unet_lr (e.g. {_lr_change(history, 10.0 if max(history.lr, default=1.0) < 1e-5 else 2.0)})",
            "check that the Network targets the model's layers, and that the images are sharp and captioned",
        ],
        evidence,
    )
