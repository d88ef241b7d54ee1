import sys

import pytest
import torch

from trainer.errors import ConfigError
from trainer.optimizers import (
    OPTIMIZERS,
    TYPICAL_LR,
    OptimizerConfig,
    build_optimizer,
    check_available,
)

# 64x64 = 4096 elements: the size at which bitsandbytes switches to 8-bit state.
N = 64


def regression_problem(seed=0):
    """Two weight matrices ("unet" and "text_encoder") fitting a fixed linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, N, generator=g)
    targets = [torch.randn(N, N, generator=g) / N**0.5 for _ in range(2)]
    weights = [torch.nn.Parameter(torch.zeros(N, N)) for _ in range(2)]

    def loss_fn():
        return sum(((x @ w - x @ t) ** 2).mean() for w, t in zip(weights, targets))

    return weights, loss_fn


def train(config, steps):
    weights, loss_fn = regression_problem()
    opt = build_optimizer(config, {"unet": [weights[0]], "text_encoder": [weights[1]]})
    start = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    return opt, weights, start, loss_fn().item()


LEARNING_SETUPS = {
    "AdamW": dict(unet_lr=1e-2, text_encoder_lr=1e-2),
    "AdamW8bit": dict(unet_lr=1e-2, text_encoder_lr=1e-2),
    "Lion": dict(unet_lr=5e-3, text_encoder_lr=5e-3, betas=(0.9, 0.99)),
    "Lion8bit": dict(unet_lr=5e-3, text_encoder_lr=5e-3, betas=(0.9, 0.99)),
    "SGD": dict(unet_lr=0.2, text_encoder_lr=0.2),
    "Prodigy": dict(unet_lr=1.0, text_encoder_lr=1.0),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_reduces_regression_loss(name):
    config = OptimizerConfig(name=name, weight_decay=0.0, **LEARNING_SETUPS[name])
    _, _, start, end = train(config, 100)
    assert end < 0.2 * start, f"{name}: loss {start:.4f} -> {end:.4f}"


@pytest.mark.parametrize("name, states", [("AdamW8bit", ("state1", "state2")), ("Lion8bit", ("state1",))])
def test_8bit_optimizers_keep_uint8_state(name, states):
    opt, weights, _, _ = train(OptimizerConfig(name=name, **LEARNING_SETUPS[name]), 2)
    for w in weights:
        state = opt.state[w]
        for key in states:
            assert state[key].dtype == torch.uint8
            assert state[key].shape == w.shape


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_groups_carry_their_names_and_configured_lrs(name):
    lr = TYPICAL_LR[name]
    te_lr = lr if name == "Prodigy" else lr / 2
    config = OptimizerConfig(name=name, unet_lr=lr, text_encoder_lr=te_lr)
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer(config, {"unet": [a], "text_encoder": [b]})
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"unet", "text_encoder"}
    assert groups["unet"]["lr"] == lr and groups["unet"]["params"] == [a]
    assert groups["text_encoder"]["lr"] == te_lr and groups["text_encoder"]["params"] == [b]


def test_empty_group_is_skipped_and_unknown_group_rejected():
    a = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer(OptimizerConfig(), {"unet": [a], "text_encoder": []})
    assert [g["name"] for g in opt.param_groups] == ["unet"]
    with pytest.raises(ValueError):
        build_optimizer(OptimizerConfig(), {"vae": [a]})
    with pytest.raises(ValueError):
        build_optimizer(OptimizerConfig(), {"unet": [], "text_encoder": []})


@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_decoupled_weight_decay_shrinks_weights_without_gradient(name):
    lr, wd = 0.1, 0.5
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = build_optimizer(OptimizerConfig(name=name, unet_lr=lr, weight_decay=wd), {"unet": [w]})
    for k in range(1, 4):
        w.grad = torch.zeros_like(w)
        opt.step()
        expected = torch.tensor([1.0, -2.0, 3.0]) * (1 - lr * wd) ** k
        assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_sgd_uses_nesterov_momentum():
    lr, mu = 0.1, 0.9
    w = torch.nn.Parameter(torch.zeros(2))
    config = OptimizerConfig(name="SGD", unet_lr=lr, momentum=mu, weight_decay=0.0)
    opt = build_optimizer(config, {"unet": [w]})
    assert opt.param_groups[0]["nesterov"] is True
    g = torch.tensor([1.0, -1.0])
    w.grad = g.clone()
    opt.step()
    # Nesterov: buf = g, update = g + mu * buf; plain momentum would move by lr * g only.
    assert torch.allclose(w.detach(), -lr * (1 + mu) * g)


def test_prodigy_rejects_different_group_lrs():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    config = OptimizerConfig(name="Prodigy", unet_lr=1.0, text_encoder_lr=0.5)
    with pytest.raises(ConfigError) as info:
        build_optimizer(config, {"unet": [a], "text_encoder": [b]})
    assert info.value.field == "text_encoder_lr"
    # Without a text-encoder group the second lr is irrelevant.
    build_optimizer(config, {"unet": [a]})


# --- availability ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_installed_optimizers_are_available(name):
    assert check_available(name, "cpu") is None


@pytest.mark.parametrize(
    "name, module, package, alternative",
    [
        ("AdamW8bit", "bitsandbytes", "bitsandbytes", "AdamW"),
        ("Lion8bit", "bitsandbytes", "bitsandbytes", "Lion"),
        ("Lion", "lion_pytorch", "lion-pytorch", "AdamW"),
        ("Prodigy", "prodigyopt", "prodigyopt", "AdamW"),
    ],
)
def test_missing_library_gives_install_hint_and_alternative(monkeypatch, name, module, package, alternative):
    # A None entry in sys.modules makes `import module` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, module, None)
    message = check_available(name)
    assert message is not None
    assert f"pip install {package}" in message
    assert f"choose {alternative}" in message
    with pytest.raises(ConfigError) as info:
        build_optimizer(OptimizerConfig(name=name, unet_lr=1.0, text_encoder_lr=1.0),
                        {"unet": [torch.nn.Parameter(torch.zeros(4))]})
    assert info.value.field == "optimizer"
    assert message in str(info.value)


def test_library_that_fails_on_device_is_reported(monkeypatch):
    import bitsandbytes

    def broken_step(self, closure=None):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.optim.AdamW8bit, "step", broken_step)
    message = check_available("AdamW8bit", "cpu")
    assert "cannot run on cpu" in message
    assert "no kernel for this device" in message
    assert "AdamW instead" in message


def test_builtin_optimizers_do_not_need_optional_libraries(monkeypatch):
    for module in ("bitsandbytes", "lion_pytorch", "prodigyopt"):
        monkeypatch.setitem(sys.modules, module, None)
    for name in ("AdamW", "SGD"):
        assert check_available(name) is None
        build_optimizer(OptimizerConfig(name=name), {"unet": [torch.nn.Parameter(torch.zeros(4))]})


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "Adam9000"}, "optimizer"),
        ({"unet_lr": 0.0}, "unet_lr"),
        ({"unet_lr": float("inf")}, "unet_lr"),
        ({"text_encoder_lr": -1e-4}, "text_encoder_lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (-0.1, 0.99)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"momentum": 0.0}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        OptimizerConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_unknown_name_lists_choices_and_lr_error_gives_typical_values():
    with pytest.raises(ConfigError) as info:
        OptimizerConfig(name="adam")
    assert all(name in str(info.value) for name in OPTIMIZERS)
    with pytest.raises(ConfigError) as info:
        OptimizerConfig(unet_lr=0)
    assert "Lion" in str(info.value) and "1.0 for Prodigy" in str(info.value)


def test_betas_from_a_list_become_a_tuple():
    config = OptimizerConfig(betas=[0.8, 0.95])
    assert config.betas == (0.8, 0.95)
    assert hash(config) == hash(OptimizerConfig(betas=(0.8, 0.95)))
