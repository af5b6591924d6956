"""Inference from a trained LatentDiffusion checkpoint: text → images, written with their metadata.

    pipe = LatentDiffusionPipeline.from_checkpoint("logs/fmnist_ldm/latest/checkpoints/last.ckpt")
    result = pipe.text_to_image(["a photo of a sneaker"], n=8, sampler="dpmpp_2m", steps=20, guidance=4, seed=0)
    pipe.save(result, "outputs/sneakers")   # one PNG per image + grid.png + metadata.json

Image k of a call (prompts in order, `n` images each) starts from noise seeded with `seed + k`, so an image
does not change with the batch size for deterministic samplers (DDIM η=0, DPM-Solver++, Euler, Heun);
ancestral samplers (DDPM, Euler-a, DDIM η>0) also draw per-step noise, seeded once per batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ldm.diffusion.samplers import get_sampler
from ldm.images import save_grid, save_png
from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} asked for but CUDA is not available (use device=cpu or auto)")
    return device


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "empty"


class LatentDiffusionPipeline:
    """A LatentDiffusion model in eval mode on a device, plus where it came from (for the images' metadata)."""

    def __init__(self, model: LatentDiffusion, checkpoint: str = "", use_ema: bool = True):
        self.model = model.eval()
        self.checkpoint = str(checkpoint)
        self.use_ema = use_ema and model.ema_unet is not None
        if use_ema and model.ema_unet is None:
            log.info("the checkpoint has no EMA weights: sampling with the raw U-Net")
        self.guide: torch.nn.Module | None = None  # autoguidance's weaker U-Net (load_guide)
        self.guide_checkpoint = ""

    def load_guide(self, path: str | Path, trust: bool = False) -> LatentDiffusionPipeline:
        """Load the U-Net that autoguidance (text_to_image's guide_scale) steers away from: an earlier checkpoint
        of the same run (e.g. <run>/checkpoints/step0001050.ckpt of a 2100-step run), EMA weights if this pipeline
        uses them. It must be the same kind of model: latent channels, noise schedule, prediction type and
        caption width are checked."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"guide checkpoint {path} does not exist: pass an earlier checkpoint of the "
                                    "same run, e.g. <run>/checkpoints/step0001050.ckpt")
        guide = LatentDiffusion.load(path, trust=trust, map_location="cpu")
        mine, theirs = self.model, guide
        checks = {
            "latent channels": (mine.latent_channels, theirs.latent_channels),
            "prediction_type": (mine.hparams.prediction_type, theirs.hparams.prediction_type),
            "variance_type": (mine.hparams.variance_type, theirs.hparams.variance_type),
            "caption width (context_dim)": (getattr(mine.unet, "context_dim", None),
                                            getattr(theirs.unet, "context_dim", None)),
            "concat channels": (mine.concat_channels, theirs.concat_channels),
        }
        for what, (a, b) in checks.items():
            if a != b:
                raise ValueError(f"guide {path} does not match the model: {what} {b!r} vs {a!r}")
        if not torch.allclose(mine.schedule.alphas_cumprod.cpu(), theirs.schedule.alphas_cumprod.cpu()):
            raise ValueError(f"guide {path} does not match the model: another noise schedule")
        net = theirs.ema_unet if self.use_ema and theirs.ema_unet is not None else theirs.unet
        self.guide = net.eval().requires_grad_(False).to(self.device)
        self.guide_checkpoint = str(path)
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", trust: bool = False,
                        use_ema: bool = True, sd_options: Mapping | None = None) -> LatentDiffusionPipeline:
        """From a LatentDiffusion Lightning .ckpt or an exported folder (see LatentDiffusion.export), or a Stable
        Diffusion single file / diffusers folder (ldm.convert; `sd_options`: model_type, tokenizer, use_ema, ...)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist: pass ckpt=<run>/checkpoints/last.ckpt, "
                                    "an exported folder (<run>/export), an SD .ckpt/.safetensors or a diffusers folder")
        from ldm import convert

        if convert.detect_format(path, trust=trust) != "ldm":
            options = {k: v for k, v in dict(sd_options or {}).items() if v is not None}
            model = convert.load_latent_diffusion(path, trust=trust, **options)
            return cls(model.to(resolve_device(device)), str(path), use_ema)
        model = LatentDiffusion.load(path, trust=trust, map_location="cpu")
        return cls(model.to(resolve_device(device)), str(path), use_ema)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_size(self) -> tuple[int, int]:
        """The (height, width) in pixels the model was trained at."""
        h, w = self.model._latent_hw(None, None)
        f = self.model.downsample_factor
        return h * f, w * f

    def _latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        f = self.model.downsample_factor
        default_h, default_w = self.image_size
        height, width = int(height or default_h), int(width or default_w)
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height={height}, width={width}: both must be positive multiples of the "
                             f"autoencoder's downsampling factor {f}")
        return height // f, width // f

    @staticmethod
    def _check_prompts(prompts: Sequence[str] | str) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        if any(not p.strip() for p in prompts):
            log.warning("%d empty prompt(s): those images are unconditional samples",
                        sum(not p.strip() for p in prompts))
        return prompts

    @torch.no_grad()
    def text_to_image(self, prompts: Sequence[str] | str, n: int = 1, negative_prompt: str | None = "",
                      sampler: str = "ddim", sampler_options: Mapping | None = None, steps: int = 50,
                      guidance: float = 4.0, guidance_rescale: float = 0.0, seed: int = 0,
                      height: int | None = None, width: int | None = None, batch_size: int = 16,
                      precision: str = "fp32", progress: bool = True, concat: torch.Tensor | None = None,
                      guide_scale: float = 0.0) -> dict:
        """`n` images for each prompt → {"images": (N, C, H, W) in [-1, 1] on the CPU, "prompts", "seeds",
        "settings"}; height/width in pixels (multiples of the downsampling factor). `concat`: the condition of a
        model with concat_channels (e.g. a segmentation map), one for all images or one per image.
        guide_scale > 0: autoguidance by the U-Net of load_guide (docs/fidelity.md)."""
        prompts = self._check_prompts(prompts)
        if guide_scale and self.guide is None:
            raise ValueError(f"guide_scale={guide_scale} needs a guide: pipe.load_guide(<an earlier checkpoint of the "
                             "run>) (sample.py / eval.py: guide=<run>/checkpoints/step….ckpt)")
        for name, value in (("n", n), ("steps", steps), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: use one of {sorted(PRECISIONS)}")
        get_sampler(sampler)  # an unknown name fails before any work
        h, w = self._latent_size(height, width)
        items = [p for p in prompts for _ in range(int(n))]
        if concat is not None and len(concat) not in (1, len(items)):
            raise ValueError(f"concat has {len(concat)} conditions for {len(items)} images (give 1 or one each)")
        seeds = [int(seed) + k for k in range(len(items))]
        shape = (self.model.latent_channels, h, w)
        dtype = PRECISIONS[precision]
        autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        chunks = []
        for start in range(0, len(items), int(batch_size)):
            batch, batch_seeds = items[start:start + batch_size], seeds[start:start + batch_size]
            x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in batch_seeds])
            if progress and len(items) > batch_size:
                print(f"batch {start // batch_size + 1}/{-(-len(items) // batch_size)}", flush=True)
            with autocast:
                images = self.model.sample(batch, negative_prompt=negative_prompt, sampler=sampler, steps=int(steps),
                                           guidance=float(guidance), guidance_rescale=float(guidance_rescale),
                                           seed=batch_seeds[0], use_ema=self.use_ema, progress=progress,
                                           sampler_options=sampler_options, x_T=x_T,
                                           concat=concat if concat is None or len(concat) == 1
                                           else concat[start:start + batch_size],
                                           guide=self.guide, guide_scale=float(guide_scale))
            chunks.append(images.float().cpu())
        settings = {"sampler": sampler, "sampler_options": dict(sampler_options or {}), "steps": int(steps),
                    "guidance": float(guidance), "guidance_rescale": float(guidance_rescale),
                    "negative_prompt": negative_prompt or "", "height": h * self.model.downsample_factor,
                    "width": w * self.model.downsample_factor, "precision": precision,
                    "weights": "ema" if self.use_ema else "raw", "checkpoint": self.checkpoint, "n": int(n)}
        if guide_scale:
            settings.update(guide=self.guide_checkpoint, guide_scale=float(guide_scale))
        return {"images": torch.cat(chunks), "prompts": items, "seeds": seeds, "settings": settings}

    @staticmethod
    def save(result: dict, out: str | Path) -> dict:
        """Write image k as `<out>/<k>_<prompt>.png` (its prompt, seed and settings in PNG text chunks),
        `grid.png` (one row per prompt) and `metadata.json`; returns the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        settings, paths, entries = result["settings"], [], []
        rows = zip(result["images"], result["prompts"], result["seeds"], strict=True)
        for k, (image, prompt, seed) in enumerate(rows):
            meta = {"prompt": prompt, "seed": seed, **settings}
            path = save_png(image, out / f"{k:05d}_{_slug(prompt)}.png", meta)
            paths.append(path)
            entries.append({"file": path.name, "prompt": prompt, "seed": seed})
        n = settings.get("n", 1)
        nrow = n if 1 < n <= 16 else None
        grid = save_grid(result["images"], out / "grid.png", nrow=nrow,
                         metadata={"prompts": list(dict.fromkeys(result["prompts"])), **settings})
        metadata = out / "metadata.json"
        metadata.write_text(json.dumps({"settings": settings, "images": entries}, indent=2))
        return {"images": paths, "grid": grid, "metadata": metadata}

