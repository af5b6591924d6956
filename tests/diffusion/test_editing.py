"""ldm.diffusion.editing against known answers: SDEdit start states, known-region blending, DDIM inversion, slerp."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import editing
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers import SAMPLERS, get_sampler
from ldm.diffusion.schedule import NoiseSchedule, make_betas

MU, S = 0.5, 0.7  # data ~ N(MU, S² I): the optimal ε-predictor is known in closed form


def schedule(T: int = 200) -> NoiseSchedule:
    return NoiseSchedule(make_betas("scaled_linear", T))


def gaussian_denoiser(sched: NoiseSchedule) -> Denoiser:
    """The exact ε-prediction for N(MU, S²) data, at integer or continuous t."""
    def model_fn(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).flatten()
        ab = torch.tensor([editing.alpha_bar_at(sched, float(v)) for v in t], dtype=x.dtype).view(-1, 1, 1, 1)
        x0 = MU + (ab.sqrt() * S**2 / (ab * S**2 + 1 - ab)) * (x - ab.sqrt() * MU)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return Denoiser(model_fn, sched)


def random_denoiser(sched: NoiseSchedule, seed: int = 0) -> Denoiser:
    """A fixed random, spatially mixing network: the output depends on every input pixel and on t."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64) * 0.2

    def model_fn(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).view(-1, 1, 1, 1)
        return torch.tanh(torch.nn.functional.conv2d(x, w.to(x.dtype), padding=1) + 1e-3 * t)
    return Denoiser(model_fn, sched)


def test_strength_maps_to_start_timestep_and_is_checked():
    assert editing.start_timestep(0.0, 1000) is None
    assert editing.start_timestep(1.0, 1000) == 999
    assert editing.start_timestep(0.6, 1000) == 599
    assert editing.start_timestep(1e-6, 1000) == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength must be in"):
            editing.start_timestep(bad, 1000)


def test_truncated_schedule_keeps_alpha_bar():
    s = schedule()
    tr = editing.truncate_schedule(s, 79)
    assert tr.num_timesteps == 80
    torch.testing.assert_close(tr.alphas_cumprod, s.alphas_cumprod[:80], rtol=0, atol=0)
    assert editing.truncate_schedule(s, 199) is s


def test_strength_zero_returns_the_input_exactly():
    s = schedule()
    z0 = torch.randn(2, 4, 4, 4)
    for name, fn in SAMPLERS.items():
        out = editing.sdedit(fn, random_denoiser(s), z0, 0.0, 10, torch.randn_like(z0))
        assert out is z0, name


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_first_network_call_sees_z0_noised_to_its_level(name):
    """Whatever the sampler's spacing and space (VP x_t or VE x0 + σε), its first call gets √ᾱ z0 + √(1−ᾱ) ε."""
    s = schedule()
    den = editing.truncated_denoiser(random_denoiser(s), editing.start_timestep(0.5, s.num_timesteps))
    z0, noise = torch.randn(1, 4, 4, 4, dtype=torch.float64), torch.randn(1, 4, 4, 4, dtype=torch.float64)
    seen = []

    def record(x, t):
        seen.append((x.clone(), float(torch.as_tensor(t).flatten()[0])))
        return x * 0
    rec = Denoiser(record, den.schedule)
    fn = get_sampler(name)
    x_T = editing.noised_start(fn, den, z0, noise, 5)
    fn(rec, x_T, 5)
    x, t = seen[0]
    assert t <= 99.0 + 1e-6
    ab = editing.alpha_bar_at(s, t)
    torch.testing.assert_close(x, math.sqrt(ab) * z0 + math.sqrt(1 - ab) * noise, atol=1e-6, rtol=1e-6)


def test_sdedit_low_strength_stays_close_high_strength_moves_towards_the_data():
    s = schedule()
    den = gaussian_denoiser(s)
    z0 = torch.full((1, 4, 4, 4), 3.0, dtype=torch.float64)  # far from the data mean MU
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dist = {}
    for strength in (0.1, 1.0):
        out = editing.sdedit(get_sampler("ddim"), den, z0, strength, 50, noise)
        dist[strength] = float((out - z0).abs().mean())
    assert dist[0.1] < 0.5 < dist[1.0]


def test_mask_to_latent_keeps_a_cell_only_if_all_its_pixels_are_kept():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 0, 0] = 1  # one pixel to repaint
    m = editing.mask_to_latent(mask, (4, 4))
    assert m.shape == (1, 1, 4, 4) and m.sum() == 1 and m[0, 0, 0, 0] == 1
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        editing.mask_to_latent(torch.zeros(8, 8), (4, 4))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_known_region_is_kept(name):
    s = schedule()
    g = torch.Generator().manual_seed(1)
    z_known = torch.randn(2, 4, 6, 6, generator=g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., 2:5, 1:4] = 1
    noise, x_T = torch.randn(z_known.shape, generator=g), torch.randn(z_known.shape, generator=g)
    fn = get_sampler(name)
    kw = dict(generator=torch.Generator().manual_seed(2))
    blended = editing.KnownRegionDenoiser(random_denoiser(s), z_known, mask, noise)
    out = fn(blended, x_T, 6, **kw)
    keep = (mask == 0).expand_as(out)
    err = (out - z_known)[keep].abs().max().item()
    if name in ("ddim", "dpmpp_2m", "ddpm"):  # their last step returns the (blended) x̂0 itself
        assert err == 0.0, err
    else:
        assert err < 1e-4, err
    pasted = editing.paste_known(out, z_known, mask)
    assert (pasted - z_known)[keep].abs().max().item() == 0.0
    # the repainted region is generated (not the known latent) and depends on the known context
    assert (out - z_known)[~keep].abs().mean() > 0.05
    other = editing.KnownRegionDenoiser(random_denoiser(s), z_known + 1.0, mask, noise)
    out2 = fn(other, x_T, 6, generator=torch.Generator().manual_seed(2))
    assert (out2 - out)[~keep].abs().mean() > 1e-3


def test_ddim_inversion_round_trip():
    s = schedule(1000)
    den = gaussian_denoiser(s)
    z0 = MU + S * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = {}
    for steps in (5, 100):
        x_T = editing.ddim_invert(den, z0, steps)
        rec = get_sampler("ddim")(den, x_T, steps)
        errors[steps] = float((rec - z0).abs().max())
        # the inverted latent is noise-like: mean ≈ 0, std ≈ 1 (the data was N(0.5, 0.49))
        assert abs(float(x_T.mean())) < 0.3 and 0.6 < float(x_T.std()) < 1.4
    # first order in the step size: 0.46 at 5 steps, 0.023 at 100 (measured) for this exact ε-predictor
    assert errors[100] < 0.03 and errors[100] < errors[5] / 10


def test_slerp_endpoints_norms_and_midpoint():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(editing.slerp(a, b, 0.0), a)
    torch.testing.assert_close(editing.slerp(a, b, 1.0), b)
    b = b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    for t in (0.25, 0.5, 0.8):  # equal norms stay equal all along the arc (a lerp would shrink them)
        mid = editing.slerp(a, b, t)
        torch.testing.assert_close(mid.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-4)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(editing.slerp(e1, e2, 0.5), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    torch.testing.assert_close(editing.slerp(e1, 2 * e1, 0.5), 1.5 * e1)  # parallel: linear
    with pytest.raises(ValueError, match="equal shapes"):
        editing.slerp(e1, torch.zeros(1, 3), 0.5)


def test_repaint_resampling_keeps_the_known_region_and_resamples():
    s = schedule()
    g = torch.Generator().manual_seed(4)
    z_known = torch.randn(1, 4, 6, 6, generator=g)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3, :] = 1
    noise, x_T = torch.randn(z_known.shape, generator=g), torch.randn(z_known.shape, generator=g)
    den = editing.KnownRegionDenoiser(random_denoiser(s), z_known, mask, noise)
    one = editing.repaint_ddim(den, x_T, 6, resample=1)
    torch.testing.assert_close(one, get_sampler("ddim")(den, x_T, 6), rtol=0, atol=0)  # resample 1 = DDIM
    calls = []
    counting = editing.KnownRegionDenoiser(
        Denoiser(lambda x, t: (calls.append(1), random_denoiser(s).model_fn(x, t))[1], s), z_known, mask, noise)
    three = editing.repaint_ddim(counting, x_T, 6, resample=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 5 * 3 + 1  # every step three times, the last one (to the data) once
    keep = (mask == 0).expand_as(three)
    assert (three - z_known)[keep].abs().max().item() == 0.0
    assert (three - one)[~keep].abs().mean() > 1e-3
    with pytest.raises(ValueError, match="resample must be"):
        editing.repaint_ddim(den, x_T, 6, resample=0)
