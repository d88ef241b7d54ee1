import math

import pytest
import torch
from torch import nn

from trainer.errors import ConfigError, TrainingError
from trainer.optim_step import DynamicLossScaler, StepResult, make_loss_scaler, optimizer_step
from trainer.precision import PrecisionConfig


# --- loss scaling and optimizer step ---------------------------------------------------------


def _param(values):
    return nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_make_loss_scaler_only_for_fp16():
    assert make_loss_scaler(PrecisionConfig(mixed_precision="fp32")) is None
    assert make_loss_scaler(PrecisionConfig(mixed_precision="bf16")) is None
    assert make_loss_scaler(PrecisionConfig(mixed_precision="fp16")).current_scale == 2.0**16


def test_scaled_backward_then_unscale_gives_true_grads():
    p = _param([1.0, 2.0])
    scaler = DynamicLossScaler(init_scale=1024.0)
    scaler.scale((p * 3).sum()).backward()
    assert torch.equal(p.grad, torch.full((2,), 3072.0))
    assert scaler.unscale_and_check([p]) is True
    assert torch.allclose(p.grad, torch.full((2,), 3.0))


def test_inf_grads_skip_step_and_halve_scale():
    p = _param([1.0, 2.0])
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = DynamicLossScaler(init_scale=1024.0)
    p.grad = torch.tensor([1.0, float("inf")])
    result = optimizer_step(opt, [p], scaler, max_grad_norm=1.0)
    assert result.skipped and math.isnan(result.grad_norm) and result.scale == 1024.0
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0]))
    assert p.grad is None
    assert scaler.current_scale == 512.0


def test_scale_grows_after_growth_interval_clean_steps():
    p = _param([1.0])
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    for _ in range(2):
        p.grad = torch.tensor([8.0])
        assert not optimizer_step(opt, [p], scaler, 0.0).skipped
    assert scaler.current_scale == 8.0
    p.grad = torch.tensor([8.0])
    optimizer_step(opt, [p], scaler, 0.0)
    assert scaler.current_scale == 16.0
    # An overflow resets the clean-step count.
    scaler.update(found_inf=False)
    scaler.update(found_inf=True)
    assert scaler.current_scale == 8.0
    scaler.update(found_inf=False)
    scaler.update(found_inf=False)
    assert scaler.current_scale == 8.0


def test_scaler_state_dict_round_trip():
    a = DynamicLossScaler(init_scale=64.0, growth_interval=5)
    a.update(True)
    a.update(False)
    a.update(False)
    b = DynamicLossScaler(growth_interval=5)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() == {"scale": 32.0, "growth_tracker": 2}
    for _ in range(3):
        b.update(False)
    assert b.current_scale == 64.0
    with pytest.raises(TrainingError):
        b.load_state_dict({"scale": 2.0})


def test_disabled_scaler_is_identity_but_still_checks():
    scaler = DynamicLossScaler(enabled=False)
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss and scaler.current_scale == 1.0
    p = _param([2.0])
    p.grad = torch.tensor([4.0])
    assert scaler.unscale_and_check([p]) and p.grad.item() == 4.0
    p.grad = torch.tensor([float("nan")])
    assert scaler.unscale_and_check([p]) is False
    scaler.update(True)
    assert scaler.current_scale == 1.0


def test_scaler_validation():
    with pytest.raises(ConfigError) as err:
        DynamicLossScaler(backoff_factor=1.5)
    assert err.value.field == "backoff_factor"
    with pytest.raises(ConfigError):
        DynamicLossScaler(growth_interval=0)


def test_clipping_caps_norm_and_reports_pre_clip_norm():
    a, b = _param([0.0, 0.0]), _param([0.0])
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # total norm 13
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen["norm"] = float(torch.cat([a.grad, b.grad]).norm())
            return super().step(closure)

    opt = Spy([a, b], lr=1.0)
    result = optimizer_step(opt, [a, b], None, max_grad_norm=1.0)
    assert result == StepResult(skipped=False, grad_norm=pytest.approx(13.0), scale=1.0)
    assert seen["norm"] == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(a.detach(), torch.tensor([-3.0, -4.0]) / 13, atol=1e-5)
    assert a.grad is None and b.grad is None


def test_no_clipping_when_max_grad_norm_is_zero():
    p = _param([0.0, 0.0])
    p.grad = torch.tensor([3.0, 4.0])
    result = optimizer_step(torch.optim.SGD([p], lr=1.0), [p], None, max_grad_norm=0.0)
    assert result.grad_norm == pytest.approx(5.0)
    assert torch.allclose(p.detach(), torch.tensor([-3.0, -4.0]))


def test_non_finite_grads_skipped_without_scaler():
    p = _param([1.0, 1.0])
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.tensor([float("nan"), 1.0])
    result = optimizer_step(opt, [p], None, max_grad_norm=1.0)
    assert result.skipped and result.scale == 1.0
    assert torch.equal(p.detach(), torch.ones(2))
    assert len(opt.state) == 0  # the optimizer never saw the bad gradients
    # A following good step works normally.
    p.grad = torch.tensor([1.0, 1.0])
    assert not optimizer_step(opt, [p], None, 1.0).skipped
    assert not torch.equal(p.detach(), torch.ones(2))


def test_norm_overflow_skips_step():
    p = _param([1.0, 1.0])
    p.grad = torch.tensor([3e38, 3e38])  # finite values, but the norm overflows fp32
    assert optimizer_step(torch.optim.SGD([p], lr=1.0), [p], None, 1.0).skipped
    assert torch.equal(p.detach(), torch.ones(2))
