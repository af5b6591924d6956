"""Random inpainting masks for training an inpainting model (as SD-inpainting / LaMa): boxes, brush strokes, the
full image, or nothing, drawn per item as a pure function of (seed, epoch, index) so a resume sees the same masks.

Masks are (1, H, W) float in {0, 1}: 1 = hidden (to be inpainted), 0 = known.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ldm.data.sampler import index_epoch

MASK_KINDS = ("box", "stroke", "full", "none")
DEFAULT_WEIGHTS = {"box": 0.4, "stroke": 0.4, "full": 0.1, "none": 0.1}


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    weights = {str(k): float(v) for k, v in dict(weights).items()}
    unknown = sorted(set(weights) - set(MASK_KINDS))
    if unknown or any(v < 0 for v in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mask weights must be non-negative, not all zero, over {MASK_KINDS}; got {weights}")
    return weights


def box_mask(h: int, w: int, rng: random.Random, boxes: int | None = None) -> Tensor:
    """1–3 rectangles, each side 25–75 % of the image."""
    m = torch.zeros(1, h, w)
    for _ in range(boxes or rng.randint(1, 3)):
        bh, bw = rng.randint(max(1, h // 4), max(1, 3 * h // 4)), rng.randint(max(1, w // 4), max(1, 3 * w // 4))
        y, x = rng.randint(0, h - bh), rng.randint(0, w - bw)
        m[:, y:y + bh, x:x + bw] = 1
    return m


def stroke_mask(h: int, w: int, rng: random.Random) -> Tensor:
    """1–4 brush strokes: random walks of 2–6 segments drawn with a round brush 6–15 % of the image wide."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    m = torch.zeros(h, w, dtype=torch.bool)
    size = min(h, w)
    for _ in range(rng.randint(1, 4)):
        radius = rng.uniform(0.03, 0.075) * size + 0.5
        y, x = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
        for _ in range(rng.randint(2, 6)):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.5) * size
            ny = min(max(y + length * math.sin(angle), 0), h - 1)
            nx = min(max(x + length * math.cos(angle), 0), w - 1)
            for s in torch.linspace(0, 1, int(length) + 2).tolist():  # stamp the brush along the segment
                cy, cx = y + s * (ny - y), x + s * (nx - x)
                m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            y, x = ny, nx
    return m.float()[None]


def random_mask(h: int, w: int, rng: random.Random, weights: Mapping[str, float] = DEFAULT_WEIGHTS) -> Tensor:
    """One mask of a kind drawn with `weights` (box / stroke / full / none)."""
    kinds = [k for k in MASK_KINDS if weights.get(k, 0) > 0]
    kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
    if kind == "box":
        return box_mask(h, w, rng)
    if kind == "stroke":
        return stroke_mask(h, w, rng)
    return torch.full((1, h, w), 1.0 if kind == "full" else 0.0)


class MaskedDataset(Dataset):
    """`dataset`'s items with a random "mask" (1, H, W) added, the same for (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, weights: Mapping[str, float] = DEFAULT_WEIGHTS, seed: int = 0):
        self.dataset, self.weights, self.seed = dataset, check_weights(weights), int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def epoch(self) -> int:
        return getattr(self.dataset, "epoch", 0)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.dataset.epoch = value

    def __getitem__(self, i) -> dict:
        item = dict(self.dataset[i])
        h, w = item["image"].shape[-2:]
        rng = random.Random(f"mask/{self.seed}/{index_epoch(i, self.epoch)}/{int(i)}")
        item["mask"] = random_mask(int(h), int(w), rng, self.weights)
        return item
