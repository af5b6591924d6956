"""Precomputed first-stage posteriors of a training set: the frozen autoencoder runs once, not every step.

Each item's "image" is the stacked posterior (mean, std) of shape (2, C, h, w), so the standard collate
gives a 5-D (B, 2, C, h, w) batch; `LatentDiffusion` recognises it and samples z = mean + std·ε each step,
which is the same distribution as encoding on the fly (the posterior is stored unscaled, in float32).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler

log = logging.getLogger(__name__)


class LatentCache(Dataset):
    """Items {"image": (2, C, h, w) posterior (mean, std), "caption": str, "label": int}.

    With `base` (the dataset the cache was made from, same order), captions and labels are read from its items
    so per-epoch caption templates still vary; otherwise the captions stored at caching time are used.
    """

    def __init__(self, mean: Tensor, std: Tensor, captions: list[str] | None = None,
                 labels: list[int] | Tensor | None = None, base: Dataset | None = None):
        if mean.shape != std.shape or mean.ndim != 4:
            raise ValueError(f"mean and std must both be (N, C, h, w); got {tuple(mean.shape)}, "
                             f"{tuple(std.shape)}")
        n = len(mean)
        captions = list(captions) if captions is not None else [""] * n
        labels = torch.as_tensor(labels if labels is not None else [-1] * n, dtype=torch.long)
        if len(captions) != n or len(labels) != n or (base is not None and len(base) != n):
            raise ValueError(f"latent cache of {n} items got {len(captions)} captions, {len(labels)} labels"
                             + (f" and a base dataset of {len(base)}" if base is not None else ""))
        self.mean, self.std, self.captions, self.labels, self.base = mean, std, captions, labels, base

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def epoch(self) -> int:
        return getattr(self.base, "epoch", 0)

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self.base is not None and hasattr(self.base, "epoch"):
            self.base.epoch = value

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def __getitem__(self, i: int) -> dict:
        if self.base is not None:
            item = self.base[i]
            caption, label = item.get("caption", self.captions[i]), int(item.get("label", self.labels[i]))
        else:
            caption, label = self.captions[i], int(self.labels[i])
        return {"image": torch.stack([self.mean[i], self.std[i]]), "caption": caption, "label": label}

    def save(self, path: str | Path) -> Path:
        """One .safetensors file: mean, std, labels; captions in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous(), "labels": self.labels},
                  str(tmp), metadata={"captions": json.dumps(self.captions)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, base: Dataset | None = None) -> LatentCache:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            captions = json.loads((f.metadata() or {}).get("captions", "null"))
        return cls(tensors["mean"], tensors["std"], captions, tensors["labels"], base=base)


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "caption": [str(it.get("caption", "")) for it in items],
            "label": torch.tensor([int(it.get("label", -1)) for it in items], dtype=torch.long)}


@torch.no_grad()
def build_latent_cache(encode: Callable[[Tensor], object], data: Dataset | DataLoader, *,
                       batch_size: int = 256, device: torch.device | str = "cpu",
                       keep_base: bool = True) -> LatentCache:
    """Encode every item of `data` (a Dataset, read in order, or an unshuffled DataLoader) with `encode`
    (images → posterior with .mean and .std) and keep the posteriors on the CPU in float32.

    keep_base: read captions from the dataset per item (they may vary per epoch); costs loading the item.
    """
    if isinstance(data, DataLoader):
        loader = data
        ordered = isinstance(data.sampler, SequentialSampler) and data.batch_sampler is not None
        base = data.dataset if ordered and keep_base else None
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate)
        base = data if keep_base else None
    means, stds, captions, labels = [], [], [], []
    for batch in loader:
        posterior = encode(batch["image"].to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        captions.extend(batch.get("caption", [""] * len(batch["image"])))
        labels.extend(torch.as_tensor(batch.get("label", [-1] * len(batch["image"]))).tolist())
    if not means:
        raise ValueError("cannot build a latent cache from an empty dataset")
    cache = LatentCache(torch.cat(means), torch.cat(stds), captions, labels, base=base)
    log.info("latent cache: %d items of shape %s", len(cache), cache.latent_shape)
    return cache


def load_or_build(build: Callable[[], LatentCache], data: Dataset | DataLoader, path: str | Path | None,
                  trainer=None) -> LatentCache:
    """`build()` the cache, or with `path`: load it if the file exists, else rank 0 builds and saves it while the
    other ranks wait, then load it (every rank calls this; `trainer` gives world size, rank and barrier)."""
    if path is None:
        return build()
    path = Path(path)
    distributed = trainer is not None and trainer.world_size > 1
    if not path.is_file() and (not distributed or trainer.is_global_zero):
        build().save(path)
    if distributed:
        trainer.strategy.barrier("latent_cache")
    base = data.dataset if isinstance(data, DataLoader) else data
    cache = LatentCache.load(path, base=base if hasattr(base, "__getitem__") else None)
    if cache.base is not None and len(cache) != len(base):
        raise ValueError(f"latent cache {path} has {len(cache)} items but the dataset {len(base)}; "
                         "delete it to rebuild")
    return cache
