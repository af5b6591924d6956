"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep solver of the probability-flow ODE in
data prediction (x̂0) form, stepping in log-SNR λ = log(α/σ) with x_t = α_t x0 + σ_t ε (VP view).

Defaults follow diffusers' DPMSolverMultistepScheduler (use_karras_sigmas=False): "linspace" timesteps
round(linspace(0, T−1, steps+1))[::-1][:-1] (spacing "leading" likewise drops t = 0 from steps+1 points;
"trailing" takes `steps` points from T−1), a last step to σ = 0, and first order on the first and last steps.
karras=True steps on the Karras σ schedule instead (k-diffusion's "DPM++ 2M Karras").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers.common import Callback, step_range, timestep_batch
from ldm.diffusion.samplers.karras import karras_sigmas
from ldm.diffusion.samplers.spacing import as_steps, spaced_timesteps


def dpm_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace", offset: int = 0) -> Tensor:
    """The `steps` timesteps DPM-Solver visits before its final step to σ = 0 (as diffusers)."""
    if spacing == "trailing":
        return spaced_timesteps(num_timesteps, steps, spacing, offset)
    steps = as_steps(steps)
    if not 1 <= steps < num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps - 1}] for spacing={spacing!r}, "
                         f"got {steps!r}")
    return spaced_timesteps(num_timesteps, steps + 1, spacing, offset)[:-1]


@torch.no_grad()
def dpmpp_2m(
    denoiser: Denoiser,
    x_T: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
    karras: bool = False,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """x_next = (σ_next/σ) x − α_next (e^{−h} − 1) D, h = λ_next − λ, D = (1 + 1/2r) x̂0 − (1/2r) x̂0_prev,
    r = h_prev / h (D = x̂0 on the first and last steps). Deterministic: `generator` is unused.
    callback gets i, t (or sigma with karras=True), x (input), x0."""
    schedule = denoiser.schedule
    if karras:
        ve = karras_sigmas(schedule, steps, rho, sigma_min, sigma_max)  # VE σ, ends in 0
        alphas = 1 / (1 + ve**2).sqrt()
        sigmas = ve * alphas
        points = ve[:-1].tolist()

        def denoise(x: Tensor, i: int) -> Tensor:
            return denoiser.denoise_sigma(x / float(alphas[i]), points[i])
    else:
        ts = dpm_timesteps(schedule.num_timesteps, steps, spacing, steps_offset)
        ab = schedule.alphas_cumprod[ts]
        alphas = torch.cat([ab.sqrt(), ab.new_ones(1)])
        sigmas = torch.cat([(1 - ab).sqrt(), ab.new_zeros(1)])
        points = ts.tolist()

        def denoise(x: Tensor, i: int) -> Tensor:
            return denoiser(x, timestep_batch(points[i], x)).x0

    alphas, sigmas = alphas.tolist(), sigmas.tolist()
    # λ = log(α/σ): −∞ where ᾱ = 0 (zero terminal SNR), +∞ at the final σ = 0
    lambdas = [math.log(a / s) if a > 0 else -math.inf for a, s in zip(alphas[:-1], sigmas[:-1], strict=True)]
    lambdas.append(math.inf)
    key = "sigma" if karras else "t"
    x, x0_prev = x_T, None
    for i in step_range(len(points), progress, "dpmpp_2m"):
        x0 = denoise(x, i)
        if callback is not None:
            callback({"i": i, key: points[i], "x": x, "x0": x0})
        if sigmas[i + 1] == 0:  # last step: first order straight to the data, x = α_next · x̂0
            x = alphas[i + 1] * x0
            break
        h = lambdas[i + 1] - lambdas[i]
        exp_neg_h = sigmas[i + 1] * alphas[i] / (sigmas[i] * alphas[i + 1])  # e^{−h}, exact at α = 0
        d = x0
        if x0_prev is not None:
            h_prev = lambdas[i] - lambdas[i - 1]
            if math.isfinite(h_prev):  # after a start at ᾱ = 0 (λ = −∞) stay first order
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * (exp_neg_h - 1) * d
        x0_prev = x0
    return x
