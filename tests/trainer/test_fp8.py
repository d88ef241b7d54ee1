
import pytest
import torch
from torch import nn

from trainer.errors import TrainingError
from trainer.fp8 import store_base_fp8
from trainer.precision import PrecisionConfig, autocast
from tests.toys import frozen, rel_err


def parameter_bytes(module: nn.Module) -> int:
    return sum(t.nbytes for t in module.parameters()) + sum(t.nbytes for t in module.buffers())


# --- fp8 base weights ------------------------------------------------------------------------


def _mlp(bias=False):
    torch.manual_seed(0)
    return frozen(nn.Sequential(nn.Linear(64, 256, bias=bias), nn.GELU(), nn.Linear(256, 64, bias=bias)))


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
    assert rel_err(out, ref) < 0.06
    assert model[0].weight.dtype == torch.float8_e4m3fn  # fp8 again after the call


def test_fp8_conv2d_close():
    torch.manual_seed(0)
    conv = frozen(nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(2, 8, 6, 6)
    ref = conv(x)
    store_base_fp8([conv])
    assert rel_err(conv(x), ref) < 0.06


def test_fp8_gradients_reach_input_and_side_branch():
    torch.manual_seed(0)
    base = frozen(nn.Linear(16, 16))
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
    lin = frozen(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1000.0, -600.0, 2.0, 0.5], [300.0, 10.0, -1000.0, 7.0], [1.0, 2.0, 3.0, 4.0]]))
    x = torch.randn(5, 4)
    ref = lin(x)
    store_base_fp8([lin])
    assert rel_err(lin(x), ref) < 0.06
    assert abs(lin.weight_fp8_scale.item() - 1000.0 / 448.0) < 1e-4


def test_fp8_under_bf16_autocast_small():
    model = _mlp()
    x = torch.randn(4, 64, requires_grad=True)
    ref = model(x).detach()
    store_base_fp8(model.modules())
    with autocast(PrecisionConfig(mixed_precision="bf16"), "cpu"):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.08
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
    lin = frozen(nn.Linear(8, 4))
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
        assert rel_err(m.weight, w) < 0.06
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
    lin = frozen(nn.Linear(4, 4))
    store_base_fp8([lin])
    lin.to(torch.float64)
    with pytest.raises(TrainingError):
        lin(torch.randn(1, 4, dtype=torch.float64))


def test_fp8_tiny_weights_under_fp16_autocast_small():
    # The scale of 1e-4-sized weights (~2e-7) is below fp16's normal range; dequantizing must not
    # lose it.
    torch.manual_seed(0)
    lin = frozen(nn.Linear(32, 8, bias=False))
    with torch.no_grad():
        lin.weight.mul_(1e-4 / lin.weight.abs().max())
    x = torch.randn(4, 32)
    ref = lin(x)
    store_base_fp8([lin])
    with autocast(PrecisionConfig(mixed_precision="fp16"), "cpu"):
        out = lin(x)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 0.06
