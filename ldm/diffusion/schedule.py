"""Noise schedules and closed-form quantities of the forward process q(x_t | x_0).

Timesteps are 0-based: t = 0 is the first noising step, t = T-1 the last (as in iDDPM and diffusers).
All tables are computed in float64 from the config (never loaded from a checkpoint) and gathered per call
into the dtype/device of the tensor they multiply.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("eps", "x0", "v")


def make_betas(
    name: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> Tensor:
    """β_1..β_T (float64) for a named schedule.

    linear: DDPM, β linearly spaced 1e-4 → 2e-2. scaled_linear: Stable Diffusion, √β linearly spaced
    √0.00085 → √0.012. cosine: iDDPM, ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at `max_beta`.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    T = num_timesteps
    if name == "linear":
        b0 = 1e-4 if beta_start is None else beta_start
        b1 = 2e-2 if beta_end is None else beta_end
        return torch.linspace(b0, b1, T, dtype=torch.float64)
    if name == "scaled_linear":
        b0 = 0.00085 if beta_start is None else beta_start
        b1 = 0.012 if beta_end is None else beta_end
        return torch.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=torch.float64) ** 2
    if name == "cosine":
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
        return betas.clamp(max=max_beta)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ so that ᾱ_T = 0 while keeping ᾱ_1 (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """The forward process for a fixed β sequence, with its derived tables.

    Not an nn.Module on purpose: nothing here is learned or saved; it is rebuilt from config.
    """

    def __init__(self, betas: Tensor):
        betas = betas.detach().to("cpu", torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence in (0, 1]")
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0): variance β̃_t and mean coefficients (DDPM eq. 7).
        denom = 1 - self.alphas_cumprod
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / denom
        # β̃_0 = 0, so log-variance is clipped to β̃_1 at t = 0 (as in DDPM / iDDPM).
        pv = self.posterior_variance
        first = pv[1:2] if len(pv) > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, pv[1:]]))
        self.log_betas = betas.log()
        # "fixed_large" variance: β_t, with β_1 replaced by β̃_2 so the t = 0 term stays finite (iDDPM).
        self.log_betas_large = torch.log(torch.cat([first, betas[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / denom
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / denom
        self._device_cache: dict[tuple, dict[str, Tensor]] = {}

    @classmethod
    def from_config(
        cls,
        name: str = "linear",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        **kwargs,
    ) -> NoiseSchedule:
        betas = make_betas(name, num_timesteps, **kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        sched = cls(betas)
        sched.name = name
        sched.zero_terminal_snr = zero_terminal_snr
        return sched

    name: str = "custom"
    zero_terminal_snr: bool = False

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.name!r}, T={self.num_timesteps}, zero_terminal_snr={self.zero_terminal_snr})"

    # ---- gathering -------------------------------------------------------------------------------
    def table(self, name: str, device: torch.device | str | None = None) -> Tensor:
        """A named float64 table (float32 on devices without float64), cached per device."""
        device = torch.device(device or "cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64
        cache = self._device_cache.setdefault((device.type, device.index), {})
        if name not in cache:
            cache[name] = getattr(self, name).to(device=device, dtype=dtype)
        return cache[name]

    def gather(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """table[t] shaped (B, 1, 1, ...) to broadcast against `like`, in like's dtype."""
        t = torch.as_tensor(t, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        out = self.table(name, like.device)[t.long()]
        return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    # ---- forward process -------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        return self.gather("sqrt_alphas_cumprod", t, x0) * x0 + \
            self.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_t | x_0)."""
        mean = self.gather("sqrt_alphas_cumprod", t, x0) * x0
        var = 1 - self.gather("alphas_cumprod", t, x0)
        return mean, var.expand_as(x0)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.gather("posterior_mean_coef1", t, x_t) * x0 + self.gather("posterior_mean_coef2", t, x_t) * x_t
        var = self.gather("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self.gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t), shape (B,)."""
        ab = self.table("alphas_cumprod", torch.as_tensor(t).device)[torch.as_tensor(t).long()]
        return ab / (1 - ab)

    # ---- parameterizations -----------------------------------------------------------------------
    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (x_t - self.gather("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / \
            self.gather("sqrt_alphas_cumprod", t, x_t)

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (x_t - self.gather("sqrt_alphas_cumprod", t, x_t) * x0) / \
            self.gather("sqrt_one_minus_alphas_cumprod", t, x_t)

    def v_target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = √ᾱ ε − √(1-ᾱ) x0 (Salimans & Ho 2022)."""
        return self.gather("sqrt_alphas_cumprod", t, x0) * eps - \
            self.gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self.gather("sqrt_alphas_cumprod", t, x_t) * x_t - \
            self.gather("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self.gather("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + \
            self.gather("sqrt_alphas_cumprod", t, x_t) * v

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
        """(x0, ε) implied by a model prediction of the given type."""
        if prediction_type == "eps":
            return self.x0_from_eps(x_t, t, pred), pred
        if prediction_type == "x0":
            return pred, self.eps_from_x0(x_t, t, pred)
        if prediction_type == "v":
            return self.x0_from_v(x_t, t, pred), self.eps_from_v(x_t, t, pred)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The regression target for a prediction type."""
        if prediction_type == "eps":
            return eps
        if prediction_type == "x0":
            return x0
        if prediction_type == "v":
            return self.v_target(x0, t, eps)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")

    # ---- σ view (k-diffusion / Karras samplers) ----------------------------------------------------
    @property
    def sigmas(self) -> Tensor:
        """σ_t = √((1-ᾱ_t)/ᾱ_t): x_t/√ᾱ_t = x_0 + σ_t ε."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for σ by linear interpolation in log σ (as k-diffusion)."""
        log_sigmas = self.table("sigmas", sigma.device).log()
        log_sigma = sigma.to(log_sigmas.dtype).clamp(min=1e-10).log()
        idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).to(sigma.dtype)


def check_prediction_type(schedule: NoiseSchedule, prediction_type: str) -> None:
    """Reject combinations that cannot work, naming the option."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if schedule.zero_terminal_snr and prediction_type == "eps":
        raise ValueError(
            "zero_terminal_snr=True with prediction_type='eps' cannot work: at ᾱ_T = 0 the ε-prediction "
            "carries no information about x0. Use prediction_type='v' (as Lin et al. 2023) or 'x0'."
        )
