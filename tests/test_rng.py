"""GlobalBatchGenerator: N ranks × B/N draws are exactly the draws of one process with batch B."""

import pytest
import torch

from ldm import rng


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_together_draw_what_one_process_draws(world):
    one = rng.GlobalBatchGenerator(7)
    full = (rng.randn((8, 3, 2), one), rng.rand((8,), one), rng.randint(1000, (8,), one))
    parts = []
    for rank in range(world):
        g, b = rng.GlobalBatchGenerator(7, rank, world), 8 // world
        parts.append((rng.randn((b, 3, 2), g), rng.rand((b,), g), rng.randint(1000, (b,), g)))
    for i, whole in enumerate(full):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole)
    if world > 1:  # no two ranks share noise
        assert not torch.equal(parts[0][0], parts[1][0])


def test_plain_generators_and_bad_ranks():
    a = rng.randn((2, 3), torch.Generator().manual_seed(1))
    assert torch.equal(a, torch.randn((2, 3), generator=torch.Generator().manual_seed(1)))
    assert rng.randint(5, (4,), None, device="cpu").shape == (4,)
    with pytest.raises(ValueError):
        rng.GlobalBatchGenerator(0, rank=2, world_size=2)
