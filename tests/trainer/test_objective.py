import dataclasses
import math

import pytest
import torch

from trainer.errors import ConfigError
from trainer.objective import (
    ObjectiveConfig,
    add_noise_offset,
    apply_shift,
    flux_resolution_shift,
    huber,
    huber_threshold,
    loss_weights,
    native_error,
    per_sample_loss,
    sample_u,
    snr,
    validate_for_prediction,
)

MSE = ObjectiveConfig()


def _batch(seed=0, b=4, sigma=None, flow=False):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    if sigma is None:
        sigma = torch.tensor([0.1, 0.4, 0.7, 0.95] if flow else [0.05, 0.5, 2.0, 14.0])[:b]
    return x0, eps, x0_hat, sigma.double()


def _mean(t):
    return t.mean(dim=(1, 2, 3))


# --- SNR -------------------------------------------------------------------------------------------


def test_snr_closed_forms():
    s = torch.tensor([0.1, 0.5, 1.0, 3.0])
    assert torch.allclose(snr(s, "eps"), torch.tensor([100.0, 4.0, 1.0, 1 / 9]))
    assert torch.allclose(snr(s, "v"), torch.tensor([100.0, 4.0, 1.0, 1 / 9]))
    f = torch.tensor([0.1, 0.5, 0.8])
    assert torch.allclose(snr(f, "flow"), torch.tensor([81.0, 1.0, 1 / 16]))


# --- native losses from first principles -----------------------------------------------------------


def test_mse_equals_eps_prediction_loss():
    x0, eps, x0_hat, sigma = _batch()
    s = sigma.view(-1, 1, 1, 1)
    x_noisy = x0 + s * eps
    eps_hat = (x_noisy - x0_hat) / s
    expected = _mean((eps_hat - eps) ** 2)
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "eps", MSE).double(), expected)
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "eps", MSE).mean().double(), expected.mean())
    # ...and that is SNR * |e|^2, not the plain x0 loss.
    assert torch.allclose(expected, snr(sigma, "eps") * _mean((x0_hat - x0) ** 2))


def test_mse_equals_v_prediction_loss():
    x0, eps, x0_hat, sigma = _batch(seed=1)
    s = sigma.view(-1, 1, 1, 1)
    alpha = 1 / torch.sqrt(1 + s**2)
    sigma_vp = s * alpha
    x_vp = alpha * (x0 + s * eps)  # = alpha * x0 + sigma_vp * eps
    v = alpha * eps - sigma_vp * x0
    v_hat = (alpha * x_vp - x0_hat) / sigma_vp  # inverts x0 = alpha * x - sigma_vp * v
    expected = _mean((v_hat - v) ** 2)
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "v", MSE).double(), expected)
    assert torch.allclose(expected, (snr(sigma, "v") + 1) * _mean((x0_hat - x0) ** 2))


def test_mse_equals_flow_velocity_loss():
    x0, eps, x0_hat, sigma = _batch(seed=2, flow=True)
    s = sigma.view(-1, 1, 1, 1)
    x_noisy = (1 - s) * x0 + s * eps
    velocity = eps - x0
    velocity_hat = (x_noisy - x0_hat) / s
    expected = _mean((velocity_hat - velocity) ** 2)
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "flow", MSE).double(), expected)


def test_native_error_broadcasts_sigma_per_sample():
    e = torch.ones(2, 3, 5)
    out = native_error(e, torch.zeros_like(e), torch.tensor([0.5, 2.0]), "eps")
    assert torch.allclose(out[0], torch.full((3, 5), 2.0))
    assert torch.allclose(out[1], torch.full((3, 5), 0.5))


def test_l1_is_mean_absolute_native_error():
    x0, _, x0_hat, sigma = _batch(seed=3)
    cfg = ObjectiveConfig(loss_type="l1")
    expected = _mean(((x0_hat - x0) / sigma.view(-1, 1, 1, 1)).abs())
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "eps", cfg).double(), expected)


def test_weights_extra_multiply_per_sample_and_shape_is_checked():
    x0, _, x0_hat, sigma = _batch(seed=4)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5])
    base = per_sample_loss(x0_hat, x0, sigma, "eps", MSE)
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "eps", MSE, w), base * w)
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "eps", MSE, w).mean(), (base * w).mean())
    with pytest.raises(ValueError):
        per_sample_loss(x0_hat, x0, sigma, "eps", MSE, torch.ones(3))


def test_loss_is_float32_for_half_precision_inputs():
    x0, _, x0_hat, sigma = _batch(seed=5)
    loss = per_sample_loss(x0_hat.bfloat16(), x0.bfloat16(), sigma.float(), "eps", MSE).mean()
    assert loss.dtype == torch.float32


# --- weighting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_closed_form(gamma):
    sigma = torch.tensor([0.1, 0.3, 1.0, 5.0], dtype=torch.float64)
    cfg = ObjectiveConfig(min_snr_gamma=gamma)
    r = 1 / sigma**2
    expected_eps = torch.tensor([min(x, gamma) / x for x in r.tolist()], dtype=torch.float64)
    expected_v = torch.tensor([min(x, gamma) / (x + 1) for x in r.tolist()], dtype=torch.float64)
    assert torch.allclose(loss_weights(sigma, "eps", cfg), expected_eps)
    assert torch.allclose(loss_weights(sigma, "v", cfg), expected_v)
    # High noise (SNR below gamma) is left alone for eps.
    assert loss_weights(sigma, "eps", cfg)[-1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_equals_x0_weight_of_clipped_snr(prediction):
    x0, _, x0_hat, sigma = _batch(seed=6)
    gamma = 5.0
    cfg = ObjectiveConfig(min_snr_gamma=gamma)
    got = per_sample_loss(x0_hat, x0, sigma, prediction, cfg).double()
    expected = torch.clamp(1 / sigma**2, max=gamma) * _mean((x0_hat - x0) ** 2)
    assert torch.allclose(got, expected)


def test_debiased_estimation_closed_form_and_combines_with_min_snr():
    sigma = torch.tensor([0.01, 0.2, 1.0, 4.0], dtype=torch.float64)
    r = torch.clamp(1 / sigma**2, max=1000.0)  # sigma=0.01 -> SNR 10000, capped
    cfg = ObjectiveConfig(debiased_estimation=True)
    assert torch.allclose(loss_weights(sigma, "eps", cfg), 1 / torch.sqrt(r))
    assert torch.allclose(loss_weights(sigma, "v", cfg), 1 / (r + 1))
    assert loss_weights(sigma, "eps", cfg)[0].item() == pytest.approx(1 / math.sqrt(1000))
    both = ObjectiveConfig(debiased_estimation=True, min_snr_gamma=5.0)
    product = loss_weights(sigma, "eps", cfg) * loss_weights(sigma, "eps", ObjectiveConfig(min_snr_gamma=5.0))
    assert torch.allclose(loss_weights(sigma, "eps", both), product)


def test_no_weighting_gives_ones():
    sigma = torch.tensor([0.1, 0.5])
    assert torch.equal(loss_weights(sigma, "flow", MSE), torch.ones(2))


def test_min_snr_and_debiased_are_rejected_for_flow():
    with pytest.raises(ConfigError) as err:
        validate_for_prediction(ObjectiveConfig(min_snr_gamma=5.0), "flow")
    assert err.value.field == "min_snr_gamma" and "Flux" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate_for_prediction(ObjectiveConfig(debiased_estimation=True), "flow")
    assert err.value.field == "debiased_estimation"
    validate_for_prediction(ObjectiveConfig(min_snr_gamma=5.0), "v")  # fine for SD models
    with pytest.raises(ConfigError) as err:
        validate_for_prediction(MSE, "x0")
    assert err.value.field == "prediction"


# --- huber / smooth L1 -----------------------------------------------------------------------------


def test_huber_formula_and_limits():
    d = torch.tensor([0.0, 0.3, -2.0], dtype=torch.float64)
    c = 0.5
    expected = torch.tensor([2 * c * (math.sqrt(x * x + c * c) - c) for x in d.tolist()], dtype=torch.float64)
    assert torch.allclose(huber(d, c), expected)
    small = torch.tensor([1e-3], dtype=torch.float64)
    assert huber(small, 1.0).item() == pytest.approx(1e-6, rel=1e-5)  # ~ d^2
    big = torch.tensor([1e4], dtype=torch.float64)
    assert huber(big, 0.1).item() == pytest.approx(2 * 0.1 * 1e4, rel=1e-4)  # ~ 2c|d|


def test_huber_threshold_schedule():
    c0 = 0.1
    sigma = torch.tensor([0.0, 1.0, 9.0], dtype=torch.float64)
    snr_cfg = ObjectiveConfig(loss_type="huber", huber_c=c0)
    expected = (1 - c0) / (1 + sigma) ** 2 + c0
    assert torch.allclose(huber_threshold(sigma, "eps", snr_cfg), expected)
    assert huber_threshold(sigma, "eps", snr_cfg)[0].item() == pytest.approx(1.0)
    # Flow sigma 0.5 is k-diffusion sigma 1, 0.9 is 9.
    flow_sigma = torch.tensor([0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(huber_threshold(flow_sigma, "flow", snr_cfg), expected[1:])
    const = ObjectiveConfig(loss_type="huber", huber_c=c0, huber_schedule="constant")
    assert torch.allclose(huber_threshold(sigma, "eps", const), torch.full((3,), c0, dtype=torch.float64))


def test_huber_loss_uses_native_error_and_scheduled_threshold():
    x0, _, x0_hat, sigma = _batch(seed=7)
    cfg = ObjectiveConfig(loss_type="huber", huber_c=0.2)
    d = (x0_hat - x0) / sigma.view(-1, 1, 1, 1)
    c = ((1 - 0.2) / (1 + sigma) ** 2 + 0.2).view(-1, 1, 1, 1)
    expected = _mean(2 * c * (torch.sqrt(d**2 + c**2) - c))
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "eps", cfg).double(), expected)


def test_smooth_l1_matches_torch_with_beta_c():
    x0, _, x0_hat, sigma = _batch(seed=8)
    cfg = ObjectiveConfig(loss_type="smooth_l1", huber_c=0.3, huber_schedule="constant")
    d = (x0_hat - x0) / sigma.view(-1, 1, 1, 1)
    expected = _mean(torch.nn.functional.smooth_l1_loss(d, torch.zeros_like(d), beta=0.3, reduction="none"))
    assert torch.allclose(per_sample_loss(x0_hat, x0, sigma, "eps", cfg).double(), expected)


# --- noise offset ----------------------------------------------------------------------------------


def test_noise_offset_is_a_per_channel_constant_shift():
    noise = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = add_noise_offset(noise, 0.1, torch.Generator().manual_seed(1))
    diff = out - noise
    # Constant over H x W within each (sample, channel) ...
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    # ... and varying across them with std ~ offset.
    shifts = diff[:, :, 0, 0].flatten()
    assert 0.08 < shifts.std().item() < 0.12
    assert abs(shifts.mean().item()) < 0.03
    again = add_noise_offset(noise, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_noise_offset_zero_is_identity_and_keeps_dtype():
    noise = torch.randn(2, 3, 4, 4).half()
    assert torch.equal(add_noise_offset(noise, 0.0, torch.Generator()), noise)
    assert add_noise_offset(noise, 0.05, torch.Generator().manual_seed(0)).dtype == torch.float16


# --- timestep sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "sigmoid", "shift"])
def test_sample_u_reproducible_and_in_open_interval(kind):
    cfg = ObjectiveConfig(timestep_sampling=kind, shift=3.0)
    a = sample_u(cfg, 2000, torch.Generator().manual_seed(5), "cpu")
    b = sample_u(cfg, 2000, torch.Generator().manual_seed(5), "cpu")
    c = sample_u(cfg, 2000, torch.Generator().manual_seed(6), "cpu")
    assert a.shape == (2000,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a > 0).all() and (a < 1).all()


def test_uniform_mean_and_logit_normal_median():
    u = sample_u(ObjectiveConfig(), 20000, torch.Generator().manual_seed(0), "cpu")
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    cfg = ObjectiveConfig(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5)
    u = sample_u(cfg, 20000, torch.Generator().manual_seed(0), "cpu")
    assert u.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)


def test_shift_moves_mass_upward_and_equals_shifted_sigmoid_draw():
    sig = sample_u(ObjectiveConfig(timestep_sampling="sigmoid"), 5000, torch.Generator().manual_seed(2), "cpu")
    shifted = sample_u(
        ObjectiveConfig(timestep_sampling="shift", shift=3.1), 5000, torch.Generator().manual_seed(2), "cpu"
    )
    assert torch.allclose(shifted, apply_shift(sig, 3.1))
    assert shifted.mean() > sig.mean() + 0.1
    assert (shifted >= sig).all()
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(apply_shift(t, 3.0), torch.tensor([0.75 / 1.5, 1.5 / 2.0]))
    assert torch.equal(apply_shift(t, 1.0), t)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "sigmoid", "shift"])
def test_timestep_range_is_respected(kind):
    cfg = ObjectiveConfig(timestep_sampling=kind, timestep_range=(0.2, 0.6))
    u = sample_u(cfg, 5000, torch.Generator().manual_seed(3), "cpu")
    assert (u >= 0.2).all() and (u <= 0.6).all()
    assert u.max() - u.min() > 0.2  # spread over the range, not collapsed


def test_flux_resolution_shift():
    assert flux_resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert flux_resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert flux_resolution_shift(2176) == pytest.approx(math.exp(0.825))
    assert flux_resolution_shift(256, base_shift=0.3, max_shift=0.9) == pytest.approx(math.exp(0.3))
    with pytest.raises(ConfigError) as err:
        flux_resolution_shift(0)
    assert err.value.field == "image_seq_len"


# --- config validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("loss_type", "mae"),
        ("huber_c", 0.0),
        ("huber_c", float("nan")),
        ("huber_schedule", "exponential"),
        ("min_snr_gamma", -1.0),
        ("debiased_estimation", 1),
        ("noise_offset", -0.1),
        ("noise_offset", 2.0),
        ("timestep_sampling", "cosine"),
        ("logit_mean", float("inf")),
        ("logit_std", 0.0),
        ("sigmoid_scale", -1.0),
        ("shift", 0.0),
        ("shift", True),
        ("timestep_range", (0.5, 0.5)),
        ("timestep_range", (-0.1, 1.0)),
        ("timestep_range", (0.0, 1.5)),
        ("timestep_range", (0.3,)),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        ObjectiveConfig(**{field: value})
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: expected")


def test_config_accepts_list_range_and_stays_frozen():
    cfg = ObjectiveConfig(timestep_range=[0.1, 0.9])
    assert cfg.timestep_range == (0.1, 0.9)
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss_type = "l1"
    # The resolution-dependent schedule is a plain replace of shift.
    replaced = dataclasses.replace(cfg, timestep_sampling="shift", shift=flux_resolution_shift(4096))
    assert replaced.shift == pytest.approx(math.exp(1.15))
