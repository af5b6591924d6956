"""Low-resolution / high-resolution pairs for training a latent upscaler: the low-resolution image is made from the
high-resolution one by a random degradation (Gaussian blur, bicubic down-sampling, Gaussian noise; a light version
of Real-ESRGAN's first-order model), drawn as a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.data.fashion_mnist import FashionMNIST
from ldm.data.sampler import index_epoch


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """(…, C, H, W) blurred by a separable Gaussian of std `sigma` px (reflect padding); sigma 0 → x."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = k / k.sum()
    shape = x.shape
    y = x.reshape(-1, 1, *shape[-2:])
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return y.reshape(shape)


def bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) or (C, H, W) resized bicubically (antialiased when shrinking), clamped to [-1, 1]."""
    batch = x if x.ndim == 4 else x[None]
    out = F.interpolate(batch, size=size, mode="bicubic", align_corners=False,
                        antialias=size[0] < batch.shape[-2]).clamp(-1, 1)
    return out if x.ndim == 4 else out[0]


def degrade(hr: Tensor, factor: int, rng: random.Random, max_blur: float = 1.0, max_noise: float = 0.05) -> Tensor:
    """hr (C, H, W) in [-1, 1] → low resolution (C, H/factor, W/factor): blur σ ~ U[0, max_blur] px, bicubic down,
    additive Gaussian noise of std ~ U[0, max_noise] (in [-1, 1] units)."""
    h, w = hr.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image {h}×{w} is not divisible by the scale factor {factor}")
    x = bicubic(gaussian_blur(hr, rng.uniform(0, max_blur)), (h // factor, w // factor))
    std = rng.uniform(0, max_noise)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


class FashionMNISTSuperRes(FashionMNIST):
    """FashionMNIST items plus "lowres" (1, S/factor, S/factor): the image degraded by `degrade`."""

    def __init__(self, *args, factor: int = 2, max_blur: float = 1.0, max_noise: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor, self.max_blur, self.max_noise = int(factor), float(max_blur), float(max_noise)

    def __getitem__(self, i) -> dict:
        item = super().__getitem__(i)
        rng = random.Random(f"lowres/{self.seed}/{index_epoch(i, self.epoch)}/{int(i)}")
        item["lowres"] = degrade(item["image"], self.factor, rng, self.max_blur, self.max_noise)
        return item
