"""Autoencoder quality vs training time on CPU: train a config on Fashion-MNIST 32×32 and print test PSNR/SSIM.

    python benchmarks/autoencoder_quality.py --minutes 5                  # conf/model/autoencoder/fmnist_f4.yaml
    python benchmarks/autoencoder_quality.py --max-steps 1500 --minutes 0 # a fixed step budget instead

The loss is the AutoencoderKL module's own (`reconstruction_nll` + kl_weight·KL, discriminator off); the loop is
plain PyTorch so that evaluation pauses the training clock. The LR follows linear warm-up then cosine decay over
the budget: over `--max-steps` when given, else over the wall-clock budget (progress = elapsed / budget).
Evaluation uses the posterior mode on the official test split; PSNR is reported both as the mean of per-image
PSNRs ("psnr", what `val/psnr` logs) and from the pooled MSE ("psnr_pooled", never higher).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml

from ldm.data.fashion_mnist import FashionMNIST
from ldm.models.autoencoder import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]


def images(split: str, root: str | None, limit: int | None = None, val_size: int = 5000) -> torch.Tensor:
    kw = {"root": root} if root else {}
    ds = FashionMNIST(split=split, image_size=32, val_size=val_size, **kw)
    n = len(ds) if limit is None else min(limit, len(ds))
    return torch.stack([ds.to_image(ds.images[i]) for i in range(n)])  # (N, 1, 32, 32) in [-1, 1]


@torch.no_grad()
def evaluate(model: AutoencoderKL, test: torch.Tensor, batch: int = 500) -> dict:
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    model.eval()
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    per_image, sq, n = [], 0.0, 0
    for i in range(0, len(test), batch):
        x = test[i: i + batch]
        a, b = (model.reconstruct(x, model.net) + 1) / 2, (x + 1) / 2
        mse = (a - b).pow(2).flatten(1).mean(1)
        per_image.append(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))
        sq, n = sq + float(mse.sum()), n + len(x)
        ssim.update(a, b)
    model.train()
    return {"psnr": float(torch.cat(per_image).mean()), "psnr_pooled": 10 * math.log10(n / sq),
            "ssim": float(ssim.compute())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "conf/model/autoencoder/fmnist_f4.yaml"),
                   help="a model/autoencoder group file (ddconfig + embed_dim) or a bare ddconfig YAML")
    p.add_argument("--ddconfig", default=None, help="JSON overrides of the ddconfig, e.g. '{\"ch\": 32}'")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget (0: --max-steps only)")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.99))
    p.add_argument("--rec-loss", default="l2", choices=["l1", "l2"])
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--no-sample-posterior", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=float, default=30.0, help="seconds of training between evaluations")
    p.add_argument("--eval-every-steps", type=int, default=0, help="evaluate every N steps instead")
    p.add_argument("--eval-images", type=int, default=10000, help="test images per intermediate evaluation")
    p.add_argument("--data-root", default=None)
    p.add_argument("--val-size", type=int, default=5000, help="training images held out as the data set's val split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args()
    if not args.minutes and not args.max_steps:
        p.error("give --minutes or --max-steps")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = yaml.safe_load(Path(args.config).read_text())
    embed_dim = cfg.get("embed_dim", cfg.get("ddconfig", cfg).get("z_channels", 4))
    cfg = dict(cfg.get("ddconfig", cfg))
    cfg.pop("embed_dim", None)
    cfg.update(json.loads(args.ddconfig or "{}"))
    model = AutoencoderKL(cfg, embed_dim, rec_loss=args.rec_loss, kl_weight=args.kl_weight, disc_factor=0.0,
                          sample_posterior=not args.no_sample_posterior)
    if args.channels_last:
        model.net.to(memory_format=torch.channels_last)
    params = list(model.net.parameters()) + [model.logvar]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=0.0)
    train, test = images("train", args.data_root, val_size=args.val_size), images("test", args.data_root)
    n_params = sum(q.numel() for q in model.net.parameters())
    print(f"config {cfg} embed_dim {embed_dim}: {n_params / 1e6:.3f} M parameters; "
          f"{len(train)} train / {len(test)} test images; batch {args.batch_size}, lr {args.lr}, {args.rec_loss}")

    budget = args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    rows, step, pos, train_time, next_eval = [], 0, 0, 0.0, args.eval_every
    header = f"{'step':>6} {'train_s':>8} {'img/s':>7} {'loss':>9} {'psnr':>7} {'pooled':>7} {'ssim':>7}"
    print(header)
    last_loss, t_window, n_window = float("nan"), 0.0, 0
    while True:
        progress = max(step / args.max_steps if args.max_steps else 0.0, train_time / budget if budget else 0.0)
        done = progress >= 1.0
        due = (args.eval_every_steps and step % args.eval_every_steps == 0 and step > 0) or (
            not args.eval_every_steps and train_time >= next_eval)
        if due or done:
            sub = test if done else test[: args.eval_images]
            m = evaluate(model, sub)
            ips = n_window / t_window if t_window else float("nan")
            rows.append({"step": step, "train_s": round(train_time, 1), "img_per_s": round(ips, 1),
                         "loss": last_loss, **m, "n_test": len(sub)})
            print(f"{step:6d} {train_time:8.1f} {ips:7.0f} {last_loss:9.5f} {m['psnr']:7.2f} "
                  f"{m['psnr_pooled']:7.2f} {m['ssim']:7.4f}" + ("" if done else f"  ({len(sub)} test images)"),
                  flush=True)
            next_eval += args.eval_every
            t_window = n_window = 0
        if done:
            break
        warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
        cos = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * cos
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = train[order[pos: pos + args.batch_size]]
        pos += args.batch_size
        t0 = time.perf_counter()
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        posterior = model.net.encode(x)
        z = posterior.sample(gen) if model.hparams.sample_posterior else posterior.mode()
        nll, rec_loss = model.reconstruction_nll(x, model.net.decode(z))
        loss = nll + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        train_time, t_window, n_window = train_time + dt, t_window + dt, n_window + len(x)
        step, last_loss = step + 1, float(rec_loss.detach())

    final = rows[-1]
    print(f"final: {final['psnr']:.2f} dB PSNR ({final['psnr_pooled']:.2f} pooled), SSIM {final['ssim']:.4f} after "
          f"{final['step']} steps / {final['train_s']:.0f} s of training ({args.threads} threads)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "params": n_params, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
