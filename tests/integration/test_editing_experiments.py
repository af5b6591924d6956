"""The editing experiments (inpainting model, semantic synthesis, upscaler) train through `train.py` as the docs
launch them, export, and their export samples through the editing pipeline."""

from __future__ import annotations

import pytest
import torch

from .conftest import QUICK, TINY_UNET, data_overrides, run_train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("experiment", ["fmnist_inpaint", "fmnist_semantic", "fmnist_upscale"])
def test_editing_experiment_trains_and_samples(experiment, fmnist_root, tiny_ae_export, tmp_path):
    from ldm.editing_pipeline import EditingPipeline

    run = tmp_path / "run"
    run_train([f"experiment={experiment}", "trainer.max_steps=2", "trainer.val_check_interval=2",
               "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=1", *QUICK,
               *data_overrides(fmnist_root, batch_size=8), *TINY_UNET, f"model.first_stage={tiny_ae_export}",
               "logger=csv", f"hydra.run.dir={run}"], timeout=240)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    export = run / "export"
    pipe = EditingPipeline.from_checkpoint(export, device="cpu")
    image = torch.zeros(1, 1, 32, 32)
    kw = dict(steps=2, progress=False)
    if experiment == "fmnist_inpaint":
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1
        out = pipe.inpaint(image, mask, "a bag", **kw)
        assert out["settings"]["known_region_max_abs_error"] == 0.0
    elif experiment == "fmnist_semantic":
        from ldm.data.segmentation import one_hot_map

        out = pipe.text_to_image("a bag", concat=one_hot_map(torch.zeros(1, 32, 32, dtype=torch.long)), **kw)
    else:
        out = pipe.upscale(torch.zeros(1, 1, 16, 16), "a bag", noise_level=10, reference=image, **kw)
        assert "bicubic_psnr_db" in out["settings"]
    assert out["images"].shape[-2:] == (32, 32) and torch.isfinite(out["images"]).all()
