"""AutoencoderKL: the perceptual compression stage of latent diffusion, as a LightningModule.

Loss (Rombach et al. 2022): reconstruction (L1/L2, optional LPIPS) under a learned scalar log-variance
+ kl_weight·KL + a PatchGAN term whose weight adapts to the gradient norms at the decoder's last layer,
active from `disc_start`. Manual optimization of the autoencoder and the discriminator.

Steps: Lightning's `global_step` counts optimizer steps (one per batch before `disc_start`, two after), so
`disc_start`, `warmup_steps`, the LR schedule and the EMA count training batches (`self.ae_step`) instead.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm import rng
from ldm.images import make_grid, save_grid
from ldm.models.ema import EMA
from ldm.models.guards import NonFiniteGuard
from ldm.models.log_step import metrics_step
from ldm.models.optim import CLIP_ALGORITHMS, LR_SCHEDULES, adamw, clip_gradients, lr_lambda
from ldm.nn.autoencoder import AutoencoderKLNet, latent_moments, save_pretrained, scale_factor_from_moments
from ldm.nn.discriminator import D_LOSSES, PatchDiscriminator

log = logging.getLogger(__name__)


class AutoencoderKL(pl.LightningModule):
    def __init__(
        self,
        ddconfig: dict,
        embed_dim: int,
        rec_loss: str = "l1",
        learn_logvar: bool = True,
        logvar_init: float = 0.0,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        lpips_path: str | None = None,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        disc_layers: int = 3,
        disc_channels: int = 64,
        disc_norm: str = "group",
        lr: float = 4.5e-6,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        grad_clip: float | None = 1.0,
        grad_clip_algorithm: str = "norm",
        ema_decay: float | None = None,
        sample_posterior: bool = True,
        scale_factor_batches: int = 50,
        channels_last: bool = False,
        fid_feature_extractor: nn.Module | None = None,
        image_log_dir: str | None = None,
        num_image_samples: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["fid_feature_extractor"])
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        if grad_clip_algorithm not in CLIP_ALGORITHMS:
            raise ValueError(f"grad_clip_algorithm must be one of {CLIP_ALGORITHMS}, got {grad_clip_algorithm!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        self.automatic_optimization = False
        self.net = AutoencoderKLNet(ddconfig, embed_dim)
        self.ema = EMA(self.net, ema_decay) if ema_decay else None
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.discriminator = PatchDiscriminator(self.net.config["ddconfig"].get("out_ch", 3), disc_channels,
                                                disc_layers, norm=disc_norm)
        perceptual = None
        if perceptual_weight > 0:
            from ldm.nn.lpips import load_lpips

            perceptual = load_lpips(lpips_path)
        self.__dict__["perceptual"] = perceptual  # frozen metric: kept out of the state dict and of DDP
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.guard = NonFiniteGuard()
        self.__dict__["_fid_features"] = fid_feature_extractor  # outside the module tree: not in checkpoints
        self._metrics: dict | None = None
        self._scale_factor_fresh = False

    # ---- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if stage == "fit" and isinstance(kwargs, dict) and not kwargs.get("find_unused_parameters"):
            # The autoencoder and discriminator backward passes each leave the other's parameters unused.
            log.info("AutoencoderKL: enabling DDP find_unused_parameters (two optimizers, manual steps)")
            kwargs["find_unused_parameters"] = True
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def compile_network(self) -> None:
        """torch.compile the encoder and decoder in place (parameter names unchanged)."""
        self.net.encoder.compile()
        self.net.decoder.compile()

    @property
    def ae_step(self) -> int:
        """Autoencoder optimizer steps so far (= training batches; restored on resume with its scheduler)."""
        if self._trainer is None or not self.trainer.lr_scheduler_configs:
            return 0
        return int(self.trainer.lr_scheduler_configs[0].scheduler.last_epoch)

    # ---- losses ----------------------------------------------------------------------------------
    def reconstruction_nll(self, x: Tensor, rec: Tensor) -> tuple[Tensor, Tensor]:
        """(NLL under the learned log-variance, summed per image, averaged over the batch; raw rec loss)."""
        err = (x - rec).abs() if self.hparams.rec_loss == "l1" else (x - rec).pow(2)
        if self.perceptual is not None:
            lpips = self.perceptual.to(device=x.device)
            err = err + self.hparams.perceptual_weight * lpips(x, rec.to(x.dtype))
        nll = err / torch.exp(self.logvar) + self.logvar
        return nll.sum() / x.shape[0], err.mean()

    def adaptive_weight(self, nll: Tensor, g_loss: Tensor) -> Tensor:
        """λ = ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 1e-4), clamped to [0, 1e4], × disc_weight (Esser et al.)."""
        last = self.net.decoder.last_layer
        g_rec = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.hparams.disc_weight

    def disc_active(self) -> bool:
        return self.ae_step >= self.hparams.disc_start and self.hparams.disc_factor > 0

    # ---- training --------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        # Inside opt.step(), where Lightning calls it for manual optimization too: after a GradScaler's unscale_.
        clip_gradients(self, optimizer, self.hparams.grad_clip, self.hparams.grad_clip_algorithm)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt_ae, opt_d = self.optimizers()
        sch_ae, sch_d = self.lr_schedulers()
        step = self.ae_step
        # Posterior samples are a function of (step, global sample index): the same for any number of ranks.
        gen = rng.step_generator(self, step * 7919, x.device)
        posterior = self.net.encode(x)
        z = posterior.sample(gen) if self.hparams.sample_posterior else posterior.mode()
        rec = self.net.decode(z)
        nll, rec_loss = self.reconstruction_nll(x, rec)
        kl = posterior.kl().mean()
        loss = nll + self.hparams.kl_weight * kl
        logs = {"train/rec_loss": rec_loss, "train/kl": kl, "train/nll": nll, "train/logvar": self.logvar,
                "train/lr": float(sch_ae.get_last_lr()[0])}
        use_disc = self.disc_active()
        if use_disc:
            g_loss = -self.discriminator(rec).mean()
            d_weight = self.adaptive_weight(nll, g_loss)
            loss = loss + d_weight * self.hparams.disc_factor * g_loss
            logs.update({"train/g_loss": g_loss, "train/d_weight": d_weight})
        if not self.guard.check(loss, self):
            return
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_ae.step()
        sch_ae.step()
        if use_disc:
            logits_real = self.discriminator(x.detach())
            logits_fake = self.discriminator(rec.detach())
            d_loss = self.hparams.disc_factor * D_LOSSES[self.hparams.disc_loss](logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            sch_d.step()
            logs.update({"train/d_loss": d_loss, "train/logits_real": logits_real.mean(),
                         "train/logits_fake": logits_fake.mean()})
        if self.ema is not None:
            self.ema.update()
        # Averaged over ranks (every rank holds an equal share of the global batch).
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(x), sync_dist=True)
        logs = {k: v.detach().float() if torch.is_tensor(v) else v for k, v in logs.items()}
        self.log_dict(logs, batch_size=len(x), sync_dist=True)
        if self.trainer.max_steps > 0 and self.trainer.global_step >= self.trainer.max_steps:
            self._final_scale_factor()  # in the last step, so that the final checkpoint holds it

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.guard.save_to(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.guard.load_from(checkpoint)

    def on_train_end(self) -> None:
        if not self._scale_factor_fresh:  # training stopped another way (max_epochs, max_time, ...)
            self._final_scale_factor()

    def _final_scale_factor(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not self.hparams.scale_factor_batches:
            log.warning("AutoencoderKL: no datamodule; scale factor unchanged (python -m ldm.scale_factor)")
            return
        self.compute_scale_factor(dm.train_dataloader(), self.hparams.scale_factor_batches)

    def _total_batches(self) -> int:
        """Training batches in this run, from trainer.max_steps (which counts both optimizers' steps)."""
        if self.hparams.lr_decay_steps:
            return int(self.hparams.lr_decay_steps)
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps <= 0:
            return 0
        start = self.hparams.disc_start if self.hparams.disc_factor > 0 else max_steps
        return max_steps if max_steps <= start else start + math.ceil((max_steps - start) / 2)

    def configure_optimizers(self):
        hp = self.hparams
        ae_params = list(self.net.parameters()) + ([self.logvar] if hp.learn_logvar else [])
        kw = dict(betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        opt_ae = adamw(ae_params, lr=hp.lr, **kw)
        opt_d = adamw(self.discriminator.parameters(), lr=hp.disc_lr or hp.lr, **kw)
        f = lr_lambda(hp.lr_schedule, hp.warmup_steps, self._total_batches(), hp.min_lr_ratio)
        start = hp.disc_start
        # The discriminator steps only from batch `disc_start` on: its schedule is the autoencoder's, shifted.
        sch_ae = torch.optim.lr_scheduler.LambdaLR(opt_ae, f)
        sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: f(s + start))
        return [opt_ae, opt_d], [{"scheduler": s, "interval": "step"} for s in (sch_ae, sch_d)]

    # ---- evaluation ------------------------------------------------------------------------------
    @property
    def eval_net(self) -> AutoencoderKLNet:
        """The EMA weights when kept, else the live ones."""
        return self.ema.module if self.ema is not None else self.net

    def _metric_modules(self) -> dict:
        if self._metrics is None:
            from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

            m = {"psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),  # mean of per-image PSNR
                 "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)}
            if self._fid_features is not None:
                from torchmetrics.image.fid import FrechetInceptionDistance

                m["rfid"] = FrechetInceptionDistance(feature=self._fid_features, normalize=True)
            self.__dict__["_metrics"] = m
        for metric in self._metrics.values():
            metric.to(self.device)
        return self._metrics

    @torch.no_grad()
    def reconstruct(self, x: Tensor, net: AutoencoderKLNet | None = None) -> Tensor:
        """Deterministic reconstruction (posterior mode), clamped to [-1, 1]."""
        net = net or self.eval_net
        return net.decode(net.encode(x).mode()).clamp(-1, 1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        rec = self.reconstruct(x)
        m = self._metric_modules()
        a, b = (rec + 1) / 2, (x + 1) / 2
        m["psnr"].update(a, b)
        m["ssim"].update(a, b)
        if "rfid" in m:
            m["rfid"].update(b, real=True)
            m["rfid"].update(a, real=False)
        err = (rec - x).abs() if self.hparams.rec_loss == "l1" else (rec - x).pow(2)
        self.log("val/rec_loss", err.mean(), sync_dist=True, batch_size=len(x))
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._log_images(x, rec)

    def on_validation_epoch_end(self) -> None:
        m = self._metric_modules()
        for name, metric in m.items():  # torchmetrics all-reduce their own state in compute()
            self.log(f"val/{name}", metric.compute(), prog_bar=name == "psnr", rank_zero_only=False)
            metric.reset()

    @torch.no_grad()
    def _log_images(self, x: Tensor, rec: Tensor) -> None:
        n = min(self.hparams.num_image_samples, len(x))
        f = self.net.downsample_factor
        gen = torch.Generator(device=x.device).manual_seed(0)
        shape = (n, self.net.embed_dim, x.shape[-2] // f, x.shape[-1] // f)
        z = torch.randn(shape, device=x.device, generator=gen)
        samples = self.eval_net.decode(z / self.scale_factor).clamp(-1, 1)
        grids = {name: imgs.float().cpu() for name, imgs in
                 (("inputs", x[:n]), ("reconstructions", rec[:n]), ("samples", samples))}  # in [-1, 1]
        out = Path(self.hparams.image_log_dir or Path(self.trainer.default_root_dir) / "images")
        nrow = max(1, int(math.sqrt(n)))
        for name, imgs in grids.items():
            save_grid(imgs, out / f"step{self.ae_step:07d}_{name}.png", nrow=nrow)
        step = metrics_step(self)  # the x-axis position of this validation run's metrics
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="val/images", images=[make_grid(g, nrow=nrow) for g in grids.values()],
                                 caption=list(grids), step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_images"):  # TensorBoard, images in [0, 1]
                for name, imgs in grids.items():
                    logger.experiment.add_images(f"val/{name}", (imgs + 1) / 2, step)

    # ---- scale factor and export -----------------------------------------------------------------
    @torch.no_grad()
    def compute_scale_factor(self, dataloader, num_batches: int | None = None) -> float:
        """1 / std of posterior samples over `num_batches` batches per rank, all-reduced so every rank agrees;
        stored in the `scale_factor` buffer (checkpoint) and written by `export`."""
        num_batches = num_batches or self.hparams.scale_factor_batches
        net = self.eval_net
        was_training = net.training
        net.eval()
        gen = rng.step_generator(self, 1234, self.device)  # same samples as one process would draw
        images = (b["image"] if isinstance(b, dict) else b for b in dataloader)
        stats = latent_moments(net, images, num_batches, gen)
        net.train(was_training)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        self.scale_factor.fill_(scale_factor_from_moments(stats))
        self._scale_factor_fresh = True
        log.info("latent scale factor 1/std = %.5f (over %d values)", self.scale_factor.item(), int(stats[2]))
        return float(self.scale_factor)

    def export(self, directory: str | Path) -> Path:
        """EMA weights if present (else raw) + config with the scale factor, as safetensors."""
        return save_pretrained(self.eval_net, directory, float(self.scale_factor))
