"""Your own images with captions: a folder (searched recursively) of png/jpg/jpeg/webp files, each captioned by a
same-named `.txt` file or by a line of a `metadata.jsonl` (the Hugging Face imagefolder convention).

Bad input never stops training and is never dropped silently:
- at index time, files that are empty, unreadable, not a decodable image (header + `Image.verify`), over
  `max_pixels`, in an unsupported mode, or without a caption are skipped; each reason is counted in
  `ImageFolder.skipped`, the first few files per reason are logged, then one summary line. `check="decode"`
  also decodes every image up front (catches truncated JPEGs, which pass `verify`, at the cost of a full read).
- at load time, an image that still fails to decode is replaced by the next loadable item (deterministic: the
  same index always gives the same replacement), counted in `load_failures` and logged. These counters live in
  the process that loads (each DataLoader worker has its own); the log lines reach the console from all of them.
- captions: a `.txt`/metadata caption that is not valid UTF-8 is decoded with U+FFFD replacement characters and
  kept (losing an image for a few bad bytes is worse than a slightly wrong caption); an empty caption is kept as
  "" (trained as unconditional). Both are counted in `caption_issues` and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.sampler import index_epoch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
# Modes Pillow gives for png/jpeg/webp files that `convert_image` turns into 8-bit RGB or L.
SUPPORTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                   "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_ALPHA_MODES = {"LA", "PA", "RGBA"}
_LOGGED_PER_REASON = 5  # per-file warnings per reason before only the summary counts


def _high_bit_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float greyscale → 8-bit L.

    I;16*: v / 257 (0..65535 → 0..255 exactly). I: the same when the values fit in 16 bits (Pillow's container
    for 16-bit data), else stretched from min..max. F: ×255 when in [0, 1], else stretched from min..max.
    """
    a = np.asarray(img).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def convert_image(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """Any supported Pillow mode → 8-bit `mode` ("RGB" or "L"); transparency is composited on white."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_8bit(img)
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        img = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    return img if img.mode == mode else img.convert(mode)


def decode_caption(data: bytes) -> tuple[str, bool]:
    """(caption, was valid UTF-8): a BOM is dropped, surrounding whitespace stripped, bad bytes become U+FFFD."""
    try:
        return data.decode("utf-8-sig").strip(), True
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="replace").strip(), False


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()))


def held_out(names: list[str], fraction: float, seed: int) -> set[str]:
    """The seeded validation subset: the round(fraction·n) names (at least one) that rank first by a hash of
    (seed, name). Depends on names only, not on their order or on which files later fail their checks."""
    if fraction <= 0:
        return set()
    k = max(1, round(fraction * len(names)))
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    return set(ranked[:k])


class ImageFolder(Dataset):
    """Items `{"image": (C, S, S) float in [-1, 1], "caption": str, "label": -1}`, as `FashionMNIST` gives them.

    root: folder searched recursively. split: "all" (every usable image), or "train"/"val" — a seeded held-out
    `val_fraction` of the images (for a separate validation folder use split="all" on that folder).
    image_size: the shorter side is resized to it (bicubic, antialiased), then a `crop` ("center" or "random")
    makes it square; `flip` mirrors half of the items. mode: "RGB" (C=3) or "L" (C=1).
    caption_column: the caption key in metadata.jsonl lines (`file_name` names the image, relative to the
    metadata file's folder); a metadata caption wins over a `.txt` file. max_pixels: larger images are skipped
    (None: Pillow's decompression-bomb limit). check: "verify" (header, size, `Image.verify`) or "decode".
    Crop and flip are a pure function of (seed, epoch, index), so a resumed run sees the same augmentations.
    """

    def __init__(self, root: str | Path, split: str = "all", image_size: int = 256, mode: str = "RGB",
                 crop: str = "center", flip: bool = False, caption_column: str = "text", val_fraction: float = 0.0,
                 seed: int = 0, max_pixels: int | None = None, check: str = "verify"):
        if split not in ("all", "train", "val"):
            raise ValueError(f"split must be all, train or val, got {split!r}")
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be RGB or L, got {mode!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be center or random, got {crop!r}")
        if check not in ("verify", "decode"):
            raise ValueError(f"check must be verify or decode, got {check!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if split == "val" and val_fraction == 0:
            raise ValueError("split='val' needs val_fraction > 0 (e.g. data.train.val_fraction=0.05), or point the "
                             "val split at its own folder with split=all (data.val.root=<dir> data.val.split=all)")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory"
                                    if not self.root.exists() else f"{self.root} is not a directory")
        self.split, self.image_size, self.mode, self.crop, self.flip = split, image_size, mode, crop, flip
        self.caption_column, self.seed, self.check = caption_column, seed, check
        self.max_pixels = int(max_pixels or Image.MAX_IMAGE_PIXELS or 0) or None
        if self.max_pixels and Image.MAX_IMAGE_PIXELS and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            log.info("raising Pillow's MAX_IMAGE_PIXELS to max_pixels=%d", self.max_pixels)
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        self.epoch = 0  # set by the training sampler
        self.skipped: Counter[str] = Counter()
        self.skipped_files: list[tuple[str, str]] = []  # (path relative to root, reason)
        self.caption_issues: Counter[str] = Counter()
        self.load_failures: Counter[str] = Counter()
        self._failed: set[int] = set()
        self.files: list[str] = []  # relative posix paths of the usable images
        self.captions: list[str] = []
        self._build_index(val_fraction)

    # ---- index ------------------------------------------------------------------------------------
    def _note(self, counter: Counter, reason: str, rel: str, detail: str = "") -> None:
        counter[reason] += 1
        if counter is self.skipped:
            self.skipped_files.append((rel, reason))
        if counter[reason] <= _LOGGED_PER_REASON:
            verb = "skipped" if counter is self.skipped else "caption"
            log.warning("%s: %s %s (%s)%s", self.root, verb, rel, reason, f": {detail}" if detail else "")

    def _walk(self) -> tuple[list[str], list[str]]:
        """(image paths, metadata.jsonl paths), relative posix, sorted; symlinked folders are not followed."""
        images, metas = [], []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.root)
            for name in sorted(filenames):
                rel = (rel_dir / name).as_posix()
                if name == METADATA_FILE:
                    metas.append(rel)
                elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    images.append(rel)
        return images, metas

    def _read_metadata(self, metas: list[str], images: set[str]) -> dict[str, str]:
        """file → caption from every metadata.jsonl; bad lines are counted as skipped `metadata_*` entries."""
        captions: dict[str, str] = {}
        for meta in metas:
            base = os.path.dirname(meta)
            try:
                lines = (self.root / meta).read_bytes().splitlines()
            except OSError as e:
                self._note(self.skipped, "metadata_unreadable", meta, str(e))
                continue
            for n, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                where = f"{meta}:{n}"
                text, utf8 = decode_caption(raw)
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    self._note(self.skipped, "metadata_bad_line", where, str(e))
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or \
                        not isinstance(row.get(self.caption_column), str):
                    self._note(self.skipped, "metadata_bad_line", where,
                               f"needs string 'file_name' and {self.caption_column!r}")
                    continue
                rel = os.path.normpath(os.path.join(base, row["file_name"])).replace(os.sep, "/")
                if rel not in images:
                    self._note(self.skipped, "metadata_missing_file", where, f"no image {rel}")
                    continue
                if rel in captions:
                    self._note(self.skipped, "metadata_duplicate", where, f"{rel} listed again (first kept)")
                    continue
                captions[rel] = row[self.caption_column].strip()
                if not utf8:
                    self._note(self.caption_issues, "not_utf8", where, "decoded with replacement characters")
        return captions

    def _caption(self, rel: str, from_metadata: dict[str, str]) -> str | None:
        if rel in from_metadata:
            return from_metadata[rel]
        txt = self.root / (os.path.splitext(rel)[0] + ".txt")
        if not txt.is_file():
            self._note(self.skipped, "no_caption", rel, f"no {txt.name} and not in any {METADATA_FILE}")
            return None
        try:
            caption, utf8 = decode_caption(txt.read_bytes())
        except OSError as e:
            self._note(self.skipped, "caption_unreadable", rel, str(e))
            return None
        if not utf8:
            self._note(self.caption_issues, "not_utf8", rel, f"{txt.name} decoded with replacement characters")
        return caption

    def _check_image(self, rel: str) -> tuple[str, str] | None:
        """None when the image passes the cheap checks, else (reason it is skipped, detail)."""
        path = self.root / rel
        try:
            if path.stat().st_size == 0:
                return "empty_file", "0 bytes"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
                    if self.max_pixels and w * h > self.max_pixels:
                        return "too_large", f"{w}x{h} is over max_pixels={self.max_pixels}"
                    if im.mode not in SUPPORTED_MODES:
                        return "unsupported_mode", f"mode {im.mode}"
                    if w < 1 or h < 1:
                        return "corrupt", f"size {w}x{h}"
                    if self.check == "decode":
                        im.load()
                    else:
                        im.verify()
        except Image.DecompressionBombError as e:
            return "too_large", str(e)
        except (PermissionError, FileNotFoundError) as e:  # no permission; a broken symlink
            return "unreadable", str(e)
        except Exception as e:  # noqa: BLE001 — Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            return "corrupt", f"{type(e).__name__}: {e}"
        return None

    def _build_index(self, val_fraction: float) -> None:
        images, metas = self._walk()
        from_metadata = self._read_metadata(metas, set(images))
        if self.split != "all":
            val = held_out(images, val_fraction, self.seed)
            images = [r for r in images if (r in val) == (self.split == "val")]
        for rel in images:
            caption = self._caption(rel, from_metadata)
            if caption is None:
                continue
            bad = self._check_image(rel)
            if bad is not None:
                self._note(self.skipped, bad[0], rel, bad[1])
                continue
            if not caption:
                self._note(self.caption_issues, "empty", rel, "kept as an unconditional example")
            self.files.append(rel)
            self.captions.append(caption)
        what = f"{self.root} ({self.split} split)"
        if self.skipped:
            log.warning("%s: skipped %d files: %s", what, sum(self.skipped.values()), _counts(self.skipped))
        if self.caption_issues:
            log.warning("%s: caption issues (kept): %s", what, _counts(self.caption_issues))
        if not self.files:
            found = f"{len(images)} candidate images" if images else \
                f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files"
            raise ValueError(f"no usable images in {what}: {found}"
                             + (f", skipped {_counts(self.skipped)}" if self.skipped else ""))
        log.info("%s: %d images", what, len(self.files))

    # ---- items ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.files)

    def load(self, j: int) -> Image.Image:
        """Image j decoded, upright (EXIF orientation) and converted to 8-bit `mode`, before resizing."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(self.root / self.files[j]) as im:
                im.draft(None, (self.image_size, self.image_size))  # JPEG: decode at a reduced scale ≥ size
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 — a broken EXIF block: keep the pixels as stored
                    pass
                return convert_image(im, self.mode)

    def transform(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """Shorter side → image_size, square crop, optional flip; (C, S, S) float in [-1, 1]."""
        s = self.image_size
        w, h = img.size
        scale = s / min(w, h)
        size = (max(s, round(w * scale)), max(s, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.Resampling.BICUBIC)
        if self.crop == "random":
            left, top = rng.randint(0, size[0] - s), rng.randint(0, size[1] - s)
        else:
            left, top = (size[0] - s) // 2, (size[1] - s) // 2
        img = img.crop((left, top, left + s, top + s))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8))
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return x.float().div(127.5).sub(1.0)

    def __getitem__(self, i: int) -> dict:
        n = len(self.files)
        epoch = index_epoch(i, self.epoch)
        for k in range(n):
            j = (int(i) + k) % n
            if j in self._failed:
                continue
            try:
                img = self.load(j)
            except Exception as e:  # noqa: BLE001 — any decoder error: use the next item, never crash training
                self._failed.add(j)
                self.load_failures[type(e).__name__] += 1
                log.warning("%s: %s failed to load (%s: %s); using the next loadable image instead", self.root,
                            self.files[j], type(e).__name__, e)
                continue
            rng = random.Random(f"{self.seed}/{epoch}/{int(i)}")
            return {"image": self.transform(img, rng), "caption": self.captions[j], "label": -1}
        raise RuntimeError(f"{self.root}: none of the {n} indexed images could be loaded "
                           f"({_counts(self.load_failures)})")
