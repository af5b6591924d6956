"""Small helpers shared by the samplers: noise from a generator, the step loop, option checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

Callback = Callable[[dict], None]


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) shaped like x, drawn from `generator` (on the generator's device, then moved: a CPU
    generator gives the same noise whatever device x is on)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def step_range(n: int, progress: bool, desc: str) -> Iterable[int]:
    """range(n), with a tqdm bar when progress=True."""
    return tqdm(range(n), desc=desc, disable=not progress, leave=False)


def timestep_batch(t: int, x: Tensor) -> Tensor:
    """Integer timestep t as an int64 (B,) tensor on x's device."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)

