"""k-diffusion-style samplers on the Karras et al. (2022) σ schedule, in the VE view x = x0 + σ ε.

Convention (k-diffusion's, also diffusers' for "linspace"/"trailing" spacing): the sampler starts from
x = x_T · σ_max, not x_T · √(σ_max² + 1); at σ_max ≈ 157 (linear) or 14.6 (scaled_linear) the two differ
by < 0.3 %. The network is called through `Denoiser.denoise_sigma` at the continuous timestep of each σ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.samplers.common import Callback, randn_like, step_range
from ldm.diffusion.samplers.spacing import as_steps
from ldm.diffusion.schedule import NoiseSchedule


def karras_sigmas(
    schedule: NoiseSchedule, steps: int, rho: float = 7.0,
    sigma_min: float | None = None, sigma_max: float | None = None,
) -> Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..n−1, then a final 0 (float64,
    length steps + 1). σ_min / σ_max default to the training schedule's σ at t = 0 and t = T−1."""
    steps = as_steps(steps)
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    table = schedule.sigmas
    lo = float(table[0]) if sigma_min is None else float(sigma_min)
    hi = float(table[-1]) if sigma_max is None else float(sigma_max)
    if not math.isfinite(hi):
        raise ValueError(
            "Karras samplers need a finite σ_max, but this schedule has zero_terminal_snr=True (ᾱ_T = 0, "
            "σ_max = ∞). Pass sigma_max=<finite value>, or use 'ddim' / 'ddpm' / 'dpmpp_2m' with "
            "spacing='trailing'."
        )
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_rho = 1.0 / rho
    sigmas = (hi**inv_rho + ramp * (lo**inv_rho - hi**inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _sigma_grid(denoiser: Denoiser, steps: int, rho: float, sigma_min, sigma_max, sigmas) -> Tensor:
    if sigmas is None:
        return karras_sigmas(denoiser.schedule, steps, rho, sigma_min, sigma_max)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if len(sigmas) != steps + 1 or float(sigmas[-1]) != 0 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError(f"sigmas must be {steps + 1} decreasing values ending in 0 (steps={steps})")
    return sigmas


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) splitting the step σ → σ_next into a deterministic part and fresh noise."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _euler_loop(denoiser, x_T, grid, eta, generator, callback, progress, name) -> Tensor:
    """Euler step down to σ_down, then fresh noise of std σ_up (σ_up = 0 when η = 0)."""
    x = x_T * float(grid[0])
    for i in step_range(len(grid) - 1, progress, name):
        sigma, sigma_next = float(grid[i]), float(grid[i + 1])
        x0 = denoiser.denoise_sigma(x, sigma)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "x0": x0})
        down, up = _ancestral_step(sigma, sigma_next, eta)
        x = x + (x - x0) / sigma * (down - sigma)
        if up > 0:
            x = x + up * randn_like(x, generator)
    return x


@torch.no_grad()
def euler(
    denoiser: Denoiser, x_T: Tensor, steps: int, *,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None, sigmas=None,
) -> Tensor:
    """Euler on the probability-flow ODE dx/dσ = (x − x̂0)/σ (Karras et al. 2022, Alg. 1 without churn).
    `sigmas` (steps + 1 values ending in 0) overrides the Karras schedule. Deterministic."""
    grid = _sigma_grid(denoiser, steps, rho, sigma_min, sigma_max, sigmas)
    return _euler_loop(denoiser, x_T, grid, 0.0, generator, callback, progress, "euler")


@torch.no_grad()
def euler_ancestral(
    denoiser: Denoiser, x_T: Tensor, steps: int, *,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    eta: float = 1.0, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None,
    sigmas=None,
) -> Tensor:
    """Euler ancestral: σ_up = min(σ_next, η √(σ_next² (σ² − σ_next²) / σ²)) of fresh noise per step,
    σ_down = √(σ_next² − σ_up²) by Euler (η = 1: the ancestral step, η = 0: plain Euler)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    grid = _sigma_grid(denoiser, steps, rho, sigma_min, sigma_max, sigmas)
    return _euler_loop(denoiser, x_T, grid, eta, generator, callback, progress, "euler_a")


@torch.no_grad()
def heun(
    denoiser: Denoiser, x_T: Tensor, steps: int, *,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None, sigmas=None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step (to σ = 0) is Euler, so it costs
    2·steps − 1 network calls. Deterministic: `generator` is accepted for the common signature only."""
    grid = _sigma_grid(denoiser, steps, rho, sigma_min, sigma_max, sigmas)
    x = x_T * float(grid[0])
    for i in step_range(len(grid) - 1, progress, "heun"):
        sigma, sigma_next = float(grid[i]), float(grid[i + 1])
        x0 = denoiser.denoise_sigma(x, sigma)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "x0": x0})
        d = (x - x0) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = (x_euler - denoiser.denoise_sigma(x_euler, sigma_next)) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x
