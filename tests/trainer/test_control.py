"""Concept bleed and regularisation images: the control prompts, the config, the per-example loss
weight, and real runs through the engine showing that regularisation images lower the bleed line."""

import pytest
import torch

from tests.toys import ToyDenoiser, make_examples, make_network
from tests.trainer.curves import record
from trainer.control import GENERIC_PROMPTS, ControlConfig, control_prompts
from trainer.data import Example
from trainer.errors import ConfigError
from trainer.loop import Session, TrainConfig
from trainer.optimizers import OptimizerConfig
from trainer.schedule import ScheduleConfig


def test_control_prompts_are_the_captions_without_the_trigger_word():
    captions = ["sks dog, sitting on grass", "a photo of sks dog on a beach", "sks dog", "SKS Dog, sitting on grass"]
    prompts = control_prompts(ControlConfig(control_images=3), captions, "sks dog")
    assert prompts == ["sitting on grass", "a photo of on a beach", "sitting on grass"]  # distinct ones, cycled


def test_typed_control_prompts_win_and_no_trigger_word_gives_generic_ones():
    assert control_prompts(ControlConfig(control_images=2, control_prompts="a house\n\n a tree \n"), ["sks, x"], "sks") == ["a house", "a tree"]
    assert control_prompts(ControlConfig(control_images=3), ["a red ball", "a blue ball"], "") == list(GENERIC_PROMPTS[:3])
    assert control_prompts(ControlConfig(control_images=0), ["a red ball"], "sks") == []


@pytest.mark.parametrize("field, kwargs", [
    ("control_images", {"control_images": -1}), ("control_images", {"control_images": 17}), ("control_images", {"control_images": 2.5}),
    ("prior_loss_weight", {"prior_loss_weight": 0.0}), ("prior_loss_weight", {"prior_loss_weight": float("nan")}),
    ("control_prompts", {"control_prompts": None}), ("reg_folder", {"reg_folder": 3}),
])
def test_control_config_names_the_wrong_input(field, kwargs):
    with pytest.raises(ConfigError) as e:
        ControlConfig(**kwargs)
    assert e.value.field == field


def _session(examples, **train):
    d = ToyDenoiser()
    torch.manual_seed(0)
    return Session(d, examples, make_network(d), optimizer=OptimizerConfig(name="AdamW", unet_lr=1e-3),
                   train=TrainConfig(steps=4, seed=0, **train))


def test_regularisation_images_train_but_are_never_held_out():
    concept = make_examples(6)
    reg = [Example(ex.latents, ex.conds, name=f"reg{i}", regularisation=True) for i, ex in enumerate(make_examples(4, seed=9))]
    s = _session(concept + reg, validation_split=0.34)
    assert all(not ex.regularisation for ex in s.val_examples) and len(s.val_examples) == 2
    assert sum(ex.regularisation for ex in s.examples) == 4
    with pytest.raises(ConfigError, match="regularisation images only"):
        _session(reg)


def test_the_loss_weight_scales_an_examples_share_of_the_loss():
    # One image, batch 1: the step's loss is the example's loss times its weight, same draws.
    plain = _session(make_examples(1))
    weighted = _session([Example(ex.latents, ex.conds, loss_weight=0.25) for ex in make_examples(1)])
    plain.run(1)
    weighted.run(1)
    assert weighted.history.loss[0] == pytest.approx(0.25 * plain.history.loss[0], rel=1e-5)


@pytest.fixture(scope="module")
def pretrained():
    torch.set_num_threads(1)
    return record.pretrained_denoiser(steps=300)  # a base model that already denoises its images


def _bleed_run(denoiser, reg: bool):
    torch.manual_seed(0)
    session = Session(
        denoiser,
        record.concept_images(8) + (record.base_samples(denoiser, 8, seed=5, regularisation=True) if reg else []),
        make_network(denoiser, rank=8, alpha=8.0),
        optimizer=OptimizerConfig(name="AdamW", unet_lr=1e-3),
        schedule=ScheduleConfig(name="cosine", warmup_ratio=0.05),
        train=TrainConfig(steps=200, seed=0, validation_split=0.25),
        control=record.base_samples(denoiser, 4, seed=99),
    )
    session.run()
    return session.history


def test_the_bleed_line_is_measured_against_the_base_model_and_falls_with_regularisation_images(pretrained):
    without, with_reg = _bleed_run(pretrained, reg=False), _bleed_run(pretrained, reg=True)
    for h in (without, with_reg):
        assert h.bleed_step == h.val_step and h.bleed_step[0] == 0
        assert h.bleed_loss[0] == pytest.approx(h.base_bleed_loss)  # step 0 is the base model
        assert h.val_loss[-1] < h.base_val_loss  # both learn the concept
    rise_without = without.bleed_loss[-1] / without.base_bleed_loss - 1
    rise_with = with_reg.bleed_loss[-1] / with_reg.base_bleed_loss - 1
    assert rise_without > 0.03  # the LoRA changes the base model's own images...
    assert rise_with < rise_without / 2  # ...and regularisation images pull it back


def test_recorded_runs_bleed_less_with_regularisation_images():
    import json
    from pathlib import Path

    curves = Path(record.__file__).parent
    bleeding = json.loads((curves / "bleeding_1e-3_300_steps.json").read_text())
    reg = json.loads((curves / "reg_images_1e-3_300_steps.json").read_text())
    assert bleeding["settings"] == {**reg["settings"], "reg": False}
    rise = lambda r: r["history"]["bleed_loss"][-1] / r["history"]["base_bleed_loss"] - 1  # noqa: E731
    assert rise(bleeding) > 0.2 and rise(reg) < 0.1
