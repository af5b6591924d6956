"""Training objectives: L_simple with ε / x0 / v targets, Min-SNR-γ weighting, offset noise and the iDDPM
hybrid loss for learned variances. Pure torch; the LightningModule calls the network and hands us its output.

The VLB pieces (normal_kl, discretized likelihood, vlb_terms, bits_per_dim) live in `likelihood.py` and are
re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm import rng
from ldm.diffusion.denoiser import VARIANCE_TYPES, Denoiser
from ldm.diffusion.likelihood import (  # noqa: F401  (re-exported)
    approx_standard_normal_cdf,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    prior_bpd,
    vlb_terms,
)
from ldm.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule, check_prediction_type

LOSS_TYPES = ("l2", "l1")


def _check_options(schedule, prediction_type, variance_type, loss_type, min_snr_gamma) -> None:
    check_prediction_type(schedule, prediction_type)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {VARIANCE_TYPES}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be None or > 0, got {min_snr_gamma}")


def regression_loss(pred: Tensor, target: Tensor, loss_type: str = "l2") -> Tensor:
    """Per-sample mean squared ("l2") or absolute ("l1") error over the non-batch dims, (B,)."""
    if loss_type == "l2":
        return mean_flat((pred - target) ** 2)
    if loss_type == "l1":
        return mean_flat((pred - target).abs())
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023) for a target type, so that every type weighs the implied
    x0 error by min(SNR, γ): ε → min(SNR,γ)/SNR, v → min(SNR,γ)/(SNR+1), x0 → min(SNR,γ).

    Finite at SNR = 0 (zero terminal SNR): ε → 1 (its limit), v and x0 → 0.
    """
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction_type == "eps":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, γ)/SNR, and 1 (not 0/0) at SNR = 0
    if prediction_type == "v":
        return clipped / (snr + 1)
    if prediction_type == "x0":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def offset_noise(like: Tensor, strength: float, generator: rng.Generator = None) -> Tensor:
    """ε + strength · δ with ε ~ N(0, I) shaped like `like` and δ ~ N(0, 1) per (sample, channel), broadcast
    over the spatial dims: lets the model change an image's mean brightness (Guttenberg 2023).
    strength=0 → plain ε."""
    noise = rng.randn(like.shape, generator, device=like.device, dtype=like.dtype)
    if strength:
        offset_shape = (*like.shape[:2], *([1] * (like.ndim - 2)))
        offset = rng.randn(offset_shape, generator, device=like.device, dtype=like.dtype)
        noise = noise + strength * offset
    return noise


def training_losses(
    raw_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "eps",
    variance_type: str = "fixed_small",
    loss_type: str = "l2",
    min_snr_gamma: float | None = None,
    vlb_weight: float = 1e-3,
) -> dict[str, Tensor]:
    """Per-sample loss terms (B,) for one noised batch x_t = q_sample(x0, t, noise).

    raw_output is the network's output at (x_t, t): C channels, or 2C for "learned_range" (mean part
    first, then iDDPM interpolation values). Returns {"loss", "simple"} and, for learned_range, "vlb": the
    hybrid loss is simple + λ·T·L_t, where T·L_t (L_t in bits/dim at the sampled t) is the one-sample
    estimate of the full bound Σ_t L_t and λ = vlb_weight. With λ = 1e-3 this is iDDPM's "rescaled MSE"
    (vb · T/1000) exactly. The VLB term sees the mean prediction through a stop-gradient, so it trains
    only the variance (iDDPM §3.1). Min-SNR-γ (if set) weighs the simple term only.
    """
    _check_options(schedule, prediction_type, variance_type, loss_type, min_snr_gamma)
    t = torch.as_tensor(t, device=x0.device).long().expand(x0.shape[0])
    channels = x0.shape[1] * (2 if variance_type == "learned_range" else 1)
    if raw_output.shape != (x0.shape[0], channels, *x0.shape[2:]):
        raise ValueError(
            f"raw_output has shape {tuple(raw_output.shape)}; variance_type={variance_type!r} expects "
            f"{(x0.shape[0], channels, *x0.shape[2:])} for x0 of shape {tuple(x0.shape)}"
        )
    pred = raw_output[:, : x0.shape[1]]
    target = schedule.target(x0, noise, t, prediction_type)
    simple = regression_loss(pred, target, loss_type)
    if min_snr_gamma is not None:
        simple = simple * min_snr_weight(schedule.snr(t), min_snr_gamma, prediction_type).to(simple.dtype)
    terms = {"simple": simple}
    loss = simple
    if variance_type == "learned_range":
        frozen = torch.cat([pred.detach(), raw_output[:, x0.shape[1]:]], dim=1)
        frozen_denoiser = Denoiser(lambda *_: frozen, schedule, prediction_type, variance_type)
        terms["vlb"] = vlb_terms(frozen_denoiser, x0, x_t, t)
        loss = loss + vlb_weight * schedule.num_timesteps * terms["vlb"]
    terms["loss"] = loss
    return terms


def diffusion_training_loss(
    raw_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "eps",
    variance_type: str = "fixed_small",
    loss_type: str = "l2",
    min_snr_gamma: float | None = None,
    vlb_weight: float = 1e-3,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training-step entry point: (scalar loss to backprop, detached scalar logs). See `training_losses`.

    Logs: "loss", "loss_simple" (after Min-SNR weighting), "mse" (unweighted target MSE) and, for learned
    variances, "loss_vlb" (mean L_t in bits/dim at the sampled t, before the λ·T scale).
    """
    terms = training_losses(
        raw_output, x0, x_t, t, noise, schedule, prediction_type=prediction_type, variance_type=variance_type,
        loss_type=loss_type, min_snr_gamma=min_snr_gamma, vlb_weight=vlb_weight,
    )
    loss = terms["loss"].mean()
    with torch.no_grad():
        pred = raw_output[:, : x0.shape[1]]
        logs = {
            "loss": loss.detach(),
            "loss_simple": terms["simple"].mean().detach(),
            "mse": regression_loss(pred, schedule.target(x0, noise, t, prediction_type), "l2").mean(),
        }
        if "vlb" in terms:
            logs["loss_vlb"] = terms["vlb"].mean().detach()
    return loss, logs
