"""Test-only callback: each rank saves its final weights, so a test can check that DDP kept the ranks equal.

    python train.py ... +callbacks.rank_weights._target_=tests.integration._rank_weights.RankWeights \
        +callbacks.rank_weights.out_dir=<dir>
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class RankWeights(pl.Callback):
    """At the end of fit, rank r writes its module's state dict to `<out_dir>/rank{r}.pt` (no collectives)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state_dict": state, "global_step": trainer.global_step, "world_size": trainer.world_size},
                   self.out_dir / f"rank{trainer.global_rank}.pt")
