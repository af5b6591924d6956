"""LDM training throughput (images/s) with and without latent + text-embedding caching, fp32 on CPU.

    python benchmarks/ldm_caching.py                 # the demo's model: fmnist U-Net, f=4 autoencoder, MiniLM
    python benchmarks/ldm_caching.py --first-stage /tmp/ae/export --steps 20 --reps 5
    python benchmarks/ldm_caching.py --smoke         # tiny sizes, one step (the tests run this)

Uncached: every step reads images, encodes them with the frozen autoencoder and the captions with the frozen
text encoder (its cache off), then trains the U-Net. Cached (what experiment=fmnist_ldm does): the training
set's posteriors are encoded once (`LatentDiffusion.cache_latents`, its one-off cost reported separately) and the
text encoder's caption cache is on, so a step samples z from the cached posterior and trains the U-Net.
A training step is the model's own loss + backward + AdamW (fused on CPU). Runs alternate cached/uncached,
order flipped each repetition, so that load on a shared machine hits both alike; we report median images/s
and the median of the per-repetition cached/uncached ratios (target ≥ 1.4×).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.data.datamodule import collate  # noqa: E402
from ldm.data.fashion_mnist import FashionMNIST  # noqa: E402
from ldm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.models.optim import adamw  # noqa: E402

TINY_AE = {"ddconfig": dict(in_channels=1, out_ch=1, resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1,
                            attn_resolutions=[], mid_attn=False, dropout=0.0, z_channels=4, double_z=True,
                            norm_groups=4), "embed_dim": 4}
TINY_UNET = dict(_target_="ldm.nn.unet.UNetModel", in_channels=4, out_channels=4, model_channels=16,
                 channel_mult=[1], num_res_blocks=1, attention_resolutions=[1], num_head_channels=8,
                 context_dim=384, norm_num_groups=8)


def build(args) -> tuple[LatentDiffusion, int]:
    """The model (U-Net, first stage, text encoder as configured for the demo, or tiny) and its image size."""
    if args.smoke:
        unet, first_stage, size = TINY_UNET, TINY_AE, 16
    else:
        unet = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/unet/fmnist.yaml"))
        ae = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/autoencoder/fmnist_f4.yaml"))
        first_stage = args.first_stage or {"ddconfig": ae["ddconfig"], "embed_dim": ae["embed_dim"]}
        size = 32
    text = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/text_encoder/minilm.yaml"))
    model = LatentDiffusion(unet=unet, first_stage=first_stage, text_encoder=text, ema_decay=None,
                            cond_drop_prob=0.1, schedule={"name": "scaled_linear", "num_timesteps": 1000})
    return model.train(), size


def run_steps(model, opt, loader, steps: int, seed: int) -> float:
    """images/s over `steps` training steps, data loading included."""
    gen = torch.Generator().manual_seed(seed)
    it = iter(loader)
    n, t0 = 0, time.perf_counter()
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss, _ = model._loss(model.unet, batch, model.hparams.cond_drop_prob, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(batch["caption"])
    return n / (time.perf_counter() - t0)


def set_text_cache(model, on: bool, size: int) -> None:
    te = model.text_encoder
    te.cache_size = size if on else 0
    if not on:
        te._cache.clear()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first-stage", default=None, help="an exported autoencoder (default: random f=4 weights, "
                   "same speed)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--items", type=int, default=4096, help="training images in the (cached) set")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--smoke", action="store_true", help="tiny model, batch 4, one step, one repetition")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.reps, args.items = 4, 1, 1, 16
    torch.manual_seed(0)
    model, size = build(args)
    data = FashionMNIST(root=args.data_root, split="test" if args.smoke else "train", image_size=size)
    data = Subset(data, range(min(args.items, len(data))))
    t0 = time.perf_counter()
    cache = model.cache_latents(data)  # the one-off cost of caching
    cache_seconds = time.perf_counter() - t0
    loaders = {"uncached": DataLoader(data, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True),
               "cached": DataLoader(cache, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True)}
    opt = adamw([p for p in model.unet.parameters() if p.requires_grad], lr=1e-4)
    cache_size = model.text_encoder.cache_size or 4096
    for mode, loader in loaders.items():  # warm-up: allocator, SDPA paths, the text cache's first captions
        set_text_cache(model, mode == "cached", cache_size)
        run_steps(model, opt, loader, 1 if args.smoke else 2, seed=0)
    speeds: dict[str, list[float]] = {"cached": [], "uncached": []}
    for rep in range(args.reps):
        order = ["cached", "uncached"] if rep % 2 == 0 else ["uncached", "cached"]
        for mode in order:
            set_text_cache(model, mode == "cached", cache_size)
            speeds[mode].append(run_steps(model, opt, loaders[mode], args.steps, seed=rep))
    ratios = [c / u for c, u in zip(speeds["cached"], speeds["uncached"], strict=True)]
    figures = {
        "cached_images_per_s": round(statistics.median(speeds["cached"]), 2),
        "uncached_images_per_s": round(statistics.median(speeds["uncached"]), 2),
        "speedup": round(statistics.median(ratios), 3),
        "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "cache_build_s": round(cache_seconds, 2), "cache_build_images_per_s": round(len(data) / cache_seconds, 1),
        "batch": args.batch, "steps": args.steps, "reps": args.reps, "threads": torch.get_num_threads(),
        "smoke": args.smoke,
    }
    print(f"LDM training, batch {args.batch}, {torch.get_num_threads()} thread(s), median of {args.reps} reps × "
          f"{args.steps} steps:")
    print(f"  uncached (encode images + captions every step): {figures['uncached_images_per_s']:8.1f} images/s")
    print(f"  cached (latents + text embeddings):             {figures['cached_images_per_s']:8.1f} images/s")
    print(f"  speed-up: {figures['speedup']:.2f}× (range {figures['speedup_range'][0]:.2f}–"
          f"{figures['speedup_range'][1]:.2f}); building the latent cache: {figures['cache_build_s']:.1f} s for "
          f"{len(data)} images")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
