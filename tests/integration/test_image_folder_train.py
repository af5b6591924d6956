"""`data=image_folder`: the config composes with both experiments, instantiates the DataModule on a generated folder
(held-out val, separate val folder, no val), and trains the autoencoder two steps through train.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from .conftest import QUICK, ROOT, TINY_AE, run_train

RGB_AE = ["model.ddconfig.in_channels=3", "model.ddconfig.out_ch=3"]


def make_folder(root: Path, n: int = 20, seed: int = 0) -> Path:
    """n captioned RGB images of mixed sizes, plus one corrupt file that must be skipped, not fatal."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 32 + 4 * (i % 3), 32 + 8 * (i % 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a photo number {i}")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "broken.txt").write_text("a broken photo")
    return root


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("experiment", ["fmnist_autoencoder", "fmnist_ldm"])
def test_image_folder_config_composes_with_the_experiments(experiment: str, tmp_path: Path):
    cfg = compose_cfg([f"experiment={experiment}", "data=image_folder", f"data.train.root={tmp_path}"])
    assert cfg.data.train._target_ == "ldm.data.image_folder.ImageFolder"
    assert cfg.data.val.root == str(tmp_path) and cfg.data.val.split == "val"
    assert cfg.data.train.mode == "RGB" and cfg.data.val.image_size == cfg.data.train.image_size
    with pytest.raises(MissingMandatoryValue, match="root"):
        OmegaConf.to_container(compose_cfg(["data=image_folder"]).data, resolve=True, throw_on_missing=True)


def test_image_folder_datamodule_splits(tmp_path: Path):
    folder = make_folder(tmp_path / "images")
    base = ["data=image_folder", f"data.train.root={folder}", "data.train.image_size=16", "data.num_workers=0",
            "data.batch_size=4", "data.train.val_fraction=0.2"]
    dm = instantiate(compose_cfg(base).data)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(train) + len(val) == 20 and len(val) >= 3  # 4 of 21 candidates held out; the corrupt one skipped
    assert not set(train.files) & set(val.files)
    assert sum(train.skipped.values()) + sum(val.skipped.values()) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["caption"]) == 4
    assert next(iter(dm.val_dataloader()))["image"].shape[1:] == (3, 16, 16)

    other = make_folder(tmp_path / "val", n=3, seed=1)
    dm = instantiate(compose_cfg([*base, f"data.val.root={other}", "data.val.split=all"]).data)
    dm.setup("fit")
    assert len(dm.datasets["val"]) == 3 and dm.datasets["val"].root == other

    dm = instantiate(compose_cfg([*base, "data.val=null", "data.train.val_fraction=0"]).data)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 20 and dm.val_dataloader() == []


def test_train_autoencoder_on_an_image_folder(tmp_path: Path):
    folder = make_folder(tmp_path / "images")
    run = tmp_path / "run"
    proc = run_train(["experiment=fmnist_autoencoder", "data=image_folder", f"data.train.root={folder}",
                      "data.train.image_size=32", "data.num_workers=0", "data.batch_size=4",
                      f"hydra.run.dir={run}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                      "trainer.limit_val_batches=1", *TINY_AE, *RGB_AE, *QUICK])
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "export" / "model.safetensors").is_file()
    log = proc.stdout + proc.stderr
    assert "skipped broken.jpg (corrupt)" in log
