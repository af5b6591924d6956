"""Training losses, Min-SNR-γ, offset noise and the variational bound (closed forms and exact oracles)."""

import math

import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.likelihood import timestep_subset
from ldm.diffusion.objectives import (
    approx_standard_normal_cdf,
    bits_per_dim,
    diffusion_training_loss,
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    offset_noise,
    training_losses,
    vlb_terms,
)
from ldm.diffusion.schedule import NoiseSchedule, make_betas

F64 = torch.float64
LN2 = math.log(2)


def close(a, b, rtol=1e-9, atol=1e-12):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---- Gaussian pieces -------------------------------------------------------------------------------------
def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(4, 5, generator=g, dtype=F64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    close(normal_kl(m1, lv1, m2, lv2), ref)
    close(normal_kl(m1, lv1, 0.0, 0.0), torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(0.0, 1.0)))
    close(normal_kl(m1, lv1, m1, lv1), torch.zeros(4, 5), atol=1e-15)


def test_approx_cdf_is_close_to_exact():
    x = torch.linspace(-8, 8, 10001, dtype=F64)
    assert (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max() < 2.5e-4
    close(approx_standard_normal_cdf(torch.zeros(1, dtype=F64)), torch.full((1,), 0.5, dtype=F64))


@pytest.mark.parametrize("exact_cdf", [False, True])
@pytest.mark.parametrize(
    "mean,log_scale", [(0.0, -4.0), (0.3, -1.0), (-0.99, -6.0), (1.7, 0.5), (-5.0, -2.0)]
)
def test_discretized_likelihood_sums_to_one_over_256_bins(exact_cdf, mean, log_scale):
    x = torch.arange(256, dtype=F64) / 255 * 2 - 1
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale),
                                               exact_cdf=exact_cdf)
    close(logp.exp().sum(), 1.0, rtol=1e-9, atol=1e-9)


def test_discretized_likelihood_is_the_bin_mass():
    x = torch.tensor([0, 1, 153, 255], dtype=F64) / 255 * 2 - 1
    mean = torch.tensor([-0.9, 0.0, 0.21, 0.95], dtype=F64)
    std = torch.tensor([0.05, 0.3, 0.01, 0.1], dtype=F64)
    n = torch.distributions.Normal(mean, std)
    expected = torch.stack([n.cdf(x + 1 / 255)[0], (n.cdf(x + 1 / 255) - n.cdf(x - 1 / 255))[1],
                            (n.cdf(x + 1 / 255) - n.cdf(x - 1 / 255))[2], 1 - n.cdf(x - 1 / 255)[3]])
    close(discretized_gaussian_log_likelihood(x, mean, std.log(), exact_cdf=True), expected.log())


# ---- Min-SNR-γ ---------------------------------------------------------------------------------------------
def test_min_snr_weights_by_hand():
    T, gamma = 1000, 5.0
    s, betas = NoiseSchedule.from_config("linear", T), make_betas("linear", T).tolist()
    ts = [0, 10, 100, 500, 999]
    for t in ts:
        ab = math.prod(1 - b for b in betas[: t + 1])
        snr = ab / (1 - ab)
        w = {p: min_snr_weight(s.snr(torch.tensor([t])), gamma, p).item() for p in ("eps", "v", "x0")}
        assert w["eps"] == pytest.approx(min(snr, gamma) / snr, rel=1e-10)
        assert w["v"] == pytest.approx(min(snr, gamma) / (snr + 1), rel=1e-10)
        assert w["x0"] == pytest.approx(min(snr, gamma), rel=1e-10)
    # zero terminal SNR: SNR_T = 0 gives finite weights (ε → its limit 1; v, x0 → 0), never NaN.
    z = NoiseSchedule.from_config("linear", 10, zero_terminal_snr=True)
    snr = z.snr(torch.tensor([9, 0]))
    assert snr[0] == 0
    for p, expected in (("eps", 1.0), ("v", 0.0), ("x0", 0.0)):
        w = min_snr_weight(snr, gamma, p)
        assert torch.isfinite(w).all() and w[0] == expected


def _same_x0_hat_in_each_parameterization(s, x0, eps, t, x0_hat):
    x_t = s.q_sample(x0, t, eps)
    eps_hat = s.eps_from_x0(x_t, t, x0_hat)
    return x_t, {"eps": eps_hat, "x0": x0_hat, "v": s.v_target(x0_hat, t, eps_hat)}



def test_min_snr_weights_every_prediction_type_to_the_same_x0_loss():
    """Min-SNR-γ weighs the x0 error: one x0 estimate as any of the 3 targets gives min(SNR,γ)·‖x̂0 − x0‖²."""
    s, gamma = NoiseSchedule.from_config("cosine", 1000), 5.0
    g = torch.Generator().manual_seed(1)
    x0, eps, err = (torch.randn(5, 2, 4, 4, generator=g, dtype=F64) for _ in range(3))
    t = torch.tensor([3, 50, 300, 700, 990])
    x_t, preds = _same_x0_hat_in_each_parameterization(s, x0, eps, t, x0 + 0.1 * err)
    expected = s.snr(t).clamp(max=gamma) * (0.1 * err).pow(2).mean(dim=(1, 2, 3))
    for p, pred in preds.items():
        terms = training_losses(pred, x0, x_t, t, eps, s, prediction_type=p, min_snr_gamma=gamma)
        close(terms["loss"], expected, rtol=1e-8)


# ---- training losses -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_simple_loss_by_hand(prediction_type, loss_type):
    s = NoiseSchedule.from_config("scaled_linear", 1000)
    g = torch.Generator().manual_seed(2)
    x0, eps, pred = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0, 400, 999])
    x_t = s.q_sample(x0, t, eps)
    target = {"eps": eps, "x0": x0, "v": s.v_target(x0, t, eps)}[prediction_type]
    diff = pred - target
    per_sample = (diff**2 if loss_type == "l2" else diff.abs()).mean(dim=(1, 2, 3))
    loss, logs = diffusion_training_loss(
        pred, x0, x_t, t, eps, s, prediction_type=prediction_type, loss_type=loss_type
    )
    close(loss, per_sample.mean(), rtol=1e-6, atol=1e-7)
    assert loss.ndim == 0 and set(logs) == {"loss", "loss_simple", "mse"}
    assert all(not v.requires_grad for v in logs.values())
    close(logs["mse"], (diff**2).mean(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_hybrid_loss_vlb_trains_only_the_variance(prediction_type):
    T = 100
    s = NoiseSchedule.from_config("linear", T)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (4, 3, 4, 4), generator=g).double() / 255 * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 50, 99])
    x_t = s.q_sample(x0, t, eps)
    raw = torch.randn(4, 6, 4, 4, generator=g, dtype=F64).requires_grad_()
    kw = {"prediction_type": prediction_type, "variance_type": "learned_range"}
    terms = training_losses(raw, x0, x_t, t, eps, s, **kw)
    # value: simple + λ·T·L_t, which at λ = 1e-3 is iDDPM's rescaled MSE (mse + vb · T/1000)
    close(terms["loss"], terms["simple"] + terms["vlb"] * T / 1000)
    den = Denoiser(lambda *_: raw.detach(), s, prediction_type, "learned_range")
    close(terms["vlb"], vlb_terms(den, x0, x_t, t))
    terms["loss"].sum().backward()
    grad_hybrid = raw.grad.clone()
    raw.grad = None
    training_losses(raw[:, :3], x0, x_t, t, eps, s, prediction_type=prediction_type)["loss"].sum().backward()
    close(grad_hybrid[:, :3], raw.grad[:, :3])  # the mean sees only L_simple
    assert grad_hybrid[:, 3:].abs().sum() > 0  # the variance is trained by the VLB
    loss, logs = diffusion_training_loss(raw, x0, x_t, t, eps, s, vlb_weight=0.5, **kw)
    close(loss, (terms["simple"] + 0.5 * T * terms["vlb"]).mean())
    close(logs["loss_vlb"], terms["vlb"].mean())


def test_offset_noise():
    like = torch.zeros(3, 4, 8, 8)
    plain = torch.randn(like.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(offset_noise(like, 0.0, torch.Generator().manual_seed(5)), plain)
    g = torch.Generator().manual_seed(5)
    noisy = offset_noise(like, 0.1, g)
    offset = noisy - plain  # one draw per (sample, channel), constant over space
    assert noisy.shape == like.shape and noisy.dtype == like.dtype
    close(offset, offset[:, :, :1, :1].expand_as(offset), rtol=0, atol=1e-6)
    g2 = torch.Generator().manual_seed(5)
    torch.randn(like.shape, generator=g2)
    close(offset[:, :, 0, 0], 0.1 * torch.randn(3, 4, 1, 1, generator=g2)[:, :, 0, 0], rtol=1e-5, atol=1e-6)


# ---- the variational bound with exact "oracle" denoisers ------------------------------------------------
T_SMALL = 20
H = 1 / 255


def _grid_data(seed=6):
    k = torch.randint(0, 256, (3, 2, 4, 4), generator=torch.Generator().manual_seed(seed))
    k[0, 0, 0, :2] = torch.tensor([0, 255])  # both edge bins
    return k.double() / 255 * 2 - 1


def _oracle(s, x0, prediction_type, delta=0.0, var_values=None):
    """The exact denoiser for data concentrated at x0 (E[x0 | x_t] = x0), optionally off by a constant δ."""
    def model_fn(x_t, t):
        x0_hat = x0.repeat(x_t.shape[0] // x0.shape[0], 1, 1, 1) + delta
        eps = s.eps_from_x0(x_t, t, x0_hat)
        pred = {"x0": x0_hat, "eps": eps, "v": s.v_target(x0_hat, t, eps)}
        out = pred[prediction_type]
        return out if var_values is None else torch.cat([out, torch.full_like(out, var_values)], dim=1)
    return model_fn


def _closed_form(x0, betas, delta=0.0, decoder_var=None, kl_t=None):
    """prior + decoder NLL + Σ_t kl_t(t) in bits/dim, from the betas alone."""
    ab = torch.cumprod(1 - betas, 0)
    prior = 0.5 * (-1 - torch.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0**2)
    if decoder_var is None:  # β̃_1 (fixed_small, clipped at t = 0), or β_1 when T = 1
        decoder_var = betas[1] * (1 - ab[0]) / (1 - ab[1]) if len(betas) > 1 else betas[0]
    sd, cdf = decoder_var.sqrt(), approx_standard_normal_cdf
    upper, lower = cdf((H - delta) / sd) * torch.ones_like(x0), cdf((-H - delta) / sd) * torch.ones_like(x0)
    p = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    per_dim = prior - p.log()
    total = per_dim.mean(dim=(1, 2, 3)) / LN2
    if kl_t is not None:
        total = total + sum(kl_t(t, ab) for t in range(1, len(betas)))
    return total


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("T", [1, 2, T_SMALL])
def test_bits_per_dim_of_the_exact_denoiser(prediction_type, T):
    """With E[x0 | x_t] exact and β̃ variances every KL term is 0: bound = prior + decoder, in closed form."""
    s, x0 = NoiseSchedule.from_config("linear", T), _grid_data()
    den = Denoiser(_oracle(s, x0, prediction_type), s, prediction_type)
    out = bits_per_dim(den, x0, generator=torch.Generator().manual_seed(0), batch_size=7, return_terms=True)
    assert out["terms"].shape == (3, T) and out["timesteps"].tolist() == list(range(T))
    close(out["terms"][:, 1:], torch.zeros(3, T - 1), atol=1e-10)
    close(out["total"], _closed_form(x0, make_betas("linear", T)), rtol=1e-10)


def test_bits_per_dim_sums_every_kl_term():
    """x0 estimate off by δ: KL_t = coef1_t² δ² / (2 β̃_t) for each t ≥ 1 (noise-free); δ in the decoder."""
    s, x0, delta = NoiseSchedule.from_config("linear", T_SMALL), _grid_data(), 0.005
    betas = make_betas("linear", T_SMALL)

    def kl_t(t, ab):
        coef1 = betas[t] * ab[t - 1].sqrt() / (1 - ab[t])
        var = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
        return coef1**2 * delta**2 / (2 * var) / LN2

    den = Denoiser(_oracle(s, x0, "x0", delta), s, "x0")
    out = bits_per_dim(den, x0, return_terms=True)
    ab = torch.cumprod(1 - betas, 0)
    close(out["terms"][:, 1:], torch.stack([kl_t(t, ab) for t in range(1, T_SMALL)]).expand(3, -1), rtol=1e-8)
    close(out["total"], _closed_form(x0, betas, delta, kl_t=kl_t), rtol=1e-10)
    # a subset of timesteps: L_0 + (T-1)/(K-1) Σ over the chosen t ≥ 1
    est = bits_per_dim(den, x0, num_timesteps=5, return_terms=True)
    ts = est["timesteps"].tolist()
    assert ts[0] == 0 and ts[-1] == T_SMALL - 1 and len(ts) == 5
    expected = est["prior"] + est["terms"][:, 0] + (T_SMALL - 1) / 4 * sum(kl_t(t, ab) for t in ts[1:])
    close(est["total"], expected, rtol=1e-8)


def test_bits_per_dim_fixed_large_and_learned_range():
    s, x0 = NoiseSchedule.from_config("cosine", T_SMALL), _grid_data()
    betas = make_betas("cosine", T_SMALL)

    def kl_large(t, ab):  # KL(N(μ, β̃_t) || N(μ, β_t))
        ratio = (1 - ab[t - 1]) / (1 - ab[t])  # β̃_t / β_t
        return 0.5 * (-torch.log(ratio) + ratio - 1) / LN2

    large = bits_per_dim(Denoiser(_oracle(s, x0, "v"), s, "v", "fixed_large"), x0)
    close(large, _closed_form(x0, betas, kl_t=kl_large), rtol=1e-10)
    small = bits_per_dim(Denoiser(_oracle(s, x0, "v"), s, "v", "fixed_small"), x0)
    low = bits_per_dim(Denoiser(_oracle(s, x0, "v", var_values=-1.0), s, "v", "learned_range"), x0)
    close(low, small, rtol=1e-10)
    high = bits_per_dim(Denoiser(_oracle(s, x0, "v", var_values=1.0), s, "v", "learned_range"), x0)
    close(high, _closed_form(x0, betas, decoder_var=betas[0], kl_t=kl_large), rtol=1e-10)


def test_vlb_terms_mixed_timesteps_and_zero_terminal_snr():
    s = NoiseSchedule.from_config("linear", 10, zero_terminal_snr=True)
    x0 = _grid_data()
    g = torch.Generator().manual_seed(8)
    raw = torch.randn(x0.shape, generator=g, dtype=F64)
    den = Denoiser(lambda x, t: raw[: x.shape[0]], s, "v")
    t = torch.tensor([0, 4, 9])
    x_t = s.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    mixed = vlb_terms(den, x0, x_t, t)
    for i in range(3):
        d = Denoiser(lambda x, _t, i=i: raw[i:i + 1], s, "v")
        close(mixed[i], vlb_terms(d, x0[i:i + 1], x_t[i:i + 1], t[i:i + 1])[0])
    assert torch.isfinite(mixed).all() and (mixed > 0).all()
    close(bits_per_dim(Denoiser(_oracle(s, x0, "v"), s, "v"), x0, return_terms=True)["prior"], torch.zeros(3))


# ---- errors ---------------------------------------------------------------------------------------------
def test_bad_options_raise_clear_errors():
    s = NoiseSchedule.from_config("linear", 10)
    x0 = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    args = (x0, x0, t, x0, s)
    with pytest.raises(ValueError, match="loss_type"):
        training_losses(x0, *args, loss_type="huber")
    with pytest.raises(ValueError, match="prediction_type"):
        training_losses(x0, *args, prediction_type="epsilon")
    with pytest.raises(ValueError, match="variance_type"):
        training_losses(x0, *args, variance_type="learned")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        training_losses(x0, *args, min_snr_gamma=0)
    with pytest.raises(ValueError, match="learned_range"):
        training_losses(x0, *args, variance_type="learned_range")  # needs 2C channels
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weight(s.snr(t), 5.0, "sample")
    zt = NoiseSchedule.from_config("linear", 10, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        training_losses(x0, x0, x0, t, x0, zt, prediction_type="eps")
    with pytest.raises(ValueError, match="num_timesteps"):
        bits_per_dim(Denoiser(lambda x, t: x, s), x0, num_timesteps=1)


def test_quadratic_timestep_subset_is_a_quadrature_crowded_near_t1():
    ts, w = timestep_subset(1000, 100, "quadratic")
    assert ts[0] == 0 and ts[1] == 1 and ts[-1] == 999 and w[0] == 1 and w[1:].sum() == 999
    assert (ts[1:7].diff() == 1).all() and ts[-1] - ts[-2] > 10  # dense where L_t changes fastest
    ts_s, w_s = timestep_subset(50, 10, "quadratic")  # each t ≥ 1 counted once, by its nearest chosen t
    assert w_s[1:].sum() == 49 and (w_s > 0).all() and len(ts_s) == len(w_s)
    ts_u, w_u = timestep_subset(1000, 5, "uniform")
    assert ts_u.tolist() == [0, 1, 334, 666, 999]
    assert torch.allclose(w_u[1:], torch.full((4,), 999 / 4.0, dtype=w_u.dtype))
    with pytest.raises(ValueError, match="spacing"):
        timestep_subset(10, 3, "log")


def test_bits_per_dim_quadratic_estimate_weights_each_term():
    s, x0, delta = NoiseSchedule.from_config("linear", T_SMALL), _grid_data(), 0.005
    den = Denoiser(_oracle(s, x0, "x0", delta), s, "x0")
    full = bits_per_dim(den, x0, return_terms=True)
    est = bits_per_dim(den, x0, num_timesteps=5, spacing="quadratic", return_terms=True)
    ts, w = timestep_subset(T_SMALL, 5, "quadratic")
    assert torch.equal(est["timesteps"], ts) and torch.equal(est["weights"], w.to(est["weights"].dtype))
    # noise-free terms: the full run's values at the chosen t, each counted for the t nearest to it
    nearest = [min(ts[1:].tolist(), key=lambda s: (abs(s - t), s)) for t in range(1, T_SMALL)]
    expected = full["prior"] + full["terms"][:, 0] + sum(full["terms"][:, s] for s in nearest)
    close(est["total"], expected, rtol=1e-8)
