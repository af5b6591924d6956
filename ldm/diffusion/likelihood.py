"""Variational bound pieces (DDPM / iDDPM): Gaussian KL, discretized decoder likelihood, per-t VLB terms and
the full bound in bits/dim.

All VLB quantities are in bits per dimension: per-sample means over the non-batch dims, divided by ln 2.
The decoder likelihood assumes 8-bit data scaled to [-1, 1]; on latents it is not an image's bits/dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser

_LN2 = math.log(2.0)
_BIN_HALF_WIDTH = 1.0 / 255.0  # 256 levels over [-1, 1]: bins of width 2/255 centred on the levels
_TINY = 1e-12


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dims: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats; arguments broadcast (floats ok)."""
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor))
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
                                      for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) by the tanh approximation of DDPM/iDDPM (max abs error ≈ 2e-4), kept for comparable numbers."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: Tensor, means: Tensor, log_scales: Tensor, *, exact_cdf: bool = False
) -> Tensor:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under N(means, e^{2 log_scales})
    integrated over each value's bin [x − 1/255, x + 1/255]; the edge bins extend to ∓∞ so the 256
    probabilities sum to one. `exact_cdf` uses torch.special.ndtr instead of the DDPM tanh approximation."""
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have one shape, got {x.shape}, {means.shape}, {log_scales.shape}"
        )
    cdf = torch.special.ndtr if exact_cdf else approx_standard_normal_cdf
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = cdf(inv_std * (centered + _BIN_HALF_WIDTH))
    cdf_lower = cdf(inv_std * (centered - _BIN_HALF_WIDTH))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_TINY))  # lowest bin: (-∞, x + 1/255]
    log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=_TINY))  # highest bin: [x - 1/255, ∞)
    log_mid = torch.log((cdf_upper - cdf_lower).clamp(min=_TINY))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


def prior_bpd(schedule, x0: Tensor) -> Tensor:
    """L_T: KL(q(x_T | x0) || N(0, I)) per sample, bits/dim. Zero with a zero-terminal-SNR schedule."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, device=x0.device, dtype=torch.long)
    mean, var = schedule.q_mean_variance(x0, t)
    return mean_flat(normal_kl(mean, torch.log(var), 0.0, 0.0)) / _LN2


def vlb_terms(denoiser: Denoiser, x0: Tensor, x_t: Tensor, t: Tensor, out=None) -> Tensor:
    """Per-sample VLB term (bits/dim) at x_t ~ q(x_t | x0): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
    the decoder NLL −log p(x0 | x_1) for t == 0. `out` reuses an existing DenoiserOutput for x_t."""
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    true_mean, _, true_log_var = denoiser.schedule.q_posterior(x0, x_t, t)
    mean, log_var, _ = denoiser.p_mean_variance(x_t, t, out)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / _LN2
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / _LN2
    return torch.where(t == 0, nll, kl)


def timestep_subset(T: int, k: int, spacing: str = "uniform") -> tuple[Tensor, Tensor]:
    """t = 0 and up to k−1 timesteps t ≥ 1 with quadrature weights for Σ_{t=1}^{T−1} L_t: "uniform" spaces them
    evenly (weight (T−1)/(k−1) each); "quadratic" crowds them near t = 1, where the terms of a trained model change
    fastest, each weighted by the number of t ≥ 1 nearer to it than to any other chosen t (weights sum to T−1).
    Returns (timesteps (K,), weights (K,)), weight 1 for t = 0."""
    if spacing not in ("uniform", "quadratic"):
        raise ValueError(f"spacing must be uniform or quadratic, got {spacing!r}")
    u = torch.linspace(0, 1, k - 1, dtype=torch.float64)
    rest = (1 + (T - 2) * (u if spacing == "uniform" else u**2)).round().long().unique()
    if spacing == "uniform":
        w = torch.full((len(rest),), (T - 1) / len(rest), dtype=torch.float64)
    else:
        all_t = torch.arange(1, T, dtype=torch.float64)
        nearest = (all_t[:, None] - rest[None].double()).abs().argmin(dim=1)  # ties go to the smaller t
        w = torch.bincount(nearest, minlength=len(rest)).double()
    return torch.cat([torch.zeros(1, dtype=torch.long), rest]), torch.cat([torch.ones(1, dtype=torch.float64), w])


@torch.no_grad()
def bits_per_dim(
    denoiser: Denoiser,
    x0: Tensor,
    num_timesteps: int | None = None,
    generator: torch.Generator | None = None,
    *,
    batch_size: int = 256,
    return_terms: bool = False,
    spacing: str = "uniform",
):
    """The variational bound L_0 + Σ_{t≥1} L_t + L_T (bits/dim, per sample) of 8-bit data x0 in [-1, 1].

    num_timesteps=None evaluates every t (the bound itself, stochastic only through x_t ~ q(x_t|x0));
    an int K ≥ 2 evaluates t = 0 and K−1 timesteps t ≥ 1 placed by `spacing` (see `timestep_subset`) and sums
    their terms with its quadrature weights (an estimate; uniform: the sum scaled by (T−1)/(K−1)).
    Up to `batch_size` network evaluations run per call. With return_terms, returns a dict with "total",
    "prior", "terms" (B, K), "timesteps" (K,) and "weights" (K,).
    """
    T = denoiser.schedule.num_timesteps
    B = x0.shape[0]
    if num_timesteps is None or num_timesteps >= T:
        ts, weights = torch.arange(T), torch.ones(T, dtype=torch.float64)
    elif num_timesteps < 2 or T < 2:
        raise ValueError(f"num_timesteps must be None or >= 2, got {num_timesteps}")
    else:
        ts, weights = timestep_subset(T, num_timesteps, spacing)
    ts, weights = ts.to(x0.device), weights.to(x0.device, x0.dtype)
    K = len(ts)
    # Flatten (t, sample) pairs into chunks of whole copies of the batch: row i is (ts[i // B], x0[i % B]).
    per_chunk = max(1, batch_size // B)
    terms = torch.empty(K, B, dtype=x0.dtype, device=x0.device)
    for start in range(0, K, per_chunk):
        tk = ts[start:start + per_chunk]
        x0_rep = x0.repeat(len(tk), *([1] * (x0.ndim - 1)))
        t_rep = tk.repeat_interleave(B)
        noise = torch.randn(x0_rep.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = denoiser.schedule.q_sample(x0_rep, t_rep, noise)
        terms[start:start + len(tk)] = vlb_terms(denoiser, x0_rep, x_t, t_rep).reshape(len(tk), B)
    terms = terms.T  # (B, K)
    prior = prior_bpd(denoiser.schedule, x0)
    total = prior + terms @ weights
    if return_terms:
        return {"total": total, "prior": prior, "terms": terms, "timesteps": ts, "weights": weights}
    return total
