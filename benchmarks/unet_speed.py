"""U-Net speed: our UNetModel vs diffusers' UNet2DConditionModel of the same architecture, fp32 on CPU.

    python benchmarks/unet_speed.py            # full: more repetitions
    python benchmarks/unet_speed.py --quick    # fewer repetitions

Both networks get the same inputs and parameter count (printed). A training step is forward + MSE loss +
backward + AdamW step (ldm's optimizer for both: torch AdamW, fused on CPU); a sampling step is one forward under
no_grad, timed before any training step. Runs alternate ours/theirs (one step each, order flipped each repetition)
so that load on a shared machine hits both alike; we report median times and the median of the per-repetition
ours/theirs ratios (with their range). Our U-Net runs in its default channels-last layout, diffusers' in its
default (NCHW).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.models.optim import adamw  # noqa: E402
from ldm.nn.unet import UNetModel  # noqa: E402

# name, latent (C, H, W), batch, context length
CONFIGS = [("fmnist 8×8", (4, 8, 8), 64, 16), ("32×32", (4, 32, 32), 16, 16)]
CONTEXT_DIM, CHANNELS, HEAD_CH = 384, (64, 128), 32


def build_ours() -> torch.nn.Module:
    return UNetModel(in_channels=4, out_channels=4, model_channels=CHANNELS[0], channel_mult=[1, 2],
                     num_res_blocks=1, attention_resolutions=[1, 2], num_head_channels=HEAD_CH,
                     context_dim=CONTEXT_DIM)


def build_theirs() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=CHANNELS, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=tuple(c // HEAD_CH for c in CHANNELS))  # = heads


def ours_fn(model):
    return lambda x, t, c, m: model(x, t, context=c, context_mask=m)


def theirs_fn(model):
    return lambda x, t, c, m: model(x, t, encoder_hidden_states=c, encoder_attention_mask=m, return_dict=False)[0]


def train_step(fn, opt, inputs, target):
    opt.zero_grad(set_to_none=True)
    F.mse_loss(fn(*inputs), target).backward()
    opt.step()


@torch.no_grad()
def sample_step(fn, inputs):
    fn(*inputs)


def time_it(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def compare(name, latent, batch, ctx_len, reps, use_mask) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    c = torch.randn(batch, ctx_len, CONTEXT_DIM, generator=g)
    m = None
    if use_mask:
        m = torch.arange(ctx_len)[None] < torch.randint(1, ctx_len + 1, (batch, 1), generator=g)
    target = torch.randn_like(x)
    models = {"ours": build_ours(), "theirs": build_theirs()}
    counts = {k: sum(p.numel() for p in v.parameters()) for k, v in models.items()}
    print(f"[{name}] parameters: ours {counts['ours']:,}  diffusers {counts['theirs']:,}")
    fns = {"ours": ours_fn(models["ours"]), "theirs": theirs_fn(models["theirs"])}
    opts = {k: adamw(v.parameters(), lr=1e-4) for k, v in models.items()}
    # Sampling first: a sampling process holds no gradients or optimizer state, and timing it after the training
    # steps (with both models' grads and AdamW moments alive) measured the allocator's state as much as the
    # networks (8×8: 0.81 in a fresh process vs 0.91 after training, same code).
    steps = {
        "sample": {k: (lambda k=k: sample_step(fns[k], (x, t, c, m))) for k in models},
        "train": {k: (lambda k=k: train_step(fns[k], opts[k], (x, t, c, m), target)) for k in models},
    }
    rows = []
    for kind, pair in steps.items():
        for k in models:  # warm-up
            models[k].train(kind == "train")
            pair[k]()
            pair[k]()
        times = {"ours": [], "theirs": []}
        for r in range(reps):
            for k in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                models[k].train(kind == "train")
                times[k].append(time_it(pair[k]))
        med = {k: statistics.median(v) for k, v in times.items()}
        # a repetition times both back to back, so its ratio cancels slow drifts in machine load
        ratios = sorted(a / b for a, b in zip(times["ours"], times["theirs"], strict=True))
        ratio = statistics.median(ratios)
        rows.append((name + (" masked" if use_mask else ""), batch, kind, med["ours"] * 1e3, med["theirs"] * 1e3,
                     ratio, ratios[0], ratios[-1]))
        print(f"  {kind}: ours {med['ours'] * 1e3:.1f} ms, diffusers {med['theirs'] * 1e3:.1f} ms, "
              f"ratio {ratio:.3f} (per-rep {ratios[0]:.2f}..{ratios[-1]:.2f})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="run only configs whose name contains this")
    p.add_argument("--mask", action="store_true", help="also run with a context key-padding mask")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # one step per model per repetition: a pair of steps is timed within a few seconds, so that the shared
    # machine's load drifts cancel in its ratio better than over longer blocks
    reps = 7 if args.quick else 25
    rows = []
    for name, latent, batch, ctx_len in CONFIGS:
        if args.only and args.only not in name:
            continue
        for use_mask in (False, True) if args.mask else (False,):
            rows += compare(name, latent, batch, ctx_len, reps, use_mask)
    print(f"\nfp32, CPU, {args.threads} threads, torch {torch.__version__}; medians of {reps} alternating "
          f"repetitions of one step; ratio = median of per-repetition ratios (min–max)\n")
    print("| latent | batch | step | ours (ms) | diffusers (ms) | ours / diffusers |")
    print("|---|---|---|---|---|---|")
    for name, batch, kind, ours, theirs, ratio, lo, hi in rows:
        print(f"| {name} | {batch} | {kind} | {ours:.1f} | {theirs:.1f} | **{ratio:.2f}** ({lo:.2f}–{hi:.2f}) |")


if __name__ == "__main__":
    main()
