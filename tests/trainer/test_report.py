import json
import math
import time

import numpy as np
import pytest
from PIL import ImageFont

from trainer import report
from trainer.errors import ConfigError
from trainer.diagnosis import Diagnosis, diagnose
from trainer.monitor import History
from trainer.report import (
    LR,
    LR_PLAN,
    MAX_ADVICE,
    NAN,
    RAW,
    SMOOTHED,
    VALIDATION,
    BASE,
    BLEED,
    chart_points,
    render_report,
    report_layout,
    report_lines,
)
from trainer.schedule import ScheduleConfig, lr_multiplier, preview

W, H = 800, 500


def noisy_history(n=300, seed=0, level=0.1, lr=1e-4, val_every=0):
    rng = np.random.default_rng(seed)
    h = History()
    for step in range(1, n + 1):
        noise = math.exp(0.4 * rng.standard_normal())
        h.record(step, level * (1 + math.exp(-step / 60)) * noise, lr, 0)
        if val_every and step % val_every == 0:
            h.record_validation(step, level * (1 + math.exp(-step / 80)))
    return h


def pixels_of(img, box, color):
    """Boolean mask, over `box` (inclusive), of the pixels with exactly this colour."""
    x0, y0, x1, y1 = box
    return np.all(img[y0 : y1 + 1, x0 : x1 + 1] == np.array(color, dtype=np.uint8), axis=-1)


def has(img, box, color):
    return bool(pixels_of(img, box, color).any())


def whole(img):
    return (0, 0, img.shape[1] - 1, img.shape[0] - 1)


def inside(box):
    # The plot minus its frame, so the axis lines do not count as drawing.
    x0, y0, x1, y1 = box
    return (x0 + 1, y0 + 1, x1 - 1, y1 - 1)


def ink(img, box):
    """Number of pixels in `box` that differ from the box's most common colour (its background)."""
    x0, y0, x1, y1 = box
    region = img[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3)
    colors, counts = np.unique(region, axis=0, return_counts=True)
    return int(np.sum(np.any(region != colors[np.argmax(counts)], axis=1)))


DIAGNOSIS = Diagnosis(
    "overfitting",
    "Validation loss is rising while training loss keeps falling.",
    [
        "pick the checkpoint at step 800",
        "train fewer epochs",
        "lower unet_lr",
        "more images",
        "lower rank",
    ],
    {},
)


# --- the image ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1024, 640), (W, H), (320, 200), (1600, 900)])
def test_shape_and_dtype(size):
    img = render_report(noisy_history(), width=size[0], height=size[1])
    assert img.shape == (size[1], size[0], 3) and img.dtype == np.uint8
    assert img.flags.writeable  # ComfyUI wraps it with torch.from_numpy


def test_series_are_drawn_inside_the_loss_plot():
    img = render_report(noisy_history(), width=W, height=H)
    plot = inside(report_layout(W, H).loss)
    assert has(img, plot, SMOOTHED)
    assert has(img, plot, RAW)


def test_smoothed_line_follows_the_curve_from_high_on_the_left_to_low_on_the_right():
    img = render_report(noisy_history(n=400), width=W, height=H)
    x0, y0, x1, y1 = inside(report_layout(W, H).loss)
    mask = pixels_of(img, (x0, y0, x1, y1), SMOOTHED)
    rows = lambda cols: np.nonzero(mask[:, cols].any(axis=1))[0].mean()  # noqa: E731
    width = x1 - x0
    assert rows(slice(5, width // 10)) < rows(slice(width - width // 10, width - 5))


def test_validation_colour_only_with_validation_data():
    without = render_report(noisy_history(), width=W, height=H)
    assert not has(without, whole(without), VALIDATION)
    with_val = render_report(noisy_history(val_every=50), width=W, height=H)
    assert has(with_val, inside(report_layout(W, H).loss), VALIDATION)


def test_the_base_model_reference_is_a_dashed_line_at_its_level_only_when_measured():
    h = noisy_history(val_every=50)
    without = render_report(h, width=W, height=H)
    assert not has(without, whole(without), BASE)
    h.base_val_loss = 0.25  # above every validation: the LoRA made the model better
    img = render_report(h, width=W, height=H)
    x0, y0, x1, y1 = inside(report_layout(W, H).loss)
    mask = pixels_of(img, (x0, y0, x1, y1), BASE)
    rows, cols = np.nonzero(mask)
    assert rows.size and rows.max() - rows.min() <= 2  # one horizontal line
    val_rows = np.nonzero(pixels_of(img, (x0, y0, x1, y1), VALIDATION).any(axis=1))[0]
    assert rows.mean() < val_rows.min()  # drawn above the (lower) validation losses
    covered = np.unique(cols)
    assert covered.size < 0.8 * (x1 - x0) and covered.max() - covered.min() > 0.9 * (x1 - x0)  # dashed, full width
    assert "Base model val loss: 0.25" in report_lines(h)


def test_the_bleed_line_and_its_base_are_drawn_only_with_a_control_set():
    h = noisy_history(val_every=50)
    without = render_report(h, width=W, height=H)
    assert not has(without, whole(without), BLEED)
    for step in h.val_step:
        h.record_bleed(step, 0.1 * (1 + step / 1000))  # rising above the base model's 0.1
    h.base_bleed_loss = 0.1
    img = render_report(h, width=W, height=H)
    x0, y0, x1, y1 = inside(report_layout(W, H).loss)
    rows, cols = np.nonzero(pixels_of(img, (x0, y0, x1, y1), BLEED))
    assert rows.size and np.unique(cols).max() - np.unique(cols).min() > 0.9 * (x1 - x0)  # the dashed base spans the panel
    assert rows.max() - rows.min() > 5  # and the measured line rises off it
    assert any(line.startswith("Bleed: +") for line in report_lines(h))
    points = chart_points(h)
    assert points["bleed_step"] == h.bleed_step and points["base_bleed_loss"] == 0.1


def test_rollbacks_are_stated_in_the_text_and_sent_to_the_chart():
    h = noisy_history(n=50, val_every=10)
    h.record_rollback(12, 0, 0.5)
    h.record_rollback(14, 0, 0.25)
    assert "NaN-guard rollbacks: 2 (LR now 0.25x the plan)" in report_lines(h)
    assert chart_points(h)["rollbacks"] == [12, 14]


def test_nan_steps_are_red_ticks_on_the_x_axis():
    h = noisy_history()
    clean = render_report(h, width=W, height=H)
    assert not has(clean, whole(clean), NAN)
    h.record(301, float("nan"), 1e-4, 0)
    img = render_report(h, width=W, height=H)
    x0, y0, x1, y1 = inside(report_layout(W, H).loss)
    rows = np.nonzero(pixels_of(img, (x0, y0, x1, y1), NAN).any(axis=1))[0]
    assert rows.size and rows.min() > (y1 - y0) * 0.8  # a short tick standing on the axis


def test_lr_panel_draws_the_recorded_lr_and_the_plan():
    total = 200
    config = ScheduleConfig(name="cosine", warmup_steps=20)
    h = History()
    for step in range(1, 101):
        h.record(step, 0.1, 1e-4 * lr_multiplier(config, step - 1, total), 0)
    plot = inside(report_layout(W, H).lr)
    plain = render_report(h, width=W, height=H)
    assert has(plain, plot, LR) and not has(plain, whole(plain), LR_PLAN)

    img = render_report(h, width=W, height=H, lr_plan=preview(config, 1e-4, total))
    assert has(img, plot, LR_PLAN)
    # The plan stretches the x axis to step 200, so the recorded lr fills only the left half.
    lr_cols = np.nonzero(pixels_of(img, plot, LR).any(axis=0))[0]
    plan_cols = np.nonzero(pixels_of(img, plot, LR_PLAN).any(axis=0))[0]
    assert lr_cols.max() < 0.6 * (plot[2] - plot[0]) < plan_cols.max()


def test_lr_plan_lines_up_with_the_recorded_lr():
    # preview's step s is History's step s + 1: drawn together, the two lines coincide.
    total = 100
    config = ScheduleConfig(name="linear", warmup_steps=10)
    h = History()
    for step in range(1, total + 1):
        h.record(step, 0.1, 1e-4 * lr_multiplier(config, step - 1, total), 0)
    img = render_report(h, width=W, height=H, lr_plan=preview(config, 1e-4, total))
    plot = inside(report_layout(W, H).lr)
    plan_only = pixels_of(img, plot, LR_PLAN)
    recorded = pixels_of(img, plot, LR)
    # The plan is the thicker line, so its edges show; each visible plan pixel must be right next
    # to the recorded line. Off by one step, the warmup ramp alone would be several pixels apart.
    for row, col in zip(*np.nonzero(plan_only)):
        assert recorded[max(0, row - 3) : row + 4, max(0, col - 3) : col + 4].any()


def test_empty_history_renders_a_message_and_no_series():
    img = render_report(History(), width=W, height=H)
    plot = inside(report_layout(W, H).loss)
    for color in (RAW, SMOOTHED, VALIDATION, NAN, LR):
        assert not has(img, whole(img), color)
    assert ink(img, plot) > 50  # "No data yet"


def test_single_point_is_visible():
    h = History()
    h.record(1, 0.3, 1e-4, 0)
    img = render_report(h, diagnose(h), width=W, height=H)
    layout = report_layout(W, H)
    assert has(img, inside(layout.loss), SMOOTHED)
    assert has(img, inside(layout.lr), LR)


def test_validation_before_the_first_step_renders():
    h = History()
    h.record_validation(0, 0.2)  # the loop measures the untrained LoRA first
    img = render_report(h, width=W, height=H)
    assert has(img, inside(report_layout(W, H).loss), VALIDATION)


def test_equal_losses_draw_a_flat_line_in_the_middle():
    h = History()
    for step in range(1, 101):
        h.record(step, 0.25, 1e-4, 0)
    img = render_report(h, width=W, height=H)
    x0, y0, x1, y1 = box = inside(report_layout(W, H).loss)
    rows = np.nonzero(pixels_of(img, box, SMOOTHED).any(axis=1))[0] + y0
    assert rows.max() - rows.min() <= 12  # the line (and its end dot), nothing else
    assert abs(rows.mean() - (y0 + y1) / 2) < (y1 - y0) * 0.1


def test_a_huge_spike_switches_to_log_scale_and_keeps_the_curve_readable():
    rng = np.random.default_rng(3)
    h = History()
    for step in range(1, 401):
        loss = 1e4 if step == 100 else 0.1 * math.exp(0.3 * rng.standard_normal())
        h.record(step, loss, 1e-4, 0)
    img = render_report(h, width=W, height=H)
    x0, y0, x1, y1 = box = inside(report_layout(W, H).loss)
    mask = pixels_of(img, box, SMOOTHED)
    end_rows = np.nonzero(mask[:, -(x1 - x0) // 10 :].any(axis=1))[0]
    # On a linear axis up to 1e4 the settled 0.1 curve would lie on the bottom pixel row.
    assert end_rows.max() < (y1 - y0) * 0.95
    # The raw spike itself still reaches the top of the plot.
    assert np.nonzero(pixels_of(img, box, RAW).any(axis=1))[0].min() < (y1 - y0) * 0.05


def test_100k_points_render_fast():
    rng = np.random.default_rng(4)
    h = History()
    n = 100_000
    losses = 0.1 * np.exp(0.5 * rng.standard_normal(n))
    h.step = list(range(1, n + 1))
    h.loss = losses.tolist()
    h.smoothed = losses.tolist()
    h.lr = [1e-4] * n
    h.epoch = [0] * n
    start = time.perf_counter()
    img = render_report(h, width=W, height=H)
    assert time.perf_counter() - start < 2.0
    # Drawn across the whole plot width, not only the first or last stretch.
    plot = inside(report_layout(W, H).loss)
    cols = np.nonzero(pixels_of(img, plot, SMOOTHED).any(axis=0))[0]
    assert cols.min() < 10 and cols.max() > plot[2] - plot[0] - 10


def test_unsorted_steps_render():
    h = History()
    for step in (5, 3, 9, 1):
        h.record(step, 0.1 * step, 1e-4, 0)
    assert render_report(h, width=W, height=H).shape == (H, W, 3)


def test_diagnosis_text_is_drawn_in_the_text_box():
    h = noisy_history()
    box = report_layout(W, H).text
    assert ink(render_report(h, DIAGNOSIS, width=W, height=H), box) > ink(
        render_report(h, None, width=W, height=H), box
    ) + 500


def test_too_small_a_size_is_refused():
    with pytest.raises(ConfigError) as err:
        render_report(History(), width=100, height=640)
    assert err.value.field == "width"
    with pytest.raises(ConfigError):
        render_report(History(), width=1024, height=50)


def test_renders_with_the_fixed_bitmap_font_of_old_pillow(monkeypatch):
    original = ImageFont.load_default

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() takes 0 positional arguments")
        return original()

    monkeypatch.setattr(report.ImageFont, "load_default", old_load_default)
    report._font.cache_clear()
    try:
        img = render_report(noisy_history(val_every=50), DIAGNOSIS, width=W, height=H)
    finally:
        report._font.cache_clear()
    assert has(img, inside(report_layout(W, H).loss), SMOOTHED)
    assert ink(img, report_layout(W, H).text) > 200


# --- the text box lines -------------------------------------------------------------------------


def test_report_lines_name_verdict_headline_advice_and_best_step():
    h = History()
    for step in range(1, 11):
        h.record(step, 1.0 / step, 1e-4, 0)
    for step, loss in ((2, 0.5), (6, 0.31), (10, 0.4)):
        h.record_validation(step, loss)
    lines = report_lines(h, DIAGNOSIS)
    assert lines[0] == "Overfitting"
    assert lines[1] == DIAGNOSIS.headline
    advice = [line for line in lines if line.startswith("- ")]
    assert advice == [f"- {a}" for a in DIAGNOSIS.advice[:MAX_ADVICE]]
    assert any("10" in line and "Steps" in line for line in lines)
    assert any(line.startswith("Best val loss: 0.31 at step 6") for line in lines)
    assert any(f"{h.smoothed[-1]:.4g}" in line for line in lines)


def test_report_lines_without_diagnosis_or_validation():
    h = noisy_history(n=30)
    lines = report_lines(h)
    assert not any(line.startswith("- ") for line in lines)
    assert not any("val" in line.lower() for line in lines)
    assert lines[0].startswith("Steps: 30")


def test_report_lines_count_nan_steps_and_handle_empty_history():
    h = History()
    assert report_lines(h) == ["No training steps recorded yet."]
    h.record(1, float("nan"), 1e-4, 0)
    assert any("NaN steps: 1" in line for line in report_lines(h))


def test_real_diagnosis_verdicts_are_readable():
    h = noisy_history(n=5)
    lines = report_lines(h, diagnose(h))
    assert lines[0] == "Warming up"


# --- chart points ------------------------------------------------------------------------------


def test_short_history_is_sent_whole():
    h = noisy_history(n=50, val_every=10)
    h.record(51, float("inf"), 1e-4, 0)
    points = chart_points(h, max_points=500)
    d = h.to_dict()
    for key in ("step", "loss", "smoothed", "lr", "val_step", "val_loss", "nan_steps", "base_val_loss"):
        assert points[key] == d[key]


@pytest.mark.parametrize("max_points", [2, 3, 7, 100, 500])
def test_long_history_is_bounded_keeps_ends_and_is_a_subset(max_points):
    h = noisy_history(n=5000, val_every=5)
    points = chart_points(h, max_points=max_points)
    for key in ("step", "loss", "smoothed", "lr", "val_step", "val_loss"):
        assert len(points[key]) <= max_points
    assert len({len(points[k]) for k in ("step", "loss", "smoothed", "lr")}) == 1
    assert points["step"][0] == h.step[0] and points["step"][-1] == h.step[-1]
    assert points["val_step"][-1] == h.val_step[-1]
    assert points["step"] == sorted(points["step"])
    index = {step: i for i, step in enumerate(h.step)}
    records = zip(points["step"], points["loss"], points["smoothed"], points["lr"])
    for step, loss, smooth, lr in records:
        i = index[step]  # every point is a whole record of the history
        assert (loss, smooth, lr) == (h.loss[i], h.smoothed[i], h.lr[i])


def test_spikes_survive_decimation():
    h = noisy_history(n=20_000)
    h.loss[12_345] = 50.0
    h.loss[777] = 1e-6
    points = chart_points(h, max_points=200)
    assert 50.0 in points["loss"] and 1e-6 in points["loss"]


def test_many_nan_steps_are_thinned_keeping_the_last():
    h = History()
    for step in range(1, 2001):
        h.record(step, float("nan"), 1e-4, 0)
    points = chart_points(h, max_points=100)
    assert len(points["nan_steps"]) <= 100 and points["nan_steps"][-1] == 2000
    assert set(points["nan_steps"]) <= set(h.nan_steps)


def test_chart_points_are_json_safe():
    h = noisy_history(n=3000, val_every=100)
    h.record(3001, float("nan"), 1e-4, 0)
    points = chart_points(h, max_points=300)
    assert json.loads(json.dumps(points, allow_nan=False)) == points
    for key in ("step", "val_step", "nan_steps"):
        assert all(type(v) is int for v in points[key])
    for key in ("loss", "smoothed", "lr", "val_loss"):
        assert all(type(v) is float for v in points[key])


def test_chart_points_of_empty_history():
    points = chart_points(History())
    keys = ("step", "loss", "smoothed", "lr", "val_step", "val_loss", "nan_steps", "rollbacks", "bleed_step", "bleed_loss")
    assert points == {**{key: [] for key in keys}, "base_val_loss": None, "base_bleed_loss": None}


def test_chart_points_refuses_fewer_than_two_points():
    with pytest.raises(ValueError):
        chart_points(noisy_history(), max_points=1)
