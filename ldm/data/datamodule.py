"""One LightningDataModule for every dataset: global batch size split across ranks, seeded resumable order."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from ldm.data.masks import MaskedDataset, check_weights
from ldm.data.sampler import ResumableShardSampler

log = logging.getLogger(__name__)


def collate(items: list[dict]) -> dict:
    """Stack images, keep captions as a list, labels as a long tensor (-1 where unknown); other tensors every
    item has (an inpainting "mask", a "concat" condition) are stacked too."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it.get("caption", "") for it in items],
        "label": torch.tensor([int(it.get("label", -1)) for it in items], dtype=torch.long),
    }
    for key in set(items[0]) - set(batch):
        if all(isinstance(it.get(key), torch.Tensor) for it in items):
            batch[key] = torch.stack([it[key] for it in items])
    return batch


class _EpochAwareSampler(ResumableShardSampler):
    """Also tells the dataset the epoch, so per-item randomness (caption template, crop, flip) is a pure
    function of (seed, epoch, index) and survives a resume."""

    def __init__(self, dataset: Dataset, *args, **kwargs):
        super().__init__(len(dataset), *args, **kwargs)
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = epoch


class DataModule(pl.LightningDataModule):
    """`batch_size` is global: each of the N ranks loads batch_size / N per step.

    Datasets may be given built or as zero-argument factories (Hydra `_partial_: true`), built in `setup`.
    Training order comes from `ResumableShardSampler` (set `use_distributed_sampler=False` on the Trainer:
    the configs do); after a resume the first epoch continues where the checkpoint stopped.
    `masks` (weights of box / stroke / full / none, see data/masks.py) adds a random inpainting "mask" to every
    item of every split.
    """

    def __init__(self, train: Dataset | Callable[[], Dataset], val: Dataset | Callable | None = None,
                 test: Dataset | Callable | None = None, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, persistent_workers: bool = False, seed: int = 0,
                 val_batch_size: int | None = None, masks: Mapping[str, float] | None = None):
        super().__init__()
        self._factories = {"train": train, "val": val, "test": test}
        self.datasets: dict[str, Dataset] = {}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.masks = check_weights(masks) if masks else None

    @property
    def world(self) -> tuple[int, int]:
        """(rank, world size) of the attached Trainer; (0, 1) without one."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def per_rank_batch(self, batch_size: int | None = None) -> int:
        batch_size = batch_size or self.batch_size
        _, world = self.world
        if batch_size % world:
            raise ValueError(f"data.batch_size={batch_size} (global) does not divide across {world} ranks; "
                             f"use a multiple of {world}")
        return batch_size // world

    def dataset(self, split: str) -> Dataset | None:
        if split not in self.datasets and self._factories.get(split) is not None:
            f = self._factories[split]
            self.datasets[split] = f() if callable(f) and not isinstance(f, Dataset) else f
            if self.masks:
                self.datasets[split] = MaskedDataset(self.datasets[split], self.masks, self.seed)
            log.info("%s split: %d items", split, len(self.datasets[split]))
        return self.datasets.get(split)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val") if stage in (None, "fit") else ("test",) if stage == "test" else ("val",):
            self.dataset(split)

    def _loader(self, dataset: Dataset, batch: int, sampler, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.world
        ds = self.dataset("train")
        sampler = _EpochAwareSampler(ds, self.per_rank_batch(), rank=rank, world_size=world, seed=self.seed)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # Lightning creates the loader's iterator (and worker processes prefetch indices) before it calls
            # set_epoch, so a resumed run must start from the restored epoch here.
            sampler.set_epoch(trainer.current_epoch)
            # A checkpoint written in on_train_batch_end (ModelCheckpoint every_n_train_steps) has `completed`
            # one behind `processed`: that batch was trained on, so it counts as done.
            current = trainer.fit_loop.epoch_loop.batch_progress.current
            done = max(current.completed, getattr(current, "processed", 0))
            if done:
                sampler.resume_at(trainer.current_epoch, done)
                log.info("resuming epoch %d after %d batches", trainer.current_epoch, done)
        return self._loader(ds, self.per_rank_batch(), sampler, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader | list:
        """In order, every item once; under DDP each rank takes every world-th item (padded to equal length,
        as Lightning's own distributed sampler does: the Trainer runs with use_distributed_sampler=False)."""
        ds = self.dataset(split)
        if ds is None:
            return []
        rank, world = self.world
        sampler = (DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1
                   else SequentialSampler(ds))
        return self._loader(ds, self.per_rank_batch(self.val_batch_size), sampler, drop_last=False)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")
