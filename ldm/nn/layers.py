"""Small layers shared by the diffusion U-Net and the autoencoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with `groups` groups (LDM: 32), fewer for narrow layers (the largest common divisor)."""
    return GroupNorm(math.gcd(groups, channels), channels, eps=eps)


# Channels-last GroupNorm on CPU. torch's own kernels for NHWC maps are several times slower than for NCHW ones in
# the backward pass (torch 2.13, 2 cores, 16×64×32×32: 2-3 ms vs 0.2-0.5 ms) and in the forward pass on small maps
# (16×128×16×16: 0.6-1 ms vs 0.1 ms), and their forward loses precision when a group's mean is large against its
# spread (a one-pass variance: mean 300, std 0.5 gives errors of 0.6 where the NCHW kernel's are 5e-5). Over the
# (N, H·W, C) view of an NHWC map, the statistics are reductions over the middle dimension and the output and the
# input gradient are one per-(sample, channel) affine map each, all vectorised along the contiguous channels:
# backward 2.9 → 0.5 ms at 16×64×32×32; forward 1.0 → 0.4 ms at 16×128×16×16, 0.2 → 0.4 ms at 16×64×32×32 (two
# passes for the variance, as exact as the NCHW kernel). Whole benchmark U-Net, paired runs: 32×32 training step
# −1.7 %, 32×32 sampling −3.5 %, 8×8 training −1.5 %.


def _channels_last_cpu(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and not torch.is_autocast_enabled("cpu"))


def _per_channel(t: Tensor, d: int) -> Tensor:
    """(N, G) per-group values -> (N, G·d): each group's value for each of its d channels."""
    return t.repeat_interleave(d, 1)


def _gn_forward_nhwc(x3: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float):
    """GroupNorm of the (N, HW, C) view of an NHWC map: y (N, HW, C), mean and 1/std (N, G). Two passes (mean,
    then the centred sum of squares), as exact as torch's kernel."""
    n, hw, c = x3.shape
    d = c // groups
    count = hw * d
    mean = x3.sum(1).view(n, groups, d).sum(-1) / count
    centred = x3 - _per_channel(mean, d)[:, None]
    var = torch.linalg.vecdot(centred, centred, dim=1).view(n, groups, d).sum(-1) / count
    rstd = (var + eps).rsqrt()
    scale = _per_channel(rstd, d)[:, None]
    if weight is not None:
        scale = scale * weight
    y = torch.mul(centred, scale) if bias is None else torch.addcmul(bias, centred, scale)
    return y, mean, rstd


class _GroupNormNHWC(torch.autograd.Function):
    """GroupNorm of an NHWC (channels-last) 4-D map with a backward pass over its (N, HW, C) view."""

    @staticmethod
    def forward(ctx, x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        n, c, h, w = x.shape
        y3, mean, rstd = _gn_forward_nhwc(x.permute(0, 2, 3, 1).reshape(n, h * w, c), groups, weight, bias, eps)
        y = y3.view(n, h, w, c).permute(0, 3, 1, 2)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        groups, d, count = ctx.groups, c // ctx.groups, h * w * (c // ctx.groups)
        x3 = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
        # views of NHWC maps (a gradient in another layout is copied to NHWC first, so dx is always NHWC)
        dy3 = dy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n, h * w, c)
        ds = torch.linalg.vecdot(dy3, x3, dim=1)  # (N, C): Σ_hw dy·x
        db = dy3.sum(1)  # (N, C): Σ_hw dy
        gds, gdb = (ds, db) if weight is None else (ds * weight, db * weight)
        gds, gdb = gds.view(n, groups, d).sum(-1), gdb.view(n, groups, d).sum(-1)  # (N, G)
        # dx = γ·rstd·dy + a·x + b, per sample and group (the GroupNorm gradient with x̂ = (x - μ)·rstd expanded)
        a = (gdb * mean - gds) * rstd.pow(3) / count
        b = -a * mean - gdb * rstd / count
        rstd_c = _per_channel(rstd, d)
        dx = None
        if ctx.needs_input_grad[0]:
            scale = rstd_c if weight is None else rstd_c * weight
            dx3 = torch.addcmul(_per_channel(b, d)[:, None], dy3, scale[:, None])
            dx3.addcmul_(x3, _per_channel(a, d)[:, None])
            dx = dx3.view(n, h, w, c).permute(0, 3, 1, 2)
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[2]:
            dweight = ((ds - _per_channel(mean, d) * db) * rstd_c).sum(0)
        if ctx.needs_input_grad[3]:
            dbias = db.sum(0)
        return dx, None, dweight, dbias, None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) that runs channels-last fp32/fp64 CPU maps through
    `_GroupNormNHWC` (faster, and exact for large means; see above); everything else goes to torch's kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if not _channels_last_cpu(x):
            return super().forward(x)
        if self.num_channels != x.shape[1]:
            raise ValueError(f"GroupNorm over {self.num_channels} channels got input {tuple(x.shape)}")
        return _GroupNormNHWC.apply(x, self.num_groups, self.weight, self.bias, self.eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (LDM's init for residual-branch output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def nearest2x_conv_kernel(weight: Tensor) -> Tensor:
    """The 3×3 conv kernel (O, I, 3, 3) of "nearest ×2, then conv (padding 1)" as the (I, O, 4, 4) kernel of one
    stride-2, padding-1 transposed convolution on the small map.

    Along each axis an even output pixel 2m sees source pixels m-1 (tap 0) and m (taps 1+2), an odd one 2m+1
    sees m (taps 0+1) and m+1 (tap 2); a transposed conv puts source pixel i at outputs 2i-1+t, t = 0..3, so
    its taps are [k2, k1+k2, k0+k1, k0].
    """

    def fold(k: Tensor, dim: int) -> Tensor:
        k0, k1, k2 = k.unbind(dim)
        return torch.stack([k2, k1 + k2, k0 + k1, k0], dim)

    return fold(fold(weight, 2), 3).transpose(0, 1)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (`conv`, the LDM/SD layout of both U-Net and decoder).

    On CPU both steps run as one stride-2 transposed convolution with the folded kernel (`nearest2x_conv_kernel`):
    the same sums, regrouped, over 4 instead of 9 taps per output pixel and without the ×4 upsampled copy
    (torch 2.13, 2 cores, 128 ch 16×16 → 32×32, batch 16: forward + backward 85-101 → 43-58 ms, forward
    25-34 → 12-16 ms). Other devices keep interpolate + conv (not measured there).
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        # the output takes the input's layout (NCHW or channels-last) whatever the folded kernel's strides
        return F.conv_transpose2d(x, nearest2x_conv_kernel(self.conv.weight), self.conv.bias, stride=2, padding=1)
