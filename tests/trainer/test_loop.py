import math

import pytest
import torch

from tests.toys import ToyDenoiser, make_examples, make_network
from trainer.errors import ConfigError, TrainingError
from trainer.loop import Session, TrainConfig
from trainer.optimizers import OptimizerConfig
from trainer.schedule import ScheduleConfig, lr_multiplier


def make_session(steps=12, optimizer="AdamW", lr=3e-3, examples=None, seed=0, **train_kw):
    d = ToyDenoiser(prediction=train_kw.pop("prediction", "eps"))
    net = make_network(d, dropout=train_kw.pop("dropout", 0.0))
    return Session(
        d,
        examples if examples is not None else make_examples(),
        net,
        optimizer=OptimizerConfig(name=optimizer, unet_lr=lr),
        schedule=train_kw.pop("schedule", ScheduleConfig(name="constant")),
        train=TrainConfig(steps=steps, seed=seed, **train_kw),
    )


def test_loss_on_a_fixed_evaluation_set_falls():
    s = make_session(steps=60, lr=1e-2, batch_size=2)
    before = s.validation_loss(s.examples)
    s.run()
    after = s.validation_loss(s.examples)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_v_and_flow_models_train_too(prediction):
    s = make_session(steps=40, lr=1e-2, batch_size=2, prediction=prediction)
    before = s.validation_loss(s.examples)
    s.run()
    assert s.validation_loss(s.examples) < 0.9 * before


def test_same_seed_same_loss_sequence_other_seed_differs():
    a, b, c = make_session(dropout=0.1), make_session(dropout=0.1), make_session(seed=1, dropout=0.1)
    for s in (a, b, c):
        s.run()
    assert a.history.loss == b.history.loss
    assert a.history.loss != c.history.loss


@pytest.mark.parametrize("optimizer", ["AdamW", "AdamW8bit", "Lion", "Prodigy"])
def test_save_state_resume_equals_uninterrupted(optimizer):
    lr = {"Prodigy": 1.0, "Lion": 3e-4}.get(optimizer, 3e-3)
    full = make_session(steps=10, optimizer=optimizer, lr=lr, dropout=0.1)
    full.run()
    first = make_session(steps=10, optimizer=optimizer, lr=lr, dropout=0.1)
    first.run(until_step=4)
    tensors, meta = first.state_dict()
    resumed = make_session(steps=10, optimizer=optimizer, lr=lr, dropout=0.1)
    resumed.load_state_dict(tensors, meta)
    assert resumed.step == 4
    resumed.run()
    assert resumed.history.loss == full.history.loss
    for name, lora in full.network.loras.items():
        assert torch.equal(lora.up.weight, resumed.network.loras[name].up.weight)


def test_interrupt_from_callback_keeps_state_and_continues_identically():
    full = make_session(steps=8)
    full.run()

    class Cancel(Exception):
        pass

    def cancel_at_3(info):
        if info.step == 3:
            raise Cancel

    s = make_session(steps=8)
    with pytest.raises(Cancel):
        s.run(callback=cancel_at_3)
    assert s.step == 3 and len(s.history.loss) == 3
    s.run()
    assert s.history.loss == full.history.loss


def test_callback_reports_progress_lr_and_eta():
    sched = ScheduleConfig(name="cosine", warmup_steps=2)
    s = make_session(steps=6, schedule=sched)
    infos = []
    s.run(callback=infos.append)
    assert [i.step for i in infos] == [1, 2, 3, 4, 5, 6]
    for i in infos:
        assert i.total_steps == 6 and i.eta_seconds >= 0 and math.isfinite(i.loss)
        assert i.lr == pytest.approx(3e-3 * lr_multiplier(sched, i.step - 1, 6))
    assert infos[-1].eta_seconds == 0


def test_epochs_times_repeats_define_the_steps_and_visit_every_image():
    ex = make_examples(n=4, repeats=3)
    s = make_session(steps=0, epochs=2, examples=ex, batch_size=2, gradient_accumulation=3)
    assert s.batches_per_epoch == 6  # 4 images x 3 repeats / batch 2
    assert s.steps_per_epoch == 2 and s.total_steps == 4
    seen = [i for k in range(6) for i in s._batch(k)]
    assert sorted(seen) == sorted([0, 1, 2, 3] * 3)
    s.run()
    assert s.step == 4 and s.history.epoch[-1] == 1


def test_gradient_accumulation_averages_micro_batches():
    # accumulation 2 x batch 1 sees the same data as batch 2 per optimizer step
    s = make_session(steps=3, gradient_accumulation=2)
    s.run()
    assert s.step == 3 and len(s.history.loss) == 3


def test_nan_batch_is_skipped_rolled_back_and_never_poisons_weights():
    ex = make_examples(n=4)
    ex[2].latents[0][0, 0, 0] = float("nan")
    s = make_session(steps=12, examples=ex)
    s.run()
    assert s.history.nan_steps, "the NaN batch was not detected"
    assert s.lr_scale < 1.0  # LR backed off
    assert all(torch.isfinite(p).all() for p in s.network.parameters())
    weights = s.network.to_kohya()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_persistent_nan_stops_with_clear_error_and_keeps_last_good_state():
    ex = make_examples(n=2)
    for e in ex:
        e.latents[0][0, 0, 0] = float("inf")
    s = make_session(steps=20, examples=ex, max_bad_steps=3)
    with pytest.raises(TrainingError, match="Lower unet_lr"):
        s.run()
    assert s.bad_streak == 3
    assert all(torch.isfinite(p).all() for p in s.network.parameters())


def test_validation_split_records_comparable_validation_loss():
    s = make_session(steps=10, examples=make_examples(n=8), validation_split=0.25, validation_every=5)
    s.run()
    assert len(s.val_examples) == 2 and len(s.examples) == 6
    assert s.history.val_step == [0, 5, 10]
    # fixed plan: evaluating twice at the same weights gives the same number
    assert s.validation_loss() == s.validation_loss()


def test_bad_inputs_name_the_field():
    with pytest.raises(ConfigError) as e:
        TrainConfig(steps=0, epochs=0)
    assert e.value.field == "steps"
    with pytest.raises(ConfigError) as e:
        make_session(examples=make_examples(n=2), batch_size=4)
    assert e.value.field == "batch_size"
    with pytest.raises(ConfigError) as e:
        make_session(examples=[])
    assert e.value.field == "dataset"
    with pytest.raises(ConfigError) as e:
        TrainConfig(gradient_accumulation=0)
    assert e.value.field == "gradient_accumulation"


def test_flow_model_refuses_min_snr_when_the_session_is_built():
    from trainer.objective import ObjectiveConfig

    d = ToyDenoiser(prediction="flow")
    with pytest.raises(ConfigError) as e:
        Session(d, make_examples(), make_network(d), objective=ObjectiveConfig(min_snr_gamma=5.0))
    assert e.value.field == "min_snr_gamma"


# --- continuing a finished run: a new schedule cycle ----------------------------------------------


def test_continuing_a_finished_cosine_run_starts_a_new_cycle_over_the_new_steps():
    cosine = ScheduleConfig(name="cosine", warmup_ratio=0.1)
    s = make_session(steps=20, schedule=cosine)
    s.run()
    first = list(s.history.lr)
    s.run(until_step=30)  # "queue again for 10 more"
    assert s.cycles == [(0, 20), (20, 30)]
    # The first 20 steps followed a 20-step cosine; the next 10 follow their own 10-step cosine
    # (warm restart, warmup included), not the tail of a stretched 30-step curve.
    assert first == pytest.approx([3e-3 * lr_multiplier(cosine, k, 20) for k in range(20)])
    assert s.history.lr[20:] == pytest.approx([3e-3 * lr_multiplier(cosine, k, 10) for k in range(10)])
    assert s.history.lr[19] < 0.05 * 3e-3 and s.history.lr[20] < s.history.lr[21]  # the restart is visible
    # The plan the charts draw is exactly what trained.
    plan = dict(s.lr_plan())
    assert [plan[k] for k in range(30)] == pytest.approx(s.history.lr)


def test_lr_plan_shows_the_cycle_a_run_would_add_before_it_runs():
    cosine = ScheduleConfig(name="cosine", warmup_ratio=0.0)
    s = make_session(steps=8, schedule=cosine)
    s.run()
    plan = dict(s.lr_plan(until=12))
    assert plan[8] == pytest.approx(3e-3) and plan[11] == pytest.approx(3e-3 * lr_multiplier(cosine, 3, 4))
    assert s.cycles == [(0, 8)]  # previewing changes nothing


def test_interrupted_run_finishes_its_own_cycle_first():
    s = make_session(steps=10, schedule=ScheduleConfig(name="linear", warmup_ratio=0.0))
    s.run(until_step=4)
    s.run()
    assert s.cycles == [(0, 10)]
    assert s.history.lr == pytest.approx([3e-3 * (1 - k / 10) for k in range(10)])


def test_state_round_trip_keeps_cycles_and_refuses_other_settings():
    s = make_session(steps=6)
    s.run()
    s.run(until_step=9)
    tensors, meta = s.state_dict()
    twin = make_session(steps=6)
    twin.load_state_dict(tensors, meta)
    assert twin.cycles == [(0, 6), (6, 9)] and twin.step == 9 and twin.started_at == s.started_at
    other = make_session(steps=6, lr=1e-3)
    with pytest.raises(Exception, match="optimizer"):
        other.load_state_dict(tensors, meta)


def test_nan_guard_rollbacks_are_recorded_in_the_history():
    ex = make_examples(n=4)
    ex[2].latents[0][0, 0, 0] = float("nan")
    s = make_session(steps=12, examples=ex)
    s.run()
    rollbacks = s.history.rollbacks
    assert [r["step"] for r in rollbacks] == s.history.nan_steps
    assert [r["lr_scale"] for r in rollbacks] == [0.5**k for k in range(1, len(rollbacks) + 1)]
    assert all(r["to_step"] < r["step"] for r in rollbacks)
    tensors, meta = s.state_dict()
    resumed = make_session(steps=12, examples=ex)
    resumed.load_state_dict(tensors, meta)
    assert resumed.history.rollbacks == rollbacks


def test_base_validation_is_the_model_without_the_lora_measured_once_and_kept_on_resume():
    s = make_session(steps=4, examples=make_examples(n=8), validation_split=0.25, validation_every=2)
    for lora in s.network.loras.values():  # as after start_from_lora: the LoRA is not zero at step 0
        torch.nn.init.normal_(lora.up.weight, std=0.5)
    s.run(until_step=2)
    base = s.history.base_val_loss
    s.network.strength = 0.0
    assert base == s.validation_loss()
    s.network.strength = 1.0
    assert base != s.history.val_loss[0]  # step 0 is not the base model here
    tensors, meta = s.state_dict()
    resumed = make_session(steps=4, examples=make_examples(n=8), validation_split=0.25, validation_every=2)
    resumed.load_state_dict(tensors, meta)
    resumed.run()
    assert resumed.history.base_val_loss == base
    assert resumed.network.strength == 1.0


def test_no_validation_split_measures_no_base():
    s = make_session(steps=3)
    s.run()
    assert s.history.base_val_loss is None
