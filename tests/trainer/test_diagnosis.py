import json
import math

import numpy as np
import pytest

from trainer.diagnosis import VERDICTS, Diagnosis, diagnose
from tests.toys import STEPS, T, history_of, noisy
from trainer.monitor import History



SEEDS = range(5)

# --- diagnose without validation: only a clear fall or a blow-up, and it says it is weaker -----


@pytest.mark.parametrize("seed", SEEDS)
def test_exponential_decay_without_validation_is_learning_and_says_the_verdict_is_weaker(seed):
    d = diagnose(history_of(noisy(0.15 * np.exp(-T / 250), seed)), total_steps=STEPS * 2)
    assert d.verdict == "learning", d.evidence
    assert "Weaker verdict: no validation" in d.headline
    assert "validation_split" in d.advice[-1]


def test_learning_at_the_end_of_the_run_asks_for_more_steps():
    d = diagnose(history_of(noisy(0.15 * np.exp(-T / 250), 0)), total_steps=STEPS)
    assert d.verdict == "learning"
    assert "train more steps next time" in d.advice[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_decay_then_flat_without_validation_is_converged(seed):
    d = diagnose(history_of(noisy(0.08 + 0.1 * np.exp(-T / 40), seed)), total_steps=STEPS)
    assert d.verdict == "converged", d.evidence


@pytest.mark.parametrize(
    "level",
    [np.full(STEPS, 0.12), 0.12 * (1 + 0.7 * (-1.0) ** T)],
    ids=["flat", "see-saw"],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_flat_or_jumpy_per_step_loss_alone_is_no_trend_never_high_or_lr_advice(level, seed):
    # Per-step diffusion loss is flat on a pretrained model and jumps with the random noise level:
    # neither says the LoRA is "high" or that the learning rate is wrong.
    d = diagnose(history_of(noisy(level, seed, rel=0.6)), total_steps=STEPS)
    assert d.verdict == "no_trend", d.evidence
    assert "high" not in d.headline and "Weaker verdict" in d.headline
    assert not any("unet_lr" in a for a in d.advice)
    assert "validation_split" in d.advice[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_rising_loss_is_diverged(seed):
    d = diagnose(history_of(noisy(0.1 * np.exp(T / 250), seed), lr=2e-4), total_steps=STEPS)
    assert d.verdict == "diverged", d.evidence
    assert any("lower unet_lr (e.g. 2e-4 -> 1e-4)" in a for a in d.advice)


@pytest.mark.parametrize("seed", SEEDS)
def test_dip_then_climb_is_diverged_and_names_the_best_step(seed):
    level = 0.1 * (1 + 0.8 * ((T - 120) / 150) ** 2)
    d = diagnose(history_of(noisy(level, seed)), total_steps=STEPS)
    assert d.verdict == "diverged", d.evidence
    best = d.evidence["best_step"]
    assert 40 <= best <= 200
    assert any(f"step {best}" in a for a in d.advice)


def test_nan_in_the_last_steps_is_reported_with_its_step():
    h = history_of(noisy(0.15 * np.exp(-T / 250), 0))
    h.record(401, float("nan"), 1e-4, 10)
    d = diagnose(h, total_steps=STEPS)
    assert d.verdict == "nan"
    assert "401" in d.headline


def test_a_recent_rollback_of_a_finite_loss_is_a_nan_verdict_and_is_stated():
    # A step whose gradients were not finite keeps its finite loss: only the rollback shows it.
    h = history_of(noisy(0.15 * np.exp(-T / 250), 0))
    h.record_rollback(380, 360, 0.5)
    h.record_rollback(395, 380, 0.25)
    d = diagnose(h, total_steps=STEPS)
    assert d.verdict == "nan" and "395" in d.headline
    assert "rolled back 2 times (step 380, 395) and lowered the LR to 0.25x the plan" in d.headline


def test_an_old_recovered_nan_does_not_decide_the_verdict_but_is_stated():
    h = History()
    losses = noisy(0.15 * np.exp(-T / 250), 0)
    for i, (step, loss) in enumerate(zip(T, losses)):
        h.record(int(step), float(loss), 1e-4, 0)
        if step == 50:
            h.record(50, float("nan"), 1e-4, 0)
            h.record_rollback(50, 40, 0.5)
    d = diagnose(h)
    assert d.verdict == "learning"
    assert d.evidence["nan_count"] == 1
    assert "rolled back once (step 50)" in d.headline


def test_nan_wins_even_before_there_is_enough_to_judge():
    h = History()
    h.record(1, 0.1, 1e-4, 0)
    h.record(2, float("nan"), 1e-4, 0)
    assert diagnose(h).verdict == "nan"


def test_too_few_points_is_warming_up_and_says_what_is_needed():
    h = history_of(noisy(0.1 * np.exp(T / 50), 0)[:19])  # would be diverged with more points
    d = diagnose(h)
    assert d.verdict == "warming_up"
    assert "needs 20 steps (19 so far)" in d.headline
    assert diagnose(History()).verdict == "warming_up"


# --- diagnose with validation: judged against the base model ----------------------------------

VAL_STEPS = [0, 50, 100, 150, 200, 250, 300, 350, 400]
FLAT_TRAIN = noisy(np.full(STEPS, 0.12), 0, rel=0.6)  # what per-step loss looks like on a real model


def with_val(values, base=0.120, train=FLAT_TRAIN, lr=1e-4):
    h = history_of(train, lr=lr, val=zip(VAL_STEPS, values))
    h.base_val_loss = base
    return h


def test_validation_below_the_base_and_falling_is_learning_slowly_when_the_gain_is_small():
    d = diagnose(with_val([0.120, 0.119, 0.118, 0.117, 0.116, 0.115, 0.114, 0.113, 0.112]), total_steps=800)
    assert d.verdict == "learning", d.evidence
    assert d.headline.startswith("Learning (slowly): validation is 6.7% better than the base model")
    assert not any("unet_lr" in a for a in d.advice)


def test_validation_well_below_the_base_and_falling_is_learning():
    d = diagnose(with_val([0.120, 0.110, 0.102, 0.096, 0.091, 0.087, 0.084, 0.081, 0.079]), total_steps=800)
    assert d.verdict == "learning" and "(slowly)" not in d.headline


def test_validation_below_the_base_and_flat_is_converged():
    d = diagnose(with_val([0.120, 0.100, 0.0950, 0.0945, 0.0950, 0.0948, 0.0946, 0.0949, 0.0947]), total_steps=STEPS)
    assert d.verdict == "converged", d.evidence
    assert "21% better than the base model" in d.headline


def test_a_curve_flattened_only_by_a_decaying_lr_is_still_learning():
    # Falls at the same rate per unit of LR to the end; cosine makes it look flat in steps.
    lr = 1e-4 * 0.5 * (1 + np.cos(np.pi * T / STEPS)) + 1e-9
    spent = np.cumsum(lr)
    val = [0.120 * math.exp(-0.15 * spent[max(s, 1) - 1] / spent[-1]) for s in VAL_STEPS]
    h = history_of(FLAT_TRAIN, val=zip(VAL_STEPS, val))
    for i, v in enumerate(lr):
        h.lr[i] = float(v)
    h.base_val_loss = 0.120
    assert diagnose(h, total_steps=STEPS).verdict == "learning"


def test_validation_rising_from_a_best_below_the_base_is_overfitting_with_the_best_step():
    d = diagnose(with_val([0.120, 0.105, 0.099, 0.097, 0.100, 0.104, 0.109, 0.113, 0.115]), total_steps=STEPS)
    assert d.verdict == "overfitting", d.evidence
    assert d.evidence["val_best_step"] == 150
    assert "checkpoint at step 150" in d.advice[0]


def test_validation_five_times_the_base_is_diverged_since_its_step_with_rollbacks():
    h = with_val([0.18, 0.95, 1.0, 0.9, 1.0, 0.95, 0.97, 0.99, 0.9], base=0.18, lr=0.5)
    h.record_rollback(3, 0, 0.5)
    h.record_rollback(5, 0, 0.25)
    d = diagnose(h, total_steps=STEPS)
    assert d.verdict == "diverged"
    assert d.headline.startswith("Diverged: validation is 5x worse than the base model since step 50")
    assert "far too high" in d.headline and "rolled back 2 times (step 3, 5)" in d.headline
    assert "5e-1 -> 5e-2" in d.advice[0]


def test_no_measurable_change_after_enough_steps_is_not_learning():
    d = diagnose(with_val([0.120, 0.1201, 0.1199, 0.1200, 0.1200, 0.1201, 0.1200, 0.1199, 0.1200]), total_steps=STEPS)
    assert d.verdict == "not_learning"
    assert "no measurable change in 400 steps" in d.headline
    assert "raise unet_lr (e.g. 1e-4 -> 2e-4)" in d.advice[0]


def test_no_measurable_change_early_in_a_long_run_is_warming_up():
    d = diagnose(with_val([0.120, 0.1201, 0.1199, 0.1200, 0.1200, 0.1201, 0.1200, 0.1199, 0.1200]), total_steps=STEPS * 10)
    assert d.verdict == "warming_up"
    assert "No measurable change yet" in d.headline


def test_validation_a_little_worse_than_the_base_and_flat_is_damaging_once_there_is_enough():
    values = [0.120, 0.126, 0.1265, 0.126, 0.1262, 0.1261, 0.126, 0.1262, 0.1261]
    d = diagnose(with_val(values), total_steps=STEPS)
    assert d.verdict == "diverged"
    assert d.headline.startswith("Damaging: validation is 5.1% worse than the base model after 400 steps")
    early = diagnose(with_val(values), total_steps=STEPS * 10)
    assert early.verdict == "warming_up" and "5.1% worse" in early.headline


def test_validation_climbing_above_the_base_is_getting_worse_before_it_is_damaged():
    values = [0.120, 0.122, 0.125, 0.128, 0.131, 0.134, 0.137, 0.140, 0.143]
    d = diagnose(with_val(values), total_steps=STEPS * 10)
    assert d.verdict == "diverged"
    assert d.headline.startswith("Getting worse: validation is 19% worse than the base model and rising")


def test_the_base_model_is_the_reference_not_the_first_validation():
    # After start_from_lora or a resume, step 0 already carries a LoRA.
    values = [0.100, 0.0995, 0.0990, 0.0985, 0.0980, 0.0975, 0.0970, 0.0965, 0.0960]
    d = diagnose(with_val(values, base=0.120), total_steps=800)
    assert "20% better than the base model" in d.headline
    h = with_val(values)
    h.base_val_loss = None  # an older save: the first validation is the reference
    assert "4.0% better than step 0" in diagnose(h, total_steps=800).headline


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
    assert "relative_drop" in text and "rollbacks" in text


def issue_history(val_values, lr_of_step, train_level, rollbacks=()):
    """80 steps, validation every 8 (10 passes per run), base measured at step 0."""
    steps = np.arange(1, 81)
    h = History()
    for step, loss in zip(steps, noisy(np.asarray([train_level(s) for s in steps], dtype=float), 3, rel=0.6)):
        h.record(int(step), float(loss), lr_of_step(step), 0)
    for step, loss in zip(range(0, 81, 8), val_values):
        h.record_validation(step, loss)
    h.base_val_loss = val_values[0]
    for r in rollbacks:
        h.record_rollback(*r)
    return h


def test_the_issues_destroyed_run_is_diverged_five_times_worse_with_its_rollbacks():
    # AdamW constant lr 0.5: training 0.5 -> 1.3 in 3 steps then ~1.0, validation 0.18 -> ~1.0,
    # the NaN guard halved the LR twice. It used to be called "overfitting".
    val = [0.18, 0.92, 1.0, 0.97, 1.02, 0.99, 1.0, 0.98, 1.01, 0.99, 1.0]
    h = issue_history(val, lambda s: 0.5, lambda s: 0.5 if s <= 2 else 1.0, rollbacks=[(4, 0, 0.5), (9, 0, 0.25)])
    d = diagnose(h, total_steps=80)
    assert d.verdict == "diverged", d.evidence
    assert d.headline.startswith("Diverged: validation is 5.6x worse than the base model since step 8; the learning rate is far too high.")
    assert "rolled back 2 times (step 4, 9) and lowered the LR to 0.25x the plan" in d.headline


def test_the_issues_slow_healthy_run_is_learning_slowly_not_a_plateau():
    # lr 2e-4 cosine: validation 0.184 -> 0.175 steadily, per-step loss noisy around 0.2.
    val = list(np.linspace(0.184, 0.175, 11))
    cosine = lambda s: 2e-4 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 80))  # noqa: E731
    d = diagnose(issue_history(val, cosine, lambda s: 0.2), total_steps=80)
    assert d.verdict == "learning", d.evidence
    assert d.headline.startswith("Learning (slowly): validation is 4.9% better than the base model")
    assert not any("unet_lr" in a for a in d.advice)
