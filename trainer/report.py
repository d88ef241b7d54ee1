"""The training report: the loss curve, the learning rate and the diagnosis, as one image or as
chart data for the browser.

Drawn with PIL alone, so a report renders anywhere the engine runs (no plotting library).

Public API:
    render_report(history, diagnosis=None, title="", width=1024, height=640, *, lr_plan=None)
        -> np.ndarray uint8 [height, width, 3]
        Title line; the loss panel (raw per-step loss as a light thin line, the smoothed loss as a
        bold line, validation loss as markers joined by a line, the base model's validation loss
        as a dashed reference line, the concept-bleed loss (markers joined by a line) with its step-0
        value dashed in its colour, NaN steps as red ticks on the x axis, legend); below it the learning-rate panel; on the right the text box with
        `report_lines`. The loss axis is logarithmic when the values span more than
        LOG_SCALE_RATIO, else linear, and the panel header says which. `lr_plan` is
        `schedule.preview(...)` output: drawn faintly behind the recorded lr, it stretches the
        x axis to the planned end of the run, so the picture shows how far along training is.
        For a ComfyUI IMAGE: torch.from_numpy(img).float()[None] / 255.
    report_lines(history, diagnosis=None) -> list[str]
        The text box's lines before wrapping: verdict, headline, up to MAX_ADVICE advice lines,
        then steps, NaN count, last smoothed loss and best validation loss with its step.
    report_layout(width, height) -> ReportLayout
        Where render_report puts the title, the two plot areas (inside the axes) and the text box.
    chart_points(history, max_points=500) -> dict     (trainer/chart.py, re-exported here)

Long runs are decimated before drawing: for every pixel column only the first, lowest, highest and
last value are kept and joined in that order, which colours exactly the pixels the full line would,
so 100k steps draw as fast as 1k and a one-step spike still shows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import ConfigError
from .diagnosis import Diagnosis
from .chart import chart_points  # noqa: F401  (part of this module's API)
from .monitor import History

LOG_SCALE_RATIO = 20.0  # loss axis turns logarithmic when max / min exceeds this
MAX_ADVICE = 3  # advice lines shown in the text box
MIN_WIDTH, MIN_HEIGHT = 320, 200  # below this the panels have no room for their labels
_LOG_FLOOR = 1e-8  # log axis spans at most 8 decades below the top, so a loss of 0 stays drawable

# Colours: every series has its own, none of them shared with the text, so a chart stays readable
# in grey-scale screenshots and the tests can find each series by its exact colour.
BACKGROUND = (255, 255, 255)
TEXT = (38, 40, 46)
MUTED = (112, 116, 124)
GRID = (233, 235, 239)
AXIS = (150, 154, 162)
BOX_FILL = (246, 247, 250)
BOX_EDGE = (214, 217, 224)
RAW = (178, 198, 224)
SMOOTHED = (24, 78, 168)
VALIDATION = (232, 118, 12)
BASE = (128, 60, 170)  # the base model's validation loss: the step-0 reference line
BLEED = (0, 150, 160)  # concept bleed: the control images' loss (dashed: the base model's)
NAN = (214, 39, 40)
LR = (46, 139, 87)
LR_PLAN = (196, 226, 206)
VERDICT_COLORS = {
    "learning": (30, 128, 60),
    "converged": (30, 128, 60),
    "warming_up": (92, 96, 104),
    "no_trend": (92, 96, 104),
    "not_learning": (196, 104, 0),
    "overfitting": (196, 104, 0),
    "diverged": (190, 24, 24),
    "nan": (190, 24, 24),
    "bleeding": (196, 104, 0),
}

Box = tuple[int, int, int, int]  # x0, y0, x1, y1; x1 and y1 are the last pixel inside


class ReportLayout(NamedTuple):
    """Pixel boxes of the report. `loss` and `lr` are the plot areas inside the axes."""

    title: Box
    loss: Box
    lr: Box
    text: Box
    font_size: int


# --- fonts and text ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        # Pillow < 10.1 has no sized default font, and a Pillow without FreeType cannot scale it:
        # the fixed bitmap font is small but still readable.
        return ImageFont.load_default()


def _text_height(draw: ImageDraw.ImageDraw, font) -> int:
    return draw.textbbox((0, 0), "Ag", font=font)[3]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than the line is cut where it overflows."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


def _fmt(value: float) -> str:
    """Short number for labels: 0.0823, 1.5, 250; 1e-4 and 2.5e5 outside [1e-3, 1e4)."""
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _fmt_step(step: float) -> str:
    step = int(round(step))
    return f"{step / 1000:g}k" if abs(step) >= 10_000 else str(step)


# --- the text box --------------------------------------------------------------------------------


def _text_items(history: History, diagnosis: Diagnosis | None) -> list[tuple[str, str]]:
    """(style, text) pairs of the text box; the style only picks font and colour."""
    items: list[tuple[str, str]] = []
    if diagnosis is not None:
        items.append(("verdict", diagnosis.verdict.replace("_", " ").capitalize()))
        items.append(("headline", diagnosis.headline))
        items.extend(("advice", f"- {line}") for line in diagnosis.advice[:MAX_ADVICE])
        items.append(("gap", ""))
    if not history.step and not history.val_step:
        items.append(("stat", "No training steps recorded yet."))
    else:
        last = f" (last: step {history.step[-1]})" if history.step else ""
        items.append(("stat", f"Steps: {len(history.step)}{last}"))
    if history.nan_steps:
        last_nan = max(history.nan_steps)
        items.append(("stat", f"NaN steps: {len(history.nan_steps)} (last: {last_nan})"))
    if history.smoothed:
        items.append(("stat", f"Last smoothed loss: {history.smoothed[-1]:.4g}"))
    if history.val_loss:
        best = int(np.argmin(history.val_loss))
        best_loss, best_step = history.val_loss[best], history.val_step[best]
        items.append(("stat", f"Best val loss: {best_loss:.4g} at step {best_step}"))
    if history.base_val_loss is not None:
        items.append(("stat", f"Base model val loss: {history.base_val_loss:.4g}"))
    if history.bleed_loss and history.base_bleed_loss:
        items.append(("stat", f"Bleed: {history.bleed_loss[-1] / history.base_bleed_loss - 1:+.1%} against the base model"))
    if history.rollbacks:
        last = history.rollbacks[-1]
        items.append(("stat", f"NaN-guard rollbacks: {len(history.rollbacks)} (LR now {last['lr_scale']:g}x the plan)"))
    return items


def report_lines(history: History, diagnosis: Diagnosis | None = None) -> list[str]:
    """The text box's lines, before wrapping (see the module docstring)."""
    return [text for _, text in _text_items(history, diagnosis) if text]


def _draw_text_box(draw, box: Box, items: list[tuple[str, str]], size: int) -> None:
    x0, y0, x1, y1 = box
    draw.rounded_rectangle(box, radius=max(3, size // 2), fill=BOX_FILL, outline=BOX_EDGE)
    pad = max(6, size // 2 + 2)
    y, width = y0 + pad, x1 - x0 - 2 * pad
    for style, text in items:
        if style == "gap":
            y += size // 2
            draw.line((x0 + pad, y, x1 - pad, y), fill=BOX_EDGE)
            y += size // 2
            continue
        font = _font(round(size * 1.35) if style == "verdict" else size)
        color = MUTED if style == "stat" else TEXT
        if style == "verdict":
            color = VERDICT_COLORS.get(text.lower().replace(" ", "_"), TEXT)
        # Advice hangs under its dash, so wrapped lines read as one item.
        indent = draw.textlength("- ", font=font) if style == "advice" else 0
        line_h = _text_height(draw, font) + max(2, size // 4)
        for i, line in enumerate(_wrap(draw, text, font, width - indent)):
            if y + line_h > y1 - pad // 2:
                # Out of room: say so rather than silently dropping the rest.
                draw.text((x0 + pad, y - line_h // 2), "...", font=font, fill=MUTED)
                return
            draw.text((x0 + pad + (indent if i else 0), y), line, font=font, fill=color)
            y += line_h
        if style in ("verdict", "headline"):
            y += max(2, size // 3)


# --- layout --------------------------------------------------------------------------------------


def _check_size(width, height) -> None:
    for name, value, least in (("width", width, MIN_WIDTH), ("height", height, MIN_HEIGHT)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(
                name, f"expected a whole number of pixels >= {least}, got {value!r}."
            )


def report_layout(width: int = 1024, height: int = 640) -> ReportLayout:
    """Boxes of the report at this size; fonts grow with the image so labels stay legible."""
    _check_size(width, height)
    size = max(10, round(min(width / 1.6, height) / 46))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(size)
    line_h = _text_height(draw, font) + max(3, size // 3)
    title_h = _text_height(draw, _font(round(size * 1.45)))
    pad = max(6, size // 2 + 2)

    text_w = min(420, max(150, int(width * 0.3)))
    text_box = (width - pad - text_w, pad + title_h + pad, width - pad - 1, height - pad - 1)
    top, bottom = text_box[1], text_box[3]

    # Room left of the plots for y tick labels such as "0.0823" or "2.5e-5".
    left = pad + int(draw.textlength("-8.88e-8", font=font)) + pad
    right = text_box[0] - pad - size  # the last x tick label is centred on the right edge
    # Fixed rows: loss header, loss x labels, gap, lr header, lr x labels, "step" axis title.
    fixed = 5 * line_h + pad
    plots_h = max(40, bottom - top - fixed)
    loss_h = round(plots_h * 0.74)
    loss = (left, top + line_h, right, top + line_h + loss_h)
    lr_top = loss[3] + line_h + pad + line_h
    lr = (left, lr_top, right, max(lr_top + 10, bottom - 2 * line_h))
    return ReportLayout((pad, pad, width - pad - 1, pad + title_h), loss, lr, text_box, size)


# --- axes ----------------------------------------------------------------------------------------


class _Axis(NamedTuple):
    """Maps data values to pixels: `lo` lands on pixel `p0`, `hi` on pixel `p1`."""

    lo: float
    hi: float
    log: bool
    p0: float
    p1: float

    def px(self, values) -> np.ndarray:
        v = np.asarray(values, dtype=float)
        lo, hi = self.lo, self.hi
        if self.log:
            # Values below the axis (a loss of exactly 0) sit on its bottom edge.
            v, lo, hi = np.log10(np.maximum(v, lo)), math.log10(lo), math.log10(hi)
        return self.p0 + (v - lo) / (hi - lo) * (self.p1 - self.p0)


def _loss_range(values: np.ndarray) -> tuple[float, float, bool]:
    """(lo, hi, log) of the loss axis, padded so no point sits on the frame."""
    if values.size == 0:
        return 0.0, 1.0, False
    lo, hi = float(values.min()), float(values.max())
    if hi > 0:
        low_positive = max(float(values[values > 0].min()), hi * _LOG_FLOOR)
        if hi / low_positive > LOG_SCALE_RATIO:
            margin = (hi / low_positive) ** 0.04
            return low_positive / margin, hi * margin, True
    span = hi - lo
    if span <= abs(hi) * 1e-9:
        # All losses equal: centre the flat line instead of dividing by a zero span.
        half = abs(hi) * 0.1 or 1.0
        return lo - half, hi + half, False
    low = lo - 0.06 * span
    return (max(low, 0.0) if lo >= 0 else low), hi + 0.06 * span, False


def _nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * magnitude >= raw * (1 - 1e-9):
            return m * magnitude
    return 10.0 * magnitude


def _linear_ticks(lo: float, hi: float, target: int, least_step: float = 0.0) -> list[float]:
    step = max(_nice_step(hi - lo, target), least_step)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def _log_ticks(lo: float, hi: float, target: int) -> list[float]:
    first, last = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    decades = list(range(first, last + 1))
    every = max(1, math.ceil(len(decades) / max(1, target)))
    ticks = [10.0**d for d in decades[::every]]
    if len(ticks) < 3:
        # Under two decades the powers of ten alone leave the axis nearly unlabelled.
        extra = [m * 10.0**d for d in range(first - 1, last + 1) for m in (2.0, 5.0)]
        ticks = sorted(ticks + [t for t in extra if lo <= t <= hi])
    return ticks


def _x_range(history: History, plan: np.ndarray) -> tuple[float, float]:
    steps = [*history.step, *history.val_step, *history.nan_steps]
    if plan.size:
        steps += [plan[0, 0], plan[-1, 0]]
    if not steps:
        return 0.0, 1.0
    lo, hi = float(min(steps)), float(max(steps))
    if hi > lo:
        return lo, hi
    # One step only: give it room, without inventing negative steps around a validation at 0.
    return (max(0.0, lo - 1), hi + 1) if lo > 0 else (lo - 1 if lo < 0 else 0.0, hi + 1)


def _draw_label(draw, x: float, y: float, text: str, font, fill, align: str) -> None:
    """Text whose left / centre / right edge ("l", "c", "r") is at x, vertically centred on y.

    Placed by measuring instead of with anchors, which the bitmap fallback font does not support.
    """
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    dx = {"l": 0, "c": (right - left) / 2, "r": right - left}[align]
    draw.text((x - dx - left, y - (top + bottom) / 2), text, font=font, fill=fill)


def _draw_axes(draw, box: Box, xaxis: _Axis, yaxis: _Axis, yticks, size: int, labels: bool):
    x0, y0, x1, y1 = box
    font = _font(max(9, size - 1))
    xticks = _linear_ticks(xaxis.lo, xaxis.hi, max(2, (x1 - x0) // (size * 6)), least_step=1.0)
    for value in yticks:
        y = round(float(yaxis.px(value)))
        draw.line((x0, y, x1, y), fill=GRID)
        if labels:
            _draw_label(draw, x0 - size // 2, y, _fmt(value), font, MUTED, "r")
    for value in xticks:
        x = round(float(xaxis.px(value)))
        draw.line((x, y0, x, y1), fill=GRID)
        if labels:
            draw.line((x, y1, x, y1 + 3), fill=AXIS)
            _draw_label(draw, x, y1 + 4 + size * 0.6, _fmt_step(value), font, MUTED, "c")
    draw.rectangle(box, outline=AXIS)


def _draw_legend(draw, box: Box, header: str, entries: list[tuple[str, tuple, int]], size: int):
    """Panel header on the left and legend entries right-aligned, in the row above the plot."""
    x0, y0, x1, _ = box
    font = _font(size)
    y = y0 - _text_height(draw, font) * 0.75 - 2
    _draw_label(draw, x0, y, header, font, TEXT, "l")
    swatch, gap = size + 6, size
    x = x1
    for label, color, line_width in reversed(entries):
        x -= draw.textlength(label, font=font)
        _draw_label(draw, x, y, label, font, MUTED, "l")
        x -= 4 + swatch
        draw.line((x, round(y), x + swatch, round(y)), fill=color, width=line_width)
        x -= gap


# --- series --------------------------------------------------------------------------------------


def _m4(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
    """First, lowest, highest and last point of each pixel column, in that order.

    Joined as a polyline this colours the same pixels as the full line (each column's vertical
    extent, then on to the next column), with at most four points per column.
    """
    cols = np.floor(xs).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    ends = np.r_[starts[1:], len(cols)] - 1
    quad = np.stack(
        [ys[starts], np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts), ys[ends]],
        axis=1,
    )
    return list(zip(np.repeat(cols[starts], 4).tolist(), quad.ravel().tolist()))


def _line(draw, xs: np.ndarray, ys: np.ndarray, color, width: int) -> None:
    if xs.size == 0:
        return
    points = _m4(xs, ys)
    if len(points) > 1:
        draw.line(points, fill=color, width=width, joint="curve" if width > 2 else None)


def _dots(draw, xs, ys, color, radius: float, outline=None) -> None:
    for x, y in zip(np.asarray(xs).tolist(), np.asarray(ys).tolist()):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline=outline)


def _sorted_by_step(steps, *series) -> list[np.ndarray]:
    """Arrays in step order; the decimation needs each pixel column to be one contiguous run."""
    steps = np.asarray(steps, dtype=float)
    arrays = [np.asarray(s, dtype=float) for s in series]
    if steps.size > 1 and np.any(np.diff(steps) < 0):
        order = np.argsort(steps, kind="stable")
        steps, arrays = steps[order], [a[order] for a in arrays]
    return [steps, *arrays]


# --- panels --------------------------------------------------------------------------------------


def _inset_x(box: Box, lo: float, hi: float) -> _Axis:
    # A few pixels in from the frame, so points at the first and last step are not on the axis.
    return _Axis(lo, hi, False, box[0] + 3, box[2] - 3)


def _draw_loss_panel(draw, box: Box, history: History, x_range, size: int) -> None:
    x0, y0, x1, y1 = box
    steps, loss, smoothed = _sorted_by_step(history.step, history.loss, history.smoothed)
    val_steps, val_loss = _sorted_by_step(history.val_step, history.val_loss)
    base = [] if history.base_val_loss is None else [history.base_val_loss]
    bleed_steps, bleed = _sorted_by_step(history.bleed_step, history.bleed_loss)
    bleed_base = [] if history.base_bleed_loss is None else [history.base_bleed_loss]
    lo, hi, log = _loss_range(np.concatenate([loss, smoothed, val_loss, base, bleed, bleed_base]))
    xaxis = _inset_x(box, *x_range)
    yaxis = _Axis(lo, hi, log, y1 - 3, y0 + 3)
    has_data = bool(steps.size or val_steps.size or bleed_steps.size or history.nan_steps)
    if log:
        yticks = _log_ticks(lo, hi, 6)
    else:
        yticks = _linear_ticks(lo, hi, max(2, (y1 - y0) // (size * 3)))
    _draw_axes(draw, box, xaxis, yaxis, yticks if has_data else [], size, has_data)

    entries = [("per step", RAW, 2), ("smoothed", SMOOTHED, 3)] if steps.size else []
    if val_steps.size:
        entries.append(("validation", VALIDATION, 2))
    if base:
        entries.append(("base model", BASE, 2))
    if bleed_steps.size:
        entries.append(("bleed", BLEED, 2))
    if history.nan_steps:
        entries.append(("NaN step", NAN, 2))
    header = f"Loss ({'log' if log else 'linear'} scale)"
    _draw_legend(draw, box, header, entries if has_data else [], size)
    if not has_data:
        center = ((x0 + x1) / 2, (y0 + y1) / 2)
        _draw_label(draw, *center, "No data yet", _font(round(size * 1.3)), MUTED, "c")
        return

    # The step-0 references, dashed across the panel: validation and bleed of the model without the LoRA.
    for value, color in [(v, BASE) for v in base] + [(v, BLEED) for v in bleed_base if bleed_steps.size]:
        y = round(float(yaxis.px(value)))
        dash = max(4, size // 2)
        for x in range(x0 + 1, x1, 2 * dash):
            draw.line((x, y, min(x + dash, x1 - 1), y), fill=color, width=2)
    bold = max(3, round(size / 5))
    xs, raw_ys, smooth_ys = xaxis.px(steps), yaxis.px(loss), yaxis.px(smoothed)
    _line(draw, xs, raw_ys, RAW, 1)
    if 0 < steps.size <= (x1 - x0) / 8:
        _dots(draw, xs, raw_ys, RAW, 1.5)  # few points: show each measurement, not just the line
    _line(draw, xs, smooth_ys, SMOOTHED, bold)
    if steps.size:
        # The current smoothed value, which also keeps a single-point history visible.
        _dots(draw, xs[-1:], smooth_ys[-1:], SMOOTHED, bold)

    for measured, values, color in ((val_steps, val_loss, VALIDATION), (bleed_steps, bleed, BLEED)):
        if measured.size:
            vx, vy = xaxis.px(measured), yaxis.px(values)
            _line(draw, vx, vy, color, 2)
            radius = max(3, size // 4)
            if measured.size <= (x1 - x0) / (3 * radius):
                _dots(draw, vx, vy, color, radius, outline=BACKGROUND)

    if history.nan_steps:
        tick = max(6, size // 2)
        for x in np.unique(np.round(xaxis.px(history.nan_steps))).tolist():
            draw.line((x, y1 - tick, x, y1), fill=NAN, width=2)


def _plan_points(lr_plan) -> np.ndarray:
    """schedule.preview() pairs as an array of (history step, lr).

    preview counts 0-based optimizer steps (s is the lr of update s + 1) while History records the
    step after the update, 1-based, so the plan shifts by one to line up with the recorded lr.
    """
    if lr_plan is None or len(lr_plan) == 0:
        return np.zeros((0, 2))
    plan = np.asarray(lr_plan, dtype=float).reshape(-1, 2)
    return np.column_stack([plan[:, 0] + 1, plan[:, 1]])


def _draw_lr_panel(draw, box: Box, history: History, plan: np.ndarray, x_range, size: int) -> None:
    x0, y0, x1, y1 = box
    steps, lr = _sorted_by_step(history.step, history.lr)
    has_data = bool(steps.size or plan.size)
    top = max([*lr.tolist(), *plan[:, 1].tolist(), 0.0])
    xaxis = _inset_x(box, *x_range)
    yaxis = _Axis(0.0, top * 1.1 if top > 0 else 1.0, False, y1 - 3, y0 + 3)
    yticks = _linear_ticks(yaxis.lo, yaxis.hi, max(2, (y1 - y0) // (size * 3)))
    _draw_axes(draw, box, xaxis, yaxis, yticks if has_data else [], size, has_data)
    entries = [("recorded", LR, 2)] + ([("planned", LR_PLAN, 4)] if plan.size else [])
    _draw_legend(draw, box, "Learning rate", entries if has_data else [], size)
    if plan.size:
        _line(draw, xaxis.px(plan[:, 0]), yaxis.px(plan[:, 1]), LR_PLAN, 4)
    _line(draw, xaxis.px(steps), yaxis.px(lr), LR, 2)
    if steps.size == 1:
        _dots(draw, xaxis.px(steps), yaxis.px(lr), LR, 2)
    if has_data:
        _draw_label(draw, (x0 + x1) / 2, y1 + 2.2 * size + 4, "step", _font(size), MUTED, "c")


# --- public --------------------------------------------------------------------------------------


def render_report(
    history: History,
    diagnosis: Diagnosis | None = None,
    title: str = "",
    width: int = 1024,
    height: int = 640,
    *,
    lr_plan: Sequence[tuple[int, float]] | None = None,
) -> np.ndarray:
    """The training report as an RGB uint8 array [height, width, 3] (see the module docstring)."""
    layout = report_layout(width, height)
    size = layout.font_size
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    title_font = _font(round(size * 1.45))
    title_text = title.strip() or "LoRA Lab training report"
    fitted = _wrap(draw, title_text, title_font, layout.title[2] - layout.title[0])
    if len(fitted) > 1:
        title_text = fitted[0].rstrip() + "..."
    draw.text(layout.title[:2], title_text, font=title_font, fill=TEXT)

    plan = _plan_points(lr_plan)
    x_range = _x_range(history, plan)
    _draw_loss_panel(draw, layout.loss, history, x_range, size)
    _draw_lr_panel(draw, layout.lr, history, plan, x_range, size)
    _draw_text_box(draw, layout.text, _text_items(history, diagnosis), size)
    return np.array(image, dtype=np.uint8)
