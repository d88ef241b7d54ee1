import math

import numpy as np
import pytest
import torch

from trainer.errors import LoRALabError
from trainer.metrics import psnr, psnr_batch, ssim, ssim_batch

skimage_metrics = pytest.importorskip("skimage.metrics")


def _images(shape):
    """Fixed seeded pairs: random, gradient, and noisy/blurred copies, in [0, 1]."""
    rng = np.random.default_rng(1234)
    h, w = shape[:2]
    random = rng.random(shape)
    horizontal = np.broadcast_to(np.linspace(0, 1, w), (h, w))
    vertical = np.broadcast_to(np.linspace(0, 1, h)[:, None], (h, w))
    if len(shape) == 3:
        gradient = np.stack([horizontal, vertical, 1 - horizontal], -1)
    else:
        gradient = np.ascontiguousarray(horizontal * vertical)
    noisy = np.clip(gradient + rng.normal(0, 0.05, shape), 0, 1)
    very_noisy = np.clip(random + rng.normal(0, 0.3, shape), 0, 1)
    offset = np.clip(gradient * 0.8 + 0.1, 0, 1)
    return [
        ("random_vs_random", random, rng.random(shape)),
        ("gradient_vs_noisy", gradient, noisy),
        ("random_vs_very_noisy", random, very_noisy),
        ("gradient_vs_scaled", gradient, offset),
    ]


@pytest.mark.parametrize("shape", [(40, 33), (37, 48, 3)], ids=["gray", "rgb"])
def test_ssim_matches_scikit_image(shape):
    channel_axis = -1 if len(shape) == 3 else None
    for name, a, b in _images(shape):
        expected = skimage_metrics.structural_similarity(
            a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, channel_axis=channel_axis,
        )
        got = ssim(torch.from_numpy(a), torch.from_numpy(b))
        assert got == pytest.approx(expected, abs=1e-4), name
        # numpy input gives the same answer as torch input
        assert ssim(a, b) == pytest.approx(got, abs=1e-12)


def test_ssim_matches_scikit_image_with_other_data_range():
    rng = np.random.default_rng(7)
    a = rng.random((32, 32, 3)) * 255
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    expected = skimage_metrics.structural_similarity(
        a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, channel_axis=-1,
    )
    assert ssim(a, b, data_range=255.0) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("shape", [(40, 33), (37, 48, 3)], ids=["gray", "rgb"])
def test_psnr_matches_scikit_image(shape):
    for name, a, b in _images(shape):
        expected = skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
        assert psnr(a, b) == pytest.approx(expected, abs=1e-6), name


def test_psnr_formula():
    a = torch.zeros(8, 8, 3)
    b = torch.full((8, 8, 3), 0.1)  # MSE = 0.01 -> 20 dB at data_range 1
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-6)
    # data_range 2 -> peak² 4 -> 10*log10(4 / 0.01)
    assert psnr(a, b, data_range=2.0) == pytest.approx(10 * math.log10(400), abs=1e-6)


def test_identical_images():
    rng = np.random.default_rng(0)
    a = rng.random((20, 24, 3)).astype(np.float32)
    assert psnr(a, a.copy()) == math.inf
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)


def test_batch_returns_one_value_per_image():
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.random((3, 24, 24, 3)))
    b = a.clone()
    b[1] = torch.clamp(b[1] + 0.1 * torch.from_numpy(rng.standard_normal((24, 24, 3))), 0, 1)
    b[2] = torch.from_numpy(rng.random((24, 24, 3)))

    ssims = ssim_batch(a, b)
    psnrs = psnr_batch(a, b)
    assert len(ssims) == len(psnrs) == 3
    assert ssims[0] == pytest.approx(1.0) and psnrs[0] == math.inf
    for i in (1, 2):
        assert ssims[i] == pytest.approx(ssim(a[i], b[i]), abs=1e-12)
        assert psnrs[i] == pytest.approx(psnr(a[i], b[i]), abs=1e-12)
    assert ssims[1] > ssims[2]
    # a batch of one is accepted by the single-image functions (ComfyUI IMAGE layout)
    assert ssim(a[1:2], b[1:2]) == pytest.approx(ssims[1], abs=1e-12)


def test_batch_of_several_refused_by_single_image_function():
    a = torch.rand(2, 16, 16, 3)
    with pytest.raises(LoRALabError, match="ssim_batch"):
        ssim(a, a)
    with pytest.raises(LoRALabError, match="psnr_batch"):
        psnr(a, a)


def test_shape_mismatch_raises_clear_error():
    a = torch.rand(16, 16, 3)
    with pytest.raises(LoRALabError, match="different shapes"):
        ssim(a, torch.rand(16, 17, 3))
    with pytest.raises(LoRALabError, match="different shapes"):
        psnr(a, torch.rand(16, 16))


def test_image_smaller_than_window_raises():
    a = torch.rand(8, 8)
    with pytest.raises(LoRALabError, match="smaller than"):
        ssim(a, a)
    # a smaller odd window works
    assert ssim(a, a, win_size=7) == pytest.approx(1.0)
    with pytest.raises(LoRALabError, match="odd"):
        ssim(a, a, win_size=6)
