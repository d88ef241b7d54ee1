
import pytest
import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.precision import PrecisionConfig, autocast, check_device_support, compute_dtype, for_device
from tests.toys import frozen


# --- config ----------------------------------------------------------------------------------


def test_defaults_and_dtypes():
    cfg = PrecisionConfig()
    # The Precision node's defaults: auto precision, gradient checkpointing on, fp16 files.
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.save_dtype, cfg.fp8_base) == ("auto", True, "fp16", False)
    assert compute_dtype(for_device(cfg, "cpu")) == torch.float32
    assert compute_dtype(PrecisionConfig(mixed_precision="bf16")) == torch.bfloat16
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
    base = frozen(nn.Linear(8, 8))
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
    with autocast(PrecisionConfig(mixed_precision="fp32"), "cpu"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


def test_check_device_support_cpu():
    assert check_device_support(PrecisionConfig(mixed_precision="fp32"), "cpu") is None
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
