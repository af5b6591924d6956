import pytest
import torch

from ldm.data.sampler import ResumableShardSampler


def test_ranks_split_the_single_process_global_batches():
    n, gb = 103, 8
    single = list(ResumableShardSampler(n, gb, seed=3))
    ranks = [list(ResumableShardSampler(n, gb // 2, rank=r, world_size=2, seed=3)) for r in range(2)]
    for b in range(n // gb):
        got = ranks[0][b * 4:(b + 1) * 4] + ranks[1][b * 4:(b + 1) * 4]
        assert got == single[b * gb:(b + 1) * gb]
    assert not set(ranks[0]) & set(ranks[1])


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableShardSampler(50, 5, seed=1), ResumableShardSampler(50, 5, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(ResumableShardSampler(50, 5, seed=2)) != list(b)
    assert sorted(list(b)) == list(range(50))


def test_resume_skips_consumed_batches_in_that_epoch_only():
    s = ResumableShardSampler(40, 4, seed=0)
    full = list(s)
    s.resume_at(epoch=0, batches_done=3)
    assert list(s) == full[12:]
    assert len(s) == 40  # Lightning counts consumed batches itself
    s.set_epoch(1)
    ref = ResumableShardSampler(40, 4, seed=0)
    ref.set_epoch(1)
    assert list(s) == list(ref)


def test_bad_setup_errors():
    with pytest.raises(ValueError):
        ResumableShardSampler(3, 4)
    with pytest.raises(ValueError):
        ResumableShardSampler(30, 4, rank=2, world_size=2)
    assert isinstance(torch.tensor(list(ResumableShardSampler(8, 4))), torch.Tensor)
