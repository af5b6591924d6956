"""Fashion-MNIST on small generated gzip IDX files: header checks, padding/resizing, captions, splits, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.fashion_mnist import CAPTION_TEMPLATES, CLASS_NAMES, FashionMNIST, caption_for, read_idx

from .conftest import idx_bytes, make_fmnist, write_idx


def marked(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """Train image i has pixel [0, 0] = i and [0, 1] = 1; test image i has [0, 0] = i and [0, 1] = 2."""
    for prefix, n, mark in (("train", n_train, 1), ("t10k", n_test, 2)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n), mark
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def ident(ds: FashionMNIST) -> list[tuple[int, int]]:
    """(mark, index in its file) of every item."""
    return [(int(ds.images[i, 0, 1]), int(ds.images[i, 0, 0])) for i in range(len(ds))]


# ---- IDX parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("code, dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, ">i2"), (0x0C, ">i4"),
                                         (0x0D, ">f4"), (0x0E, ">f8")])
@pytest.mark.parametrize("name", ["x.idx.gz", "x.idx"])
def test_idx_round_trip(tmp_path: Path, code, dtype, name):
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype) if code != 0x08 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / name, a, raw=idx_bytes(a, code))
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    got = read_idx(path)
    assert got.shape == (2, 3, 4) and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("raw, match", [
    (b"", "bad magic"),
    (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number 01000801"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),                # unknown type code
    (b"\x00\x00\x08\x00", "truncated IDX header"),                                     # no dimensions
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),              # 3 dims, 1 given
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + bytes(5), r"body has 5 bytes, header \[2, 3\] needs 6"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + bytes(3), "body has 3 bytes"),       # too long
])
def test_bad_idx_headers_are_clear_errors(tmp_path: Path, raw, match):
    path = write_idx(tmp_path / "bad-idx.gz", None, raw=raw)
    with pytest.raises(ValueError, match=match) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_gzip_is_a_clear_error(tmp_path: Path):
    path = write_idx(tmp_path / "t-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=f"{path}: unreadable IDX file"):
        read_idx(path)


@pytest.mark.parametrize("which, array, match", [
    ("images", np.zeros((10, 28)), r"expected uint8 images of shape \(N, H, W\)"),
    ("labels", np.zeros((10, 1)), r"expected uint8 labels of shape \(N,\)"),
    ("labels", np.zeros(9), "10 images but 9 labels"),
    ("labels", np.full(10, 10), "label 10 out of range 0..9"),
])
def test_wrong_dimensions_and_labels(tmp_path: Path, which, array, match):
    root = make_fmnist(tmp_path, n_train=10, n_test=10)
    write_idx(root / f"train-{which}-idx{3 if which == 'images' else 1}-ubyte.gz", array)
    with pytest.raises(ValueError, match=match):
        FashionMNIST(root, split="train", val_size=2)


def test_raw_uncompressed_files_are_found(tmp_path: Path):
    root = make_fmnist(tmp_path / "gz", n_train=10, n_test=5)
    raw = tmp_path / "raw"
    for f in root.iterdir():
        write_idx(raw / f.name.removesuffix(".gz"), None, raw=gzip.decompress(f.read_bytes()))
    assert len(FashionMNIST(raw, split="test")) == 5


# ---- images and captions ----------------------------------------------------------------------------
def test_padding_to_32_and_range(fmnist_dir: Path):
    ds = FashionMNIST(fmnist_dir, split="test")
    raw = ds.images[7].float().div(127.5).sub(1)
    item = ds[7]
    x = item["image"]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0, 2:30, 2:30], raw)                   # centred, values kept
    assert (x[0, :2] == -1).all() and (x[0, :, 30:] == -1).all()  # background padding
    assert x[0, 2, 2] == 7 / 127.5 - 1
    assert set(item) == {"image", "caption", "label"} and item["label"] == 7 % 10


def test_extreme_values_and_other_sizes(tmp_path: Path):
    root = make_fmnist(tmp_path, n_train=10, n_test=2)
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[1] = 255
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    for size in (32, 28, 16, 64, 31):
        ds = FashionMNIST(root, split="test", image_size=size)
        black, white = ds[0]["image"], ds[1]["image"]
        assert black.shape == (1, size, size) == white.shape
        assert torch.allclose(black, torch.tensor(-1.0), atol=1e-6)
        assert white.min() >= -1 and white.max() <= 1 and white.max() == pytest.approx(1, abs=1e-6)
    resized = FashionMNIST(root, split="test", image_size=16)[1]["image"]
    assert torch.allclose(resized, torch.tensor(1.0), atol=1e-6)  # resized (antialiased), not padded


def test_caption_names_and_articles():
    assert caption_for(0) == "a photo of a t-shirt"
    assert caption_for(9, "a {}") == "an ankle boot"
    assert caption_for(1, "a black and white photo of a {}") == "a black and white photo of a trouser"
    assert CLASS_NAMES[9] == "ankle boot" and len(CLASS_NAMES) == 10


def test_captions_use_the_label_and_a_seeded_template(fmnist_dir: Path):
    ds = FashionMNIST(fmnist_dir, split="test", seed=3)
    fills = {caption_for(label, t) for label in range(10) for t in CAPTION_TEMPLATES}
    per_epoch = []
    for epoch in range(4):
        ds.epoch = epoch
        caps = [ds[i]["caption"] for i in range(len(ds))]
        assert caps == [ds[i]["caption"] for i in range(len(ds))]  # same (seed, epoch, index) → same caption
        assert all(c in fills and CLASS_NAMES[ds[i]["label"]] in c for i, c in enumerate(caps))
        per_epoch.append(caps)
    assert len({tuple(c) for c in per_epoch}) > 1                   # templates change across epochs
    assert len({c for caps in per_epoch for c in caps}) > 10        # more than one template in use
    custom = FashionMNIST(fmnist_dir, split="test", templates=("sketch of a {}",))
    assert custom[3]["caption"] == f"sketch of a {CLASS_NAMES[3]}"


# ---- splits -----------------------------------------------------------------------------------------
def test_test_split_is_the_official_test_file_never_trained_on(tmp_path: Path):
    root = marked(tmp_path)
    test = FashionMNIST(root, split="test")
    train, val = FashionMNIST(root, split="train", val_size=8), FashionMNIST(root, split="val", val_size=8)
    assert sorted(ident(test)) == [(2, i) for i in range(12)]
    assert all(mark == 1 for mark, _ in ident(train) + ident(val))


def test_seeded_train_val_split_is_deterministic_disjoint_and_complete(tmp_path: Path):
    root = marked(tmp_path)
    train, val = FashionMNIST(root, split="train", val_size=8, seed=1), FashionMNIST(root, split="val", val_size=8,
                                                                                      seed=1)
    assert len(train) == 32 and len(val) == 8
    assert not set(ident(train)) & set(ident(val))
    assert sorted(ident(train) + ident(val)) == [(1, i) for i in range(40)]
    assert ident(FashionMNIST(root, split="val", val_size=8, seed=1)) == ident(val)
    assert ident(FashionMNIST(root, split="val", val_size=8, seed=2)) != ident(val)
    assert len(FashionMNIST(root, split="train", val_size=0)) == 40


@pytest.mark.parametrize("kw, match", [
    ({"split": "validation"}, "split must be train, val or test"),
    ({"split": "train", "val_size": 40}, r"val_size=40 must be in \[0, 40\)"),
    ({"split": "val", "val_size": -1}, "val_size=-1"),
])
def test_bad_split_arguments(tmp_path: Path, kw, match):
    with pytest.raises(ValueError, match=match):
        FashionMNIST(marked(tmp_path), **kw)


def test_missing_root_names_the_path_and_how_to_install(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        FashionMNIST(missing)
    msg = str(e.value)
    assert f"({missing} does not exist)" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and "data.train.root" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"t10k-images-idx3-ubyte.*not found in {empty}"):
        FashionMNIST(empty, split="test")
