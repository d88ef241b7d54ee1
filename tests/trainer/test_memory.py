import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.toys import ToyDenoiser, make_examples, make_network
from trainer.errors import ConfigError
from trainer.memory import ActivationProfile, MemoryEstimate, estimate_peak_bytes, optimizer_state_bytes, probe_activations

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


def profile(saved=100 * MiB, outside=10 * MiB, inputs=20 * MiB, largest_block=15 * MiB, largest_tensor=4 * MiB, batch=1):
    return ActivationProfile(saved, outside, inputs, largest_block, largest_tensor, batch)


def test_optimizer_state_per_parameter():
    n = [1_000_000]
    assert optimizer_state_bytes("AdamW", n) == 8_000_000
    assert optimizer_state_bytes("Lion", n) == 4_000_000
    assert optimizer_state_bytes("SGD", n) == 4_000_000
    assert optimizer_state_bytes("Prodigy", n) == 16_000_000
    # 8-bit: two uint8 states plus one fp32 scale per 2048-element block; small tensors stay fp32
    assert optimizer_state_bytes("AdamW8bit", n) == 2_000_000 + 2 * 4 * 489
    assert optimizer_state_bytes("AdamW8bit", [1000]) == 8000
    assert optimizer_state_bytes("Lion8bit", n) < optimizer_state_bytes("Lion", n) / 3
    with pytest.raises(ConfigError) as e:
        optimizer_state_bytes("Adafactor", n)
    assert e.value.field == "optimizer"


def test_estimate_parts_batch_and_checkpointing():
    kw = dict(weight_bytes=1000 * MiB, lora_numels=[2 * MiB], optimizer="AdamW")
    one = estimate_peak_bytes(activations=profile(), batch_size=1, gradient_checkpointing=False, **kw)
    four = estimate_peak_bytes(activations=profile(), batch_size=4, gradient_checkpointing=False, **kw)
    ckpt = estimate_peak_bytes(activations=profile(), batch_size=4, gradient_checkpointing=True, **kw)
    assert one.total == sum(one.parts.values())
    assert one.parts["weights"] == 1000 * MiB and one.parts["lora+grads"] == 16 * MiB and one.parts["optimizer"] == 16 * MiB
    assert four.parts["activations"] == 4 * one.parts["activations"] == 400 * MiB
    assert ckpt.parts["activations"] == 4 * (10 + 20 + 15) * MiB  # outside + block inputs + one block
    # a probe of the whole batch is used as it is
    assert estimate_peak_bytes(activations=profile(saved=380 * MiB, batch=4), batch_size=4, gradient_checkpointing=False, **kw).parts["activations"] == 380 * MiB
    fp8 = estimate_peak_bytes(activations=profile(), batch_size=1, gradient_checkpointing=False, **dict(kw, weight_bytes=500 * MiB))
    assert one.total - fp8.total == 500 * MiB
    assert "rollback copy" in estimate_peak_bytes(activations=profile(), batch_size=1, gradient_checkpointing=False, snapshot_on_device=True, **kw).parts
    assert "estimated peak memory" in one.to_text() and "GiB" in one.to_text()


def test_check_fits_names_the_ways_to_fit():
    est = MemoryEstimate(10 * 2**30, {"weights": 6 * 2**30, "activations": 4 * 2**30})
    est.check_fits(free_bytes=5 * 2**30, resident_bytes=6 * 2**30)  # 4 GiB still to allocate: fits
    with pytest.raises(ConfigError) as e:
        est.check_fits(free_bytes=3 * 2**30, resident_bytes=6 * 2**30, device="cuda:0")
    msg = str(e.value)
    assert e.value.field == "batch_size"
    for fix in ("gradient_checkpointing", "fp8_base", "batch_size", "rank", "resolution", "AdamW8bit", "4.00 GiB", "3.00 GiB"):
        assert fix in msg, fix


def _toy(shape=(4, 16, 16)):
    den = ToyDenoiser()
    net = make_network(den)
    ex = make_examples(n=2, shape=shape)
    x = torch.randn(1, *shape)
    sigma = den.sigma_from_u(torch.tensor([0.5]))
    return den, net, ex, x, sigma


def test_probe_counts_what_autograd_saves_and_keeps_nothing():
    den, net, ex, x, sigma = _toy()
    params = list(den.unet.parameters())

    def forward():
        with net.applied():
            return den.denoise(x, sigma, [ex[0].conds[0]])

    # reference: keep every saved tensor and count distinct storages that are not weights
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        forward()
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in kept}
    expected = sum(n for ptr, n in storages if ptr not in weights)

    blocks = [den.unet.res, den.unet.block]
    prof = probe_activations(forward, blocks, exclude=params)
    assert expected > 0 and abs(prof.saved - expected) <= 0.01 * expected
    assert prof.block_inputs > 0 and 0 < prof.largest_block <= prof.saved
    assert prof.kept(True) == prof.outside_blocks + prof.block_inputs + prof.largest_block
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)  # hooks removed


def test_probe_scales_with_resolution():
    small = _toy((4, 16, 16))
    large = _toy((4, 32, 32))
    sizes = []
    for den, net, ex, x, sigma in (small, large):
        def forward(den=den, net=net, ex=ex, x=x, sigma=sigma):
            with net.applied():
                den.denoise(x, sigma, [ex[0].conds[0]])
        sizes.append(probe_activations(forward, [den.unet.res, den.unet.block], exclude=list(den.unet.parameters())).saved)
    assert 3.5 < sizes[1] / sizes[0] < 4.5  # 4x the pixels


MEASURE = textwrap.dedent("""
    import json, os, sys, threading, time
    sys.path.insert(0, os.getcwd())
    import torch
    from tests.toys import ToyDenoiser, ToyUNet, make_examples, make_network
    from trainer.loop import Session, TrainConfig
    from trainer.memory import estimate_peak_bytes, probe_activations
    from trainer.optimizers import OptimizerConfig

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    batch, side = int(sys.argv[1]), int(sys.argv[2])
    # load what the first training step imports (torch.optim pulls in large modules) before the baseline
    warm = ToyDenoiser()
    Session(warm, make_examples(n=2), make_network(warm), train=TrainConfig(steps=1)).run()
    del warm
    base = rss()
    den = ToyDenoiser()
    den.unet = ToyUNet(dim=96).requires_grad_(False)
    net = make_network(den, rank=8, alpha=8.0)
    examples = make_examples(n=4, shape=(4, side, side))
    session = Session(den, examples, net, optimizer=OptimizerConfig(name="AdamW"), train=TrainConfig(steps=3, batch_size=batch))
    x = examples[0].latents[0][None].expand(batch, -1, -1, -1).contiguous()
    sigma = den.sigma_from_u(torch.full((batch,), 0.5))
    def forward():
        with net.applied():
            den.denoise(x, sigma, [examples[0].conds[0]] * batch)
    prof = probe_activations(forward, [den.unet.res, den.unet.block], exclude=list(den.unet.parameters()), batch=batch)
    data = sum(t.numel() * t.element_size() for e in examples for t in e.latents + e.conds)
    weights = sum(p.numel() * p.element_size() for p in den.unet.parameters())
    est = estimate_peak_bytes(weights, [p.numel() for p in net.parameters()], "AdamW", prof, batch, False,
                              snapshot_on_device=True, dataset_bytes=data)
    peak = [rss()]
    stop = []
    def sample():
        while not stop:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    th = threading.Thread(target=sample)
    th.start()
    session.run()
    stop.append(1)
    th.join()
    print(json.dumps({"measured": peak[0] - base, "estimate": est.total, "activations": est.parts["activations"]}))
""")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read the resident memory")
@pytest.mark.parametrize("batch,side", [(2, 64), (4, 48)])
def test_estimate_within_20_percent_of_measured_cpu_peak(batch, side):
    # glibc keeps freed heap blocks; a fixed mmap threshold makes the resident size track live
    # memory, the way a GPU allocator's statistics do.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", MEASURE, str(batch), str(side)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["activations"] > 0.3 * out["measured"]  # a case where activations matter
    assert 0.8 <= out["estimate"] / out["measured"] <= 1.2, out
