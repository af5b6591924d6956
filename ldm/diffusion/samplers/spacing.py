"""Which training timesteps a sampler visits, and the schedule respaced onto them (iDDPM).

Spacings follow diffusers' `timestep_spacing` (Lin et al. 2023, Table 2), all 0-based and returned
in descending order (the order a sampler visits them):

- "leading":  arange(0, steps) · (T // steps) + offset        (diffusers' default for DDIM/DDPM)
- "trailing": round(T − k · T / steps) − 1, k = 0..steps−1    (starts at T−1; use it with zero-terminal SNR)
- "linspace": round(linspace(0, T−1, steps))
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedule import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")


def as_steps(steps) -> int:
    """`steps` as an int (any integer type, not bool or float), else a clear error."""
    try:
        if isinstance(steps, bool):
            raise TypeError
        return operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be an integer, got {steps!r}") from None


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading", offset: int = 0) -> Tensor:
    """`steps` distinct training timesteps (int64, descending) chosen by `spacing`."""
    T = int(num_timesteps)
    steps = as_steps(steps)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the training timesteps), got {steps!r}")
    if offset and spacing != "leading":
        raise ValueError(f"steps_offset={offset} only applies to spacing='leading' (as in diffusers)")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.int64) * (T // steps) + int(offset)
    elif spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(f"timesteps out of range [0, {T - 1}] (steps={steps}, spacing={spacing!r}, "
                         f"offset={offset})")
    return ts.sort(descending=True).values


def respace(schedule: NoiseSchedule, timesteps: Tensor) -> NoiseSchedule:
    """The schedule whose ᾱ sequence is ᾱ at `timesteps` (any order), with β_i = 1 − ᾱ_i / ᾱ_{i−1}
    recomputed for the subsequence (iDDPM's SpacedDiffusion). Index i ↔ the i-th smallest timestep."""
    ts = torch.as_tensor(timesteps).long().unique(sorted=True)
    ab = schedule.alphas_cumprod[ts]
    prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    betas = 1 - ab / prev
    if ts.numel() == schedule.num_timesteps:  # plain DDPM: keep the training betas exactly
        betas = schedule.betas
    out = NoiseSchedule(betas)
    out.name = f"{schedule.name}[respaced {ts.numel()}/{schedule.num_timesteps}]"
    out.zero_terminal_snr = schedule.zero_terminal_snr
    return out


def respaced_denoiser(denoiser: Denoiser, timesteps: Tensor) -> Denoiser:
    """A Denoiser on `respace(schedule, timesteps)` whose model_fn maps new indices back to the original
    timesteps. With all T timesteps it is `denoiser` itself."""
    ts = torch.as_tensor(timesteps).long().unique(sorted=True)
    if ts.numel() == denoiser.schedule.num_timesteps:
        return denoiser
    inner = denoiser.model_fn

    def model_fn(x: Tensor, i: Tensor) -> Tensor:
        i = torch.as_tensor(i, device=x.device).long()
        return inner(x, ts.to(x.device)[i])

    out = copy.copy(denoiser)  # keeps the class: a wrapper (e.g. editing.KnownRegionDenoiser) stays one
    out.model_fn, out.schedule = model_fn, respace(denoiser.schedule, ts)
    return out
