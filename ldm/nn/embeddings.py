"""Timestep and class embeddings of the diffusion U-Net."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin] halves as in LDM; timesteps may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32,
                                                                   device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def as_batch_timesteps(timesteps: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    """Scalars, (1,) and (B,) timesteps -> a (B,) tensor on `device`."""
    t = torch.as_tensor(timesteps, device=device)
    if t.ndim == 0 or t.shape == (1,):
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def label_embedding(num_classes: int | str | None, embed_dim: int,
                    adm_in_channels: int | None = None) -> nn.Module | None:
    """Class/vector conditioning added to the time embedding, named as in LDM/SD2/SDXL (`label_emb`).

    int -> nn.Embedding (class labels); "continuous" -> Linear(1, D); "sequential" -> MLP over an
    `adm_in_channels` vector (SD2 unCLIP/upscaler, SDXL size/crop conditioning).
    """
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, str)):
        raise ValueError(f"num_classes must be an int, 'continuous', 'sequential' or None, got {num_classes!r}")
    if isinstance(num_classes, int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        return nn.Embedding(num_classes, embed_dim)
    if num_classes == "continuous":
        return nn.Linear(1, embed_dim)
    if num_classes == "sequential":
        if not adm_in_channels:
            raise ValueError("num_classes='sequential' needs adm_in_channels (the conditioning vector size)")
        return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, embed_dim), nn.SiLU(),
                                           nn.Linear(embed_dim, embed_dim)))
    raise ValueError(f"unknown num_classes {num_classes!r}: use an int, 'continuous' or 'sequential'")
