import pytest
import torch

from tests.toys import ToyDenoiser, make_examples
from trainer import recipe
from trainer.data import Example
from trainer.errors import ConfigError
from trainer.network import NetworkConfig
from trainer.optimizers import OptimizerConfig
from trainer.resume import changed_parts, load_state, save_state
from trainer.schedule import ScheduleConfig
from trainer.spec import TrainConfig, TrainingSpec


def spec(**kw):
    base = dict(network=NetworkConfig(rank=4, alpha=2.0), optimizer=OptimizerConfig(name="AdamW", unet_lr=3e-3), schedule=ScheduleConfig(name="cosine"), train=TrainConfig(steps=10, seed=3))
    base.update(kw)
    return TrainingSpec(**base)


def session(s=None):
    d = ToyDenoiser()
    return recipe.start_session(d, d.targets((s or spec()).network), make_examples(), s or spec())


def test_lora_file_describes_the_session_that_trained_not_the_caller():
    s = session()
    recipe.train(s, 4)
    weights, meta = recipe.lora_file(s, "chained")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_learning_rate"] == "0.003" and meta["ss_lr_scheduler"] == "cosine" and meta["ss_optimizer"] == "AdamW"
    assert meta["ss_steps"] == "4" and meta["ss_output_name"] == "chained" and meta["lora_lab_seed"] == "3"
    assert set(weights) == set(s.network.to_kohya())


def test_initial_weights_follow_the_seed_and_start_weights_replace_them():
    a, b = session(), session()
    assert all(torch.equal(x, y) for x, y in zip(a.network.state_dict().values(), b.network.state_dict().values()))
    recipe.train(a, 3)
    saved = a.network.to_kohya(torch.float32)
    d = ToyDenoiser()
    started = recipe.start_session(d, d.targets(spec().network), make_examples(), spec(), start_weights=saved)
    assert all(torch.equal(v, started.network.to_kohya(torch.float32)[k]) for k, v in saved.items())
    other = spec(network=NetworkConfig(rank=8, alpha=8.0))
    with pytest.raises(ConfigError) as e:
        recipe.start_session(d, d.targets(other.network), make_examples(), other, start_weights=saved)
    assert e.value.field == "start_from_lora"


def test_resume_from_disk_gives_the_uninterrupted_loss_sequence(tmp_path):
    twin = session(spec(network=NetworkConfig(rank=4, alpha=2.0, dropout=0.1)))
    recipe.train(twin, 10)
    first = session(spec(network=NetworkConfig(rank=4, alpha=2.0, dropout=0.1)))
    recipe.train(first, 6)
    fingerprint = {"model": "m1", "dataset": "d1", **first.spec.parts()}
    path = save_state(tmp_path / "run-step000006.state.safetensors", first, fingerprint, target_step=10)
    del first  # "ComfyUI was killed"
    state = load_state(path)
    assert (state.step, state.target_step, state.fingerprint) == (6, 10, fingerprint)
    resumed = session(spec(network=NetworkConfig(rank=4, alpha=2.0, dropout=0.1)))
    resumed.load_state_dict(state.tensors, state.metadata)
    recipe.train(resumed, state.target_step)
    assert resumed.history.loss == twin.history.loss
    assert all(torch.equal(a, b) for a, b in zip(resumed.network.state_dict().values(), twin.network.state_dict().values()))
    assert changed_parts(state.fingerprint, {**fingerprint, "model": "m2"}) == ["model"]


def test_a_damaged_state_file_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "x.state.safetensors"
    bad.write_bytes(b"not a state")
    with pytest.raises(Exception, match="x.state.safetensors"):
        load_state(bad)


def test_resolve_objective_flux_shift_only_for_flow_models():
    lat = [Example([torch.zeros(16, 64, 64)], [torch.zeros(3, 8)], 1, "a")]
    objective, note = recipe.resolve_objective("flow", lat, "flux_shift")
    assert objective.timestep_sampling == "shift" and objective.shift > 1 and "1024 image tokens" in note
    with pytest.raises(ConfigError) as e:
        recipe.resolve_objective("eps", lat, "flux_shift")
    assert e.value.field == "timestep_sampling"
    with pytest.raises(ConfigError) as e:
        recipe.resolve_objective("flow", lat, "uniform", min_snr_gamma=5.0)
    assert e.value.field == "min_snr_gamma"


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "sigmoid", "shift"])
@pytest.mark.parametrize("expert, inside", [("high_noise", lambda u: (u >= 0.875).all()), ("low_noise", lambda u: (u < 0.875).all())])
def test_wan_expert_draws_only_its_side_of_the_boundary(sampling, expert, inside):
    from trainer.objective import sample_u

    config, _ = recipe.resolve_objective("flow", [], sampling, 3.0, expert=expert)
    u = sample_u(config, 4096, torch.Generator().manual_seed(0), "cpu")
    assert inside(u), (u.min(), u.max())
    assert float(u.max() - u.min()) > 0.5 * (0.125 if expert == "high_noise" else 0.875)  # the whole side, not a point


def test_expert_none_is_the_whole_range_and_bad_values_name_the_input():
    assert recipe.expert_range() == (0.0, 1.0)
    assert recipe.expert_range("low_noise", 0.9) == (0.0, 0.9)
    with pytest.raises(ConfigError, match="expected one of none, high_noise, low_noise") as e:
        recipe.expert_range("mid")
    assert e.value.field == "expert"
    with pytest.raises(ConfigError) as e:
        recipe.expert_range("high_noise", 1.0)
    assert e.value.field == "expert_boundary"


def test_an_expert_is_validated_at_noise_levels_inside_its_range():
    objective, _ = recipe.resolve_objective("flow", [], "uniform", expert="high_noise", expert_boundary=0.8)
    s = session(spec(objective=objective, train=TrainConfig(steps=4, seed=3, validation_split=0.25)))
    levels = sorted({u for _, u, _ in s.val_plan})
    assert levels == pytest.approx([0.84, 0.88, 0.92, 0.96])
