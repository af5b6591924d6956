"""experiment=sd_v1_finetune / sd_v2_finetune compose with a user's SD file, train a step on an image folder, and
the result samples; sample.py's pipeline takes SD files and diffusers folders directly."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

from ldm import runtime
from ldm.pipeline import LatentDiffusionPipeline
from tests.convert.test_from_original import original_file
from tests.convert.tiny import write_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_finetune_experiment_trains_and_samples(layout, tmp_path):
    torch.set_num_threads(1)
    original_file(layout, tmp_path / "sd.ckpt")
    tok = write_tokenizer(tmp_path / "tok")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of thing {i}")
    runtime.register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"experiment=sd_{layout}_finetune", "trainer=cpu", f"model.path={tmp_path / 'sd.ckpt'}",
            f"model.tokenizer={tok}", f"data.train.root={images}", "data.train.image_size=16", "data.batch_size=2",
            "data.num_workers=0", "data.train.val_fraction=0.25", "model.val_prompts=null",
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'out'}", "model.model_type=" + ("v1" if layout == "v1" else "v2-v")])
    model = instantiate(cfg.model, _convert_="all")
    assert model.hparams.lr == 1e-5 and model.unet.input_blocks[1][0].use_checkpoint
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    pipe = LatentDiffusionPipeline.from_checkpoint(tmp_path / "ft.ckpt", device="cpu")
    out = pipe.text_to_image("a photo", steps=2, guidance=7.5, height=16, width=16, progress=False)
    assert out["images"].shape == (1, 3, 16, 16) and torch.isfinite(out["images"]).all()


def test_pipeline_samples_from_an_sd_file(tmp_path):
    torch.set_num_threads(1)
    original_file("v1", tmp_path / "sd.safetensors.ckpt")
    tok = write_tokenizer(tmp_path / "tok")
    pipe = LatentDiffusionPipeline.from_checkpoint(tmp_path / "sd.safetensors.ckpt", device="cpu",
                                                   sd_options={"tokenizer": str(tok), "model_type": None})
    assert pipe.model.hparams.prediction_type == "eps"
    out = pipe.text_to_image(["a cat"], n=2, steps=3, guidance=7.5, height=16, width=16, progress=False,
                             sampler_options={"steps_offset": 1})
    assert out["images"].shape == (2, 3, 16, 16)
