"""Generated data for the data-layer tests: tiny gzip IDX files (no Fashion-MNIST install needed)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX encoding of `array`: magic (0, 0, type, ndim), big-endian dims, then the data."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: Path, array: np.ndarray, *, raw: bytes | None = None) -> Path:
    """Write `array` as uint8 IDX (gzip when the name ends in .gz), or the bytes `raw` as they are."""
    data = raw if raw is not None else idx_bytes(np.asarray(array, dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_fmnist(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Four Fashion-MNIST-named gzip files; image i of a split has pixel value (i mod 256) at [0, 0]."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    return make_fmnist(tmp_path / "fmnist")
