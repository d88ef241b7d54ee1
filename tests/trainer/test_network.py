import pytest
import torch
from torch import nn

from tests.toys import ToyDenoiser, make_network
from trainer.errors import ConfigError
from trainer.network import LoRAModule, LoRANetwork, NetworkConfig, find_targets, kohya_name


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.randn(2, 1, generator=g)
    ctx = torch.randn(2, 3, 8, generator=g)
    return x, t, ctx


def _randomize_up(network, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * 0.1)


def test_step_zero_equals_base_model_exactly():
    d = ToyDenoiser()
    net = make_network(d, conv_rank=2, conv_alpha=1.0)
    x, t, ctx = _inputs()
    base = d.unet(x, t, ctx)
    with net.applied():
        adapted = d.unet(x, t, ctx)
    assert torch.equal(base, adapted)


def test_output_delta_is_alpha_over_rank_times_strength():
    d = ToyDenoiser()
    lin = d.unet.block.attn.to_q
    lora = LoRAModule(lin, rank=4, alpha=2.0)
    with torch.no_grad():
        lora.up.weight.normal_()
    x = torch.randn(5, lin.in_features)
    raw = lora.up(lora.down(x))
    assert lora.scale == pytest.approx(0.5)
    torch.testing.assert_close(lora(x), 0.5 * raw)
    torch.testing.assert_close(lora(x, strength=1.8), 0.9 * raw)


def test_network_strength_scales_the_change_linearly():
    d = ToyDenoiser()
    net = make_network(d)
    # Only one module gets a non-zero up, so the output change is linear in strength.
    with torch.no_grad():
        name = next(n for n in net.loras if n.endswith("attn_to_out"))
        net.loras[name].up.weight.normal_(std=0.01)
    x, t, ctx = _inputs()
    base = d.unet(x, t, ctx)
    deltas = {}
    for s in (0.0, 1.0, 1.5):
        net.strength = s
        with net.applied():
            deltas[s] = d.unet(x, t, ctx) - base
    assert deltas[0.0].abs().max() == 0
    torch.testing.assert_close(deltas[1.5], 1.5 * deltas[1.0], rtol=1e-3, atol=1e-6)
    assert deltas[1.5].norm() > deltas[1.0].norm() > 0


def test_applied_leaves_no_trace_on_the_shared_modules():
    d = ToyDenoiser()
    before = {k: v.clone() for k, v in d.unet.state_dict().items()}
    net = make_network(d)
    _randomize_up(net)
    x, t, ctx = _inputs()
    base = d.unet(x, t, ctx)
    with net.applied():
        changed = d.unet(x, t, ctx)
    after = d.unet(x, t, ctx)
    assert not torch.equal(base, changed)
    assert torch.equal(base, after)
    assert all(not m._forward_hooks for m in d.unet.modules())
    assert all(torch.equal(before[k], v) for k, v in d.unet.state_dict().items())
    assert set(d.unet.state_dict()) == set(before)


def test_attn_mlp_preset_takes_linears_and_1x1_convs_in_transformer_blocks():
    d = ToyDenoiser()
    names = {t.name: t.kind for t in d.targets(NetworkConfig(rank=4))}
    assert names == {
        "lora_unet_block_proj_in": "conv",
        "lora_unet_block_attn_to_q": "linear",
        "lora_unet_block_attn_to_k": "linear",
        "lora_unet_block_attn_to_v": "linear",
        "lora_unet_block_attn_to_out": "linear",
        "lora_unet_block_ff_0": "linear",
        "lora_unet_block_ff_2": "linear",
        "lora_unet_block_proj_out": "conv",
    }


def test_attn_only_preset_and_conv3x3_with_own_rank():
    d = ToyDenoiser()
    attn = {t.name for t in d.targets(NetworkConfig(rank=4, targets="attn_only"))}
    assert attn == {f"lora_unet_block_attn_to_{p}" for p in ("q", "k", "v", "out")}
    config = NetworkConfig(rank=4, alpha=4, conv_rank=2, conv_alpha=1.0)
    net = LoRANetwork(d.targets(config), config)
    conv = net.loras["lora_unet_res_conv"]
    assert conv.rank == 2 and conv.scale == pytest.approx(0.5)
    assert conv.down.weight.shape == (2, 16, 3, 3) and conv.up.weight.shape == (16, 2, 1, 1)
    assert net.loras["lora_unet_block_proj_in"].down.weight.shape == (4, 16, 1, 1)
    assert net.loras["lora_unet_block_attn_to_q"].scale == pytest.approx(1.0)


def test_kohya_round_trip_and_layout():
    d = ToyDenoiser()
    net = make_network(d, conv_rank=2)
    _randomize_up(net)
    w = net.to_kohya(torch.float16)
    assert w["lora_unet_block_attn_to_k.lora_down.weight"].shape == (4, 8)
    assert w["lora_unet_block_attn_to_k.lora_up.weight"].shape == (16, 4)
    assert w["lora_unet_block_attn_to_k.lora_up.weight"].dtype == torch.float16
    assert w["lora_unet_block_attn_to_k.alpha"].ndim == 0
    other = make_network(ToyDenoiser(seed=5), conv_rank=2)
    other.load_kohya(w)
    for name, lora in net.loras.items():
        torch.testing.assert_close(other.loras[name].up.weight, lora.up.weight.half().float())


def test_load_kohya_with_other_rank_names_the_fix():
    d = ToyDenoiser()
    w = make_network(d, rank=4).to_kohya()
    with pytest.raises(Exception, match="rank"):
        make_network(d, rank=2, alpha=2.0).load_kohya(w)


def test_dropout_only_in_training_mode():
    d = ToyDenoiser()
    net = make_network(d, dropout=0.5)
    _randomize_up(net)
    x, t, ctx = _inputs()
    net.train()
    with net.applied():
        a, b = d.unet(x, t, ctx), d.unet(x, t, ctx)
    assert not torch.equal(a, b)
    net.eval()
    with net.applied():
        a, b = d.unet(x, t, ctx), d.unet(x, t, ctx)
    assert torch.equal(a, b)


def test_param_groups_split_unet_and_text_encoder():
    lin_u, lin_t = nn.Linear(8, 8), nn.Linear(8, 8)
    from trainer.network import Target

    net = LoRANetwork([Target("lora_unet_a", lin_u, "linear"), Target("lora_te_b", lin_t, "linear")], NetworkConfig(rank=2, alpha=1))
    groups = net.param_groups()
    assert len(groups["unet"]) == 2 and len(groups["text_encoder"]) == 2


@pytest.mark.parametrize(
    "kw,field",
    [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"targets": "everything"}, "targets"), ({"conv_rank": -1}, "conv_rank")],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        NetworkConfig(**kw)
    assert e.value.field == field


def test_rank_larger_than_layer_width_is_refused():
    with pytest.raises(ConfigError, match="rank"):
        LoRAModule(nn.Linear(8, 6), rank=7, alpha=1)


def test_kohya_name():
    assert kohya_name("lora_unet", "down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_rename_can_map_and_skip():
    d = ToyDenoiser()
    targets = find_targets(d.unet, "lora_unet", ["ToyTransformer"], config=NetworkConfig(rank=2, alpha=1), rename=lambda p: None if "ff" in p else "x." + p)
    names = {t.name for t in targets}
    assert "lora_unet_x_block_attn_to_q" in names and not any("ff" in n for n in names)
