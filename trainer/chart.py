"""The training history as chart data for the browser's live chart (the Train node's UI output).

Public API:
    chart_points(history, max_points=500) -> dict
        {step, loss, smoothed, lr, val_step, val_loss, nan_steps, base_val_loss, rollbacks,
        bleed_step, bleed_loss, base_bleed_loss}: at most `max_points` entries per list, JSON-safe;
        base_val_loss (None without validation) is the step-0 reference line, rollbacks the steps
        where the NaN guard rolled back, bleed_* the concept-bleed line and its step-0 value
        (empty / None without a control set).

`chart_points` keeps the lowest and highest raw loss of each bucket (plus the first and last
point): averaging would hide the spikes that explain a diagnosis.
"""

from __future__ import annotations

import numpy as np

from .monitor import History


def _keep_indices(values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices to keep: all of them if they fit, else the first, the last and the lowest and
    highest value of each of (max_points - 2) // 2 equal buckets in between, in order."""
    n = values.size
    if n <= max_points:
        return np.arange(n)
    keep = [0, n - 1]
    buckets = (max_points - 2) // 2
    for bucket in np.array_split(np.arange(1, n - 1), buckets) if buckets else []:
        if bucket.size:
            chunk = values[bucket]
            keep += [int(bucket[np.argmin(chunk)]), int(bucket[np.argmax(chunk)])]
    return np.unique(keep)


def chart_points(history: History, max_points: int = 500) -> dict:
    """Decimated history for the browser chart: at most `max_points` entries in each list.

    Points are whole records taken from the history (same index in step, loss, smoothed and lr),
    never averages, so a spike the diagnosis talks about is still on the chart. The first and last
    points are always kept. NaN steps beyond `max_points` are thinned evenly, keeping the last.
    """
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be a whole number >= 2, got {max_points!r}")
    keep = _keep_indices(np.asarray(history.loss, dtype=float), max_points)
    val_keep = _keep_indices(np.asarray(history.val_loss, dtype=float), max_points)
    bleed_keep = _keep_indices(np.asarray(history.bleed_loss, dtype=float), max_points)
    nan_steps = sorted(set(history.nan_steps))
    if len(nan_steps) > max_points:
        picks = np.unique(np.round(np.linspace(0, len(nan_steps) - 1, max_points)).astype(int))
        nan_steps = [nan_steps[i] for i in picks]

    def pick(values, indices, kind):
        return [kind(values[i]) for i in indices.tolist()]

    return {
        "step": pick(history.step, keep, int),
        "loss": pick(history.loss, keep, float),
        "smoothed": pick(history.smoothed, keep, float),
        "lr": pick(history.lr, keep, float),
        "val_step": pick(history.val_step, val_keep, int),
        "val_loss": pick(history.val_loss, val_keep, float),
        "nan_steps": [int(s) for s in nan_steps],
        "base_val_loss": history.base_val_loss,
        "rollbacks": [int(r["step"]) for r in history.rollbacks[-max_points:]],
        "bleed_step": pick(history.bleed_step, bleed_keep, int),
        "bleed_loss": pick(history.bleed_loss, bleed_keep, float),
        "base_bleed_loss": history.base_bleed_loss,
    }
