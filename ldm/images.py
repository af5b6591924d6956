"""Tensor ↔ PNG: grids and single images, with generation metadata in PNG text chunks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] → uint8 (B, H, W, C)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile (B, C, H, W) into one (C, H', W') image with `nrow` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = images.new_full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] → PIL image (L or RGB)."""
    arr = to_uint8(image[None])[0].numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_png(image: Tensor, path: str | Path, metadata: dict | None = None) -> Path:
    """Write (C, H, W) in [-1, 1] as PNG; each metadata item becomes a tEXt chunk (values JSON-encoded
    unless already strings)."""
    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path, pnginfo=info)
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, metadata: dict | None = None) -> Path:
    return save_png(make_grid(images, nrow=nrow), path, metadata)


def upscale_nearest(images: Tensor, factor: int) -> Tensor:
    """Enlarge tiny images (e.g. 32×32 Fashion-MNIST) so a grid is easy to look at."""
    return images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2) if factor > 1 else images


def load_image(path: str | Path, channels: int, size: tuple[int, int] | None = None) -> Tensor:
    """An image file as (1, channels, H, W) in [-1, 1] (grey for 1 channel, RGB for 3), resized (bicubic) to
    `size` = (H, W) if given; a missing or unreadable file gets a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.size[1], im.size[0], -1)
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path} is not a readable image ({e})") from e
    return arr.permute(2, 0, 1)[None].float() / 127.5 - 1


def load_mask(path: str | Path, size: tuple[int, int]) -> Tensor:
    """A mask file as (1, 1, H, W) in {0, 1} (white, > 50 %: repaint; black: keep); it must be (H, W) = `size`,
    the size of the image it goes with."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} does not exist")
    try:
        with Image.open(path) as im:
            got = (im.size[1], im.size[0])
    except OSError as e:
        raise ValueError(f"{path} is not a readable image ({e})") from e
    if got != tuple(size):
        raise ValueError(f"mask {path} is {got[0]}×{got[1]} (H×W) but the image is {size[0]}×{size[1]}: "
                         "give a mask of the image's size")
    return (load_image(path, 1) > 0).float()
