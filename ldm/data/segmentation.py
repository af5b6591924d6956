"""Segmentation maps derived offline from Fashion-MNIST, for semantic synthesis (map → image): every pixel is
background, a dark part or a bright part of the garment, by fixed intensity thresholds, so a generated image can
be re-segmented by the same rule and compared with the map it was asked for (IoU).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ldm.data.fashion_mnist import FashionMNIST

SEGMENT_NAMES = ("background", "dark part", "bright part")
THRESHOLDS = (-0.8, 0.0)  # in [-1, 1]: < −0.8 (≈ 10 % grey) background; < 0 dark; ≥ 0 bright


def segment(images: Tensor, thresholds: tuple[float, float] = THRESHOLDS) -> Tensor:
    """(B, 1, H, W) or (1, H, W) grey images in [-1, 1] → class indices (same shape without the channel), long."""
    x = images[..., 0, :, :] if images.shape[-3] == 1 else images.mean(-3)
    return (x >= thresholds[0]).long() + (x >= thresholds[1]).long()


def one_hot_map(labels: Tensor, classes: int = len(SEGMENT_NAMES)) -> Tensor:
    """(B, H, W) or (H, W) class indices → one-hot float (B, classes, H, W) or (classes, H, W)."""
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"segmentation labels must be in [0, {classes - 1}], got {labels.min()}..{labels.max()}")
    return F.one_hot(labels.long(), classes).movedim(-1, -3).float()


def mean_iou(pred: Tensor, target: Tensor, classes: int = len(SEGMENT_NAMES)) -> tuple[float, list[float]]:
    """Mean over classes of IoU (pooled over the batch) between two label maps; classes absent from both skipped."""
    ious = []
    for k in range(classes):
        p, t = pred == k, target == k
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return sum(ious) / len(ious), ious


class FashionMNISTSegmentation(FashionMNIST):
    """FashionMNIST items plus "segmentation" (H, W) long and "concat": its one-hot map (3, H, W), the condition of
    a map → image model (LatentDiffusion concat_channels=3, resized to the latent grid there)."""

    def __getitem__(self, i) -> dict:
        item = super().__getitem__(i)
        seg = segment(item["image"])
        item["segmentation"], item["concat"] = seg, one_hot_map(seg)
        return item
