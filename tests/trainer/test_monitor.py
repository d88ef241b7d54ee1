import json
import math

import numpy as np
import pytest

from trainer.errors import ConfigError
from trainer.monitor import (
    VERDICTS,
    Diagnosis,
    History,
    diagnose,
    fixed_validation_plan,
    split_validation,
)

STEPS = 400
T = np.arange(1, STEPS + 1)


def noisy(level, seed, rel=0.45):
    """Per-step diffusion-like loss: the level times log-normal noise of `rel` relative spread."""
    rng = np.random.default_rng(seed)
    s = math.sqrt(math.log(1 + rel**2))
    return np.asarray(level) * np.exp(s * rng.standard_normal(len(level)) - s * s / 2)


def history_of(losses, lr=1e-4, val=()):
    h = History()
    for i, (step, loss) in enumerate(zip(T, losses)):
        h.record(int(step), float(loss), lr, i // 40)
    for step, loss in val:
        h.record_validation(step, loss)
    return h


SEEDS = range(5)


# --- History ---------------------------------------------------------------------------------


def test_smoothed_is_debiased_ema():
    h = History(ema_beta=0.9)
    for step, loss in enumerate([1.0, 2.0, 3.0], start=1):
        h.record(step, loss, 1e-4, 0)
    # s1 = 0.1, s2 = 0.29, s3 = 0.561; shown s_t / (1 - 0.9**t)
    assert h.smoothed == pytest.approx([1.0, 0.29 / 0.19, 0.561 / 0.271], rel=1e-12)
    assert h.smoothed[0] == 1.0  # no pull towards zero at the start


def test_non_finite_loss_goes_to_nan_steps_only_and_does_not_touch_the_ema():
    h = History(ema_beta=0.5)
    h.record(1, 2.0, 1e-4, 0)
    h.record(2, float("nan"), 1e-4, 0)
    h.record(3, float("inf"), 1e-4, 0)
    h.record(4, 4.0, 1e-4, 0)
    assert h.nan_steps == [2, 3]
    assert h.step == [1, 4] and h.loss == [2.0, 4.0] and len(h.lr) == len(h.epoch) == 2
    # second finite point: s = 0.5*1.0 + 0.5*4.0 = 2.5, debiased by 1 - 0.25
    assert h.smoothed == pytest.approx([2.0, 2.5 / 0.75])


def test_ema_beta_zero_shows_raw_loss_and_bad_beta_is_rejected():
    h = History(ema_beta=0.0)
    for step, loss in enumerate([0.3, 0.1, 0.2]):
        h.record(step, loss, 1e-4, 0)
    assert h.smoothed == h.loss
    with pytest.raises(ConfigError):
        History(ema_beta=1.0)


def test_epoch_means():
    h = History()
    points = [(1.0, 0), (3.0, 0), (float("nan"), 1), (5.0, 1), (2.0, 2)]
    for step, (loss, epoch) in enumerate(points):
        h.record(step, loss, 1e-4, epoch)
    assert h.epoch_means() == {0: 2.0, 1: 5.0, 2: 2.0}


def test_to_dict_round_trips_through_json_and_resumes_the_same_curve():
    full = History(ema_beta=0.8)
    losses = noisy(np.full(30, 0.1), seed=3)
    for step, loss in enumerate(losses[:20]):
        full.record(step, loss, 1e-4 * (1 + step), step // 7)
    full.record(20, float("nan"), 1e-4, 2)
    full.record_validation(10, 0.123456789)
    full.record_validation(20, 0.1)

    restored = History.from_dict(json.loads(json.dumps(full.to_dict())))
    assert restored == full
    for step, loss in enumerate(losses[20:], start=21):
        full.record(step, loss, 1e-4, 3)
        restored.record(step, loss, 1e-4, 3)
    assert restored.smoothed == full.smoothed  # exact, not approximately


def test_tail_keeps_the_last_points_and_the_validation_beside_them():
    h = History()
    for step in range(10):
        h.record(step, 1.0 + step, 1e-4, 0)
    h.record_validation(2, 0.5)
    h.record_validation(8, 0.4)
    h.nan_steps.extend([1, 9])
    t = h.tail(3)
    assert t["step"] == [7, 8, 9] and t["loss"] == [8.0, 9.0, 10.0] and len(t["smoothed"]) == 3
    assert t["val_step"] == [8] and t["val_loss"] == [0.4]
    assert t["nan_steps"] == [9]
    json.dumps(t)
    assert h.tail(100)["step"] == h.step


# --- diagnose on synthetic curves ------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_exponential_decay_is_converging(seed):
    d = diagnose(history_of(noisy(0.15 * np.exp(-T / 250), seed)), total_steps=STEPS * 2)
    assert d.verdict == "converging", d.evidence
    assert any("keep training" in a for a in d.advice)


def test_converging_at_the_end_of_the_run_asks_for_more_epochs():
    d = diagnose(history_of(noisy(0.15 * np.exp(-T / 250), 0)), total_steps=STEPS)
    assert d.verdict == "converging"
    assert any("more epochs or repeats" in a for a in d.advice)


@pytest.mark.parametrize("seed", SEEDS)
def test_decay_then_flat_is_converged(seed):
    d = diagnose(history_of(noisy(0.08 + 0.1 * np.exp(-T / 40), seed)), total_steps=STEPS)
    assert d.verdict == "converged", d.evidence


@pytest.mark.parametrize("seed", SEEDS)
def test_flat_high_noisy_loss_is_a_plateau(seed):
    d = diagnose(history_of(noisy(np.full(STEPS, 0.12), seed, rel=0.6)), total_steps=STEPS)
    assert d.verdict == "plateau_high", d.evidence
    assert "61" in d.headline
    assert any("raise rank" in a for a in d.advice)
    assert any("raise unet_lr (e.g. 1e-4 -> 2e-4)" in a for a in d.advice)


def test_flat_loss_early_in_a_long_run_is_not_called_a_plateau_yet():
    d = diagnose(history_of(noisy(np.full(STEPS, 0.12), 0)), total_steps=STEPS * 10)
    assert d.verdict == "warming_up"


@pytest.mark.parametrize("seed", SEEDS)
def test_see_saw_around_a_flat_level_is_oscillating(seed):
    level = 0.12 * (1 + 0.7 * (-1.0) ** T)
    d = diagnose(history_of(noisy(level, seed, rel=0.3)), total_steps=STEPS)
    assert d.verdict == "oscillating", d.evidence
    assert d.evidence["noise_ratio"] > 1.0


def test_ordinary_diffusion_noise_is_not_oscillation():
    d = diagnose(history_of(noisy(np.full(STEPS, 0.12), 1, rel=0.6)), total_steps=STEPS)
    assert d.evidence["noise_ratio"] < 1.0
    assert d.verdict != "oscillating"


@pytest.mark.parametrize("seed", SEEDS)
def test_rising_loss_is_diverging(seed):
    d = diagnose(history_of(noisy(0.1 * np.exp(T / 250), seed), lr=2e-4), total_steps=STEPS)
    assert d.verdict == "diverging", d.evidence
    assert any("lower unet_lr (e.g. 2e-4 -> 1e-4)" in a for a in d.advice)


@pytest.mark.parametrize("seed", SEEDS)
def test_dip_then_climb_is_diverging_and_names_the_best_step(seed):
    level = 0.1 * (1 + 0.8 * ((T - 120) / 150) ** 2)
    d = diagnose(history_of(noisy(level, seed)), total_steps=STEPS)
    assert d.verdict == "diverging", d.evidence
    best = d.evidence["best_step"]
    assert 40 <= best <= 200
    assert any(f"step {best}" in a for a in d.advice)


def test_nan_in_the_last_steps_is_reported_with_its_step():
    h = history_of(noisy(0.15 * np.exp(-T / 250), 0))
    h.record(401, float("nan"), 1e-4, 10)
    d = diagnose(h, total_steps=STEPS)
    assert d.verdict == "nan"
    assert "401" in d.headline


def test_an_old_recovered_nan_does_not_decide_the_verdict():
    h = History()
    losses = noisy(0.15 * np.exp(-T / 250), 0)
    for i, (step, loss) in enumerate(zip(T, losses)):
        h.record(int(step), float(loss), 1e-4, 0)
        if step == 50:
            h.record(50, float("nan"), 1e-4, 0)
    d = diagnose(h)
    assert d.verdict == "converging"
    assert d.evidence["nan_count"] == 1


def test_nan_wins_even_before_there_is_enough_to_judge():
    h = History()
    h.record(1, 0.1, 1e-4, 0)
    h.record(2, float("nan"), 1e-4, 0)
    assert diagnose(h).verdict == "nan"


def test_too_few_points_is_warming_up():
    h = history_of(noisy(0.1 * np.exp(T / 50), 0)[:19])  # would be diverging with more points
    d = diagnose(h)
    assert d.verdict == "warming_up"
    assert diagnose(History()).verdict == "warming_up"


VAL_STEPS = [50, 100, 150, 200, 250, 300, 350, 400]


@pytest.mark.parametrize("seed", SEEDS)
def test_validation_rising_while_training_falls_is_overfitting_with_the_best_step(seed):
    train = noisy(0.15 * np.exp(-T / 250), seed)
    val_u = [0.120, 0.105, 0.099, 0.097, 0.100, 0.104, 0.109, 0.113]
    d = diagnose(history_of(train, val=zip(VAL_STEPS, val_u)), total_steps=STEPS)
    assert d.verdict == "overfitting", d.evidence
    assert d.evidence["val_best_step"] == 200
    assert any("checkpoint at step 200" in a for a in d.advice)


def test_validation_still_falling_is_not_overfitting():
    train = noisy(0.15 * np.exp(-T / 250), 0)
    val_down = [0.120, 0.110, 0.104, 0.099, 0.095, 0.092, 0.089, 0.087]
    d = diagnose(history_of(train, val=zip(VAL_STEPS, val_down)), total_steps=STEPS * 2)
    assert d.verdict == "converging", d.evidence


def test_flat_validation_decides_converged_even_if_training_loss_looks_still_falling():
    train = noisy(0.15 * np.exp(-T / 250), 0)
    val_flat = [0.120, 0.100, 0.0950, 0.0945, 0.0950, 0.0948, 0.0946, 0.0949]
    d = diagnose(history_of(train, val=zip(VAL_STEPS, val_flat)), total_steps=STEPS)
    assert d.verdict == "converged", d.evidence


@pytest.mark.parametrize(
    "level",
    [0.15 * np.exp(-T / 250), np.full(STEPS, 0.12), 0.1 * np.exp(T / 250)],
    ids=["falling", "flat", "rising"],
)
def test_every_diagnosis_is_complete_and_json_safe(level):
    d = diagnose(history_of(noisy(level, 0)), total_steps=STEPS)
    assert isinstance(d, Diagnosis)
    assert d.verdict in VERDICTS
    assert d.headline and d.advice
    text = json.dumps(d.evidence, allow_nan=False)
    assert "relative_drop" in text and "noise_ratio" in text


# --- validation plan and split ---------------------------------------------------------------


def test_validation_plan_is_deterministic_and_covers_every_item_at_every_level():
    plan = fixed_validation_plan(3, seed=7)
    assert plan == fixed_validation_plan(3, seed=7)
    assert sorted((p.item_index, p.u) for p in plan) == [
        (i, u) for i in range(3) for u in (0.2, 0.4, 0.6, 0.8)
    ]
    assert len({p.noise_seed for p in plan}) == len(plan)  # independent noise per measurement
    other = fixed_validation_plan(3, seed=8)
    assert [p.noise_seed for p in other] != [p.noise_seed for p in plan]
    item, u, noise_seed = plan[0]  # plain tuples for callers that unpack
    assert (item, u) == (0, 0.2) and isinstance(noise_seed, int)


def test_validation_plan_rejects_bad_inputs():
    with pytest.raises(ConfigError):
        fixed_validation_plan(0, seed=0)
    with pytest.raises(ConfigError):
        fixed_validation_plan(2, seed=0, sigma_fractions=(0.5, 1.0))
    assert [p.u for p in fixed_validation_plan(1, 0, sigma_fractions=(0.5,))] == [0.5]


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_validation(20, 0.25, seed=1)
    assert (train, val) == split_validation(20, 0.25, seed=1)
    assert len(val) == 5 and not set(train) & set(val)
    assert sorted(train + val) == list(range(20))
    assert split_validation(20, 0.25, seed=2) != (train, val)


def test_split_holds_out_at_least_one_and_never_all():
    assert len(split_validation(3, 0.01, seed=0)[1]) == 1
    train, val = split_validation(4, 0.99, seed=0)
    assert len(train) == 1 and len(val) == 3
    assert split_validation(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])


@pytest.mark.parametrize("n_items, fraction", [(1, 0.2), (0, 0.5), (10, 1.0), (10, -0.1)])
def test_split_errors_name_the_validation_split_input(n_items, fraction):
    with pytest.raises(ConfigError) as err:
        split_validation(n_items, fraction, seed=0)
    assert err.value.field == "validation_split"
