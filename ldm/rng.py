"""Training noise as a function of (seed, step, global sample index), the same for any number of DDP ranks.

With a per-rank generator (or the global RNG, which `seed_everything` seeds alike on every rank) two ranks
either share their noise draws or draw numbers a single process never would. `GlobalBatchGenerator` has every
rank draw the whole global batch's numbers from one generator seeded by (seed, step) and keep its own rows:
N ranks × B/N samples get exactly the draws 1 × B gets, no two samples share a draw, and a resumed run draws
what the uninterrupted one did. The cost is one global batch of random numbers per rank and step.

Functions that draw noise take `generator: torch.Generator | GlobalBatchGenerator | None` and call `randn`,
`rand` or `randint` below; the leading dimension of every shape is the (local) batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class GlobalBatchGenerator:
    """Draws for rank `rank` of `world_size`, each holding an equal slice of the global batch in rank order
    (how `ldm.data.sampler.ResumableShardSampler` splits it)."""

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} of world size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=device).manual_seed(int(seed))

    def _mine(self, full: Tensor, local: int) -> Tensor:
        return full[self.rank * local:(self.rank + 1) * local]

    def _global(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (int(shape[0]) * self.world_size, *shape[1:])

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype | None = None) -> Tensor:
        full = torch.randn(self._global(shape), generator=self.generator, device=self.generator.device, dtype=dtype)
        return self._mine(full, shape[0])

    def rand(self, shape: Sequence[int], *, dtype: torch.dtype | None = None) -> Tensor:
        full = torch.rand(self._global(shape), generator=self.generator, device=self.generator.device, dtype=dtype)
        return self._mine(full, shape[0])

    def randint(self, high: int, shape: Sequence[int]) -> Tensor:
        full = torch.randint(0, high, self._global(shape), generator=self.generator, device=self.generator.device)
        return self._mine(full, shape[0])


Generator = torch.Generator | GlobalBatchGenerator | None


def _to(x: Tensor, device) -> Tensor:
    return x if device is None else x.to(device)


def randn(shape: Sequence[int], generator: Generator = None, *, device=None, dtype=None) -> Tensor:
    if isinstance(generator, GlobalBatchGenerator):
        return _to(generator.randn(tuple(shape), dtype=dtype), device)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(shape: Sequence[int], generator: Generator = None, *, device=None, dtype=None) -> Tensor:
    if isinstance(generator, GlobalBatchGenerator):
        return _to(generator.rand(tuple(shape), dtype=dtype), device)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def randint(high: int, shape: Sequence[int], generator: Generator = None, *, device=None) -> Tensor:
    if isinstance(generator, GlobalBatchGenerator):
        return _to(generator.randint(high, tuple(shape)), device)
    return torch.randint(0, high, tuple(shape), generator=generator, device=device)


def step_generator(module, seed: int, batch_device: torch.device) -> GlobalBatchGenerator:
    """The generator of one training step of a LightningModule: its rank and world size from the Trainer."""
    trainer = getattr(module, "_trainer", None)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    return GlobalBatchGenerator(seed, rank, world, device=batch_device)
