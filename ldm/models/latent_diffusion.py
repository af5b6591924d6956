"""LatentDiffusion: text-conditioned diffusion in a frozen autoencoder's latent space; a thin LightningModule.

The math lives in `ldm.diffusion` (schedule, objectives, denoiser, samplers, guidance). This module wires the
frozen first stage and text encoder to the U-Net and its EMA; it optimises, logs and draws validation grids.
Parts (`unet`, `text_encoder`, `schedule`) are modules or configs (`_target_` dicts, built here), so a
checkpoint's hyper-parameters are plain configs from which `load_latent_diffusion` rebuilds the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm import rng
from ldm.diffusion.denoiser import VARIANCE_TYPES, Denoiser
from ldm.diffusion.objectives import LOSS_TYPES, diffusion_training_loss, offset_noise
from ldm.diffusion.samplers import get_sampler
from ldm.diffusion.schedule import NoiseSchedule, check_prediction_type
from ldm.models import ldm_parts as parts
from ldm.models.conditioning import CONCAT_SOURCES, batch_conditions, drop_condition, with_concat
from ldm.models.ema import EMA
from ldm.models.guards import NonFiniteGuard
from ldm.models.latent_cache import LatentCache, build_latent_cache, load_or_build
from ldm.models.optim import adamw, clip_gradients, lr_lambda
from ldm.nn.text_encoder import pad_context

log = logging.getLogger(__name__)


class LatentDiffusion(pl.LightningModule):
    """Text-to-image latent diffusion. See the module docstring; `sample()` is the inference entry point.

    first_stage: exported autoencoder folder or AutoencoderKL .ckpt (frozen; its scale factor is used unless
    `scale_factor` is given), an nn.Module with encode/decode, or an architecture dict (random weights, for
    configs and for loading converted SD weights). text_encoder=None trains an unconditional model.
    latent_cache: encode the training set once at fit start (kept in memory; saved to / loaded from
    `latent_cache_path` if given) and sample z = mean + std·ε from the cached posterior each step.
    """

    def __init__(
        self,
        unet: nn.Module | Mapping,
        first_stage: str | Path | nn.Module | Mapping,
        text_encoder: nn.Module | Mapping | None = None,
        schedule: NoiseSchedule | Mapping | None = None,
        prediction_type: str = "eps",
        variance_type: str = "fixed_small",
        loss_type: str = "l2",
        min_snr_gamma: float | None = None,
        vlb_weight: float = 1e-3,
        offset_noise: float = 0.0,
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = 0.9999,
        ema_warmup: bool = True,
        lr: float = 1e-4,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        scale_factor: float | None = None,
        latent_cache: bool = False,
        latent_cache_path: str | None = None,
        val_prompts: Sequence[str] | None = None,
        val_images_per_prompt: int = 4,
        sample_every_n_steps: int = 1000,
        val_sampler: str = "ddim",
        val_sampler_options: Mapping | None = None,
        val_steps: int = 50,
        val_guidance: float = 4.0,
        val_seed: int = 0,
        image_log_dir: str | None = None,
        trust_checkpoint: bool = False,
        concat_channels: int = 0,
        concat_source: str | None = None,
    ):
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.save_hyperparameters(parts.plain_hparams(args))
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if concat_source not in CONCAT_SOURCES:
            raise ValueError(f"concat_source must be one of {CONCAT_SOURCES}, got {concat_source!r}")
        if variance_type not in VARIANCE_TYPES or loss_type not in LOSS_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES} (got {variance_type!r}) and "
                             f"loss_type one of {LOSS_TYPES} (got {loss_type!r})")
        get_sampler(val_sampler)  # an unknown name fails now, not at the first validation
        lr_lambda(lr_schedule, warmup_steps, 0)  # so does an unknown LR schedule
        self.schedule: NoiseSchedule = parts.build_schedule(schedule)
        check_prediction_type(self.schedule, prediction_type)
        self.unet: nn.Module = parts.build_unet(unet)
        self.ema = EMA(self.unet, ema_decay, warmup=ema_warmup) if ema_decay else None
        self.first_stage, stored_scale = parts.load_first_stage(first_stage, trust=trust_checkpoint)
        self.first_stage.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor if scale_factor is not None else stored_scale)
        self.text_encoder = parts.build_text_encoder(text_encoder)
        self.concat_channels = int(concat_channels)  # the `concat` key: cat([z_t, c]) into the U-Net (conditioning.py)
        parts.check_channels(self.first_stage, self.unet, variance_type, self.concat_channels)
        if self.text_encoder is not None and getattr(self.text_encoder, "loaded", True):
            parts.check_context_dim(self.text_encoder, self.unet)
        self.register_buffer("latent_size", torch.zeros(2, dtype=torch.long))  # (h, w) seen in training
        self.guard = NonFiniteGuard()
        self._skip_update = False  # set by training_step on a non-finite loss
        self._next_sample_step = 0

    # ---- frozen parts ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.first_stage.eval()
        return self

    @property
    def ema_unet(self) -> nn.Module | None:
        """The EMA copy of the U-Net (None without EMA); saved in checkpoints as `ema.module.*`."""
        return self.ema.module if self.ema is not None else None

    @property
    def latent_channels(self) -> int:
        return parts.latent_channels(self.first_stage)

    @property
    def downsample_factor(self) -> int:
        return int(getattr(self.first_stage, "downsample_factor", 1))

    @torch.no_grad()
    def posterior(self, x: Tensor):
        """The frozen autoencoder's posterior of images `x`; images whose channels it does not take are refused."""
        parts.check_image_channels(x, self.first_stage, self.hparams.first_stage)
        return self.first_stage.encode(x.to(parts.dtype_of(self.first_stage)))

    @torch.no_grad()
    def encode_images(self, x: Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] → scaled latents (posterior mode, or a sample)."""
        post = self.posterior(x.to(self.device))
        z = post.mean.float()
        if sample:
            z = z + post.std.float() * torch.randn(z.shape, generator=generator, device=z.device)
        return z * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents → images (roughly in [-1, 1])."""
        return self.first_stage.decode((z / self.scale_factor).to(parts.dtype_of(self.first_stage))).float()

    @torch.no_grad()
    def get_latents(self, batch: dict, generator: rng.Generator = None) -> Tensor:
        """z0 = (mean + std·ε) · scale_factor from images, or from a cached posterior (B, 2, C, h, w)."""
        x = batch["image"]
        if x.ndim == 5:
            mean, std = x[:, 0].float(), x[:, 1].float()
        else:
            post = self.posterior(x)
            mean, std = post.mean.float(), post.std.float()
        eps = rng.randn(mean.shape, generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps) * self.scale_factor

    def encode_text(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.text_encoder is None:
            raise RuntimeError("this model is unconditional (text_encoder=None)")
        if not self.text_encoder.loaded:
            self.text_encoder.load()
            parts.check_context_dim(self.text_encoder, self.unet)
        ctx, mask = self.text_encoder.encode(list(prompts))
        return ctx.to(self.device), mask.to(self.device)

    def condition(self, captions: Sequence[str], drop_prob: float = 0.0, generator: rng.Generator = None) -> dict:
        """U-Net keyword arguments for a batch of captions, with condition dropout at `drop_prob`."""
        if self.text_encoder is None:
            return {}
        ctx, mask = self.encode_text(captions)
        if drop_prob > 0:
            null_ctx, null_mask = self.encode_text([""])
            ctx, mask, _ = drop_condition(ctx, mask, null_ctx, null_mask, drop_prob, generator)
        return {"context": ctx, "context_mask": mask}

    # ---- training --------------------------------------------------------------------------------
    def _loss(self, net: nn.Module, batch: dict, drop_prob: float, generator: rng.Generator = None):
        hp = self.hparams
        z0 = self.get_latents(batch, generator)
        cond = self.condition(batch["caption"], drop_prob, generator) if self.text_encoder is not None else {}
        if self.concat_channels:
            cond.update(batch_conditions(self, batch, generator))
        t = rng.randint(self.schedule.num_timesteps, (z0.shape[0],), generator, device=z0.device)
        noise = offset_noise(z0, hp.offset_noise, generator=generator)
        x_t = self.schedule.q_sample(z0, t, noise)
        raw = with_concat(net, self.concat_channels)(x_t, t, **cond)
        return diffusion_training_loss(
            raw.float(), z0, x_t, t, noise, self.schedule, prediction_type=hp.prediction_type,
            variance_type=hp.variance_type, loss_type=hp.loss_type, min_snr_gamma=hp.min_snr_gamma,
            vlb_weight=hp.vlb_weight,
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # Latent sample, t, ε and condition dropout: a function of (seed, step, global sample index), so N ranks
        # train on what one process with the same global batch would, and a resume draws what it would have.
        seed = torch.initial_seed() % 2**31  # seed_everything(cfg.seed) sets it on every rank
        gen = rng.step_generator(self, seed * 1_000_003 + self.global_step, self.device)
        loss, logs = self._loss(self.unet, batch, self.hparams.cond_drop_prob, gen)
        self._skip_update = not self.guard.check(loss, self)
        if self._skip_update:
            # Not `return None` (Lightning refuses that under DDP): a zero loss on every trainable parameter keeps
            # DDP's gradient all-reduce in step; on_before_optimizer_step then drops the gradients, so the
            # optimizer (AdamW skips parameters without .grad) and the EMA leave everything as it was.
            return sum((p.sum() * 0.0 for p in self.unet.parameters() if p.requires_grad), loss.new_zeros(()))
        if not bool(self.latent_size.any()):
            self.latent_size.copy_(torch.tensor(self.get_latent_hw(batch), device=self.latent_size.device))
        if self._trainer is not None:
            b = len(batch["caption"])
            # Averaged over ranks (every rank holds an equal share of the global batch).
            self.log("train/loss", logs.pop("loss"), prog_bar=True, batch_size=b, sync_dist=True)
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=b, sync_dist=True)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=b)
        return loss

    def get_latent_hw(self, batch: dict) -> tuple[int, int]:
        x = batch["image"]
        if x.ndim == 5:
            return int(x.shape[-2]), int(x.shape[-1])
        return int(x.shape[-2]) // self.downsample_factor, int(x.shape[-1]) // self.downsample_factor

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_update:  # a non-finite loss: no update, not even weight decay or momentum
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # trainer.gradient_clip_val, clipped in a way that works with the fused AdamW under every precision plugin
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)  # runs the closure: training_step, backward, the step
        if self.ema is not None and not self._skip_update:
            self.ema.update()
        self._skip_update = False

    def compile_network(self, **options) -> None:
        """torch.compile the U-Net in place (parameter names, hence checkpoints, are unchanged)."""
        self.unet.compile(**options)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.unet.parameters() if p.requires_grad]
        opt = adamw(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        # decay over lr_decay_steps, else over the run (trainer.max_steps); a run without max_steps stays constant
        total = hp.lr_decay_steps or (self.trainer.max_steps if self._trainer is not None else 0)
        f = lr_lambda(hp.lr_schedule, max(0, int(hp.warmup_steps)), max(0, int(total or 0)), hp.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        if self.text_encoder is not None:
            self.encode_text(list(self.hparams.val_prompts or []) + [""])  # loads, checks, caches
        if self.hparams.latent_cache:
            self._install_latent_cache()

    def _install_latent_cache(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "dataset") or not hasattr(dm, "datasets"):
            raise ValueError("latent_cache=true needs ldm.data.DataModule (it swaps in the cached train set)")
        train = dm.dataset("train")
        if isinstance(train, LatentCache):
            return
        dm.datasets["train"] = self.cache_latents(train, path=self.hparams.latent_cache_path)

    def cache_latents(self, data, path: str | Path | None = None, batch_size: int = 256) -> LatentCache:
        """Posterior (mean, std) of every training item, computed once; with `path`, saved there by rank 0 and
        reused (latent_cache.load_or_build; all ranks call this)."""
        return load_or_build(lambda: self._compute_cache(data, batch_size), data, path, self._trainer)

    def _compute_cache(self, data, batch_size: int) -> LatentCache:
        was_training = self.training
        self.eval()
        try:
            return build_latent_cache(self.posterior, data, batch_size=batch_size, device=self.device)
        finally:
            self.train(was_training)

    # ---- validation ------------------------------------------------------------------------------
    @property
    def eval_unet(self) -> nn.Module:
        return self.ema_unet if self.ema_unet is not None else self.unet

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        seed = int(self.hparams.val_seed) * 100_003 + batch_idx  # the same t and noise at every validation
        gen = torch.Generator(device=self.device).manual_seed(seed)
        loss, _ = self._loss(self.eval_unet, batch, 0.0, generator=gen)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True, batch_size=len(batch["caption"]))

    def on_validation_epoch_end(self) -> None:
        hp = self.hparams
        if self.trainer.sanity_checking or not hp.val_prompts or not hp.sample_every_n_steps or self.concat_channels:
            return
        if self.global_step < self._next_sample_step:
            return
        self._next_sample_step = self.global_step + hp.sample_every_n_steps
        if self.trainer.is_global_zero:  # rank 0 only: no collective calls below
            parts.log_sample_grid(self, list(hp.val_prompts))

    # ---- inference -------------------------------------------------------------------------------
    @property
    def learned_variance(self) -> bool:
        return self.hparams.variance_type == "learned_range"

    def make_denoiser(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      guidance: float = 1.0, guidance_rescale: float = 0.0, use_ema: bool = True,
                      context: tuple[Tensor, Tensor] | None = None, concat: Tensor | None = None,
                      y: Tensor | None = None, guide: nn.Module | None = None, guide_scale: float = 0.0) -> Denoiser:
        """The U-Net (EMA by default) with prompts and classifier-free guidance folded in, as a Denoiser.
        `context` = (ctx, mask) stands in for the prompts' encoding (e.g. interpolated embeddings); `concat` is
        the concatenated condition (any resolution, resized to the latent grid), `y` the class-embedding input
        (e.g. the upscaler's noise level); both are the same in the two CFG branches. `guide` (a U-Net of the same
        model, e.g. an earlier checkpoint's) with guide_scale > 0 adds autoguidance (ldm.diffusion.guidance)."""
        from ldm.diffusion.guidance import cfg_model_fn, check_guide

        check_guide(guide, guide_scale)
        net = with_concat(self.ema_unet if use_ema and self.ema_unet is not None else self.unet, self.concat_channels)
        guide_net = with_concat(guide, self.concat_channels) if guide is not None and guide_scale > 0 else None
        hp = self.hparams
        cond = {k: v.to(self.device) for k, v in (("concat", concat), ("y", y)) if v is not None}
        extra = dict(cond)  # the same in both CFG branches
        if self.text_encoder is not None:
            cond["context"], cond["context_mask"] = self.encode_text(prompts) if context is None else context
        scale = guidance if self.text_encoder is not None else 1.0
        uncond = cond  # scale 1: no CFG, cfg_model_fn runs the conditional pass only (two with a guide)
        if scale != 1.0:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            nctx, nmask = self.encode_text(negs)
            length = max(cond["context"].shape[1], nctx.shape[1])
            cond["context"], cond["context_mask"] = pad_context(cond["context"], cond["context_mask"], length)
            nctx, nmask = pad_context(nctx, nmask, length)
            uncond = {**extra, "context": nctx, "context_mask": nmask}
        model_fn = cfg_model_fn(net, cond, uncond, scale, guidance_rescale, learned_variance=self.learned_variance,
                                guide_fn=guide_net, guide_scale=guide_scale)
        return Denoiser(model_fn, self.schedule, hp.prediction_type, hp.variance_type, clip_x0=self.clip_x0)

    @property
    def clip_x0(self) -> float | None:
        """The range the predicted x0 is clipped to: the first stage's (pixels: 1.0); None for latents."""
        return getattr(self.first_stage, "clip_x0", None)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | str, negative_prompt: str | Sequence[str] | None = None,
               sampler: str = "ddim", steps: int = 50, guidance: float = 4.0, guidance_rescale: float = 0.0,
               seed: int = 0, height: int | None = None, width: int | None = None, use_ema: bool = True,
               progress: bool = False, sampler_options: Mapping | None = None, x_T: Tensor | None = None,
               callback: Callable[[dict], None] | None = None, return_latents: bool = False,
               concat: Tensor | None = None, y: Tensor | None = None, guide: nn.Module | None = None,
               guide_scale: float = 0.0) -> Tensor:
        """One image per prompt, (B, C, H, W) in [-1, 1]. height/width are in latent pixels (default: the
        training latent size). Same seed → same images (noise is drawn on the CPU, then moved). guide /
        guide_scale: autoguidance by another U-Net of this model (see make_denoiser)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.text_encoder is None and guidance != 1.0:
            guidance = 1.0  # unconditional model: nothing to guide
        h, w = self._latent_hw(height, width)
        if x_T is None:
            shape = (len(prompts), self.latent_channels, h, w)
            x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        x_T = x_T.to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        was_training = self.training
        self.eval()
        try:
            denoiser = self.make_denoiser(prompts, negative_prompt, guidance, guidance_rescale, use_ema, concat=concat,
                                          y=y, guide=guide, guide_scale=guide_scale)
            z0 = get_sampler(sampler)(denoiser, x_T, steps, generator=gen, callback=callback,
                                      progress=progress, **dict(sampler_options or {}))
            return z0 if return_latents else self.decode_latents(z0).clamp(-1, 1)
        finally:
            self.train(was_training)

    def _latent_hw(self, height: int | None, width: int | None) -> tuple[int, int]:
        trained = [int(v) for v in self.latent_size.tolist()]
        h = height or trained[0] or getattr(self.unet, "image_size", None)
        w = width or trained[1] or h
        if not h:
            raise ValueError("latent height/width unknown (model not trained yet): pass height=, width=")
        return int(h), int(w)

    # ---- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["first_stage_config"] = parts.first_stage_config(self.first_stage, self.scale_factor)
        self.guard.save_to(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # before Lightning loads the state dict: a different autoencoder would fail there with a list of keys
        parts.check_same_first_stage(checkpoint, self.first_stage)
        self.guard.load_from(checkpoint)
        saved = (checkpoint.get("first_stage_config") or {}).get("scale_factor")
        if saved is not None and abs(float(saved) - self.scale_factor) > 1e-6 * abs(self.scale_factor):
            log.warning("checkpoint was trained with scale_factor=%.6g but the config gives %.6g: using the "
                        "config's (set model.scale_factor to match)", saved, self.scale_factor)

    def export(self, directory: str | Path, use_ema: bool = True) -> Path:
        """U-Net weights (EMA by default) + first stage + config as safetensors/JSON; see ldm_parts."""
        return parts.export(self, directory, use_ema=use_ema)

    @classmethod
    def load(cls, path: str | Path, *, trust: bool = False, map_location: str | torch.device = "cpu",
             **overrides) -> LatentDiffusion:
        """From a Lightning .ckpt or an exported folder; `overrides` replace constructor arguments."""
        return parts.load_latent_diffusion(cls, path, trust=trust, map_location=map_location, **overrides)
