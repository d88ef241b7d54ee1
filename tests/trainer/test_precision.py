import math

import pytest
import torch
from torch import nn

from trainer.errors import ConfigError, TrainingError
from trainer.precision import (
    DynamicLossScaler,
    PrecisionConfig,
    StepResult,
    autocast,
    check_device_support,
    compute_dtype,
    for_device,
    make_loss_scaler,
    optimizer_step,
    parameter_bytes,
    save_torch_dtype,
    store_base_fp8,
)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# --- config ----------------------------------------------------------------------------------


def test_defaults_and_dtypes():
    cfg = PrecisionConfig()
    assert compute_dtype(cfg) == torch.float32
    assert save_torch_dtype(cfg) == torch.float16
    cfg = PrecisionConfig(mixed_precision="bf16", save_dtype="fp32")
    assert compute_dtype(cfg) == torch.bfloat16
    assert save_torch_dtype(cfg) == torch.float32
    assert compute_dtype(PrecisionConfig(mixed_precision="fp16")) == torch.float16


@pytest.mark.parametrize(
    "kwargs, field, mentions",
    [
        ({"mixed_precision": "fp8"}, "mixed_precision", "bf16"),
        ({"save_dtype": "int8"}, "save_dtype", "fp16"),
        ({"max_grad_norm": -1.0}, "max_grad_norm", ">= 0"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm", ">= 0"),
        ({"fp8_base": "yes"}, "fp8_base", "true or false"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing", "true or false"),
    ],
)
def test_config_validation_names_field(kwargs, field, mentions):
    with pytest.raises(ConfigError) as err:
        PrecisionConfig(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:")
    assert mentions in str(err.value)


def test_max_grad_norm_zero_is_allowed():
    assert PrecisionConfig(max_grad_norm=0).max_grad_norm == 0


# --- autocast and device checks --------------------------------------------------------------


def test_autocast_bf16_output_with_fp32_lora_grads():
    torch.manual_seed(0)
    base = _frozen(nn.Linear(8, 8))
    down, up = nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
    nn.init.normal_(up.weight)
    x = torch.randn(4, 8)
    with autocast(PrecisionConfig(mixed_precision="bf16"), "cpu"):
        out = base(x) + up(down(x))
        assert out.dtype == torch.bfloat16
        loss = out.float().pow(2).mean()
    loss.backward()
    assert down.weight.dtype == torch.float32
    assert down.weight.grad is not None and down.weight.grad.dtype == torch.float32
    assert up.weight.grad.dtype == torch.float32
    assert base.weight.grad is None


def test_autocast_fp32_is_a_no_op():
    lin = nn.Linear(4, 4)
    with autocast(PrecisionConfig(), "cpu"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


def test_check_device_support_cpu():
    assert check_device_support(PrecisionConfig(), "cpu") is None
    for mp in ("bf16", "fp16"):
        msg = check_device_support(PrecisionConfig(mixed_precision=mp), torch.device("cpu"))
        assert msg is not None and mp in msg and "fp32" in msg and "CPU" in msg


def test_check_device_support_cuda_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ConfigError) as err:
        check_device_support(PrecisionConfig(mixed_precision="bf16"), "cuda")
    assert err.value.field == "mixed_precision" and "fp16" in str(err.value)
    assert check_device_support(PrecisionConfig(mixed_precision="fp16"), "cuda") is None


@pytest.mark.parametrize("device, native_bf16, expected", [
    ("cpu", False, "fp32"), ("mps", False, "fp32"), ("cuda", True, "bf16"), ("cuda:1", False, "fp16"),
])
def test_auto_precision_is_chosen_for_the_device(monkeypatch, device, native_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    chosen = for_device(PrecisionConfig(mixed_precision="auto", gradient_checkpointing=True, save_dtype="bf16"), device)
    assert chosen == PrecisionConfig(mixed_precision=expected, gradient_checkpointing=True, save_dtype="bf16")
    assert check_device_support(chosen, device) is None  # never a slow or unusable choice
    explicit = PrecisionConfig(mixed_precision="bf16")
    assert for_device(explicit, device) is explicit  # an explicit choice is the user's


def test_check_device_support_cuda_with_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert check_device_support(PrecisionConfig(mixed_precision="bf16"), "cuda:0") is None


def test_fp8_on_mps_is_refused():
    with pytest.raises(ConfigError) as err:
        check_device_support(PrecisionConfig(fp8_base=True), "mps")
    assert err.value.field == "fp8_base"


# --- loss scaling and optimizer step ---------------------------------------------------------


def _param(values):
    return nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_make_loss_scaler_only_for_fp16():
    assert make_loss_scaler(PrecisionConfig()) is None
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


# --- fp8 base weights ------------------------------------------------------------------------


def _mlp(bias=False):
    torch.manual_seed(0)
    return _frozen(nn.Sequential(nn.Linear(64, 256, bias=bias), nn.GELU(), nn.Linear(256, 64, bias=bias)))


def test_fp8_cuts_weight_bytes_about_four_times():
    model = _mlp()
    before = parameter_bytes(model)
    assert before == 2 * 64 * 256 * 4
    handle = store_base_fp8(model.modules())
    after = parameter_bytes(model)
    assert len(handle.modules) == 2
    assert 3.9 < before / after <= 4.0
    assert model[0].weight.dtype == torch.float8_e4m3fn


def test_fp8_outputs_close_and_module_identity_kept():
    model = _mlp(bias=True)
    x = torch.randn(16, 64)
    ref = model(x)
    keys = set(model.state_dict())
    first = model[0]
    store_base_fp8(model.modules())
    out = model(x)
    assert model[0] is first and set(model.state_dict()) == keys
    assert out.dtype == torch.float32
    assert _rel_err(out, ref) < 0.06
    assert model[0].weight.dtype == torch.float8_e4m3fn  # fp8 again after the call


def test_fp8_conv2d_close():
    torch.manual_seed(0)
    conv = _frozen(nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(2, 8, 6, 6)
    ref = conv(x)
    store_base_fp8([conv])
    assert _rel_err(conv(x), ref) < 0.06


def test_fp8_gradients_reach_input_and_side_branch():
    torch.manual_seed(0)
    base = _frozen(nn.Linear(16, 16))
    pre = nn.Linear(16, 16)  # trainable layer before the fp8 one
    lora = nn.Linear(16, 16, bias=False)
    handle = store_base_fp8([base, pre, lora])
    assert handle.modules == (base,)  # trainable layers are not converted
    hook = base.register_forward_hook(lambda m, args, out: out + lora(args[0]))
    x = torch.randn(4, 16, requires_grad=True)
    base(pre(x)).sum().backward()
    hook.remove()
    for g in (x.grad, pre.weight.grad, lora.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert base.weight.grad is None and base.weight.dtype == torch.float8_e4m3fn


def test_fp8_scale_keeps_large_weights_from_saturating():
    lin = _frozen(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1000.0, -600.0, 2.0, 0.5], [300.0, 10.0, -1000.0, 7.0], [1.0, 2.0, 3.0, 4.0]]))
    x = torch.randn(5, 4)
    ref = lin(x)
    store_base_fp8([lin])
    assert _rel_err(lin(x), ref) < 0.06
    assert abs(lin.weight_fp8_scale.item() - 1000.0 / 448.0) < 1e-4


def test_fp8_under_bf16_autocast_small():
    model = _mlp()
    x = torch.randn(4, 64, requires_grad=True)
    ref = model(x).detach()
    store_base_fp8(model.modules())
    with autocast(PrecisionConfig(mixed_precision="bf16"), "cpu"):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < 0.08
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fp8_with_gradient_checkpointing():
    model = _mlp()
    store_base_fp8(model.modules())
    x = torch.randn(4, 64, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fp8_weight_restored_after_failed_call():
    lin = _frozen(nn.Linear(8, 4))
    store_base_fp8([lin])
    with pytest.raises(RuntimeError):
        lin(torch.randn(2, 5))
    assert lin.weight.dtype == torch.float8_e4m3fn


def test_fp8_restore_lossy_by_default():
    model = _mlp()
    originals = [m.weight.detach().clone() for m in (model[0], model[2])]
    before = parameter_bytes(model)
    handle = store_base_fp8(model.modules())
    handle.restore()
    handle.restore()  # second call is a no-op
    assert parameter_bytes(model) == before and handle.modules == ()
    for m, w in zip((model[0], model[2]), originals):
        assert m.weight.dtype == torch.float32 and not m.weight.requires_grad
        assert not hasattr(m, "weight_fp8_scale")
        assert _rel_err(m.weight, w) < 0.06
        assert not torch.equal(m.weight, w)
    # Hooks are gone: the module computes with the restored weight as a plain Linear does.
    x = torch.randn(3, 64)
    assert torch.equal(model[0](x), x @ model[0].weight.T)


def test_fp8_restore_exact_with_keep_original():
    model = _mlp()
    originals = [m.weight.detach().clone() for m in (model[0], model[2])]
    store_base_fp8(model.modules(), keep_original=True).restore()
    for m, w in zip((model[0], model[2]), originals):
        assert torch.equal(m.weight, w)


def test_fp8_dtype_cast_behind_our_back_is_reported():
    lin = _frozen(nn.Linear(4, 4))
    store_base_fp8([lin])
    lin.to(torch.float64)
    with pytest.raises(TrainingError):
        lin(torch.randn(1, 4, dtype=torch.float64))


def test_fp8_tiny_weights_under_fp16_autocast_small():
    # The scale of 1e-4-sized weights (~2e-7) is below fp16's normal range; dequantizing must not
    # lose it.
    torch.manual_seed(0)
    lin = _frozen(nn.Linear(32, 8, bias=False))
    with torch.no_grad():
        lin.weight.mul_(1e-4 / lin.weight.abs().max())
    x = torch.randn(4, 32)
    ref = lin(x)
    store_base_fp8([lin])
    with autocast(PrecisionConfig(mixed_precision="fp16"), "cpu"):
        out = lin(x)
    assert out.dtype == torch.float16
    assert _rel_err(out, ref) < 0.06
