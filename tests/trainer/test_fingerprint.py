"""trainer/fingerprint.py: every tensor counts, casts and in-place patches don't."""

from __future__ import annotations

import torch

from trainer.fingerprint import SAMPLES_MIN, SAMPLE_STRIDE, sample_stride, weights_fingerprint


def _model(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"block.{i}.weight": torch.randn(64, 48, generator=g) for i in range(9)} | {"ids": torch.arange(7)}


def test_a_change_in_a_middle_tensor_changes_the_fingerprint():
    sd = _model()
    before = weights_fingerprint(sd)
    for how in (lambda t: t.mul_(1.01), lambda t: t.add_(1e-3 * torch.randn_like(t))):
        changed = {k: v.clone() for k, v in sd.items()}
        how(changed["block.4.weight"])  # neither the first nor the last tensor
        assert weights_fingerprint(changed) != before


def test_names_shapes_and_integer_buffers_count():
    sd = _model()
    before = weights_fingerprint(sd)
    assert weights_fingerprint({("x" + k): v for k, v in sd.items()}) != before
    assert weights_fingerprint(dict(sd, **{"block.0.weight": sd["block.0.weight"].reshape(48, 64)})) != before
    assert weights_fingerprint(dict(sd, ids=torch.arange(7) + 1)) != before
    assert weights_fingerprint(dict(sd, extra=torch.zeros(1))) != before


def test_the_same_values_loaded_again_or_cast_to_fp16_are_the_same_model():
    sd = {k: v.half().float() if v.is_floating_point() else v for k, v in _model().items()}  # fp16-exact values
    before = weights_fingerprint(sd)
    assert weights_fingerprint({k: v.clone() for k, v in sd.items()}) == before
    assert weights_fingerprint({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}) == before
    assert weights_fingerprint(list(reversed(list(sd.items())))) == before  # order does not matter


def test_originals_describe_weights_patched_in_place():
    sd = _model()
    before = weights_fingerprint(sd)
    patched = dict(sd)
    patched["block.4.weight"] = sd["block.4.weight"] + 0.1  # what loading a LoRA-patched clone does
    assert weights_fingerprint(patched) != before
    assert weights_fingerprint(patched, originals={"block.4.weight": sd["block.4.weight"]}) == before


def test_skipped_names_are_left_out():
    sd = _model()
    noisy = dict(sd, text_projection=torch.full((4, 4), float("nan")))
    assert weights_fingerprint(noisy, skip=("text_projection",)) == weights_fingerprint(sd)


def test_samples_cover_the_whole_tensor():
    assert sample_stride(10) == 1 and sample_stride(SAMPLES_MIN) == 1
    assert sample_stride(100 * SAMPLES_MIN) == 100
    assert sample_stride(1_000_000) == 1_000_000 // (1_000_000 // SAMPLE_STRIDE)
    t = torch.zeros(1_000_000)
    before = weights_fingerprint({"w": t})
    for at in (0, 999_999):  # both ends are sampled
        changed = t.clone()
        changed[at] = 1.0
        assert weights_fingerprint({"w": changed}) != before


def test_a_patcher_is_described_by_its_unpatched_weights_and_its_own_patches():
    """ComfyUI's ModelPatcher layout: clones share `backup` (key -> (weight, inplace_update)) and
    loading a LoRA-patched clone writes the patched weight into the shared module."""
    from collections import namedtuple
    from types import SimpleNamespace

    from trainer.fingerprint import patcher_fingerprint

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    base = SimpleNamespace(model=net, backup={}, patches={})
    before = patcher_fingerprint(base)
    original = net[1].weight
    net[1].weight = torch.nn.Parameter(original + 0.5)  # a patched clone was loaded
    base.backup["1.weight"] = namedtuple("Dimension", ["weight", "inplace_update"])(original, False)
    assert patcher_fingerprint(base) == before
    lora = (1.0, (torch.ones(8, 2), torch.ones(2, 8), None, None, None, None), 1.0, None, None)
    patched_clone = SimpleNamespace(model=net, backup=base.backup, patches={"1.weight": [lora]})
    assert patcher_fingerprint(patched_clone) != before  # what it computes with differs
    stronger = SimpleNamespace(model=net, backup=base.backup, patches={"1.weight": [(0.5,) + lora[1:]]})
    assert patcher_fingerprint(stronger) not in (before, patcher_fingerprint(patched_clone))
