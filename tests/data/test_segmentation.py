"""Fashion-MNIST segmentation maps: thresholds, one-hot maps, IoU against known answers, the dataset's items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data.segmentation import FashionMNISTSegmentation, mean_iou, one_hot_map, segment


def test_segment_one_hot_and_iou():
    x = torch.tensor([[[-1.0, -0.9, -0.5, 0.0, 0.7]]])  # (1, 1, 5)
    assert segment(x).tolist() == [[0, 0, 1, 2, 2]]
    oh = one_hot_map(segment(x))
    assert oh.shape == (3, 1, 5) and oh.sum(0).eq(1).all() and oh[2].tolist() == [[0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        one_hot_map(torch.tensor([[3]]))
    a, b = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 2])
    miou, ious = mean_iou(a, b)
    assert ious == pytest.approx([1 / 2, 2 / 3, 1.0]) and miou == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert mean_iou(a, a)[0] == 1.0


def test_dataset_items_carry_the_map(tmp_path):
    import gzip

    images = np.zeros((4, 28, 28), np.uint8)
    images[:, 8:20, 8:20] = 60   # dark part
    images[:, 12:16, 12:16] = 250  # bright part
    for name, arr, magic in (("train-images-idx3-ubyte.gz", images, b"\x00\x00\x08\x03"),
                             ("train-labels-idx1-ubyte.gz", np.arange(4, dtype=np.uint8), b"\x00\x00\x08\x01")):
        dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(magic + dims + arr.tobytes())
    ds = FashionMNISTSegmentation(tmp_path, split="train", val_size=1)
    item = ds[0]
    assert item["concat"].shape == (3, 32, 32) and item["segmentation"].shape == (32, 32)
    counts = torch.bincount(item["segmentation"].flatten(), minlength=3).tolist()
    assert counts == [32 * 32 - 144, 144 - 16, 16]
