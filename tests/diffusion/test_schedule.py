"""NoiseSchedule and Denoiser against diffusers' DDPMScheduler (an independent reference) and closed forms."""

import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import NoiseSchedule, check_prediction_type, make_betas

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
CASES = [(name, T, zt) for name in DIFFUSERS_NAME for T in (10, 1000) for zt in (False, True)]


def reference(name, T, zero_terminal_snr, float64=True, **kwargs):
    """diffusers' DDPMScheduler; with float64, its tables are rebuilt in float64 by its own functions (they
    run in float32 inside, which alone drifts ~1e-5 relative over 1000 steps and swamps the comparison)."""
    extra = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], clip_sample=False,
        rescale_betas_zero_snr=zero_terminal_snr and not float64, **extra, **kwargs,
    )
    if float64:
        betas = ref.betas.double()
        if zero_terminal_snr:
            betas = diffusers.schedulers.scheduling_ddpm.rescale_zero_terminal_snr(betas)
        ref.betas, ref.alphas = betas, 1.0 - betas
        ref.alphas_cumprod, ref.one = torch.cumprod(ref.alphas, dim=0), torch.tensor(1.0, dtype=torch.float64)
    return ref


def ours(name, T, zero_terminal_snr):
    extra = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    return NoiseSchedule.from_config(name, T, zero_terminal_snr=zero_terminal_snr, **extra)


def close(a, b, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,T,zt", CASES)
def test_tables_match_diffusers(name, T, zt):
    ref, s = reference(name, T, zt), ours(name, T, zt)
    close(s.betas, ref.betas)
    close(s.alphas_cumprod, ref.alphas_cumprod)
    raw = reference(name, T, zt, float64=False)  # the float32 tables as diffusers ships them
    close(s.alphas_cumprod, raw.alphas_cumprod, rtol=2e-4, atol=1e-6)
    if zt:
        assert s.alphas_cumprod[-1] == 0 and s.snr(torch.tensor([T - 1])).item() == 0


@pytest.mark.parametrize("name,T,zt", CASES)
def test_forward_process_and_velocity_match_diffusers(name, T, zt):
    ref, s = reference(name, T, zt), ours(name, T, zt)
    g = torch.Generator().manual_seed(1)
    # float64 inputs: diffusers computes 1 - ᾱ in the input dtype, which in float32 loses ~1e-3 of √(1-ᾱ_0).
    x0, noise = (torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 1, T // 2, T - 2, T - 1, T // 3])
    close(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-6)
    close(s.v_target(x0, t, noise), ref.get_velocity(x0, noise, t), atol=1e-6)
    close(s.target(x0, noise, t, "v"), ref.get_velocity(x0, noise, t), atol=1e-6)


@pytest.mark.parametrize("name,T,zt", CASES)
def test_posterior_variance_matches_diffusers(name, T, zt):
    ref, s = reference(name, T, zt), ours(name, T, zt)
    x = torch.zeros(1, 1, 2, 2)
    for t in range(1, T, max(1, T // 37)):
        tt = torch.tensor([t])
        close(s.gather("posterior_variance", tt, x).flatten(), ref._get_variance(t).reshape(1))
        _, _, log_var = s.q_posterior(x, x, tt)
        close(log_var[0, 0, 0, 0], torch.log(ref._get_variance(t)))  # clipped = unclipped for t ≥ 1
        large = ref._get_variance(t, variance_type="fixed_large")
        close(s.gather("betas", tt, x).flatten(), large.reshape(1))


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize(
    "name,zt,prediction_type",
    [(n, False, p) for n in ("linear", "scaled_linear") for p in ("eps", "x0", "v")]
    + [("cosine", True, "x0"), ("cosine", True, "v")],  # zero terminal SNR rejects eps
)
def test_reverse_step_matches_diffusers(prediction_type, variance_type, name, zt):
    """p(x_{t-1} | x_t) mean and variance: mean + σ·z equals diffusers' DDPM step with the same z."""
    T = 50
    ref = reference(name, T, zt, prediction_type=DIFFUSERS_PRED[prediction_type], variance_type=variance_type)
    s = ours(name, T, zt)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out_ch = 6 if variance_type == "learned_range" else 3
    raw = torch.randn(2, out_ch, 4, 4, generator=g, dtype=torch.float64)
    if variance_type == "learned_range":
        raw[:, 3:] = raw[:, 3:].tanh()
    den = Denoiser(lambda x, t: raw, s, prediction_type, variance_type)
    for t in (1, 7, 30, T - 1):
        mean, log_var, out = den.p_mean_variance(x_t, torch.tensor([t, t]))
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        step = ref.step(raw, t, x_t, generator=torch.Generator().manual_seed(t))
        close(out.x0, step.pred_original_sample, atol=1e-6)
        close(mean + torch.exp(0.5 * log_var) * z, step.prev_sample, atol=1e-6)


@pytest.mark.parametrize("name,T,zt", CASES)
def test_conversions_round_trip(name, T, zt):
    s = ours(name, T, zt)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 3, generator=g,
                                                                                     dtype=torch.float64)
    t = torch.tensor([0, 1, T // 2, T - 2, T - 1])
    x_t = s.q_sample(x0, t, eps)
    for p in ("x0", "v") + (() if zt else ("eps",)):
        rx0, reps = s.to_x0_eps(s.target(x0, eps, t, p), x_t, t, p)
        close(rx0, x0, rtol=1e-8, atol=1e-8 if p != "eps" else 1e-4)
        close(reps, eps, rtol=1e-8, atol=1e-8 if p != "x0" else 1e-4)
    # v is a rotation of (ε, x0): v² + x_t² = ε² + x0² elementwise
    v = s.v_target(x0, t, eps)
    close(v**2 + x_t**2, eps**2 + x0**2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_bayes_on_gaussians(name):
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; √α_t x_{t-1}, β_t) · N(x_{t-1}; √ᾱ_{t-1} x0, 1-ᾱ_{t-1}), from betas."""
    T = 100
    s = NoiseSchedule.from_config(name, T)
    betas = make_betas(name, T)
    g = torch.Generator().manual_seed(4)
    x0, x_t = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(1, 2, 3, 3, generator=g,
                                                                                     dtype=torch.float64)
    for t in (1, 2, 50, T - 1):
        alpha_t = 1 - betas[t]
        ab_prev = torch.prod(1 - betas[:t])
        precision = alpha_t / betas[t] + 1 / (1 - ab_prev)
        var = 1 / precision
        mean = var * (alpha_t.sqrt() * x_t / betas[t] + ab_prev.sqrt() * x0 / (1 - ab_prev))
        m, v, lv = s.q_posterior(x0, x_t, torch.tensor([t]))
        close(m, mean, rtol=1e-10, atol=1e-12)
        close(v, var.expand_as(v), rtol=1e-10, atol=0)
        close(lv, var.log().expand_as(v), rtol=1e-10, atol=1e-12)
    # t = 0: x_{-1} is x0 itself, so the posterior is a point mass at x0 (variance 0, log-variance clipped).
    m, v, _ = s.q_posterior(x0, x_t, torch.tensor([0]))
    close(m, x0, rtol=1e-12, atol=1e-12)
    assert (v == 0).all()


def test_schedule_errors():
    with pytest.raises(ValueError, match="noise schedule"):
        NoiseSchedule.from_config("quadratic", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule.from_config("linear", 0)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        check_prediction_type(NoiseSchedule.from_config("linear", 10, zero_terminal_snr=True), "eps")
    with pytest.raises(ValueError, match="prediction_type"):
        check_prediction_type(NoiseSchedule.from_config("linear", 10), "epsilon")
