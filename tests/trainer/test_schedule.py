import math

import pytest

from trainer.errors import ConfigError
from trainer.schedule import (
    SCHEDULES,
    ScheduleConfig,
    lr_multiplier,
    preview,
    warmup_steps_for,
)


def curve(config, total):
    return [lr_multiplier(config, s, total) for s in range(total)]


# --- formulas after warmup -------------------------------------------------------------------

T = 100


@pytest.mark.parametrize("step", [0, 1, 37, 50, 99])
def test_linear_is_one_minus_progress(step):
    assert lr_multiplier(ScheduleConfig(name="linear", warmup_ratio=0.0), step, T) == pytest.approx(1 - step / T)


@pytest.mark.parametrize("step", [0, 25, 50, 75, 99])
def test_cosine_is_half_cosine(step):
    expected = 0.5 * (1 + math.cos(math.pi * step / T))
    assert lr_multiplier(ScheduleConfig(name="cosine", warmup_ratio=0.0), step, T) == pytest.approx(expected)


@pytest.mark.parametrize("step", [0, 10, 33, 34, 70, 99])
def test_restarts_formula(step):
    config = ScheduleConfig(name="cosine_with_restarts", cycles=3, warmup_ratio=0.0)
    p = step / T
    expected = 0.5 * (1 + math.cos(math.pi * ((3 * p) % 1)))
    assert lr_multiplier(config, step, T) == pytest.approx(expected)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("step", [0, 40, 99])
def test_polynomial_formula(power, step):
    config = ScheduleConfig(name="polynomial", power=power, warmup_ratio=0.0)
    assert lr_multiplier(config, step, T) == pytest.approx((1 - step / T) ** power)


def test_constant_is_flat():
    assert curve(ScheduleConfig(name="constant"), 20) == [1.0] * 20


def test_decays_reach_floor_only_after_the_last_update():
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        config = ScheduleConfig(name=name, warmup_ratio=0.0)
        assert lr_multiplier(config, T - 1, T) > 0, name
        assert lr_multiplier(config, T, T) == pytest.approx(0.0, abs=1e-12), name
        assert lr_multiplier(config, T + 50, T) == pytest.approx(0.0, abs=1e-12), name


# --- warmup ------------------------------------------------------------------------------------


def test_warmup_by_steps_follows_documented_ramp_then_decay():
    config = ScheduleConfig(name="cosine", warmup_steps=10)
    total = 110
    for s in range(10):
        assert lr_multiplier(config, s, total) == pytest.approx((s + 1) / 11)
    assert lr_multiplier(config, 0, total) > 0
    assert lr_multiplier(config, 10, total) == pytest.approx(1.0)
    # Decay runs over the 100 post-warmup steps.
    assert lr_multiplier(config, 60, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_by_ratio_resolves_to_rounded_steps():
    config = ScheduleConfig(name="linear", warmup_ratio=0.1)
    assert warmup_steps_for(config, 200) == 20
    assert warmup_steps_for(config, 55) == round(5.5)
    assert lr_multiplier(config, 19, 200) == pytest.approx(20 / 21)
    assert lr_multiplier(config, 20, 200) == pytest.approx(1.0)
    assert lr_multiplier(config, 110, 200) == pytest.approx(0.5)


def test_constant_with_warmup_ramps_then_stays_flat():
    config = ScheduleConfig(name="constant_with_warmup", warmup_steps=4)
    values = curve(config, 30)
    assert values[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert values[4:] == [1.0] * 26


def test_warmup_is_monotonic_and_below_peak():
    values = curve(ScheduleConfig(name="linear", warmup_steps=7), 50)
    assert all(a < b for a, b in zip(values[:8], values[1:8]))
    assert max(values) == pytest.approx(1.0)


# --- floor and restarts --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_min_lr_ratio_is_the_floor(name):
    config = ScheduleConfig(name=name, min_lr_ratio=0.2, cycles=2, warmup_steps=5)
    values = curve(config, 80)
    assert min(values[5:]) >= 0.2 - 1e-12
    assert lr_multiplier(config, 80, 80) == pytest.approx(0.2)
    # Mid-decay values are rescaled into [min, 1]: linear halfway is min + (1 - min) * 0.5.
    if name == "linear":
        assert lr_multiplier(config, 5 + 30, 80) == pytest.approx(0.2 + 0.8 * (1 - 30 / 75))


@pytest.mark.parametrize("cycles", [1, 2, 3, 4, 7])
def test_restarts_have_one_peak_per_cycle(cycles):
    config = ScheduleConfig(name="cosine_with_restarts", cycles=cycles, warmup_ratio=0.0)
    values = curve(config, 100)
    restarts = sum(1 for a, b in zip(values, values[1:]) if b > a)
    assert restarts + 1 == cycles
    # Every cycle restarts near the full lr, also when a cycle is not a whole number of steps.
    starts = [values[0]] + [b for a, b in zip(values, values[1:]) if b > a]
    assert all(v > 0.95 for v in starts)


# --- preview -------------------------------------------------------------------------------


def test_preview_short_run_lists_every_step_with_lr():
    config = ScheduleConfig(name="linear", warmup_steps=5)
    points = preview(config, 2e-4, 50)
    assert [s for s, _ in points] == list(range(50))
    for s, lr in points:
        assert lr == pytest.approx(2e-4 * lr_multiplier(config, s, 50))


def test_preview_long_run_is_sampled_and_keeps_corners():
    config = ScheduleConfig(name="cosine_with_restarts", cycles=3, warmup_steps=37)
    total = 10_000
    points = preview(config, 1e-4, total, points=50)
    steps = [s for s, _ in points]
    assert steps[0] == 0 and steps[-1] == total - 1
    assert steps == sorted(set(steps))
    assert 50 <= len(points) <= 60
    assert {36, 37}.issubset(steps)  # end of warmup
    for s, lr in points:
        assert lr == pytest.approx(1e-4 * lr_multiplier(config, s, total))
    # Each restart peak (full lr) is in the chart.
    assert sum(1 for _, lr in points if lr == pytest.approx(1e-4)) == 3


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "exponential"}, "scheduler"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_ratio": 0.6}, "warmup_ratio"),
        ({"warmup_ratio": -0.1}, "warmup_ratio"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"min_lr_ratio": float("nan")}, "min_lr_ratio"),
        ({"cycles": 0}, "cycles"),
        ({"power": 0.0}, "power"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        ScheduleConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_warmup_steps_win_over_the_ratio_and_constant_has_no_warmup():
    assert ScheduleConfig(warmup_steps=5, warmup_ratio=0.1) == ScheduleConfig(warmup_steps=5, warmup_ratio=0.0)
    assert warmup_steps_for(ScheduleConfig(warmup_steps=5, warmup_ratio=0.1), 100) == 5
    constant = ScheduleConfig(name="constant", warmup_steps=5, warmup_ratio=0.1)
    assert (constant.warmup_steps, constant.warmup_ratio) == (0, 0.0)
    assert curve(constant, 20) == [1.0] * 20


def test_defaults_are_cosine_with_five_percent_warmup():
    assert ScheduleConfig() == ScheduleConfig(name="cosine", warmup_steps=0, warmup_ratio=0.05, min_lr_ratio=0.0, cycles=1, power=1.0)
    assert warmup_steps_for(ScheduleConfig(), 1000) == 50


def test_all_documented_names_are_accepted():
    for name in SCHEDULES:
        ScheduleConfig(name=name, warmup_ratio=0.0)


@pytest.mark.parametrize("total", [0, -3, 2.0])
def test_bad_total_steps_is_steps_error(total):
    config = ScheduleConfig()
    for call in (
        lambda: lr_multiplier(config, 0, total),
        lambda: warmup_steps_for(config, total),
        lambda: preview(config, 1e-4, total),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == "steps"


def test_warmup_longer_than_run_is_rejected():
    with pytest.raises(ConfigError) as info:
        lr_multiplier(ScheduleConfig(warmup_steps=10), 0, 10)
    assert info.value.field == "warmup_steps"
    assert lr_multiplier(ScheduleConfig(warmup_steps=9), 9, 10) == pytest.approx(1.0)


def test_single_step_run_trains_at_full_lr():
    for name in SCHEDULES:
        assert lr_multiplier(ScheduleConfig(name=name, warmup_ratio=0.0), 0, 1) == pytest.approx(1.0)
