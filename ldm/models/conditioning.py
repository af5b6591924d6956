"""Conditioning of LatentDiffusion besides the text: condition dropout for classifier-free guidance, and the
concatenation key `concat` (inpainting mask + masked latent, a low-resolution image, a segmentation map).

`concat` is resized to the latent grid by one function, `concat_to_latent_grid`, and joined to the state by one
wrapper, `with_concat`, so the U-Net sees cat([z_t, c_concat]) on every path (training loss, validation,
sampling, guidance: both branches of CFG get the same c_concat, as SD's inpainting and upscaling models).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import rng
from ldm.nn.text_encoder import pad_context


def concat_to_latent_grid(c: Tensor, latent_hw: tuple[int, int], batch: int | None = None) -> Tensor:
    """(B or 1, C, H, W) at any resolution → (B, C, h, w) on the latent grid: area-averaged when shrinking (a
    mask or one-hot map becomes coverage fractions), bilinear when enlarging, unchanged when it already fits."""
    if c.ndim != 4:
        raise ValueError(f"concat conditioning must be (B, C, H, W), got {tuple(c.shape)}")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    c = c.float()
    if tuple(c.shape[-2:]) != (h, w):
        shrink = c.shape[-2] >= h and c.shape[-1] >= w
        c = F.interpolate(c, size=(h, w), mode="area") if shrink else \
            F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False)
    if batch is not None and c.shape[0] != batch:
        if c.shape[0] != 1:
            raise ValueError(f"concat conditioning has batch {c.shape[0]}, expected {batch} or 1")
        c = c.expand(batch, -1, -1, -1)
    return c


def with_concat(net: nn.Module, concat_channels: int) -> Callable[..., Tensor]:
    """net(x, t, **cond) called as net(cat([x, c]), t, **rest), c = concat_to_latent_grid(concat, x's grid): the one
    place the key is resized and joined. `concat` is required when concat_channels > 0, refused otherwise."""
    if not concat_channels:
        return lambda x, t, concat=None, **cond: net(x, t, **cond) if concat is None else _unexpected()

    def fn(x: Tensor, t: Tensor, concat: Tensor | None = None, **cond) -> Tensor:
        if concat is None:
            raise ValueError(f"this model is conditioned on {concat_channels} concatenated channels: pass concat=")
        if concat.ndim != 4 or concat.shape[1] != concat_channels:
            raise ValueError(f"concat must have {concat_channels} channels (B, {concat_channels}, H, W), got "
                             f"{tuple(concat.shape)}")
        c = concat_to_latent_grid(concat.to(x.device), x.shape[-2:], x.shape[0]).to(x.dtype)
        return net(torch.cat([x, c], 1), t, **cond)
    return fn


def _unexpected() -> Tensor:
    raise ValueError("concat= given but this model has concat_channels=0")


def drop_condition(context: Tensor, mask: Tensor, null_context: Tensor, null_mask: Tensor, prob: float,
                   generator: rng.Generator = None) -> tuple[Tensor, Tensor, Tensor]:
    """Replace a Bernoulli(prob) subset of the batch's contexts by the null (empty-prompt) context, the
    unconditional branch of classifier-free guidance. Returns (context, mask, dropped (B,) bool)."""
    b = context.shape[0]
    dropped = rng.rand((b,), generator, device=context.device) < prob
    if not bool(dropped.any()):
        return context, mask, dropped
    length = max(context.shape[1], null_context.shape[1])
    context, mask = pad_context(context, mask, length)
    null_context, null_mask = pad_context(null_context, null_mask, length)
    context = torch.where(dropped[:, None, None], null_context.to(context.dtype).expand(b, -1, -1), context)
    mask = torch.where(dropped[:, None], null_mask.expand(b, -1), mask)
    return context, mask, dropped




CONCAT_SOURCES = (None, "batch", "inpaint", "upscale")


def inpainting_concat(model, image: Tensor, mask: Tensor) -> Tensor:
    """SD-inpainting's condition: cat([mask on the latent grid, latent of the masked image]), (B, 1 + c, h, w).
    image (B, C, H, W) in [-1, 1]; mask (B or 1, 1, H, W), 1 = hidden (its pixels are set to 0 before encoding)."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask must be (B, 1, {image.shape[-2]}, {image.shape[-1]}) like the image, got "
                         f"{tuple(mask.shape)}")
    mask = (mask.to(image.device, torch.float32) > 0.5).float().expand(image.shape[0], -1, -1, -1)
    z_masked = model.encode_images(image * (1 - mask))
    return torch.cat([concat_to_latent_grid(mask, z_masked.shape[-2:]).to(z_masked), z_masked], 1)


def upscale_condition(model, lowres: Tensor, size: tuple[int, int], noise_level: Tensor,
                      generator: rng.Generator = None) -> dict:
    """SD-x4-upscaler-style condition: the low-resolution image bicubic-upsampled to `size`, encoded, and noised to
    `noise_level` (B,) on the model's schedule (noise augmentation); the level is embedded through the U-Net's class
    embedding (y), so the model learns to trust a noisy condition less. Returns {"concat", "y"}."""
    from ldm.data.superres import bicubic

    noise_level = noise_level.to(model.device).long()
    z = model.encode_images(bicubic(lowres.to(model.device, torch.float32), tuple(size)))
    eps = rng.randn(z.shape, generator, device=z.device, dtype=z.dtype)
    return {"concat": model.schedule.q_sample(z, noise_level.expand(z.shape[0]), eps),
            "y": noise_level.expand(z.shape[0])}


def batch_conditions(model, batch: dict, generator: rng.Generator = None) -> dict:
    """The U-Net's extra conditions for a training batch: {"concat": batch["concat"]} (concat_source "batch"),
    built from the images and batch["mask"] ("inpaint"), or from batch["lowres"] with a random noise level in
    [0, unet.num_classes) ("upscale"); the last two need pixel images, not the latent cache."""
    source = model.hparams.get("concat_source") or "batch"
    if source in ("inpaint", "upscale"):
        key = "mask" if source == "inpaint" else "lowres"
        if batch.get(key) is None or batch["image"].ndim != 4:
            raise ValueError(f"concat_source={source!r} needs pixel images and a {key!r} per item "
                             f"({'data.masks=...' if key == 'mask' else 'a super-resolution dataset'}, "
                             "latent_cache=false)")
        if source == "inpaint":
            return {"concat": inpainting_concat(model, batch["image"], batch["mask"])}
        b, levels = batch["image"].shape[0], int(model.unet.num_classes)
        level = rng.randint(levels, (b,), generator, device=model.device)
        return upscale_condition(model, batch["lowres"], batch["image"].shape[-2:], level, generator)
    if batch.get("concat") is None:
        raise ValueError(f"concat_channels={model.concat_channels}: the batch needs a 'concat' tensor")
    return {"concat": batch["concat"]}
