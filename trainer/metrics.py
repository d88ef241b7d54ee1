"""Image similarity: PSNR and SSIM, in PyTorch.

Images are torch tensors or numpy arrays with values in [0, data_range], laid out H×W (gray) or
H×W×C (ComfyUI's IMAGE layout, channels last). A 4-D [B, H, W, C] IMAGE batch goes to the
`*_batch` functions, which return one value per image; the single-image functions also take a
batch of one.

Public API:
    psnr(a, b, data_range=1.0) -> float
        10·log10(data_range² / MSE) over all pixels and channels; identical images give inf.
    ssim(a, b, data_range=1.0, win_size=11, sigma=1.5) -> float
        Gaussian-window SSIM (Wang et al. 2004; K1=0.01, K2=0.03, population covariance),
        computed per channel and averaged; identical images give 1.0.
    psnr_batch(a, b, data_range=1.0) -> list[float]
    ssim_batch(a, b, data_range=1.0, win_size=11, sigma=1.5) -> list[float]

SSIM follows scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=..., channel_axis=-1)``: the local statistics are
averaged only where the whole win_size×win_size window lies inside the image (scikit-image
filters with reflected borders, then crops (win_size-1)//2 pixels from each side before
averaging, which is the same set of values). The window has win_size taps of a Gaussian with
`sigma`; with the defaults this is scikit-image's 11-tap window exactly.

Errors (shape mismatch, image smaller than the window, bad arguments) are `LoRALabError`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LoRALabError

_K1 = 0.01
_K2 = 0.03


SSIM_WINDOW = 11  # taps of the Gaussian SSIM window (scikit-image's and the paper's default)

def _to_batch(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as float64 [B, C, H, W] CPU tensors, after checking they match."""
    ta, tb = _as_tensor(a, "first image"), _as_tensor(b, "second image")
    if ta.shape != tb.shape:
        raise LoRALabError(
            f"Cannot compare images of different shapes {tuple(ta.shape)} and {tuple(tb.shape)}; "
            "resize or crop them to the same size (and channel count) first."
        )
    if ta.ndim == 2:  # H, W
        ta, tb = ta[None, None], tb[None, None]
    elif ta.ndim == 3:  # H, W, C
        ta, tb = ta.permute(2, 0, 1)[None], tb.permute(2, 0, 1)[None]
    elif ta.ndim == 4:  # B, H, W, C
        ta, tb = ta.permute(0, 3, 1, 2), tb.permute(0, 3, 1, 2)
    else:
        raise LoRALabError(
            f"Expected an image shaped H×W, H×W×C or a batch B×H×W×C, got shape {tuple(ta.shape)}."
        )
    return ta, tb


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise LoRALabError(f"The {what} must be a torch tensor or numpy array, got {type(x).__name__}.")
    # float64 so that SSIM's differences of small local moments do not lose precision.
    return x.detach().to(device="cpu", dtype=torch.float64)


def _check_range(data_range: float) -> float:
    if not (data_range > 0 and math.isfinite(data_range)):
        raise LoRALabError(f"data_range must be a positive number (1.0 for [0,1] images), got {data_range}.")
    return float(data_range)


def _single(values: list[float], name: str) -> float:
    if len(values) != 1:
        raise LoRALabError(
            f"{name}() compares one image, got a batch of {len(values)}; use {name}_batch() for batches."
        )
    return values[0]


def psnr_batch(a, b, data_range: float = 1.0) -> list[float]:
    """PSNR in dB for each image pair of a batch (or a single pair); inf where the pair is identical."""
    data_range = _check_range(data_range)
    ta, tb = _to_batch(a, b)
    mse = (ta - tb).square().flatten(1).mean(dim=1)
    out = []
    for m in mse.tolist():
        out.append(math.inf if m == 0 else 10.0 * math.log10(data_range * data_range / m))
    return out


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images; identical images give math.inf."""
    return _single(psnr_batch(a, b, data_range), "psnr")


def _gaussian_taps(win_size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over [N, 1, H, W] without padding ("valid"): only full windows."""
    k = taps.numel()
    x = F.conv2d(x, taps.view(1, 1, 1, k))
    return F.conv2d(x, taps.view(1, 1, k, 1))


def ssim_batch(a, b, data_range: float = 1.0, win_size: int = SSIM_WINDOW, sigma: float = 1.5) -> list[float]:
    """Mean SSIM for each image pair of a batch (or a single pair), channels averaged."""
    data_range = _check_range(data_range)
    if not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise LoRALabError(f"win_size must be an odd positive integer, got {win_size}.")
    if not sigma > 0:
        raise LoRALabError(f"sigma must be positive, got {sigma}.")
    ta, tb = _to_batch(a, b)
    batch, channels, height, width = ta.shape
    if height < win_size or width < win_size:
        raise LoRALabError(
            f"Images of {height}×{width} are smaller than the {win_size}×{win_size} SSIM window; "
            "use larger images or a smaller odd win_size."
        )
    # Channels become independent images: SSIM is per channel, then averaged.
    x = ta.reshape(batch * channels, 1, height, width)
    y = tb.reshape(batch * channels, 1, height, width)
    taps = _gaussian_taps(win_size, sigma)
    mu_x, mu_y = _blur(x, taps), _blur(y, taps)
    var_x = _blur(x * x, taps) - mu_x * mu_x
    var_y = _blur(y * y, taps) - mu_y * mu_y
    cov = _blur(x * y, taps) - mu_x * mu_y
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    per_channel = ssim_map.flatten(1).mean(dim=1).reshape(batch, channels)
    return per_channel.mean(dim=1).tolist()


def ssim(a, b, data_range: float = 1.0, win_size: int = SSIM_WINDOW, sigma: float = 1.5) -> float:
    """Structural similarity of two images (1.0 when identical)."""
    return _single(ssim_batch(a, b, data_range, win_size, sigma), "ssim")
