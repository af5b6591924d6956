"""Run by test_autoencoder.py: 2-process CPU DDP training of a tiny AutoencoderKL; each rank writes its scale
factor, its local latent moments (before the all-reduce) and a checksum of its weights to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

import ldm.models.autoencoder as ae_module
from ldm.data.datamodule import DataModule
from tests.models.test_autoencoder import TinyImages, tiny_model

if __name__ == "__main__":
    out = Path(sys.argv[1])
    local = []
    original = ae_module.latent_moments

    def spy(*args, **kwargs):
        stats = original(*args, **kwargs)
        local.append(stats.clone())
        return stats

    ae_module.latent_moments = spy
    torch.manual_seed(0)
    model = tiny_model(disc_start=2, disc_factor=1.0, scale_factor_batches=3)
    dm = DataModule(TinyImages(64), batch_size=8, seed=0)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0, default_root_dir=str(out))
    trainer.fit(model, datamodule=dm)
    checksum = sum(float(p.double().sum()) for p in model.net.parameters())
    checksum_d = sum(float(p.double().sum()) for p in model.discriminator.parameters())
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "scale_factor": float(model.scale_factor), "local": [s.tolist() for s in local],
        "checksum": checksum, "checksum_d": checksum_d, "ae_step": model.ae_step}))
