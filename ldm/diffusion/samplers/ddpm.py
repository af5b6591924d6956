"""Ancestral DDPM sampling (Ho et al. 2020) over respaced timesteps (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers.common import Callback, randn_like, step_range, timestep_batch
from ldm.diffusion.samplers.spacing import respaced_denoiser, spaced_timesteps


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x_T: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> Tensor:
    """x_{t−1} ~ p_θ(x_{t−1} | x_t) with the denoiser's variance type (fixed_small / fixed_large /
    learned_range); with steps < T the betas are recomputed for the visited timesteps. The last step
    returns the posterior mean (no noise). callback gets i, t (original timestep), x (input), x0."""
    ts = spaced_timesteps(denoiser.schedule.num_timesteps, steps, spacing, steps_offset)
    spaced = respaced_denoiser(denoiser, ts)
    x = x_T
    n = len(ts)
    for i in step_range(n, progress, "ddpm"):
        k = n - 1 - i  # index into the respaced schedule (k = 0 is the smallest timestep)
        mean, log_var, out = spaced.p_mean_variance(x, timestep_batch(k, x))
        if callback is not None:
            callback({"i": i, "t": int(ts[i]), "x": x, "x0": out.x0})
        x = mean + (0.5 * log_var).exp() * randn_like(x, generator) if k > 0 else mean
    return x
