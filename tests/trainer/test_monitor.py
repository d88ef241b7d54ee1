import json

import numpy as np
import pytest

from trainer.errors import ConfigError
from tests.toys import STEPS, history_of, noisy
from trainer.monitor import History, fixed_validation_plan, split_validation



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


def test_base_and_rollbacks_round_trip_and_older_saves_load():
    h = history_of(noisy(np.full(STEPS, 0.1), 0), val=[(0, 0.12), (200, 0.11), (400, 0.10)])
    h.base_val_loss = 0.120
    h.record_rollback(7, 0, 0.5)
    restored = History.from_dict(json.loads(json.dumps(h.to_dict())))
    assert restored == h and restored.base_val_loss == 0.120
    assert restored.tail(10)["rollbacks"] == [] and h.tail(400)["rollbacks"] == h.rollbacks
    old = History.from_dict({"step": [1], "loss": [0.1], "lr": [1e-4], "smoothed": [0.1], "epoch": [0]})
    assert old.base_val_loss is None and old.rollbacks == []


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
