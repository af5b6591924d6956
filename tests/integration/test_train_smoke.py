"""`train.py` end to end on tiny models and generated data: both experiments run and write what they promise."""

from __future__ import annotations

from pathlib import Path

from .conftest import QUICK, TINY_AE_F2, TINY_UNET, data_overrides, run_train


def test_autoencoder_then_ldm_experiments(fmnist_root: Path, tmp_path: Path):
    ae_dir, ldm_dir = tmp_path / "ae", tmp_path / "ldm"
    run_train(["experiment=fmnist_autoencoder_f2", f"hydra.run.dir={ae_dir}", "trainer.max_steps=6",
               "trainer.val_check_interval=3", "trainer.limit_val_batches=1", *TINY_AE_F2, *QUICK,
               *data_overrides(fmnist_root)])
    assert (ae_dir / "checkpoints" / "last.ckpt").is_file()
    assert {p.name for p in (ae_dir / "export").iterdir()} >= {"model.safetensors", "config.json"}
    assert list((ae_dir / "images").glob("*.png"))
    # the same command again is a fresh run into a folder holding the first run's checkpoints: refused before
    # anything is built, and the first run's checkpoints are untouched (Lightning would write last-v1.ckpt beside them)
    before = {p.name: p.stat().st_mtime_ns for p in (ae_dir / "checkpoints").iterdir()}
    again = run_train(["experiment=fmnist_autoencoder_f2", f"hydra.run.dir={ae_dir}", "trainer.max_steps=6",
                       *TINY_AE_F2, *QUICK, *data_overrides(fmnist_root)], check=False)
    assert again.returncode != 0 and "already holds checkpoints of an earlier run" in again.stderr
    assert "ckpt_path=last" in again.stderr and "Instantiating data" not in again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (ae_dir / "checkpoints").iterdir()} == before
    run_train(["experiment=fmnist_ldm", f"hydra.run.dir={ldm_dir}", f"model.first_stage={ae_dir / 'export'}",
               "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
               "model.sample_every_n_steps=4", "model.val_steps=2", "model.val_images_per_prompt=1",
               "model.val_prompts=[a photo of a bag,a photo of a dress]", *TINY_UNET, *QUICK,
               *data_overrides(fmnist_root)])
    assert (ldm_dir / "checkpoints" / "last.ckpt").is_file()
    assert (ldm_dir / "export" / "unet.safetensors").is_file()
    assert list((ldm_dir / "images").glob("samples_step*.png"))
