"""Editing from a trained LatentDiffusion checkpoint: img2img (SDEdit), inpainting by latent blending, DDIM
inversion with re-prompting, and interpolation strips. The math is in `ldm.diffusion.editing`; here are images,
prompts, seeds and metadata, as in `LatentDiffusionPipeline` (whose `save` writes the results).

    pipe = EditingPipeline.from_checkpoint("logs/fmnist_ldm/latest/export")
    out = pipe.img2img("shirt.png", "a photo of a dress", strength=0.6, n=4)
    out = pipe.inpaint("shirt.png", "mask.png", "a photo of a coat", n=4)
    out = pipe.invert("shirt.png", "a photo of a shirt", edit_prompts=["a photo of a pullover"])
    out = pipe.interpolate(["a photo of a sneaker", "a photo of an ankle boot"], frames=8)
    out = pipe.upscale("small.png", "a photo of a shirt", noise_level=20)   # a concat_source="upscale" model
    pipe.save(out, "outputs/edit")

Images are 1 (grey) or 3 (RGB) channels in [-1, 1]; a path is loaded and resized to the model's image size.
Image k of a call draws its noise from `seed + k`, as text_to_image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ldm.diffusion import editing
from ldm.diffusion.samplers import get_sampler
from ldm.images import load_image, load_mask
from ldm.nn.text_encoder import pad_context
from ldm.pipeline import PRECISIONS, LatentDiffusionPipeline


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


class EditingPipeline(LatentDiffusionPipeline):
    """LatentDiffusionPipeline plus the editing modes; each returns the dict `save` writes."""

    # ---- inputs ----------------------------------------------------------------------------------
    def _channels(self) -> int:
        cfg = getattr(self.model.first_stage, "config", None) or {}
        return int(cfg.get("ddconfig", {}).get("in_channels", 3))

    def load_image(self, image: str | Path | Tensor) -> Tensor:
        """A path or a (1, C, H, W) / (C, H, W) tensor in [-1, 1] → (1, C, H, W) at the model's image size."""
        if isinstance(image, (str, Path)):
            return load_image(image, self._channels(), self.image_size)
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"init image must be (1, C, H, W) or (C, H, W), got {tuple(image.shape)}")
        self._latent_size(*image.shape[-2:])  # multiples of the downsampling factor
        return image.float()

    def _mask(self, mask: str | Path | Tensor, size: tuple[int, int]) -> Tensor:
        if isinstance(mask, (str, Path)):
            return load_mask(mask, size)
        mask = mask[None] if mask.ndim == 3 else mask[None, None] if mask.ndim == 2 else mask
        if mask.shape[-2:] != size or mask.shape[:2] != (1, 1):
            raise ValueError(f"mask must be (1, 1, {size[0]}, {size[1]}) like the image, got {tuple(mask.shape)}")
        return (mask > 0.5).float()

    def _setup(self, prompts, n, sampler, steps, precision, seed):
        prompts = self._check_prompts(prompts)
        for name, value in (("n", n), ("steps", steps)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {sorted(PRECISIONS)}")
        fn = get_sampler(sampler)
        items = [p for p in prompts for _ in range(int(n))]
        return fn, items, [int(seed) + k for k in range(len(items))]

    def _autocast(self, precision: str):
        dtype = PRECISIONS[precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _noise(self, seeds: Sequence[int], like: Tensor, offset: int = 0) -> Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=torch.Generator().manual_seed(s + offset))
                            for s in seeds]).to(self.device)

    def _settings(self, mode: str, sampler, sampler_options, steps, guidance, guidance_rescale, negative_prompt,
                  precision, n, **extra) -> dict:
        h, w = self.image_size
        return {"mode": mode, "sampler": sampler, "sampler_options": dict(sampler_options or {}),
                "steps": int(steps), "guidance": float(guidance), "guidance_rescale": float(guidance_rescale),
                "negative_prompt": negative_prompt or "", "height": h, "width": w, "precision": precision,
                "weights": "ema" if self.use_ema else "raw", "checkpoint": self.checkpoint, "n": int(n), **extra}

    def _denoiser(self, prompts, negative_prompt, guidance, guidance_rescale, context=None, concat=None):
        guidance = guidance if self.model.text_encoder is not None else 1.0
        return self.model.make_denoiser(list(prompts), negative_prompt, guidance, guidance_rescale, self.use_ema,
                                        context=context, concat=concat)

    @property
    def is_inpainting_model(self) -> bool:
        """A model trained with concat_source='inpaint' (mask + masked-image latent concatenated, as SD-inpainting)."""
        return self.model.hparams.get("concat_source") == "inpaint"

    # ---- img2img and inpainting ------------------------------------------------------------------
    @torch.no_grad()
    def img2img(self, image, prompts, strength: float = 0.6, n: int = 1, negative_prompt: str | None = "",
                sampler: str = "ddim", sampler_options: Mapping | None = None, steps: int = 50,
                guidance: float = 4.0, guidance_rescale: float = 0.0, seed: int = 0, batch_size: int = 16,
                precision: str = "fp32", progress: bool = True, mask=None, paste: bool = True,
                blend: bool | None = None, repaint: int = 1) -> dict:
        """SDEdit: the image's latent noised to strength·T and denoised with int(steps·strength) steps of
        `sampler` under the prompt. strength 0 returns the input itself. With `mask` (1 = repaint) this is
        inpainting: the known region is blended in at every step (`blend`; default: unless the model is an
        inpainting model, which sees mask and masked image through `concat`) and pasted back in pixels (`paste`).
        `repaint` > 1: RePaint resampling, each DDIM step taken that many times (sampler ddim, strength 1, blend)."""
        strength = editing.check_strength(strength)
        fn, items, seeds = self._setup(prompts, n, sampler, steps, precision, seed)
        image = self.load_image(image).to(self.device)
        size = tuple(image.shape[-2:])
        pixel_mask = self._mask(mask, size).to(self.device) if mask is not None else None
        z_known = self.model.encode_images(image)  # posterior mean, (1, c, h, w)
        latent_mask = editing.mask_to_latent(pixel_mask, z_known.shape[-2:]) if pixel_mask is not None else None
        concat = None
        if self.is_inpainting_model:
            if pixel_mask is None:
                raise ValueError("this is an inpainting model: give a mask (mode=inpaint)")
            from ldm.models.conditioning import inpainting_concat
            concat = inpainting_concat(self.model, image, pixel_mask)
        blend = (not self.is_inpainting_model) if blend is None else bool(blend)
        if int(repaint) > 1 and (pixel_mask is None or not blend or sampler != "ddim" or strength != 1.0):
            raise ValueError("repaint > 1 needs a mask, blending, sampler=ddim and strength=1")
        chunks, unpasted = [], []
        for start in range(0, len(items), int(batch_size)):
            batch, batch_seeds = items[start:start + batch_size], seeds[start:start + batch_size]
            z0 = z_known.expand(len(batch), -1, -1, -1)
            if strength == 0:
                chunks.append(image.expand(len(batch), -1, -1, -1).float().cpu())
                unpasted.append(chunks[-1])
                continue
            den = self._denoiser(batch, negative_prompt, guidance, guidance_rescale, concat=concat)
            if latent_mask is not None and blend:
                den = editing.KnownRegionDenoiser(den, z0, latent_mask, self._noise(batch_seeds, z_known, 1 << 20))
            gen = torch.Generator(device=self.device).manual_seed(batch_seeds[0] + 1)
            with self._autocast(precision):
                if int(repaint) > 1:
                    opts = {k: v for k, v in dict(sampler_options or {}).items() if k in ("spacing", "steps_offset")}
                    z = editing.repaint_ddim(den, self._noise(batch_seeds, z_known), int(steps), int(repaint),
                                             generator=gen, progress=progress, **opts)
                else:
                    z = editing.sdedit(fn, den, z0, strength, int(steps), self._noise(batch_seeds, z_known),
                                       generator=gen, progress=progress, **dict(sampler_options or {}))
            if latent_mask is not None:
                z = editing.paste_known(z, z0, latent_mask)
            x = self.model.decode_latents(z.float()).clamp(-1, 1)
            unpasted.append(x.cpu())
            if pixel_mask is not None and paste:
                x = editing.paste_known(x, image, pixel_mask)
            chunks.append(x.float().cpu())
        images = torch.cat(chunks)
        extra = {"strength": strength, "steps_run": 0 if strength == 0 else editing.img2img_steps(steps, strength)}
        if pixel_mask is not None:
            keep = (pixel_mask.cpu() < 0.5).expand_as(images)
            err = lambda out: float((out - image.cpu()).abs()[keep].max()) if bool(keep.any()) else 0.0  # noqa: E731
            mean = lambda out: float((out - image.cpu()).abs()[keep].mean()) if bool(keep.any()) else 0.0  # noqa: E731
            extra.update(paste=bool(paste), blend=blend, inpainting_model=self.is_inpainting_model,
                         repaint=int(repaint), known_region_max_abs_error=err(images),
                         known_region_max_abs_error_unpasted=err(torch.cat(unpasted)),
                         known_region_mean_abs_error_unpasted=mean(torch.cat(unpasted)),
                         masked_fraction=float(pixel_mask.mean()))
        mode = "inpaint" if pixel_mask is not None else "img2img"
        settings = self._settings(mode, sampler, sampler_options, steps, guidance, guidance_rescale,
                                  negative_prompt, precision, n, **extra)
        return {"images": images, "prompts": items, "seeds": seeds, "settings": settings}

    def inpaint(self, image, mask, prompts, strength: float = 1.0, **kwargs) -> dict:
        """Repaint where `mask` is 1 (white) under the prompt, keeping the rest: img2img with a mask."""
        if mask is None:
            raise ValueError("inpaint needs a mask (white = repaint, black = keep)")
        return self.img2img(image, prompts, strength=strength, mask=mask, **kwargs)

    # ---- inversion and interpolation -------------------------------------------------------------
    @torch.no_grad()
    def invert(self, image, prompt: str, edit_prompts: Sequence[str] | str = (), steps: int = 50,
               guidance: float = 1.0, edit_guidance: float = 4.0, negative_prompt: str | None = "",
               spacing: str = "leading", seed: int = 0, progress: bool = True) -> dict:
        """Deterministic DDIM inversion of `image` under `prompt` (guidance 1 by default, where the round trip is
        closest), then η = 0 DDIM from the inverted noise: under `prompt` (the reconstruction) and under each
        edit prompt. Images: input, autoencoder reconstruction, DDIM reconstruction, edits."""
        prompt = self._check_prompts(prompt)[0]
        edits = self._check_prompts(edit_prompts) if edit_prompts else []
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        image = self.load_image(image).to(self.device)
        z0 = self.model.encode_images(image)
        den = self._denoiser([prompt], negative_prompt, guidance, 0.0)
        x_T = editing.ddim_invert(den, z0, int(steps), spacing=spacing)
        ddim = get_sampler("ddim")
        z_rec = ddim(den, x_T, int(steps), spacing=spacing, progress=progress)
        outs = [image.cpu(), self.model.decode_latents(z0).clamp(-1, 1).cpu(),
                self.model.decode_latents(z_rec).clamp(-1, 1).cpu()]
        for p in edits:
            z = ddim(self._denoiser([p], negative_prompt, edit_guidance, 0.0), x_T, int(steps), spacing=spacing,
                     progress=progress)
            outs.append(self.model.decode_latents(z).clamp(-1, 1).cpu())
        images = torch.cat(outs)
        metrics = {"latent_rmse": float(((z_rec - z0) ** 2).mean().sqrt()),
                   "latent_rms": float((z0**2).mean().sqrt()),
                   "psnr_reconstruction_vs_input_db": psnr(images[2], images[0]),
                   "psnr_autoencoder_vs_input_db": psnr(images[1], images[0]),
                   "psnr_reconstruction_vs_autoencoder_db": psnr(images[2], images[1]),
                   "inverted_noise_std": float(x_T.std())}
        labels = ["input", "autoencoder", f"reconstruction: {prompt}"] + [f"edit: {p}" for p in edits]
        settings = self._settings("invert", "ddim", {"spacing": spacing}, steps, edit_guidance, 0.0, negative_prompt,
                                  "fp32", len(labels), inversion_prompt=prompt, inversion_guidance=float(guidance),
                                  metrics=metrics)
        return {"images": images, "prompts": labels, "seeds": [int(seed)] * len(labels), "settings": settings,
                "noise": x_T.cpu()}

    @torch.no_grad()
    def interpolate(self, prompts: Sequence[str] | str, frames: int = 8, seed: int = 0, seed2: int | None = None,
                    negative_prompt: str | None = "", sampler: str = "ddim", sampler_options: Mapping | None = None,
                    steps: int = 50, guidance: float = 4.0, guidance_rescale: float = 0.0,
                    progress: bool = True) -> dict:
        """A strip of `frames` images. One prompt: slerp between the noises of `seed` and `seed2` (seed + 1 by
        default). Two prompts: slerp between their text embeddings, from the one noise of `seed` (or between
        the two noises too if `seed2` is given). Use a deterministic sampler (DDIM η=0, DPM-Solver++, Euler)."""
        prompts = self._check_prompts(prompts)
        if len(prompts) not in (1, 2):
            raise ValueError(f"interpolate takes one prompt (between two seeds) or two, got {len(prompts)}")
        if int(frames) < 2:
            raise ValueError(f"frames must be >= 2, got {frames}")
        fn = get_sampler(sampler)
        ts = torch.linspace(0, 1, int(frames), dtype=torch.float64)
        h, w = self._latent_size(None, None)
        shape = (1, self.model.latent_channels, h, w)
        noise = lambda s: torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))  # noqa: E731
        a = noise(seed)
        b = noise(seed2 if seed2 is not None else (seed + 1 if len(prompts) == 1 else seed))
        x_T = torch.cat([editing.slerp(a, b, float(t)) for t in ts]).to(self.device)
        context, labels = None, [prompts[0]] * len(ts)
        if len(prompts) == 2 and self.model.text_encoder is not None:
            ca, ma = self.model.encode_text(prompts[:1])
            cb, mb = self.model.encode_text(prompts[1:])
            length = max(ca.shape[1], cb.shape[1])
            (ca, ma), (cb, mb) = pad_context(ca, ma, length), pad_context(cb, mb, length)
            ctx = torch.cat([editing.slerp(ca, cb, float(t)) for t in ts])
            context = (ctx, torch.logical_or(ma.bool(), mb.bool()).to(ma.dtype).expand(len(ts), -1))
            labels = [f"{prompts[0]} → {prompts[1]} @ {float(t):.3f}" for t in ts]
        den = self._denoiser(labels, negative_prompt, guidance, guidance_rescale, context=context)
        gen = torch.Generator(device=self.device).manual_seed(int(seed) + 1)
        z = fn(den, x_T, int(steps), generator=gen, progress=progress, **dict(sampler_options or {}))
        images = self.model.decode_latents(z).clamp(-1, 1).float().cpu()
        settings = self._settings("interpolate", sampler, sampler_options, steps, guidance, guidance_rescale,
                                  negative_prompt, "fp32", len(ts), frames=int(frames), ts=ts.tolist(),
                                  endpoints=list(prompts), seeds_interpolated=[int(seed), int(seed2) if seed2
                                                                               is not None else None])
        return {"images": images, "prompts": labels, "seeds": [int(seed)] * len(ts), "settings": settings}

    # ---- super-resolution ------------------------------------------------------------------------
    @torch.no_grad()
    def upscale(self, lowres, prompts, noise_level: int = 20, n: int = 1, reference: Tensor | None = None,
                negative_prompt: str | None = "", sampler: str = "ddim", sampler_options: Mapping | None = None,
                steps: int = 50, guidance: float = 1.0, guidance_rescale: float = 0.0, seed: int = 0,
                batch_size: int = 16, precision: str = "fp32", progress: bool = True) -> dict:
        """A concat_source="upscale" model: `lowres` (a path or (1, C, h, w) tensor) → images at the model's size,
        conditioned on its bicubic upsampling's latent noised to `noise_level` (SD x4 upscaler). With `reference`
        (the high-resolution image) PSNR and SSIM of the outputs and of plain bicubic upsampling are reported."""
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        from ldm.data.superres import bicubic
        from ldm.models.conditioning import upscale_condition

        if self.model.hparams.get("concat_source") != "upscale":
            raise ValueError("upscale needs a super-resolution model (concat_source='upscale', "
                             "experiment=fmnist_upscale)")
        levels = int(self.model.unet.num_classes)
        if not 0 <= int(noise_level) < levels:
            raise ValueError(f"noise_level must be in [0, {levels - 1}] (the levels it was trained on), got "
                             f"{noise_level}")
        fn, items, seeds = self._setup(prompts, n, sampler, steps, precision, seed)
        if isinstance(lowres, (str, Path)):
            lowres = load_image(lowres, self._channels())
        lowres = lowres[None] if lowres.ndim == 3 else lowres
        size = self.image_size
        if lowres.ndim != 4 or lowres.shape[0] != 1 or lowres.shape[-1] > size[1] or lowres.shape[-2] > size[0]:
            raise ValueError(f"lowres must be one (1, C, h, w) image at most {size[0]}×{size[1]}, got "
                             f"{tuple(lowres.shape)}")
        cond = upscale_condition(self.model, lowres, size, torch.tensor([int(noise_level)]),
                                 torch.Generator(device=self.device).manual_seed(int(seed) + 2))
        chunks = []
        for start in range(0, len(items), int(batch_size)):
            batch, batch_seeds = items[start:start + batch_size], seeds[start:start + batch_size]
            den = self.model.make_denoiser(batch, negative_prompt, guidance if self.model.text_encoder else 1.0,
                                           guidance_rescale, self.use_ema, concat=cond["concat"], y=cond["y"])
            x_T = self._noise(batch_seeds, torch.zeros(1, self.model.latent_channels, *self._latent_size(None, None)))
            gen = torch.Generator(device=self.device).manual_seed(batch_seeds[0] + 1)
            with self._autocast(precision):
                z = fn(den, x_T, int(steps), generator=gen, progress=progress, **dict(sampler_options or {}))
            chunks.append(self.model.decode_latents(z.float()).clamp(-1, 1).float().cpu())
        images = torch.cat(chunks)
        extra = {"noise_level": int(noise_level), "lowres_size": list(lowres.shape[-2:])}
        if reference is not None:
            ref = self.load_image(reference).cpu().expand_as(images)
            base = bicubic(lowres.float().cpu(), size).expand_as(images)
            score = lambda a: float(ssim((a + 1) / 2, (ref + 1) / 2, data_range=1.0))  # noqa: E731
            extra.update(psnr_db=psnr(images, ref), ssim=score(images), bicubic_psnr_db=psnr(base, ref),
                         bicubic_ssim=score(base))
        settings = self._settings("upscale", sampler, sampler_options, steps, guidance, guidance_rescale,
                                  negative_prompt, precision, n, **extra)
        return {"images": images, "prompts": items, "seeds": seeds, "settings": settings}
