"""LPIPS perceptual distance (Zhang et al. 2018) on a VGG16 trunk, from a local weights file only.

No weights ship with ldm and nothing is downloaded. The file is a state dict (.safetensors, or a .pt/.pth
loaded with weights_only) in the key layout of the `lpips` package's `LPIPS(net="vgg")` module
(`net.slice1.0.weight` … `net.slice5.28.bias`, `lin0.model.1.weight` … `lin4.model.1.weight`), e.g. written
once
on a machine with the weights by `torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.pth")`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# VGG16 `features` indices of the conv layers in each LPIPS slice (ReLU after each; max-pool between slices).
_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
_CHANNELS = (64, 128, 256, 512, 512)


class _Linear(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(ch, 1, 1, bias=False))


class LPIPS(nn.Module):
    """`lpips(x, y)` → (B, 1, 1, 1) distances for images in [-1, 1] (grayscale is repeated to RGB)."""

    def __init__(self):
        super().__init__()
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.net = nn.Module()
        c_in = 3
        for s, (idx, c) in enumerate(zip(_SLICES, _CHANNELS, strict=True), start=1):
            block = nn.Module()
            for i in idx:
                block.add_module(str(i), nn.Conv2d(c_in, c, 3, padding=1))
                c_in = c
            setattr(self.net, f"slice{s}", block)
        for i, c in enumerate(_CHANNELS):
            setattr(self, f"lin{i}", _Linear(c))
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a frozen metric: dropout stays off

    def features(self, x: Tensor) -> list[Tensor]:
        h, out = (x - self.shift) / self.scale, []
        for s in range(1, 6):
            if s > 1:
                h = F.max_pool2d(h, 2)
            for conv in getattr(self.net, f"slice{s}").children():
                h = F.relu(conv(h))
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        total = 0.0
        for i, (fx, fy) in enumerate(zip(self.features(x), self.features(y), strict=True)):
            total = total + getattr(self, f"lin{i}").model(fx.sub(fy).pow(2)).mean((2, 3), keepdim=True)
        return total


def load_lpips(path: str | Path | None) -> LPIPS:
    """LPIPS with weights from `path`; a clear error when they are not there."""
    if not path or not Path(path).is_file():
        shown = repr(str(path)) if path else repr(path)
        raise FileNotFoundError(
            f"perceptual_weight > 0 needs LPIPS (VGG16) weights, but lpips_path={shown} is not a file. "
            "No LPIPS weights ship with ldm and none are downloaded: save the `lpips` package's "
            "LPIPS(net='vgg').state_dict() to a file on a machine that has them and pass its path "
            "(model.lpips_path=...), or set model.perceptual_weight=0."
        )
    from ldm.checkpoint import load_file, load_weights_into, state_dict_of

    model = LPIPS()
    sd = state_dict_of(load_file(path), path)
    sd = {k: v for k, v in sd.items() if not k.startswith("scaling_layer.")}  # constants, built in here
    load_weights_into(model, sd, strict=True, source=str(path))
    return model.eval()
