"""The step at which images go to the loggers: the one Lightning gives this moment's metrics."""

from __future__ import annotations

import pytorch_lightning as pl


def metrics_step(module: pl.LightningModule) -> int:
    """Lightning logs every metric at the count of training batches that stepped so far (a validation run inside
    fit logs at the count before its batch is added), not at `global_step`, which is one ahead there and counts each
    optimizer of a multi-optimizer module. Images logged at this step share the x-axis position of the validation
    metrics they belong to. The attribute is Lightning's own (`_LoggerConnector.log_metrics` reads it); should a
    Lightning version lack it, this falls back to `global_step`."""
    loop = getattr(getattr(module.trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if isinstance(step, int) else int(module.global_step)
