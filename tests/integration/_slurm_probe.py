"""Test-only callback: each rank writes what cluster environment Lightning chose and the ranks it read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl


class ClusterProbe(pl.Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        info = {"environment": type(env).__name__, "global_rank": trainer.global_rank,
                "world_size": trainer.world_size, "node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes,
                "local_rank": trainer.local_rank, "strategy": type(trainer.strategy).__name__}
        out = Path(os.environ["LDM_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
