"""DataModule: the global batch split across (simulated) ranks, seeded order, resume, epoch-aware workers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from ldm.data.datamodule import DataModule, collate
from ldm.data.fashion_mnist import FashionMNIST


class Numbered(Dataset):
    """Item i is an image filled with i, caption "item {i}"."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(i)), "caption": f"item {int(i)}"}


def fake_trainer(rank: int = 0, world: int = 1, epoch: int = 0, done: int = 0) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(completed=done))
    return SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def make_dm(data, rank=0, world=1, epoch=0, done=0, **kw) -> DataModule:
    dm = DataModule(train=data, **{"batch_size": 8, "seed": 3, **kw})
    dm.trainer = fake_trainer(rank, world, epoch, done)
    return dm


def ids(batch: dict) -> list[int]:
    return batch["image"][:, 0, 0, 0].long().tolist()


def test_collate_shapes_and_unknown_label():
    batch = collate([{"image": torch.zeros(1, 2, 2), "caption": "a"}, {"image": torch.ones(1, 2, 2), "label": 3}])
    assert batch["image"].shape == (2, 1, 2, 2)
    assert batch["caption"] == ["a", ""]
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [-1, 3]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_batch_is_split_across_ranks(world: int):
    dm = make_dm(Numbered(40), world=world, batch_size=16)
    assert dm.per_rank_batch() == 16 // world
    for rank in range(world):
        dm.trainer = fake_trainer(rank, world)
        assert all(len(b["caption"]) == 16 // world for b in dm.train_dataloader())


def test_batch_that_does_not_divide_is_a_clear_error():
    dm = make_dm(Numbered(40), world=3, batch_size=16)
    with pytest.raises(ValueError, match=r"batch_size=16 \(global\) does not divide across 3 ranks"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="does not divide"):
        make_dm(Numbered(40), world=3, batch_size=12, val=Numbered(9), val_batch_size=4).val_dataloader()


def test_without_trainer_one_process_takes_the_whole_batch():
    dm = DataModule(train=lambda: Numbered(20), batch_size=4)  # a factory, as Hydra's _partial_ gives
    assert dm.world == (0, 1)
    assert [len(b["caption"]) for b in dm.train_dataloader()] == [4] * 5


def test_ranks_together_load_exactly_the_single_process_batches():
    single = [ids(b) for b in make_dm(Numbered(45)).train_dataloader()]
    ranks = [[ids(b) for b in make_dm(Numbered(45), rank=r, world=2).train_dataloader()] for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 45 // 8
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == 40  # disjoint; the ragged tail (5 items) is dropped


def test_seeded_shuffling_is_reproducible():
    def order(seed, epoch=0):
        dm = make_dm(Numbered(32), seed=seed)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [i for b in loader for i in ids(b)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, epoch=1) != order(1, epoch=0)
    assert sorted(order(1)) == list(range(32))


def test_resume_continues_the_restored_epoch_mid_way():
    full = make_dm(Numbered(32)).train_dataloader()
    full.sampler.set_epoch(2)
    expected = [ids(b) for b in full][3:]
    resumed = make_dm(Numbered(32), epoch=2, done=3).train_dataloader()  # no set_epoch: Lightning calls it late
    assert [ids(b) for b in resumed] == expected


def test_val_is_in_order_complete_and_sharded_across_ranks():
    val = Numbered(11)
    single = [i for b in make_dm(Numbered(16), val=val, val_batch_size=4).val_dataloader() for i in ids(b)]
    assert single == list(range(11))  # nothing dropped
    shards = [[ids(b) for b in make_dm(Numbered(16), rank=r, world=2, val=val, val_batch_size=4).val_dataloader()]
              for r in range(2)]
    assert len(shards[0]) == len(shards[1])  # equal batch counts: no rank waits in a collective
    assert all(len(b) <= 2 for s in shards for b in s)
    assert {i for s in shards for b in s for i in b} == set(range(11))
    assert make_dm(Numbered(16)).val_dataloader() == []


def test_epoch_reaches_workers_including_persistent_ones(fmnist_dir):
    def captions(num_workers: int, persistent: bool) -> list[list[str]]:
        ds = FashionMNIST(fmnist_dir, split="train", val_size=10)
        dm = make_dm(ds, num_workers=num_workers, persistent_workers=persistent)
        loader = dm.train_dataloader()
        out = []
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            out.append([c for b in loader for c in b["caption"]])
        return out

    reference = captions(0, False)
    assert reference[0] != reference[1]  # templates vary by epoch
    assert captions(1, True) == reference
