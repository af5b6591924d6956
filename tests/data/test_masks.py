"""Random inpainting masks: each kind's shape and coverage, determinism per (seed, epoch, index), the data module."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset

from ldm.data.datamodule import DataModule, collate
from ldm.data.masks import MaskedDataset, box_mask, check_weights, random_mask, stroke_mask


class Items(Dataset):
    epoch = 0

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"image": torch.zeros(1, 32, 32), "caption": f"item {i}", "label": i}


def test_each_kind():
    rng = random.Random(0)
    for _ in range(20):
        b = box_mask(32, 32, rng, boxes=1)
        assert b.shape == (1, 32, 32) and set(b.unique().tolist()) <= {0.0, 1.0}
        assert 8 * 8 <= b.sum() <= 24 * 24  # one box, sides 25–75 %
        s = stroke_mask(32, 32, rng)
        assert 0 < s.sum() < 32 * 32
    assert random_mask(8, 8, rng, {"full": 1}).sum() == 64 and random_mask(8, 8, rng, {"none": 1}).sum() == 0
    kinds = [random_mask(16, 16, random.Random(k)).mean().item() for k in range(200)]
    assert 0.05 < sum(v == 1.0 for v in kinds) / 200 < 0.2 and 0.05 < sum(v == 0.0 for v in kinds) / 200 < 0.2
    with pytest.raises(ValueError, match="mask weights"):
        check_weights({"circle": 1.0})
    with pytest.raises(ValueError, match="mask weights"):
        check_weights({"box": 0.0})


def test_masks_are_a_function_of_seed_epoch_and_index():
    ds = MaskedDataset(Items(), {"box": 1, "stroke": 1}, seed=3)
    a, b = ds[5]["mask"], ds[5]["mask"]
    assert torch.equal(a, b) and not torch.equal(a, ds[6]["mask"])
    ds.epoch = 1
    assert ds.dataset.epoch == 1 and not torch.equal(a, ds[5]["mask"])
    assert not torch.equal(a, MaskedDataset(Items(), {"box": 1, "stroke": 1}, seed=4)[5]["mask"])


def test_data_module_adds_and_collates_masks():
    dm = DataModule(train=Items(), val=Items(), batch_size=4, masks={"box": 1.0})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (4, 1, 32, 32) and batch["image"].shape == (4, 1, 32, 32)
    assert "mask" not in collate([Items()[0], Items()[1]])
