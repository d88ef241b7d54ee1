import pytest

from trainer.errors import ConfigError
from trainer.network import NetworkConfig
from trainer.optimizers import OptimizerConfig
from trainer.precision import PrecisionConfig
from trainer.schedule import ScheduleConfig
from trainer.spec import TrainConfig, TrainingSpec


def test_defaults_are_the_nodes_defaults():
    spec = TrainingSpec()
    assert spec.precision == PrecisionConfig(mixed_precision="auto", gradient_checkpointing=True)
    assert spec.schedule == ScheduleConfig(name="cosine", warmup_ratio=0.05)
    assert (spec.network.rank, spec.network.alpha, spec.optimizer.name, spec.optimizer.unet_lr) == (16, 16.0, "AdamW", 1e-4)
    assert spec.train.steps == 500


def test_parts_ignore_the_run_length_and_name_what_changed():
    a = TrainingSpec()
    assert a.parts() == a.with_steps(2000).parts() == TrainingSpec(train=TrainConfig(steps=0, epochs=3)).parts()
    b = TrainingSpec(network=NetworkConfig(rank=8, alpha=8.0))
    assert [k for k in a.parts() if a.parts()[k] != b.parts()[k]] == ["network"]
    c = TrainingSpec(optimizer=OptimizerConfig(unet_lr=2e-4), guidance=3.5)
    assert sorted(k for k in a.parts() if a.parts()[k] != c.parts()[k]) == ["guidance", "optimizer"]


def test_json_round_trip():
    spec = TrainingSpec(network=NetworkConfig(rank=4, alpha=2.0, conv_rank=2), optimizer=OptimizerConfig(betas=(0.9, 0.99)), guidance=2.0)
    assert TrainingSpec.from_json(spec.to_json()) == spec


def test_bad_guidance_and_damaged_json_name_the_field():
    with pytest.raises(ConfigError) as e:
        TrainingSpec(guidance=-1.0)
    assert e.value.field == "guidance"
    with pytest.raises(ConfigError) as e:
        TrainingSpec.from_json({"network": {}})
    assert e.value.field == "state"
