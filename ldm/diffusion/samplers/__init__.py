"""Samplers, one function per method, all called as
`fn(denoiser, x_T, steps, *, generator=None, callback=None, progress=False, **options) -> x0`.

x_T is N(0, I) noise (Karras samplers scale it by σ_max themselves). callback receives
dict(i=, t= or sigma=, x=, x0=) once per step: x is the step's input in the sampler's own space
(VE x0 + σε for the Karras samplers), x0 the data predicted from it.
"""

from __future__ import annotations

from collections.abc import Callable

from ldm.diffusion.samplers.ddim import ddim
from ldm.diffusion.samplers.ddpm import ddpm
from ldm.diffusion.samplers.dpm_solver import dpmpp_2m
from ldm.diffusion.samplers.karras import euler, euler_ancestral, heun, karras_sigmas
from ldm.diffusion.samplers.spacing import SPACINGS, respace, respaced_denoiser, spaced_timesteps

SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpmpp_2m": dpmpp_2m,
    "euler": euler,
    "euler_a": euler_ancestral,
    "heun": heun,
}


def get_sampler(name: str) -> Callable:
    """The sampler registered under `name`."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


__all__ = [
    "SAMPLERS", "SPACINGS", "get_sampler", "ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral", "heun",
    "karras_sigmas", "respace", "respaced_denoiser", "spaced_timesteps",
]
