"""Test-set negative log-likelihood bound (bits/dim) of a pixel-space diffusion model (first stage PixelSpace).

    python -m ldm.metrics.nll logs/fmnist_pixel_ddpm/latest/checkpoints/last.ckpt --n 1000 --timesteps 100

The bound is DDPM's L_T + Σ_{t≥1} L_t + L_0 (ldm.diffusion.likelihood.bits_per_dim), in bits per dimension of
8-bit images in [-1, 1], for two models in one network: conditional on the image's class caption
(−log p(x | c), the text-to-image model) and unconditional (the null caption "" that classifier-free guidance
trains, −log p(x): the setting of DDPM's and iDDPM's published figures).

`--timesteps K` evaluates t = 0 and up to K−1 timesteps t ≥ 1, crowded near t = 1 where a trained model's terms
change fastest (`--spacing quadratic`, each weighted by the t it stands for) or evenly spaced (an estimate);
`--full-check M` also evaluates every t on the first M images, so the printed gap says what K costs.

Fashion-MNIST's 28×28 images are padded with background to 32×32: the bound is reported per model input
dimension (32·32) and per real pixel (the same total bits over 28·28). The second is a valid bound on the 28×28
image: p(x₂₈) ≥ p(x₂₈, border = background) = p(x₃₂).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.likelihood import bits_per_dim

log = logging.getLogger(__name__)
FMNIST_PIXELS = 28 * 28


def check_pixel_space(model) -> None:
    from ldm.nn.autoencoder import PixelSpace

    if not isinstance(model.first_stage, PixelSpace) or model.scale_factor != 1.0:
        raise ValueError("bits/dim is an image likelihood only for a pixel-space model (model.first_stage="
                         "{type: PixelSpace, channels: C}, scale factor 1, e.g. experiment=fmnist_pixel_ddpm); "
                         "a latent model's bound is in latent units and says nothing about images")


def caption_denoiser(model, captions: list[str], use_ema: bool = True) -> Denoiser:
    """The U-Net conditioned on one caption per image; accepts batches that repeat the images k times (as
    bits_per_dim evaluates several t per call). The predicted x0 is clipped to [-1, 1] as when sampling (iDDPM's
    bits/dim evaluation does the same); any reverse process gives a valid bound."""
    net = model.ema_unet if use_ema and model.ema_unet is not None else model.unet
    if model.text_encoder is None:
        fn = lambda x, t: net(x, t)  # noqa: E731
    else:
        ctx, mask = model.encode_text(captions)

        def fn(x: Tensor, t: Tensor) -> Tensor:
            k = x.shape[0] // ctx.shape[0]
            return net(x, t, context=ctx.repeat(k, 1, 1), context_mask=mask.repeat(k, *([1] * (mask.ndim - 1))))
    hp = model.hparams
    return Denoiser(fn, model.schedule, hp.prediction_type, hp.variance_type, clip_x0=model.clip_x0)


@torch.no_grad()
def test_set_bits_per_dim(model, images: Tensor, captions: list[str], *, timesteps: int | None = 100,
                          batch_size: int = 500, seed: int = 0, use_ema: bool = True,
                          images_per_call: int = 50, spacing: str = "quadratic") -> Tensor:
    """Per-image bound (bits/dim over the model's input dims) for `images` (N, C, H, W) in [-1, 1] given one
    caption each ("" for the unconditional model). Noise comes from one seeded generator: reruns agree."""
    check_pixel_space(model)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for i in range(0, len(images), images_per_call):
        x0 = images[i:i + images_per_call].to(model.device).float()
        den = caption_denoiser(model, captions[i:i + images_per_call], use_ema)
        out.append(bits_per_dim(den, x0, timesteps, gen, batch_size=batch_size, spacing=spacing).cpu())
    return torch.cat(out)


def summarize(bpd: Tensor, dims: int, real_dims: int) -> dict:
    """Mean and standard error over images, per input dim and per real pixel."""
    n = len(bpd)
    mean, se = float(bpd.mean()), float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    scale = dims / real_dims
    return {"n": n, "bpd": mean, "bpd_se": se, "bpd_per_real_pixel": mean * scale,
            "bpd_per_real_pixel_se": se * scale}


def evaluate(ckpt: str, *, n: int | None = 1000, timesteps: int | None = 100, full_check: int = 0,
             conditions: tuple[str, ...] = ("class", "null"), batch_size: int = 500, seed: int = 0,
             data_root: str | None = None, device: str = "auto", trust: bool = False,
             spacing: str = "quadratic") -> dict:
    from ldm.data.fashion_mnist import caption_for
    from ldm.metrics.evaluate import real_images
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt, device=device, trust=trust)
    model = pipe.model
    check_pixel_space(model)
    size = pipe.image_size[0]
    images, labels = real_images("test", n, size, data_root, seed=seed)
    dims = images[0].numel()
    real_dims = FMNIST_PIXELS * images.shape[1] if size >= 28 else dims
    result = {"ckpt": str(ckpt), "timesteps": timesteps or model.schedule.num_timesteps,
              "num_timesteps": model.schedule.num_timesteps, "spacing": spacing if timesteps else "every t",
              "image_shape": list(images.shape[1:])}
    for cond in conditions:
        caps = [caption_for(int(c)) for c in labels] if cond == "class" else [""] * len(labels)
        t0 = time.time()
        bpd = test_set_bits_per_dim(model, images, caps, timesteps=timesteps, batch_size=batch_size, seed=seed,
                                    spacing=spacing)
        result[cond] = {**summarize(bpd, dims, real_dims), "seconds": round(time.time() - t0, 1)}
        if full_check:  # every t on the first m images, against their estimates above
            m = min(full_check, len(images))
            full = test_set_bits_per_dim(model, images[:m], caps[:m], timesteps=None, batch_size=batch_size,
                                         seed=seed + 1)
            result[cond]["full_check"] = {"n": m, "bpd_all_t": float(full.mean()),
                                          "bpd_estimate": float(bpd[:m].mean())}
    return result


def format_result(r: dict) -> str:
    lines = [f"test-set NLL bound of {r['ckpt']} ({r['timesteps']} of {r['num_timesteps']} timesteps, {r['spacing']}, "
             f"image {tuple(r['image_shape'])}):"]
    names = {"class": "conditional, −log p(x | class caption)", "null": "unconditional, −log p(x) (null caption)"}
    for cond in ("class", "null"):
        if cond in r:
            c = r[cond]
            lines.append(f"  {names[cond]}: {c['bpd']:.3f} ± {c['bpd_se']:.3f} bits/dim over the input, "
                         f"{c['bpd_per_real_pixel']:.3f} ± {c['bpd_per_real_pixel_se']:.3f} bits per 28×28 pixel "
                         f"(n={c['n']}, {c['seconds']:.0f} s)")
            if "full_check" in c:
                fc = c["full_check"]
                lines.append(f"    every t on {fc['n']} images: {fc['bpd_all_t']:.3f} vs the estimate "
                             f"{fc['bpd_estimate']:.3f} bits/dim")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Test-set NLL bound (bits/dim) of a pixel-space diffusion model.")
    p.add_argument("ckpt", help="a pixel-space LatentDiffusion .ckpt or export folder (experiment=fmnist_pixel_ddpm)")
    p.add_argument("--n", type=int, default=1000, help="test images (a seeded random subset; 0: all 10,000)")
    p.add_argument("--timesteps", type=int, default=100, help="t evaluated per image (0: all of them)")
    p.add_argument("--spacing", default="quadratic", choices=["quadratic", "uniform"],
                   help="where the --timesteps t lie: crowded near t = 1 (quadratic) or evenly")
    p.add_argument("--full-check", type=int, default=0, help="also evaluate every t on this many images")
    p.add_argument("--conditions", default="class,null", help="class, null or both (comma-separated)")
    p.add_argument("--batch-size", type=int, default=500, help="network evaluations per call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    conditions = tuple(c.strip() for c in a.conditions.split(",") if c.strip())
    if not conditions or set(conditions) - {"class", "null"}:
        p.error(f"--conditions takes class and/or null, got {a.conditions!r}")
    r = evaluate(a.ckpt, n=a.n or None, timesteps=a.timesteps or None, full_check=a.full_check,
                 conditions=conditions, batch_size=a.batch_size, seed=a.seed, data_root=a.data_root,
                 device=a.device, trust=a.trust_checkpoint, spacing=a.spacing)
    print(format_result(r), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
