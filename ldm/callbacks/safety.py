"""Keep a run's checkpoints trustworthy: save on SIGTERM/SIGUSR1 (and submitit's preemption signal) before exit,
never save NaN weights."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


def submitit_preempt_signal() -> int | None:
    """The signal a submitit job gets before its time limit or on preemption (USR2 unless overridden), or None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class NonFiniteWeightsError(RuntimeError):
    pass


class CheckpointSafety(pl.Callback):
    """SIGTERM (and SIGUSR1 outside SLURM) → `last.ckpt` at the next step boundary, then exit with status 143.

    Lightning turns SIGTERM into a SIGTERMException on every rank at a step boundary; this saves the
    state there. Under SLURM, Lightning's own SIGUSR1 handler saves and requeues the job. In a submitit job
    (hydra/launcher=submitit_slurm), submitit's preemption signal (USR2) is taken the same way: save `last.ckpt`
    first, then hand the signal to submitit's own handler, which requeues the job (the requeued job resumes with
    ckpt_path=last). A checkpoint whose weights hold NaN/Inf is refused, so a diverged model never replaces a
    good checkpoint.
    """

    def __init__(self, check_finite: bool = True):
        self.check_finite = check_finite
        self._previous: dict[int, object] = {}  # signal → the handler it had before fit
        self._pass_on: int | None = None  # a signal to hand to its previous handler once the checkpoint is saved

    def _redirect_to_sigterm(self, sig: int, pass_on: bool = False) -> None:
        """Turn `sig` into SIGTERM (Lightning's save-at-the-next-step-boundary path); with pass_on, the handler
        `sig` had before also runs once the checkpoint is saved (submitit requeues the job there)."""
        def handler(signum, frame) -> None:
            if pass_on:
                self._pass_on = signum
            os.kill(os.getpid(), signal.SIGTERM)

        try:
            self._previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        under_slurm = isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
        if hasattr(signal, "SIGUSR1") and not under_slurm:
            self._redirect_to_sigterm(signal.SIGUSR1)
        if (sig := submitit_preempt_signal()) is not None:
            self._redirect_to_sigterm(sig, pass_on=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        ckpt_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        default = Path(trainer.default_root_dir) / "checkpoints"
        dirpath = Path(ckpt_cb.dirpath) if ckpt_cb and ckpt_cb.dirpath else default
        path = dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("termination signal: saved %s at step %d; resume with ckpt_path=last", path, trainer.global_step)
        # Lightning re-raises this SystemExit with no code (exit status 0): report 128 + SIGTERM instead, as a
        # process ended by SIGTERM does, so that scripts and schedulers do not take the run for a finished one.
        exception.code = EXIT_SIGTERM
        sig, self._pass_on = self._pass_on, None
        if sig is not None and callable(previous := self._previous.get(sig)):
            log.warning("passing %s on to its previous handler (submitit: requeue the job)", signal.Signals(sig).name)
            previous(sig, None)  # submitit: requeue and exit on rank 0; returns on the other ranks

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if not self.check_finite:
            return
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to save a checkpoint at step {trainer.global_step}: {len(bad)} tensors hold NaN/Inf "
                f"(e.g. {bad[0]}). Earlier checkpoints are untouched."
            )
