"""The training-order sampler: a seeded permutation per epoch, split across ranks, resumable mid-epoch.

The order is a pure function of (seed, epoch): global batch b is `perm[b·B:(b+1)·B]` (B = global batch size) and
rank r takes the r-th contiguous slice of it, so N ranks together see exactly the batches one process would.
After a resume, the first epoch starts at the batch the checkpoint stopped at.

Indices are yielded as `EpochIndex` (an int that also carries the epoch), so per-item randomness in a dataset
(caption template, crop, flip) follows the epoch even in DataLoader workers that were started in an earlier
epoch (persistent workers) or before the epoch was set (a resumed run).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochIndex(int):
    """A dataset index that remembers the epoch it was drawn for (pickles through worker queues)."""

    epoch: int

    def __new__(cls, value: int, epoch: int = 0) -> EpochIndex:
        obj = super().__new__(cls, value)
        obj.epoch = epoch
        return obj

    def __reduce__(self):
        return EpochIndex, (int(self), self.epoch)


def index_epoch(index: int, default: int = 0) -> int:
    """The epoch an index was drawn for (an `EpochIndex`), else `default` (the dataset's own `epoch`)."""
    return getattr(index, "epoch", default)


class ResumableShardSampler(Sampler[int]):
    def __init__(self, num_samples: int, per_rank_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if per_rank_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler setup: batch {per_rank_batch}, rank {rank}, world size {world_size}")
        self.num_samples = num_samples
        self.per_rank_batch = per_rank_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self._start = (0, 0)  # (epoch, batches already consumed in that epoch)
        self.num_batches = num_samples // (per_rank_batch * world_size)
        if self.num_batches == 0:
            raise ValueError(f"{num_samples} samples do not fill one global batch of "
                             f"{per_rank_batch * world_size}")

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Skip the first `batches_done` batches of `epoch` (they were trained on before the checkpoint)."""
        self._start = (epoch, batches_done)

    def global_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        gb = self.per_rank_batch * self.world_size
        order = self.global_order(self.epoch)[: self.num_batches * gb].view(self.num_batches, gb)
        mine = order[:, self.rank * self.per_rank_batch:(self.rank + 1) * self.per_rank_batch]
        skip = self._start[1] if self._start[0] == self.epoch else 0
        epoch = self.epoch
        return (EpochIndex(i, epoch) for i in mine[skip:].reshape(-1).tolist())

    def __len__(self) -> int:
        # The full epoch length even when resuming: Lightning counts the batches it already consumed.
        return self.num_batches * self.per_rank_batch
