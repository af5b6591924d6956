"""Store what a resumed run needs to continue as the same run: its folder and its W&B run id."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger


class RunMetadata(pl.Callback):
    """Adds checkpoint["ldm"] = {"run_dir", "wandb_run_id", "global_step"}; read back by train.py on resume."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        meta = {"run_dir": self.run_dir, "global_step": int(trainer.global_step)}
        for logger in trainer.loggers:
            # Only rank 0 has a live W&B run; its id is what later resumes must continue.
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                meta["wandb_run_id"] = logger.experiment.id
        checkpoint["ldm"] = meta
