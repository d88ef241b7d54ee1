"""LoRA / LoKr / LoHa / DoRA adapters: the bypass forward against each algorithm's closed form.

The closed forms here are written from the saved file's tensors, the way ComfyUI's loader reads
them (tests/comfyui/test_algorithms.py checks the same files against ComfyUI's own code).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters import ALGORITHMS, LoKrModule, factorization, make_adapter
from trainer.errors import ConfigError, LoRALabError
from trainer.network import LoRANetwork, NetworkConfig, Target

LAYERS = {
    "linear": lambda: nn.Linear(24, 36),
    "conv1x1": lambda: nn.Conv2d(24, 36, 1),
    "conv3x3": lambda: nn.Conv2d(24, 36, 3, padding=1, stride=2),
}


def _input(kind, batch=2):
    return torch.randn(batch, 5, 24) if kind == "linear" else torch.randn(batch, 24, 6, 6)


def _randomise(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))


def _network(base, kind, algorithm, **kw):
    config = NetworkConfig(rank=4, alpha=3.0, conv_rank=4, conv_alpha=3.0, algorithm=algorithm, **kw)
    net = LoRANetwork([Target("lora_unet_x", base, "conv3x3" if kind == "conv3x3" else kind)], config)
    _randomise(net.loras["lora_unet_x"])
    return net


def _apply(base, x, weight):
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)


def comfy_closed_form(file: dict, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """W patched from a file's tensors (suffix -> tensor), with ComfyUI's conventions."""
    w = weight.float()
    alpha = float(file["alpha"])
    if "hada_w1_a" in file:
        rank = file["hada_w1_b"].shape[0]
        m1 = file["hada_w1_a"].float() @ file["hada_w1_b"].float()
        m2 = file["hada_w2_a"].float() @ file["hada_w2_b"].float()
        return w + strength * (alpha / rank) * (m1 * m2).reshape(w.shape)
    if "lokr_w1" in file:
        if "lokr_w2" in file:  # both factors full: alpha is ignored
            w2, scale = file["lokr_w2"].float().reshape(file["lokr_w2"].shape[0], -1), 1.0
        else:
            w2, scale = file["lokr_w2_a"].float() @ file["lokr_w2_b"].float(), alpha / file["lokr_w2_b"].shape[0]
        return w + strength * scale * torch.kron(file["lokr_w1"].float(), w2).reshape(w.shape)
    up, down = file["lora_up.weight"].float(), file["lora_down.weight"].float()
    delta = (alpha / down.shape[0]) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
    if "dora_scale" not in file:
        return w + strength * delta
    merged = w + delta
    col = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)  # per input channel
    shape = [1, -1] + [1] * (w.dim() - 2)
    full = merged * (file["dora_scale"].float().reshape(shape) / (col.reshape(shape) + torch.finfo(torch.float32).eps))
    return w + strength * (full - w)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("strength", [1.0, 1.5])
def test_bypass_forward_equals_closed_form(algorithm, kind, strength):
    torch.manual_seed(0)
    base = LAYERS[kind]().requires_grad_(False)
    net = _network(base, kind, algorithm)
    net.strength = strength
    adapter = net.loras["lora_unet_x"]
    x = _input(kind)
    with net.applied():
        got = base(x)
    file = {k.split(".", 1)[1]: v for k, v in net.to_kohya().items()}
    want = _apply(base, x, comfy_closed_form(file, base.weight, strength))
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert torch.allclose(adapter.merged_weight(base.weight, strength), comfy_closed_form(file, base.weight, strength), atol=1e-5)
    assert not torch.allclose(got, base(x), atol=1e-3)  # the adapter changes the output


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_equal_those_of_the_closed_form(algorithm, kind):
    torch.manual_seed(1)
    base = LAYERS[kind]().requires_grad_(False)
    net = _network(base, kind, algorithm)
    net.strength = 1.5
    adapter = net.loras["lora_unet_x"]
    x = _input(kind)
    target = torch.randn_like(base(x))
    with net.applied():
        F.mse_loss(base(x), target).backward()
    bypass = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    adapter.zero_grad()
    F.mse_loss(_apply(base, x, adapter.merged_weight(base.weight, 1.5)), target).backward()
    for n, p in adapter.named_parameters():
        assert torch.allclose(bypass[n], p.grad, atol=1e-5, rtol=1e-3), (n, (bypass[n] - p.grad).abs().max())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_starts_as_a_no_op_and_learns(algorithm):
    torch.manual_seed(2)
    base = nn.Linear(32, 32).requires_grad_(False)
    net = LoRANetwork([Target("lora_unet_x", base, "linear")], NetworkConfig(rank=4, alpha=4.0, algorithm=algorithm))
    x, target = torch.randn(16, 32), torch.randn(16, 32)
    with net.applied():
        assert torch.allclose(base(x), F.linear(x, base.weight, base.bias), atol=1e-6)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with net.applied():
            loss = F.mse_loss(base(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_file_round_trip_restores_the_same_forward(algorithm):
    torch.manual_seed(3)
    base = nn.Conv2d(24, 36, 3, padding=1).requires_grad_(False)
    net = _network(base, "conv3x3", algorithm)
    x = _input("conv3x3")
    with net.applied():
        before = base(x)
    fresh = LoRANetwork([Target("lora_unet_x", base, "conv3x3")], net.config)
    fresh.load_kohya(net.to_kohya(torch.float32))
    with fresh.applied():
        assert torch.allclose(base(x), before, atol=1e-6)


def test_loading_a_file_of_another_algorithm_names_the_setting():
    base = nn.Linear(24, 36)
    lokr = _network(base, "linear", "lokr")
    lora = LoRANetwork([Target("lora_unet_x", base, "linear")], NetworkConfig(rank=4, alpha=3.0))
    with pytest.raises(LoRALabError, match="algorithm"):
        lora.load_kohya(lokr.to_kohya())


def test_file_keys_are_the_ones_comfyui_reads():
    base = nn.Linear(64, 64)
    keys = {}
    for algorithm in ALGORITHMS:
        net = LoRANetwork([Target("m", base, "linear")], NetworkConfig(rank=4, alpha=2.0, algorithm=algorithm))
        keys[algorithm] = {k: tuple(v.shape) for k, v in net.to_kohya().items()}
    assert keys["lora"] == {"m.lora_down.weight": (4, 64), "m.lora_up.weight": (64, 4), "m.alpha": ()}
    assert keys["dora"] == {**keys["lora"], "m.dora_scale": (1, 64)}  # input axis: first size 1, not out
    assert keys["loha"] == {"m.hada_w1_a": (64, 4), "m.hada_w1_b": (4, 64), "m.hada_w2_a": (64, 4), "m.hada_w2_b": (4, 64), "m.alpha": ()}
    assert keys["lokr"] == {"m.lokr_w1": (8, 8), "m.lokr_w2_a": (8, 4), "m.lokr_w2_b": (4, 8), "m.alpha": ()}


def test_lokr_alpha_applies_once_and_only_to_a_decomposed_factor():
    base = nn.Linear(64, 64)
    decomposed = LoKrModule(base, rank=4, alpha=2.0)
    full = LoKrModule(base, rank=4, alpha=2.0, decompose=False)
    assert decomposed.decomposed and decomposed.scale == 0.5
    assert not full.decomposed and full.scale == 1.0
    assert hasattr(full, "w2") and full.w2.shape == (8, 8)
    # a rank at least as large as the factor cannot be decomposed: stored in full
    assert not LoKrModule(base, rank=8, alpha=2.0).decomposed


@pytest.mark.parametrize("dim,factor,expected", [(64, -1, (8, 8)), (128, -1, (8, 16)), (128, 4, (4, 32)), (36, -1, (6, 6)),
                                                 (24, -1, (4, 6)), (127, -1, (1, 127)), (360, 16, (15, 24)), (250, 8, (5, 50))])
def test_factorization(dim, factor, expected):
    small, large = factorization(dim, factor)
    assert (small, large) == expected and small * large == dim


def test_config_refuses_unknown_algorithm_and_bad_factor():
    with pytest.raises(ConfigError, match="algorithm"):
        NetworkConfig(algorithm="oft")
    with pytest.raises(ConfigError, match="lokr_factor"):
        NetworkConfig(algorithm="lokr", lokr_factor=0)


def _saved_bytes(net, base, x):
    """Bytes autograd saves for backward in one adapted layer's forward, not counting the layer's
    own weight and the input (which plain training keeps anyway)."""
    skip = {base.weight.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    sizes = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and not isinstance(t, nn.Parameter):
            skip.add(ptr)
            sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), net.applied():
        base(x).sum().backward()
    return sizes


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_autograd_keeps_no_full_size_weight(algorithm):
    """Bypass form: what backward keeps per layer is activations of rank size and small factors,
    never a [out, in] matrix (materialising ΔW or W + ΔW would save one)."""
    torch.manual_seed(4)
    base = nn.Linear(512, 512).requires_grad_(False)
    net = LoRANetwork([Target("m", base, "linear")], NetworkConfig(rank=8, alpha=8.0, algorithm=algorithm))
    x = torch.randn(4, 512, requires_grad=True)
    sizes = _saved_bytes(net, base, x)
    weight_bytes = base.weight.numel() * 4
    assert max(sizes) < weight_bytes / 4, (algorithm, sorted(sizes)[-3:])
    # LoHa works at rank r² (64 here): its factors [64, 512] are the largest thing it keeps.
    assert sum(sizes) < weight_bytes * (0.6 if algorithm == "loha" else 0.25), (algorithm, sum(sizes))


@pytest.mark.parametrize("dora_hooks_first", [False, True])
def test_dora_with_fp8_base_weights_matches_the_dequantised_weight(dora_hooks_first):
    """Whichever pre-hook runs first, DoRA's norms are those of the weight the layer computes with:
    the fp8 weight dequantised (read raw with its scale, or as fp8's upcast copy)."""
    from contextlib import ExitStack

    from trainer.adapters import FP8_DTYPES
    from trainer.fp8 import store_base_fp8

    torch.manual_seed(5)
    base = nn.Linear(48, 40).requires_grad_(False)
    net = _network(base, "linear", "dora")
    adapter = net.loras["lora_unet_x"]
    x = torch.randn(2, 5, 48)
    with ExitStack() as stack:
        if dora_hooks_first:  # DoRA's pre-hook registered before fp8's: it reads the raw fp8 weight
            stack.enter_context(net.applied())
        stack.callback(store_base_fp8([base]).restore)
        if not dora_hooks_first:
            stack.enter_context(net.applied())
        dequantised = base.weight.float() * base.weight_fp8_scale
        got = base(x)
        assert (adapter._norm_cache[0][2] in FP8_DTYPES) == dora_hooks_first
    want = F.linear(x, adapter.merged_weight(dequantised, 1.0), base.bias)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_dora_norm_is_cached_while_the_weight_is_unchanged():
    base = nn.Linear(16, 16).requires_grad_(False)
    net = _network(base, "linear", "dora")
    adapter = net.loras["lora_unet_x"]
    x = torch.randn(3, 16)
    with net.applied():
        base(x)
    first = adapter._norm_cache[1]
    with net.applied():
        base(x)
    assert adapter._norm_cache[1] is first
    with torch.no_grad():
        base.weight.mul_(2.0)  # a changed weight (e.g. another model loaded in place) is re-measured
    with net.applied():
        base(x)
    assert torch.allclose(adapter._norm_cache[1], 4 * first)
    assert math.isclose(float(adapter._norm_cache[1].sum()), float(base.weight.pow(2).sum()), rel_tol=1e-5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_every_algorithm_runs_under_autocast_with_half_precision_base(algorithm, kind):
    """The fp16/bf16 path: a half-precision frozen layer under autocast, fp32 adapter weights
    that receive fp32 gradients, and an output within half-precision rounding of the fp32 one."""
    torch.manual_seed(6)
    base = LAYERS[kind]().requires_grad_(False)
    net = _network(base, kind, algorithm)
    x = _input(kind)
    with net.applied():
        want = base(x)
    base.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), net.applied():
        got = base(x.to(torch.bfloat16))
    got.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters())
    assert torch.allclose(got.float(), want, atol=0.1, rtol=0.05), (got.float() - want).abs().max()
