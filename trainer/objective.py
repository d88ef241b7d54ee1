"""The training objective: what is regressed, how it is weighted, and which noise levels are drawn.

The engine works in ComfyUI's k-diffusion convention: the model wrapper returns the *denoised*
estimate ``x0_hat`` for a noisy input at noise level ``sigma``.

* eps and v models: ``x_noisy = x0 + sigma * eps`` (k-diffusion sigma), ``SNR = 1 / sigma**2``.
* flow models (Flux, SD3): ``x_noisy = (1 - sigma) * x0 + sigma * eps`` with sigma in (0, 1),
  ``SNR = ((1 - sigma) / sigma)**2``.

Training on the plain x0 error ``e = x0_hat - x0`` would be a different objective from the one each
family was trained with, so the loss is taken on the *native-space* error instead, which is ``e``
times a per-sample factor:

* eps: ``e / sigma``                 (``|.|^2 = SNR * |e|^2``, the epsilon-prediction loss)
* v:   ``e * sqrt(SNR + 1)``          (``|.|^2 = (SNR + 1) * |e|^2``, the v-prediction loss)
* flow: ``e / sigma``                 (``|.|^2 = |e|^2 / sigma^2``, the velocity loss)

With ``loss_type="mse"`` the loss therefore equals the family's native loss exactly.

Public API
----------
``PREDICTION_TYPES``, ``LOSS_TYPES``, ``TIMESTEP_SAMPLING``, ``HUBER_SCHEDULES``
    The accepted names.
``ObjectiveConfig``
    Frozen settings; every value is checked on construction.
``validate_for_prediction(config, prediction)``
    Checks settings that depend on the model family (min-SNR and debiased estimation do not apply to
    flow models). The loop calls it once before training.
``snr(sigma, prediction) -> Tensor``
    Signal-to-noise ratio per sample.
``native_error(x0_hat, x0, sigma, prediction) -> Tensor``
    The error in the family's own prediction space; ``sigma`` is ``[B]``.
``huber(d, c) -> Tensor``
    Pseudo-Huber ``2c(sqrt(d^2 + c^2) - c)`` elementwise.
``huber_threshold(sigma, prediction, config) -> Tensor [B]``
    The Huber / smooth-L1 threshold ``c`` per sample (constant or scheduled by noise level).
``loss_weights(sigma, prediction, config) -> Tensor [B]``
    The extra per-sample weight on top of the native loss (min-SNR-gamma, debiased estimation).
``per_sample_loss(x0_hat, x0, sigma, prediction, config, weights_extra=None) -> Tensor [B]``
    Weighted loss per sample (validation uses this).
``sample_u(config, batch, generator, device) -> Tensor [B]``
    The training draw of the noise fraction ``u`` in (0, 1): 0 is clean, 1 is pure noise. How ``u``
    becomes a sigma is the model adapter's business (an SD model picks one of its 1000 discrete
    sigmas, a flow model uses ``sigma = u``).
``apply_shift(t, shift) -> Tensor``
    The discrete flow shift ``shift * t / (1 + (shift - 1) * t)``.
``flux_resolution_shift(image_seq_len, base_shift=0.5, max_shift=1.15) -> float``
    Flux's resolution-dependent shift. For a resolution-dependent schedule the loop uses
    ``dataclasses.replace(config, shift=flux_resolution_shift(n))`` with ``timestep_sampling="shift"``.
``add_noise_offset(noise, offset, generator) -> Tensor``
    Adds ``offset * N(0, 1)`` per (sample, channel), constant over the spatial dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ConfigError

PREDICTION_TYPES = ("eps", "v", "flow")
LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "sigmoid", "shift")
HUBER_SCHEDULES = ("snr", "constant")

# At t = 0 the eps SNR is infinite; sd-scripts caps it at 1000 for debiased estimation.
_DEBIASED_SNR_CAP = 1000.0
# Keeps u strictly inside (0, 1): a flow model at sigma = 0 would divide by zero in the velocity error.
_U_MARGIN = 1e-5


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_positive(field: str, value, hint: str) -> None:
    if not _is_number(value) or value <= 0:
        raise ConfigError(field, f"expected a number greater than 0, got {value!r}. {hint}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """How the loss is formed and how noise levels are drawn.

    loss_type: "mse" (the native loss), "l1", "huber" (pseudo-Huber) or "smooth_l1"; the last
        three are robust to outlier errors at the cost of slower convergence.
    huber_c: the Huber / smooth-L1 threshold in native-error units (> 0; 0.1 is sd-scripts' default).
    huber_schedule: "snr" makes the threshold large at low noise and ``huber_c`` at high noise;
        "constant" always uses ``huber_c``.
    min_snr_gamma: min-SNR-gamma weighting (0 = off, 5 is typical); SD-style models only.
    debiased_estimation: down-weights low-noise steps; SD-style models only.
    noise_offset: strength of the per-channel noise offset (0 = off, 0.05-0.1 is typical); lets the
        model learn very dark or very bright images.
    timestep_sampling: how the noise fraction is drawn: "uniform", "logit_normal", "sigmoid"
        (``sigmoid(sigmoid_scale * N(0,1))``) or "shift" (the sigmoid draw, then the flow shift).
    logit_mean, logit_std: the normal behind "logit_normal".
    sigmoid_scale: spread of the "sigmoid" and "shift" draws (> 0).
    shift: the flow shift for "shift" (> 0; 1 = none, 3.1 is Flux-dev style).
    timestep_range: (min, max) fraction of the noise range to train on, 0 <= min < max <= 1.
    """

    loss_type: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    min_snr_gamma: float = 0.0
    debiased_estimation: bool = False
    noise_offset: float = 0.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    shift: float = 1.0
    timestep_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                "loss_type", f"expected one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}."
            )
        _require_positive("huber_c", self.huber_c, "0.1 is a good start.")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ConfigError(
                "huber_schedule",
                f"expected one of {', '.join(HUBER_SCHEDULES)}, got {self.huber_schedule!r}.",
            )
        if not _is_number(self.min_snr_gamma) or self.min_snr_gamma < 0:
            raise ConfigError(
                "min_snr_gamma",
                f"expected 0 (off) or a positive number, got {self.min_snr_gamma!r}. 5 is typical.",
            )
        if not isinstance(self.debiased_estimation, bool):
            raise ConfigError(
                "debiased_estimation", f"expected true or false, got {self.debiased_estimation!r}."
            )
        if not _is_number(self.noise_offset) or not 0 <= self.noise_offset <= 1:
            raise ConfigError(
                "noise_offset",
                f"expected a number from 0 to 1, got {self.noise_offset!r}. "
                "Use 0 to turn it off; 0.05-0.1 is typical.",
            )
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ConfigError(
                "timestep_sampling",
                f"expected one of {', '.join(TIMESTEP_SAMPLING)}, got {self.timestep_sampling!r}.",
            )
        if not _is_number(self.logit_mean):
            raise ConfigError(
                "logit_mean", f"expected a finite number, got {self.logit_mean!r}. 0 is typical."
            )
        _require_positive("logit_std", self.logit_std, "1.0 is typical.")
        _require_positive("sigmoid_scale", self.sigmoid_scale, "1.0 is typical.")
        _require_positive("shift", self.shift, "Use 1 for no shift; 3.1 is Flux-dev style.")
        self._check_timestep_range()

    def _check_timestep_range(self) -> None:
        rng = self.timestep_range
        if (
            not isinstance(rng, (tuple, list))
            or len(rng) != 2
            or not all(_is_number(v) for v in rng)
            or not 0 <= rng[0] < rng[1] <= 1
        ):
            raise ConfigError(
                "timestep_range",
                f"expected (min, max) with 0 <= min < max <= 1, got {rng!r}. "
                "Use (0, 1) to train on the whole noise range.",
            )
        # Settings arriving from JSON are lists; store a tuple so the config stays hashable.
        object.__setattr__(self, "timestep_range", (float(rng[0]), float(rng[1])))


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            "prediction",
            f"expected one of {', '.join(PREDICTION_TYPES)}, got {prediction!r}. "
            "This comes from the model; use a supported SD1.5, SDXL or Flux checkpoint.",
        )


def validate_for_prediction(config: ObjectiveConfig, prediction: str) -> None:
    """Raise ConfigError for settings that do not apply to this model family."""
    _check_prediction(prediction)
    if prediction == "flow":
        if config.min_snr_gamma > 0:
            raise ConfigError(
                "min_snr_gamma",
                "min-SNR weighting does not apply to flow models such as Flux; set it to 0.",
            )
        if config.debiased_estimation:
            raise ConfigError(
                "debiased_estimation",
                "debiased estimation does not apply to flow models such as Flux; turn it off.",
            )


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape sigma [B] to [B, 1, ..., 1] so it broadcasts over a sample's other dims."""
    return sigma.reshape(-1, *([1] * (like.dim() - 1)))


def snr(sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """Signal-to-noise ratio: 1/sigma^2 for eps and v, ((1-sigma)/sigma)^2 for flow."""
    _check_prediction(prediction)
    if prediction == "flow":
        return ((1 - sigma) / sigma) ** 2
    return 1 / sigma**2


def native_error(
    x0_hat: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, prediction: str
) -> torch.Tensor:
    """The error in the family's own prediction space (see the module docstring)."""
    _check_prediction(prediction)
    e = x0_hat - x0
    s = _per_sample(sigma, e)
    if prediction == "v":
        # sqrt(SNR + 1) = sqrt(1 + sigma^2) / sigma, written so it stays finite for large sigma.
        return e * (torch.sqrt(1 + s**2) / s)
    # eps: eps_hat - eps = -(x0_hat - x0)/sigma; flow: v_hat - v = -(x0_hat - x0)/sigma.
    # The sign does not matter to any of the losses.
    return e / s


def huber(d: torch.Tensor, c) -> torch.Tensor:
    """Pseudo-Huber: about d^2 for |d| << c and about 2c|d| for |d| >> c."""
    return 2 * c * (torch.sqrt(d**2 + c**2) - c)


def _smooth_l1(d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # torch.nn.functional.smooth_l1_loss with beta = c, written out because c varies per sample
    # (torch only takes one float beta).
    a = d.abs()
    return torch.where(a < c, 0.5 * d**2 / c, a - 0.5 * c)


def huber_threshold(sigma: torch.Tensor, prediction: str, config: ObjectiveConfig) -> torch.Tensor:
    """The Huber / smooth-L1 threshold c per sample [B].

    "snr" schedule (sd-scripts): ``c = (1 - c0) / (1 + s)^2 + c0`` where ``s`` is the VP noise ratio
    ``sqrt((1 - alpha_bar) / alpha_bar)``, which is the k-diffusion sigma for eps and v models. For a
    flow model ``x = (1 - sigma) x0 + sigma eps`` divided by ``1 - sigma`` is ``x0 + s eps`` with
    ``s = sigma / (1 - sigma)``, so that is the equivalent used. c goes from 1 (clean) to c0 (noise).
    """
    _check_prediction(prediction)
    c0 = config.huber_c
    if config.huber_schedule == "constant":
        return torch.full_like(sigma, c0)
    s = sigma / (1 - sigma) if prediction == "flow" else sigma
    return (1 - c0) / (1 + s) ** 2 + c0


def loss_weights(sigma: torch.Tensor, prediction: str, config: ObjectiveConfig) -> torch.Tensor:
    """Extra per-sample weight [B] on top of the native loss; all ones when nothing is switched on.

    min-SNR-gamma: eps ``min(SNR, g) / SNR``, v ``min(SNR, g) / (SNR + 1)``; both turn the native loss
    into ``min(SNR, g) * |e|^2`` in x0 terms. Debiased estimation: eps ``1 / sqrt(min(SNR, 1000))``,
    v ``1 / (min(SNR, 1000) + 1)``. Both together multiply. The settings were checked against the
    prediction type once, by ``validate_for_prediction`` when the session was built.
    """
    w = torch.ones_like(sigma)
    if config.min_snr_gamma == 0 and not config.debiased_estimation:
        return w
    ratio = snr(sigma, prediction)
    if config.min_snr_gamma > 0:
        clipped = torch.clamp(ratio, max=config.min_snr_gamma)
        w = w * (clipped / ratio if prediction == "eps" else clipped / (ratio + 1))
    if config.debiased_estimation:
        capped = torch.clamp(ratio, max=_DEBIASED_SNR_CAP)
        w = w * (1 / torch.sqrt(capped) if prediction == "eps" else 1 / (capped + 1))
    return w


def per_sample_loss(
    x0_hat: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    prediction: str,
    config: ObjectiveConfig,
    weights_extra: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Loss per sample [B]: elementwise loss on the native error, mean over the non-batch dims,
    times ``loss_weights`` and the optional ``weights_extra`` [B]."""
    # Mixed-precision model outputs are reduced in float32 so small losses do not round away.
    x0_hat = x0_hat.float()
    x0 = x0.float()
    sigma = sigma.float().to(x0.device).reshape(-1)
    if sigma.numel() == 1 and x0.shape[0] != 1:
        sigma = sigma.expand(x0.shape[0])
    d = native_error(x0_hat, x0, sigma, prediction)
    if config.loss_type == "mse":
        elementwise = d**2
    elif config.loss_type == "l1":
        elementwise = d.abs()
    else:
        c = _per_sample(huber_threshold(sigma, prediction, config), d)
        elementwise = huber(d, c) if config.loss_type == "huber" else _smooth_l1(d, c)
    loss = elementwise.mean(dim=tuple(range(1, elementwise.dim())))
    loss = loss * loss_weights(sigma, prediction, config)
    if weights_extra is not None:
        weights_extra = weights_extra.to(loss).reshape(-1)
        if weights_extra.shape != loss.shape:
            raise ValueError(
                f"weights_extra must have one weight per sample ({loss.shape[0]}), "
                f"got shape {tuple(weights_extra.shape)}"
            )
        loss = loss * weights_extra
    return loss


def apply_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Discrete flow shift ``shift * t / (1 + (shift - 1) * t)``; shift > 1 moves t toward 1 (more noise)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_u(
    config: ObjectiveConfig,
    batch: int,
    generator: Optional[torch.Generator],
    device,
) -> torch.Tensor:
    """Draw the noise fraction u [batch] in (0, 1) for training.

    A base draw t in (0, 1) is made by ``timestep_sampling``:
      uniform: U(0, 1); logit_normal: sigmoid(N(logit_mean, logit_std));
      sigmoid: sigmoid(sigmoid_scale * N(0, 1)); shift: the sigmoid draw then ``apply_shift``
      (sd-scripts' "shift"). It is then mapped linearly into ``timestep_range`` (so "uniform" is
      U(min, max)) and kept a hair inside (0, 1).
    Only ``generator`` is used for randomness, so the same seed gives the same draw.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    kind = config.timestep_sampling
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=gen_device)
    else:
        z = torch.randn(batch, generator=generator, device=gen_device)
        if kind == "logit_normal":
            t = torch.sigmoid(z * config.logit_std + config.logit_mean)
        else:
            t = torch.sigmoid(z * config.sigmoid_scale)
            if kind == "shift":
                t = apply_shift(t, config.shift)
    lo, hi = config.timestep_range
    u = lo + (hi - lo) * t
    return u.clamp(_U_MARGIN, 1 - _U_MARGIN).to(device)


def flux_resolution_shift(
    image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """Flux's resolution-dependent shift: ``exp(mu)`` with mu linear in the image token count,
    ``mu = base_shift + (max_shift - base_shift) * (image_seq_len - 256) / (4096 - 256)``
    (so 256 tokens, 256x256 px, gives exp(0.5) and 4096 tokens, 1024x1024 px, gives exp(1.15)).
    Flux's ``exp(mu) / (exp(mu) + 1/t - 1)`` is exactly ``apply_shift(t, exp(mu))``.
    """
    if not _is_number(image_seq_len) or image_seq_len <= 0:
        raise ConfigError(
            "image_seq_len", f"expected a positive number of image tokens, got {image_seq_len!r}."
        )
    mu = base_shift + (max_shift - base_shift) * (image_seq_len - 256) / (4096 - 256)
    return math.exp(mu)


def add_noise_offset(
    noise: torch.Tensor, offset: float, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """``noise + offset * N(0, 1)`` with one draw per (sample, channel), broadcast over spatial dims.

    Plain noise has almost no per-channel mean, so a model never learns to shift an image's overall
    brightness; the offset gives it that signal.
    """
    if offset == 0:
        return noise
    if noise.dim() < 2:
        raise ValueError(f"noise must be [B, C, ...], got shape {tuple(noise.shape)}")
    shape = (noise.shape[0], noise.shape[1]) + (1,) * (noise.dim() - 2)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randn(shape, generator=generator, device=gen_device)
    return noise + (offset * draw).to(device=noise.device, dtype=noise.dtype)
