"""Run by test_guards.py: 2-process CPU DDP training of a tiny AutoencoderKL or LatentDiffusion (argv[2]) whose
loss is NaN on rank 1 only, at its second batch. Each rank writes its guard counts, its optimizer steps and a
checksum of its weights to OUT/rank{r}.json. Without the ranks agreeing to skip, DDP would hang (the timeout
below turns that into an error) or the ranks would drift apart."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from tests.models.test_guards import CASES

if __name__ == "__main__":
    out, name = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    ae_dir = out / "ae"
    if name == "latent_diffusion":
        from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained
        from tests.models.test_latent_diffusion import DDCONFIG

        if not (ae_dir / "config.json").exists():  # rank 0 writes it before the launcher starts rank 1
            save_pretrained(AutoencoderKLNet(DDCONFIG, 4), ae_dir, scale_factor=0.5)
    model, loss_name, data = CASES[name](ae_dir)
    original, calls = getattr(model, loss_name), []

    def poisoned(*args, **kwargs):
        loss = original(*args, **kwargs)
        if model.training:
            calls.append(1)
            if len(calls) == 2 and model.global_rank == 1:
                return (loss[0] + float("nan"), *loss[1:])
        return loss

    setattr(model, loss_name, poisoned)
    trainer = pl.Trainer(strategy=DDPStrategy(timeout=timedelta(seconds=60)), accelerator="cpu", devices=2,
                         max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=str(out))
    data = data()
    if "dm" in data:
        trainer.fit(model, datamodule=data["dm"])
    else:
        trainer.fit(model, **data)
    net = model.net if name == "autoencoder" else model.unet
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "skipped": model.guard.skipped, "batches": len(calls), "global_step": trainer.global_step,
        "checksum": sum(float(p.double().sum()) for p in net.parameters())}))
