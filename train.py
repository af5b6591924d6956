"""Train an ldm model: compose the Hydra config → instantiate data, model, callbacks, loggers, trainer → fit.

    python train.py experiment=fmnist_autoencoder
    python train.py experiment=fmnist_ldm trainer=ddp trainer.devices=8 ckpt_path=last
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm import checkpoint, config_check, runtime
from ldm.callbacks.rng_state import RNGState
from ldm.callbacks.run_metadata import RunMetadata
from ldm.callbacks.safety import CheckpointSafety

log = logging.getLogger("train")
runtime.register_resolvers()
runtime.prepare_argv()


def instantiate_all(group: DictConfig | None) -> list:
    """Every `_target_` entry of a callbacks/logger group, in order."""
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def build_loggers(cfg: DictConfig, resume_meta: dict) -> list:
    loggers = []
    for conf in (cfg.get("logger") or {}).values():
        if not (isinstance(conf, DictConfig) and "_target_" in conf):
            continue
        if conf._target_.endswith("WandbLogger") and resume_meta.get("wandb_run_id") and not conf.get("id"):
            # Continue the W&B run this checkpoint came from (an explicit logger.wandb.id wins).
            conf = OmegaConf.create(OmegaConf.to_container(conf, resolve=True))
            conf.id, conf.resume = resume_meta["wandb_run_id"], "allow"
        loggers.append(instantiate(conf))
    return loggers


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    # `trainer.max_steps=abc` or `seed=abc` named here, not deep inside Lightning
    config_check.check_types(cfg, plain=config_check.TRAIN_KEYS)
    if cfg.tune_malloc:
        runtime.tune_malloc()
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    task_dir = Path(cfg.paths.log_dir) / cfg.task_name
    trust = bool(cfg.trust_checkpoint)
    ckpt_path = runtime.resolve_ckpt_path(cfg.ckpt_path, out_dir, task_dir)
    ckpt_dir = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    if cfg.train and not ckpt_path and ckpt_dir:
        runtime.refuse_used_checkpoint_dir(ckpt_dir, out_dir)

    log.info("Instantiating data <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model = instantiate(cfg.model, _convert_="all")
    if cfg.init_from.path:
        report = checkpoint.init_from(model, cfg.init_from.path, rename=cfg.init_from.rename,
                                      ignore=list(cfg.init_from.ignore), strict=cfg.init_from.strict, trust=trust)
        log.info("init_from %s: weights loaded; %s", cfg.init_from.path,
                 ", ".join(f"{len(keys)} {what}" for what, keys in report.items()) + " keys")
    if cfg.compile and hasattr(model, "compile_network"):
        model.compile_network()

    resume_meta = checkpoint.read_metadata(ckpt_path, trust=trust) if ckpt_path else {}
    callbacks = instantiate_all(cfg.get("callbacks")) + [RunMetadata(str(out_dir)), CheckpointSafety(), RNGState()]
    loggers = build_loggers(cfg, resume_meta)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[checkpoint.AtomicCheckpointIO()]
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.train:
        if ckpt_path:
            log.info("Resuming from %s", ckpt_path)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust)
    if cfg.test:
        trainer.test(model, datamodule=datamodule)
    if trainer.is_global_zero:
        if cfg.export and cfg.train and hasattr(model, "export"):
            model.export(out_dir / "export")
            log.info("Exported weights to %s", out_dir / "export")
        runtime.link_latest(task_dir, out_dir)
    log.info("Run folder: %s", out_dir)


if __name__ == "__main__":
    main()
