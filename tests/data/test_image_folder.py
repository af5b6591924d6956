"""ImageFolder on generated files: every Pillow mode to 8-bit RGB/L, captions from .txt and metadata.jsonl, bad
files skipped and counted by reason, load-time failures replaced deterministically, splits, crops, errors."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.datamodule import DataModule, collate
from ldm.data.image_folder import ImageFolder, convert_image, decode_caption, held_out

LOGGER = "ldm.data.image_folder"


def to_u8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] back to (H, W, C) uint8 values."""
    return ((x + 1) * 127.5).round().to(torch.int64).permute(1, 2, 0).numpy()


def save(root: Path, name: str, img: Image.Image | bytes, caption: str | bytes | None = "a caption", **kw) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(img, bytes):
        path.write_bytes(img)
    else:
        img.save(path, **kw)
    if caption is not None:
        txt = path.with_suffix(".txt")
        txt.write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    return path


def noise(size=(16, 12), mode="RGB", seed=0) -> Image.Image:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a signature, an IHDR claiming width×height RGB and IEND: cheap "huge" image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def jpeg_bytes(size=(128, 128), seed=0) -> bytes:
    buf = io.BytesIO()
    noise(size, seed=seed).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ---- modes ------------------------------------------------------------------------------------------
def single(tmp_path: Path, img: Image.Image, name: str = "x.png", mode: str = "RGB", **save_kw) -> np.ndarray:
    """The one item of a folder holding `img` (8×8, no resize) as uint8 (H, W, C)."""
    save(tmp_path, name, img, **save_kw)
    ds = ImageFolder(tmp_path, image_size=img.size[0], mode=mode)
    x = ds[0]["image"]
    assert x.shape == ((3 if mode == "RGB" else 1), 8, 8) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    return to_u8(x)


def test_rgba_is_composited_on_white(tmp_path: Path):
    img = Image.new("RGBA", (8, 8), (200, 100, 50, 128))
    img.putpixel((0, 0), (10, 20, 30, 0))      # fully transparent → white
    img.putpixel((1, 0), (10, 20, 30, 255))    # opaque → itself
    px = single(tmp_path, img)
    # c·a + 255·(1 − a), a = 128/255
    assert px[4, 4].tolist() == [227, 177, 152]
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [10, 20, 30]


def test_la_composited_and_l_kept(tmp_path: Path):
    la = Image.new("LA", (8, 8), (100, 128))
    assert single(tmp_path / "la", la)[0, 0].tolist() == [177, 177, 177]
    assert single(tmp_path / "la_l", la, mode="L")[0, 0].tolist() == [177]
    gray = Image.new("L", (8, 8), 100)
    assert single(tmp_path / "l", gray)[3, 3].tolist() == [100, 100, 100]
    assert single(tmp_path / "l_l", gray, mode="L")[3, 3].tolist() == [100]


def test_palette_with_and_without_transparency(tmp_path: Path):
    img = Image.new("P", (8, 8), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    assert single(tmp_path / "p", img)[0, 0].tolist() == [255, 0, 0]
    assert single(tmp_path / "p", img)[5, 5].tolist() == [0, 0, 255]
    px = single(tmp_path / "pt", img, transparency=0)  # palette index 0 transparent
    assert Image.open(tmp_path / "pt" / "x.png").mode == "P"
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[5, 5].tolist() == [0, 0, 255]


def test_cmyk_jpeg(tmp_path: Path):
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in Pillow's naive CMYK→RGB
    save(tmp_path, "x.jpg", img, quality=100)
    assert Image.open(tmp_path / "x.jpg").mode == "CMYK"
    px = to_u8(ImageFolder(tmp_path, image_size=8)[0]["image"])
    assert np.abs(px[4, 4].astype(int) - [255, 0, 0]).max() <= 3


def test_16_bit_gradient_maps_to_8_bit(tmp_path: Path):
    values = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    img = Image.fromarray(values)
    save(tmp_path, "g.png", img)
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    ds = ImageFolder(tmp_path, image_size=8, mode="L")
    got = to_u8(ds[0]["image"])[..., 0]
    np.testing.assert_array_equal(got, np.round(values / 257.0).astype(int))
    assert got.min() == 0 and got.max() == 255


@pytest.mark.parametrize("mode, fill, expected", [
    ("I", 65535, 255), ("I", 257 * 10, 10), ("F", 0.5, 128), ("1", 1, 255), ("YCbCr", (128, 128, 128), 128),
])
def test_convert_image_other_modes(mode, fill, expected):
    out = convert_image(Image.new(mode, (2, 2), fill), "L")
    assert out.mode == "L" and abs(out.getpixel((0, 0)) - expected) <= 1


def test_convert_image_stretches_out_of_range_values():
    img = Image.fromarray(np.array([[-5.0, 5.0]], dtype=np.float32), "F")
    assert list(convert_image(img, "L").getdata()) == [0, 255]
    with pytest.raises(ValueError, match="mode must be"):
        convert_image(img, "CMYK")


# ---- formats and captions ---------------------------------------------------------------------------
def test_formats_recursive_case_insensitive_and_txt_captions(tmp_path: Path):
    save(tmp_path, "a.png", noise(), "png caption\n")
    save(tmp_path, "sub/b.JPG", noise(), "jpg caption")
    save(tmp_path, "sub/deeper/c.webp", noise(), "webp caption", lossless=True)
    save(tmp_path, "sub/d.jpeg", noise(), "jpeg caption")
    (tmp_path / "notes.md").write_text("not an image")
    ds = ImageFolder(tmp_path, image_size=8)
    assert ds.files == ["a.png", "sub/b.JPG", "sub/d.jpeg", "sub/deeper/c.webp"]
    assert [ds[i]["caption"] for i in range(4)] == ["png caption", "jpg caption", "jpeg caption", "webp caption"]
    assert not ds.skipped and not ds.caption_issues
    item = ds[0]
    assert set(item) == {"image", "caption", "label"} and item["label"] == -1
    assert item["image"].shape == (3, 8, 8)


def test_metadata_jsonl_captions_column_and_bad_lines(tmp_path: Path, caplog):
    for name in ("a.png", "b.png", "sub/c.png", "d.png"):
        save(tmp_path, name, noise(), caption=None)
    save(tmp_path, "e.png", noise(), caption="from txt")
    (tmp_path / "d.txt").write_text("txt loses to metadata")
    rows = [
        {"file_name": "a.png", "caption": "first"},
        {"file_name": "sub/c.png", "caption": "third"},
        {"file_name": "d.png", "caption": "fourth"},
        {"file_name": "a.png", "caption": "again"},        # duplicate: first kept
        {"file_name": "missing.png", "caption": "gone"},   # no such image
        {"file_name": "b.png", "text": "wrong column"},    # b then has no caption at all
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", ""]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageFolder(tmp_path, image_size=8, caption_column="caption")
    assert dict(zip(ds.files, ds.captions, strict=True)) == {"a.png": "first", "d.png": "fourth", "e.png": "from txt",
                                                "sub/c.png": "third"}
    assert ds.skipped == {"metadata_duplicate": 1, "metadata_missing_file": 1, "metadata_bad_line": 2,
                          "no_caption": 1}
    assert ("b.png", "no_caption") in ds.skipped_files
    assert "skipped 5 files" in caplog.text and "metadata.jsonl:7" in caplog.text


def test_metadata_in_a_subfolder_is_relative_to_it(tmp_path: Path):
    save(tmp_path, "train/x.png", noise(), caption=None)
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "sub"}) + "\n")
    ds = ImageFolder(tmp_path, image_size=8)
    assert ds.files == ["train/x.png"] and ds.captions == ["sub"]


def test_non_utf8_and_empty_captions_are_kept_counted_and_logged(tmp_path: Path, caplog):
    save(tmp_path, "latin1.png", noise(), "caf\xe9 au lait".encode("latin-1"))
    save(tmp_path, "bom.png", noise(), "\ufeffwith bom".encode())
    save(tmp_path, "empty.png", noise(), "  \n")
    save(tmp_path, "ok.png", noise(), "fine")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "meta.png", "text": "na\xefve"}\n')
    save(tmp_path, "meta.png", noise(), caption=None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageFolder(tmp_path, image_size=8)
    caps = dict(zip(ds.files, ds.captions, strict=True))
    assert caps == {"bom.png": "with bom", "empty.png": "", "latin1.png": "caf\ufffd au lait",
                    "meta.png": "na\ufffdve", "ok.png": "fine"}
    assert ds.caption_issues == {"not_utf8": 2, "empty": 1} and not ds.skipped
    assert "caption issues (kept): empty=1, not_utf8=2" in caplog.text
    assert decode_caption(b"\xff\xfe") == ("\ufffd\ufffd", False)


# ---- bad files --------------------------------------------------------------------------------------
def test_bad_files_are_skipped_and_counted_by_reason(tmp_path: Path, caplog):
    save(tmp_path, "good.png", noise(), "good")
    save(tmp_path, "good.jpg", noise(), "good too")
    save(tmp_path, "corrupt.png", b"this is not a png at all")
    save(tmp_path, "corrupt.jpg", b"\xff\xd8\xff\xe0garbage")
    save(tmp_path, "zero.webp", b"")
    png = (tmp_path / "good.png").read_bytes()
    save(tmp_path, "truncated.png", png[: len(png) // 2])
    save(tmp_path, "huge.png", png_header(100_000, 100_000))   # 10^10 pixels: Pillow's bomb error
    save(tmp_path, "big.png", png_header(12_000, 10_000))       # 1.2·10^8: over the limit, under Pillow's error
    save(tmp_path, "uncaptioned.png", noise(), caption=None)
    (tmp_path / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "broken.txt").write_text("caption of a dangling link")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageFolder(tmp_path, image_size=8)  # max_pixels: Pillow's MAX_IMAGE_PIXELS
    assert ds.files == ["good.jpg", "good.png"]
    assert ds.skipped == {"corrupt": 3, "empty_file": 1, "too_large": 2, "no_caption": 1, "unreadable": 1}
    assert sorted(ds.skipped_files) == sorted([
        ("big.png", "too_large"), ("broken.png", "unreadable"), ("corrupt.jpg", "corrupt"),
        ("corrupt.png", "corrupt"), ("huge.png", "too_large"), ("truncated.png", "corrupt"),
        ("uncaptioned.png", "no_caption"), ("zero.webp", "empty_file")])
    summary = [r for r in caplog.records if "skipped 8 files" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    assert "corrupt=3, empty_file=1, no_caption=1, too_large=2, unreadable=1" in summary[0].getMessage()
    assert "huge.png (too_large)" in caplog.text and "12000x10000 is over max_pixels=89478485" in caplog.text
    assert all(ds[i]["image"].shape == (3, 8, 8) for i in range(len(ds)))


def test_lower_max_pixels(tmp_path: Path):
    save(tmp_path, "small.png", noise((8, 8)))
    save(tmp_path, "large.png", noise((64, 64)))
    ds = ImageFolder(tmp_path, image_size=8, max_pixels=1000)
    assert ds.files == ["small.png"] and ds.skipped == {"too_large": 1}


def test_max_pixels_above_pillows_limit_raises_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse 64×64 (> 2 × 1000) outright
    save(tmp_path, "large.png", noise((64, 64)))
    ds = ImageFolder(tmp_path, image_size=8, max_pixels=5000)
    assert ds.files == ["large.png"] and Image.MAX_IMAGE_PIXELS == 5000
    assert ds[0]["image"].shape == (3, 8, 8)


def test_truncated_jpeg_is_replaced_at_load_time_deterministically(tmp_path: Path, caplog):
    for i in range(4):
        save(tmp_path, f"{i}.jpg", jpeg_bytes(seed=i), f"caption {i}")
    data = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(data[: len(data) // 2])  # passes Image.verify, fails to decode
    ds = ImageFolder(tmp_path, image_size=16)
    assert len(ds) == 4 and not ds.skipped
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        item = ds[1]
    assert item["caption"] == "caption 2"  # the next loadable item, image and caption together
    assert torch.equal(item["image"], ds[2]["image"])
    assert ds.load_failures == {"OSError": 1}
    assert "1.jpg failed to load" in caplog.text and "truncated" in caplog.text
    assert ds[1]["caption"] == "caption 2" and ds.load_failures == {"OSError": 1}  # remembered, not retried
    fresh = ImageFolder(tmp_path, image_size=16)
    assert [fresh[i]["caption"] for i in (3, 1, 0)] == ["caption 3", "caption 2", "caption 0"]
    # check="decode" finds it before training instead
    decoded = ImageFolder(tmp_path, image_size=16, check="decode")
    assert decoded.skipped == {"corrupt": 1} and len(decoded) == 3


def test_every_image_failing_at_load_time_is_a_clear_error(tmp_path: Path):
    data = jpeg_bytes()
    save(tmp_path, "t.jpg", data[: len(data) // 2])
    ds = ImageFolder(tmp_path, image_size=16)
    with pytest.raises(RuntimeError, match="none of the 1 indexed images could be loaded"):
        ds[0]


def test_missing_empty_and_all_bad_folders_are_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ImageFolder(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no usable images in {tmp_path / 'empty'}.*no png/jpg/jpeg/webp files"):
        ImageFolder(tmp_path / "empty")
    save(tmp_path / "bad", "zero.png", b"")
    save(tmp_path / "bad", "nocap.png", noise(), caption=None)
    with pytest.raises(ValueError, match=r"no usable images.*2 candidate images, skipped empty_file=1, no_caption=1"):
        ImageFolder(tmp_path / "bad")


@pytest.mark.parametrize("kw, match", [
    ({"split": "test"}, "split must be"), ({"mode": "CMYK"}, "mode must be"), ({"crop": "none"}, "crop must be"),
    ({"check": "full"}, "check must be"), ({"image_size": 0}, "image_size"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"split": "val"}, "needs val_fraction > 0"),
])
def test_bad_arguments(tmp_path: Path, kw, match):
    with pytest.raises(ValueError, match=match):
        ImageFolder(tmp_path, **kw)


# ---- geometry and splits ----------------------------------------------------------------------------
def test_shorter_side_resized_then_center_crop(tmp_path: Path):
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :10], a[:, 10:30], a[:, 30:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)  # red | green | blue
    save(tmp_path, "wide.png", Image.fromarray(a))
    x = to_u8(ImageFolder(tmp_path, image_size=10)[0]["image"])  # 40×20 → 20×10 → centre 10×10: all green
    assert x.shape == (10, 10, 3)
    assert np.abs(x[:, 1:-1].astype(int) - [0, 255, 0]).max() <= 2


def test_random_crop_and_flip_follow_seed_epoch_and_index(tmp_path: Path):
    save(tmp_path, "x.png", noise((32, 16)))
    ds = ImageFolder(tmp_path, image_size=8, crop="random", flip=True, seed=1)
    by_epoch = []
    for epoch in range(6):
        ds.epoch = epoch
        by_epoch.append(ds[0]["image"])
        assert torch.equal(ds[0]["image"], by_epoch[-1])
    assert len({t.numpy().tobytes() for t in by_epoch}) > 1  # crops/flips differ across epochs
    again = ImageFolder(tmp_path, image_size=8, crop="random", flip=True, seed=1)
    again.epoch = 3
    assert torch.equal(again[0]["image"], by_epoch[3])


def test_train_val_split_is_seeded_disjoint_and_complete(tmp_path: Path):
    for i in range(20):
        save(tmp_path, f"{i:02d}.png", noise((4, 4), seed=i), f"c{i}")
    kw = {"image_size": 4, "val_fraction": 0.25, "seed": 5}
    train, val = ImageFolder(tmp_path, split="train", **kw), ImageFolder(tmp_path, split="val", **kw)
    assert len(val) == 5 and len(train) == 15
    assert not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == ImageFolder(tmp_path, image_size=4).files
    assert ImageFolder(tmp_path, split="val", **kw).files == val.files
    assert ImageFolder(tmp_path, split="val", **{**kw, "seed": 6}).files != val.files
    assert held_out(["a"], 0.01, 0) == {"a"} and held_out(["a", "b"], 0.0, 0) == set()


def test_datamodule_batches_match_fashion_mnist_keys(tmp_path: Path):
    for i in range(8):
        save(tmp_path, f"{i}.png", noise((12, 10), seed=i), f"caption {i}")
    dm = DataModule(train=lambda: ImageFolder(tmp_path, image_size=8), batch_size=4, seed=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {"image", "caption", "label"}
    assert b["image"].shape == (4, 3, 8, 8) and b["label"].tolist() == [-1] * 4
    assert all(c.startswith("caption ") for c in b["caption"])
    one = collate([ImageFolder(tmp_path, image_size=8, mode="L")[0]])
    assert one["image"].shape == (1, 1, 8, 8)


def test_a_mode_convert_image_does_not_know_is_skipped_and_counted(tmp_path: Path, monkeypatch):
    # Every mode Pillow gives for png/jpeg/webp today is handled; a new one must be skipped, not crash a worker.
    import ldm.data.image_folder as image_folder

    monkeypatch.setattr(image_folder, "SUPPORTED_MODES", image_folder.SUPPORTED_MODES - {"CMYK"})
    save(tmp_path, "rgb.png", noise())
    save(tmp_path, "cmyk.jpg", noise().convert("CMYK"))
    ds = ImageFolder(tmp_path, image_size=8)
    assert ds.files == ["rgb.png"] and ds.skipped == {"unsupported_mode": 1}
    assert ds.skipped_files == [("cmyk.jpg", "unsupported_mode")]
