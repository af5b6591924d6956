"""Global RNG state (torch, CUDA, numpy, Python `random`) saved with every checkpoint and restored on resume.

The training noise of both LightningModules comes from generators seeded by (seed, step) (`ldm.rng`), so it
resumes exactly by construction. This covers what still draws from the global generators: dropout, data
augmentation in the main process, DataLoader worker seeds. Two rules make a resumed run draw what the
uninterrupted one did:
- the saved state is put back just before the first training batch after the resume (not when the checkpoint
  is read: Lightning draws from the global RNG while it builds loaders in between);
- validation is RNG-neutral: the state after each training batch is put back when validation ends (Lightning
  draws a loader seed when validation starts), so how often validation runs never changes the training draws.
Datasets should draw per-item randomness from (seed, epoch, index), as ours do: items are fetched ahead of the
step that uses them, in the main process or in workers, at points a resume cannot replay.
Under DDP, the state of rank 0 is stored (the ranks are seeded alike by `seed_everything`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def collect_rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class RNGState(pl.Callback):
    """Saves the global RNG state in `checkpoint["callbacks"]`; see the module docstring for when it is put back."""

    def __init__(self) -> None:
        self._pending: dict | None = None  # read from a checkpoint, waiting for the first training batch
        self._after_batch: dict | None = None  # the state right after the last training batch

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last): the same state it saves.
        self._after_batch = collect_rng_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._after_batch is not None and trainer.state.fn == "fit":
            restore_rng_state(self._after_batch)
