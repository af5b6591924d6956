"""Fashion-MNIST from the standard gzip IDX files, with captions made from the class names."""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.sampler import index_epoch

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a {}",
    "a black and white photo of a {}",
    "a picture of a {}",
    "a low resolution photo of a {}",
    "a grayscale image of a {}",
)
_FILES = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or raw) as a numpy array, with its header checked against its size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path}: IDX body has {len(body)} bytes, header {dims} needs {expected} (truncated?)")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(root: Path, split: str, kind: str) -> Path:
    stem = _FILES[split].format(kind, 3 if kind == "images" else 1)
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    where = f"in {root}" if root.is_dir() else f"({root} does not exist)"
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found {where}. Install Debian's package "
        f"(`sudo apt-get install dataset-fashion-mnist`, files land in {DEFAULT_ROOT}) "
        "or put the four *-ubyte.gz files in a folder and pass data.train.root=<folder>."
    )


def caption_for(label: int, template: str = CAPTION_TEMPLATES[0]) -> str:
    """Fill a template with a class name, fixing the article ("a ankle boot" → "an ankle boot")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(CLASS_NAMES[label]))


class FashionMNIST(Dataset):
    """Items `{"image": (1, S, S) float in [-1, 1], "caption": str, "label": int}`.

    "train"/"val" split the official 60k training set by a seeded permutation (`val_size` held out); "test" is
    the official 10k test set, never trained on. 28×28 images are padded with background (-1) to `image_size`
    when it is larger, resized otherwise. Images stay uint8 in memory; conversion happens per item.
    """

    def __init__(self, root: str | Path = DEFAULT_ROOT, split: str = "train", image_size: int = 32,
                 val_size: int = 5000, seed: int = 0, templates: tuple[str, ...] | None = None):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        root = Path(root)
        src = "test" if split == "test" else "train"
        images_path, labels_path = _find(root, src, "images"), _find(root, src, "labels")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), "
                             f"got {images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(f"{labels_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..{len(CLASS_NAMES) - 1}")
        if split != "test":
            if not 0 <= val_size < len(images):
                raise ValueError(f"val_size={val_size} must be in [0, {len(images)}) for {len(images)} training "
                                 "images")
            perm = np.random.default_rng(seed).permutation(len(images))
            idx = perm[:val_size] if split == "val" else perm[val_size:]
            images, labels = images[np.sort(idx)], labels[np.sort(idx)]
        # writable copy where needed: np.frombuffer data is read-only, which torch tensors must not wrap
        self.images = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.image_size, self.split = image_size, split
        self.templates = tuple(templates or CAPTION_TEMPLATES)
        self.seed = seed
        self.epoch = 0  # set by the training sampler: captions are a pure function of (seed, epoch, index)

    def __len__(self) -> int:
        return len(self.images)

    def to_image(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.float().div(127.5).sub(1)[None]  # (1, 28, 28) in [-1, 1]
        h = x.shape[-1]
        if self.image_size > h and (self.image_size - h) % 2 == 0:
            p = (self.image_size - h) // 2
            return F.pad(x, (p, p, p, p), value=-1.0)
        if self.image_size != h:
            return F.interpolate(x[None], size=self.image_size, mode="bilinear", antialias=True,
                                 align_corners=False)[0].clamp(-1, 1)
        return x

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        epoch = index_epoch(i, self.epoch)
        pick = random.Random(f"{self.seed}/{epoch}/{int(i)}").randrange(len(self.templates))
        return {"image": self.to_image(self.images[i]), "label": label,
                "caption": caption_for(label, self.templates[pick])}
