"""Numerical faults in a training step: skip a non-finite loss (counted, logged) and stop after a run of them."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive NaN/Inf losses: training stops with this message."""


class NonFiniteGuard:
    """`ok = guard.check(loss, module)` before backward; when False, skip the step (all ranks agree)."""

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def check(self, loss: Tensor, module=None) -> bool:
        finite = bool(torch.isfinite(loss.detach()).all())
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and trainer.world_size > 1:
            # Every rank must skip together, or DDP's gradient all-reduce would wait forever.
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
            step = trainer.global_step if trainer is not None else -1
            log.warning("non-finite loss at step %d: step skipped (%d skipped so far)", step, self.skipped)
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteLossError(
                    f"{self.consecutive} consecutive non-finite losses (last at step {step}); stopping. "
                    "Lower the learning rate, enable gradient clipping, or check the data. "
                    "Checkpoints written so far are untouched."
                )
        if module is not None and trainer is not None:
            module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, prog_bar=False)
        return finite

    # The counts travel in checkpoints, so that train/nonfinite_skipped and a run of bad steps survive a resume.
    CHECKPOINT_KEY = "nonfinite_guard"

    def save_to(self, checkpoint: dict) -> None:
        checkpoint[self.CHECKPOINT_KEY] = {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_from(self, checkpoint: dict) -> None:
        """Restore the counts (checkpoints written before they were saved leave them at zero)."""
        state = checkpoint.get(self.CHECKPOINT_KEY)
        if state is not None:
            self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
