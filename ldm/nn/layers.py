"""Small shared layers of the diffusion U-Net."""

from __future__ import annotations

import math

from torch import nn


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with `groups` groups (LDM: 32), fewer for narrow layers (the largest common divisor)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (LDM's init for residual-branch output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
