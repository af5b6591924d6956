"""Samplers: agreement with diffusers' schedulers (an independent reference) on a deterministic toy model,
convergence to Gaussian data under the exact denoiser for every parameterization, seeds and callbacks.

Convention differences with diffusers, and how the tests deal with them:
- DDIM goes from each spaced timestep to the *next one in the sequence* (then to ᾱ = 1); diffusers'
  DDIMScheduler always goes to t − T//steps. Both agree for "leading" and for "trailing" when steps divides
  T, which is what is compared; "linspace" is checked against DPM-Solver++ of order 1 (= DDIM η=0) on the
  same timesteps instead.
- DPM++ 2M with karras=True calls the network at the continuous timestep of each σ; diffusers rounds it,
  so that case is compared with a model that ignores t.
"""

import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers import SAMPLERS, get_sampler, karras_sigmas, respace, respaced_denoiser
from ldm.diffusion.samplers.dpm_solver import dpm_timesteps
from ldm.diffusion.samplers.spacing import spaced_timesteps
from ldm.diffusion.schedule import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")

PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # not diffusers' defaults


def sd_schedule(T=1000, **kw):
    return NoiseSchedule.from_config("scaled_linear", T, **kw)


def toy(x, t):
    """A fixed function of x and t (float or int, 0-d or (B,)), different per channel."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    c = torch.arange(x.shape[1], dtype=x.dtype).reshape(1, -1, 1, 1)
    return 0.6 * x + 0.3 * torch.sin(t / 70 + c) - 0.05 * c


def toy_learned(x, t):
    t_ = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return torch.cat([toy(x, t), torch.tanh(0.5 * x + t_ / 500 - 1)], dim=1)


def noise(shape=(2, 3, 4, 4), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_diffusers(sched, model, x, steps, scale_input=False, seed=None, **set_kw):
    sched.set_timesteps(steps, **set_kw) if steps is not None else sched.set_timesteps(**set_kw)
    step_kw = {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if scale_input else x
        x = sched.step(model(inp, t), t, x, **step_kw).prev_sample
    return x


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


# ---- timesteps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_spacing_matches_diffusers_ddim(spacing, offset, steps):
    if spacing == "leading" and steps == 1000 and offset:  # diffusers would index ᾱ[1000]
        with pytest.raises(ValueError, match="out of range"):
            spaced_timesteps(1000, steps, spacing, offset)
        return
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    assert spaced_timesteps(1000, steps, spacing, offset).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [5, 20])
def test_dpm_timesteps_match_diffusers(spacing, steps):
    ref = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert dpm_timesteps(1000, steps, spacing).tolist() == ref.timesteps.tolist()


def test_bad_steps_and_spacing_are_clear_errors():
    with pytest.raises(ValueError, match="steps must be"):
        spaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps must be"):
        spaced_timesteps(100, 101)
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps_offset"):
        spaced_timesteps(1000, 10, "trailing", offset=1)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*ddpm, ddim, dpmpp_2m, euler, euler_a, heun"):
        get_sampler("dpm")
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "euler", "euler_a", "heun"}


def test_respace():
    s = sd_schedule(100)
    assert torch.equal(respace(s, torch.arange(100)).betas, s.betas)  # plain DDPM: the training betas
    ts = spaced_timesteps(100, 10, "trailing")
    r = respace(s, ts)
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[ts.flip(0)])
    calls = []
    d = Denoiser(lambda x, t: calls.append(t) or toy(x, t), s)
    rd = respaced_denoiser(d, ts)
    rd(noise(), torch.tensor([0, 9]))
    assert calls[-1].tolist() == [ts.min().item(), ts.max().item()]  # new indices map back to timesteps
    assert respaced_denoiser(d, torch.arange(100)) is d


# ---- agreement with diffusers ---------------------------------------------------------------------
@pytest.mark.parametrize("spacing,offset,steps", [("leading", 0, 10), ("leading", 1, 7), ("trailing", 0, 25)])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_ddim_matches_diffusers(spacing, offset, steps, pred):
    s = sd_schedule()
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, prediction_type=PRED[pred],
                                  timestep_spacing=spacing, steps_offset=offset)
    x = noise()
    got = SAMPLERS["ddim"](Denoiser(toy, s, pred), x, steps, spacing=spacing, steps_offset=offset)
    close(got, run_diffusers(ref, toy, x, steps))


def test_ddim_eta1_matches_diffusers_with_the_same_noise():
    s = sd_schedule()
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True)
    x0 = x = noise()
    got = SAMPLERS["ddim"](Denoiser(toy, s), x0, 10, eta=1.0, generator=torch.Generator().manual_seed(3))
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        x = ref.step(toy(x, t), t, x, eta=1.0, generator=g).prev_sample
    close(got, x)


@pytest.mark.parametrize("steps", [10, 30])
def test_ddim_linspace_matches_first_order_dpm_solver(steps):
    """DPM-Solver++ of order 1 is DDIM (η = 0); it accepts custom timesteps and ends at ᾱ = 1."""
    s = sd_schedule()
    ts = spaced_timesteps(1000, steps, "linspace")
    ref = diffusers.DPMSolverMultistepScheduler(**SD, solver_order=1)
    x = noise()
    got = SAMPLERS["ddim"](Denoiser(toy, s), x, steps, spacing="linspace")
    close(got, run_diffusers(ref, toy, x, None, timesteps=ts.tolist()))


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("T,steps", [(100, 100), (1000, 10)])
def test_ddpm_matches_diffusers_with_the_same_noise(variance_type, T, steps):
    """Full T is plain DDPM; steps < T compares the respaced betas (diffusers recomputes β from ᾱ too)."""
    s = NoiseSchedule.from_config("linear", T)
    model = toy_learned if variance_type == "learned_range" else toy
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False, variance_type=variance_type)
    x = noise()
    got = SAMPLERS["ddpm"](Denoiser(model, s, "eps", variance_type), x, steps,
                           generator=torch.Generator().manual_seed(5))
    close(got, run_diffusers(ref, model, x, steps, seed=5), tol=5e-4)  # float32 ᾱ over 100 steps there


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_karras_samplers_match_diffusers(name, pred):
    s = sd_schedule()
    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}[name]
    ref = cls(**SD, use_karras_sigmas=True,
              prediction_type=PRED[pred])
    x = noise()
    got = SAMPLERS[name](Denoiser(toy, s, pred), x, 12)
    close(got, run_diffusers(ref, toy, x, 12, scale_input=True))


def test_karras_sigmas_match_diffusers():
    ref = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    ref.set_timesteps(15)
    close(karras_sigmas(sd_schedule(), 15).float(), ref.sigmas, tol=1e-5)


def test_euler_ancestral_matches_diffusers_on_its_sigmas():
    """diffusers' ancestral Euler has no Karras option: feed ours its σ sequence (t integer there)."""
    s = sd_schedule()
    ref = diffusers.EulerAncestralDiscreteScheduler(**SD)
    ref.set_timesteps(10)
    x = noise()
    got = SAMPLERS["euler_a"](Denoiser(toy, s), x, 10, sigmas=ref.sigmas,
                              generator=torch.Generator().manual_seed(2))
    close(got, run_diffusers(ref, toy, x, 10, scale_input=True, seed=2))


@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("linspace", 20), ("leading", 8),
                                           ("trailing", 15)])
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_dpmpp_2m_matches_diffusers(spacing, steps, pred):
    s = sd_schedule()
    ref = diffusers.DPMSolverMultistepScheduler(**SD, prediction_type=PRED[pred],
                                                timestep_spacing=spacing)
    x = noise()
    got = SAMPLERS["dpmpp_2m"](Denoiser(toy, s, pred), x, steps, spacing=spacing)
    close(got, run_diffusers(ref, toy, x, steps))


def test_dpmpp_2m_karras_matches_diffusers():
    s = sd_schedule()
    ref = diffusers.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    model = lambda x, t: toy(x, torch.zeros(()))  # noqa: E731 — diffusers rounds t here, we do not
    x = noise()
    close(SAMPLERS["dpmpp_2m"](Denoiser(model, s), x, 12, karras=True), run_diffusers(ref, model, x, 12))


# ---- convergence to Gaussian data under the exact denoiser --------------------------------------
MU = torch.tensor([1.0, -0.5, 0.0, 2.0]).reshape(1, 4, 1, 1).double()
STD = torch.tensor([0.5, 1.0, 0.7, 1.5]).reshape(1, 4, 1, 1).double()


def gaussian_model(schedule: NoiseSchedule, prediction_type: str):
    """The exact E[ε|x_t], E[x0|x_t] or E[v|x_t] for x0 ~ N(MU, STD²) per dimension; continuous t
    is mapped back to σ by the same log-σ interpolation as `sigma_to_t`."""
    log_sigmas = schedule.sigmas.log()

    def fn(x, t):
        t = torch.as_tensor(t).reshape(-1)
        if t.dtype.is_floating_point:
            lo = t.double().floor().long().clamp(max=len(log_sigmas) - 2)
            w = t.double() - lo
            ab = 1 / (1 + ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp() ** 2)
        else:
            ab = schedule.alphas_cumprod[t]
        a, b = ab.sqrt().reshape(-1, 1, 1, 1), (1 - ab).sqrt().reshape(-1, 1, 1, 1)
        var = a**2 * STD**2 + b**2
        eps = b * (x - a * MU) / var
        x0 = MU + a * STD**2 * (x - a * MU) / var
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction_type]

    return fn


CONVERGENCE = [  # (sampler, steps, options, tolerance on std / STD − 1)
    ("ddpm", 250, {}, 0.04),
    ("ddpm", 250, {"variance_type": "fixed_large"}, 0.05),
    ("ddim", 100, {}, 0.04),
    ("ddim", 100, {"eta": 1.0}, 0.06),
    ("euler", 100, {}, 0.04),
    ("euler_a", 100, {}, 0.06),
    ("heun", 30, {}, 0.03),
    ("dpmpp_2m", 50, {}, 0.03),
    ("dpmpp_2m", 30, {"karras": True}, 0.03),
]


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
@pytest.mark.parametrize("name,steps,options,tol", CONVERGENCE, ids=lambda v: str(v) if v else "")
def test_samples_have_the_data_mean_and_std(name, steps, options, tol, pred):
    options = dict(options)
    s = NoiseSchedule.from_config("linear", 1000)
    d = Denoiser(gaussian_model(s, pred), s, pred, options.pop("variance_type", "fixed_small"))
    n = 8192
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64)
    x = SAMPLERS[name](d, x_T, steps, generator=g, **options)
    se = STD / n**0.5  # standard error of the sample mean
    assert ((x.mean(0, keepdim=True) - MU).abs() < 4 * se + 0.02).all(), x.mean(0).flatten()
    assert ((x.std(0, keepdim=True) / STD - 1).abs() < tol + 4 / (2 * n) ** 0.5).all(), x.std(0).flatten()


@pytest.mark.parametrize("name,steps,variance_type", [
    ("ddim", 100, "fixed_small"), ("ddpm", 100, "fixed_large"), ("dpmpp_2m", 25, "fixed_small")])
def test_zero_terminal_snr_with_trailing_spacing(name, steps, variance_type):
    """ᾱ_{T−1} = 0 exactly (σ = ∞, λ = −∞): the first step must still be finite and right."""
    s = NoiseSchedule.from_config("linear", 1000, zero_terminal_snr=True)
    d = Denoiser(gaussian_model(s, "v"), s, "v", variance_type)
    n = 8192
    g = torch.Generator().manual_seed(0)
    x = SAMPLERS[name](d, torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64), steps, generator=g,
                       spacing="trailing")
    assert torch.isfinite(x).all()
    assert ((x.mean(0, keepdim=True) - MU).abs() < 4 * STD / n**0.5 + 0.02).all(), x.mean(0).flatten()
    assert ((x.std(0, keepdim=True) / STD - 1).abs() < 0.05).all(), x.std(0).flatten()


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpmpp_2m"])
def test_karras_on_zero_terminal_snr_is_a_clear_error(name):
    s = NoiseSchedule.from_config("linear", 100, zero_terminal_snr=True)
    opts = {"karras": True} if name == "dpmpp_2m" else {}
    with pytest.raises(ValueError, match="zero_terminal_snr=True.*sigma_max"):
        SAMPLERS[name](Denoiser(toy, s, "v"), noise(), 5, **opts)


def test_learned_range_endpoints_are_the_fixed_variances():
    s = NoiseSchedule.from_config("linear", 1000)
    x = noise()
    run = lambda model, vt: SAMPLERS["ddpm"](Denoiser(model, s, "eps", vt), x, 20,  # noqa: E731
                                             generator=torch.Generator().manual_seed(1))
    for value, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        learned = lambda x, t, v=value: torch.cat([toy(x, t), torch.full_like(x, v)], 1)  # noqa: E731
        close(run(learned, "learned_range"), run(toy, fixed), tol=1e-5)


# ---- seeds, callbacks, progress -------------------------------------------------------------------
STOCHASTIC = {"ddpm": {}, "ddim": {"eta": 1.0}, "euler_a": {}}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seeds_callbacks_and_call_counts(name):
    s = sd_schedule()
    calls = []
    d = Denoiser(lambda x, t: calls.append(t) or toy(x, t), s)
    options = STOCHASTIC.get(name, {})
    x = noise()
    seen = []
    a = SAMPLERS[name](d, x, 6, generator=torch.Generator().manual_seed(0), callback=seen.append,
                       progress=True, **options)
    b = SAMPLERS[name](d, x, 6, generator=torch.Generator().manual_seed(0), **options)
    c = SAMPLERS[name](d, x, 6, generator=torch.Generator().manual_seed(1), **options)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (not torch.equal(a, c)) == (name in STOCHASTIC)
    assert [e["i"] for e in seen] == list(range(6))
    key = "sigma" if name in ("euler", "euler_a", "heun") else "t"
    assert all(set(e) == {"i", key, "x", "x0"} and e["x0"].shape == x.shape for e in seen)
    assert len(calls) == 3 * (11 if name == "heun" else 6)  # Heun: 2 calls per step, Euler on the last
