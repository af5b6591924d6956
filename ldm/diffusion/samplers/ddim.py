"""DDIM sampling (Song et al. 2021): η = 0 deterministic, η = 1 has DDPM's posterior variance."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers.common import Callback, randn_like, step_range, timestep_batch
from ldm.diffusion.samplers.spacing import spaced_timesteps


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x_T: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    eta: float = 0.0,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> Tensor:
    """x_prev = √ᾱ_prev x̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ z, σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_prev).

    "prev" is the next timestep of the spaced sequence; after the last one ᾱ_prev = 1, so the result is
    the final x̂0 (diffusers' set_alpha_to_one=True). callback gets i, t, x (input), x0."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ab_table = denoiser.schedule.alphas_cumprod
    ts = spaced_timesteps(denoiser.schedule.num_timesteps, steps, spacing, steps_offset)
    x = x_T
    for i in step_range(len(ts), progress, "ddim"):
        t = int(ts[i])
        ab = float(ab_table[t])
        ab_prev = float(ab_table[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        out = denoiser(x, timestep_batch(t, x))
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": out.x0})
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) if ab_prev < 1 else 0.0
        x = math.sqrt(ab_prev) * out.x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * out.eps
        if sigma > 0:
            x = x + sigma * randn_like(x, generator)
    return x
