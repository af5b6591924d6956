"""Wrap a network once: parameterization (ε / x0 / v) and variance type, for every sampler and the VLB.

A sampler never looks at what the network predicts; it asks the `Denoiser` for x0, ε and the reverse
variance. Classifier-free guidance and conditioning are folded into `model_fn` before it gets here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule, check_prediction_type

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> raw network output


@dataclass
class DenoiserOutput:
    pred: Tensor  # the network's mean prediction in its own parameterization
    x0: Tensor
    eps: Tensor
    var_values: Tensor | None  # learned_range: raw interpolation values in [-1, 1] (iDDPM), else None


def convert_prediction(
    pred: Tensor, x_t: Tensor, sqrt_ab: Tensor, sqrt_1mab: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x0, ε) from a prediction, given √ᾱ and √(1-ᾱ) broadcastable to x_t."""
    if prediction_type == "eps":
        return (x_t - sqrt_1mab * pred) / sqrt_ab, pred
    if prediction_type == "x0":
        return pred, (x_t - sqrt_ab * pred) / sqrt_1mab
    if prediction_type == "v":
        return sqrt_ab * x_t - sqrt_1mab * pred, sqrt_1mab * x_t + sqrt_ab * pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


class Denoiser:
    """model_fn(x_t, t) → x0, ε (and learned variance) under a schedule.

    `clip_x0` clamps the predicted x0 (e.g. 1.0 for pixel-space data in [-1, 1]; None for latents).
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: NoiseSchedule,
        prediction_type: str = "eps",
        variance_type: str = "fixed_small",
        clip_x0: float | None = None,
    ):
        check_prediction_type(schedule, prediction_type)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {VARIANCE_TYPES}")
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.clip_x0 = clip_x0

    @property
    def learned_variance(self) -> bool:
        return self.variance_type == "learned_range"

    def _finish(self, raw: Tensor, x_t: Tensor, sqrt_ab: Tensor, sqrt_1mab: Tensor) -> DenoiserOutput:
        var_values = None
        if self.learned_variance:
            raw, var_values = raw.chunk(2, dim=1)
        x0, eps = convert_prediction(raw, x_t, sqrt_ab, sqrt_1mab, self.prediction_type)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x_t - sqrt_ab * x0) / sqrt_1mab
        return DenoiserOutput(pred=raw, x0=x0, eps=eps, var_values=var_values)

    def __call__(self, x_t: Tensor, t: Tensor) -> DenoiserOutput:
        """At integer timesteps t (B,) of the training schedule."""
        s = self.schedule
        raw = self.model_fn(x_t, t)
        return self._finish(
            raw, x_t, s.gather("sqrt_alphas_cumprod", t, x_t), s.gather("sqrt_one_minus_alphas_cumprod", t, x_t)
        )

    def denoise_sigma(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x0 from the variance-exploding view x = x0 + σ ε, at any σ (continuous t for the network)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).expand(x.shape[0])
        sqrt_ab = (1 / (1 + sigma**2).sqrt()).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sqrt_1mab = (sigma / (1 + sigma**2).sqrt()).to(x.dtype).reshape_as(sqrt_ab)
        x_t = x * sqrt_ab
        t = self.schedule.sigma_to_t(sigma).to(x.dtype)
        return self._finish(self.model_fn(x_t, t), x_t, sqrt_ab, sqrt_1mab).x0

    def p_mean_variance(self, x_t: Tensor, t: Tensor, out: DenoiserOutput | None = None):
        """Mean and (log-)variance of p_θ(x_{t-1} | x_t): posterior mean at predicted x0, and the
        variance of `variance_type`. Returns (mean, log_variance, out)."""
        s = self.schedule
        out = out if out is not None else self(x_t, t)
        mean, _, small_log = s.q_posterior(out.x0, x_t, t)
        if self.variance_type == "fixed_small":
            log_var = small_log
        else:
            # log β_t, with β_1 replaced by β̃_2 at t = 0 so that L_0 is well-defined (iDDPM).
            large_log = s.gather("log_betas_large", t, x_t).expand_as(x_t)
            if self.variance_type == "fixed_large":
                log_var = large_log
            else:
                frac = (out.var_values + 1) / 2
                log_var = frac * s.gather("log_betas", t, x_t) + (1 - frac) * small_log
        return mean, log_var, out
