"""Sampling throughput per sampler at equal quality: the steps DDIM and DPM-Solver++ 2M need to reach the same FID.

    python benchmarks/sampler_steps.py --ckpt /tmp/ldm/checkpoints/last.ckpt --per-prompt 100 \
        --steps 5 10 15 20 30 50 --out outputs/bench/sampler_steps
    python benchmarks/sampler_steps.py --smoke     # a tiny random model, one step count (the tests run this)

Every (sampler, steps) cell samples the same class prompts with the same seed and is scored with the domain
FID (Fashion-MNIST classifier features) against the test split. The target is the best FID any cell reached
times (1 + --tolerance); for each sampler we report the fewest steps whose FID is within the target, the images/s
at those steps and the speed-up over the slowest sampler. Writes steps.csv, fid_vs_steps.png and summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.metrics import evaluate as ev  # noqa: E402
from ldm.metrics.classifier import DEFAULT_PATH, SmallCNN, load_or_train_classifier  # noqa: E402
from ldm.metrics.plot import plot_metric_vs_steps  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402


def tiny_export(root: Path) -> Path:
    """A tiny random text-conditioned model (16 px), exported: the smoke mode's checkpoint."""
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained

    dd = dict(in_channels=1, out_ch=1, resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
              mid_attn=False, dropout=0.0, z_channels=4, double_z=True, norm_groups=4)
    unet = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1], num_res_blocks=1,
                attention_resolutions=[1], num_head_channels=8, context_dim=384, norm_num_groups=8)
    save_pretrained(AutoencoderKLNet(dd, 4), root / "ae", scale_factor=0.5)
    model = LatentDiffusion(unet=unet, first_stage=str(root / "ae"), text_encoder={"max_length": 16},
                            schedule={"name": "linear", "num_timesteps": 100}, ema_decay=None)
    model.latent_size.fill_(8)
    return model.export(root / "export")


def steps_to_target(rows: list[dict], tolerance: float) -> dict:
    """Per sampler: the fewest steps whose FID ≤ (best FID of all cells) · (1 + tolerance), or None."""
    target = min(r["fid"] for r in rows) * (1 + tolerance)
    out = {}
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        ok = sorted((r for r in rows if r["sampler"] == sampler and r["fid"] <= target), key=lambda r: r["steps"])
        out[sampler] = ({"steps": ok[0]["steps"], "fid": ok[0]["fid"], "images_per_s": ok[0]["images_per_s"]}
                        if ok else None)
    return {"target_fid": target, "samplers": out}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m"])
    p.add_argument("--steps", nargs="+", type=int, default=[5, 10, 15, 20, 30, 50])
    p.add_argument("--per-prompt", type=int, default=100)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--tolerance", type=float, default=0.1, help="relative FID slack over the best cell")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--real-n", type=int, default=None, help="test images in the reference (default: all)")
    p.add_argument("--classifier", default=DEFAULT_PATH)
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--smoke", action="store_true", help="tiny random model and classifier, 2 images per prompt")
    p.add_argument("--from-csv", default=None, help="summarise an eval.py table (its eval.csv) instead of sampling")
    p.add_argument("--out", default="outputs/bench/sampler_steps")
    args = p.parse_args(argv)
    if args.from_csv:
        return summarise(from_csv(args.from_csv), args, Path(args.out))
    tmp = tempfile.TemporaryDirectory() if args.smoke else None
    if args.smoke:
        args.ckpt = str(tiny_export(Path(tmp.name)))
        args.steps, args.per_prompt, args.real_n = [1, 2], 2, 40
    if not args.ckpt:
        p.error("--ckpt is required (or --smoke)")
    pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt, device="cpu")
    size = pipe.image_size[0]
    clf = (SmallCNN(width=4, image_size=size).eval() if args.smoke
           else load_or_train_classifier(args.classifier, size, args.data_root))
    quality = ev.make_quality(clf, kid_subset_size=min(1000, 10 * args.per_prompt), inception_score=False)
    real, _ = ev.real_images("test", args.real_n, size, args.data_root)
    quality.add_real(real)
    prompts, labels = ev.class_prompts()
    rows = ev.sample_grid(ev.pipeline_generator(pipe, args.batch_size), quality, clf, prompts, labels,
                          args.per_prompt, args.samplers, args.steps, [args.guidance], seed=args.seed,
                          on_row=lambda r: print(ev.format_table([r]).splitlines()[1], flush=True))
    return summarise(rows, args, Path(args.out), tmp)


def from_csv(path: str) -> list[dict]:
    """The sampled rows of an eval.py / sampler_steps.py table, numbers parsed."""
    def number(key: str, value: str):
        if key == "sampler" or value == "":
            return value or None
        return int(value) if key in ("steps", "n") else float(value)

    rows = [{k: number(k, v) for k, v in r.items()} for r in ev.read_csv(path)]
    rows = [r for r in rows if r.get("fid") is not None and (r.get("steps") or 0) > 0]
    if not rows:
        raise ValueError(f"{path}: no sampled rows with an FID")
    return rows


def summarise(rows: list[dict], args, out: Path, tmp=None) -> dict:
    if len({r["guidance"] for r in rows}) > 1:
        raise ValueError("rows at several guidance scales: compare samplers at one")
    summary = steps_to_target(rows, args.tolerance)
    reached = {s: v for s, v in summary["samplers"].items() if v}
    if reached:
        slowest = min(v["images_per_s"] for v in reached.values())
        for v in reached.values():
            v["speedup"] = round(v["images_per_s"] / slowest, 2)
    ev.write_csv(rows, out / "steps.csv")
    guidance = rows[0]["guidance"]
    plot_metric_vs_steps(rows, out / "fid_vs_steps.png", "fid", title=f"FID vs steps, guidance {guidance:g}")
    summary.update(rows=rows, samples_per_cell=int(rows[0]["n"]), guidance=guidance, ckpt=str(args.ckpt),
                   smoke=args.smoke, tolerance=args.tolerance)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(ev.format_table(rows))
    print(f"target FID (best cell + {args.tolerance:.0%}): {summary['target_fid']:.3f}")
    for sampler, v in summary["samplers"].items():
        print(f"  {sampler:<10} " + (f"{v['steps']:3d} steps, FID {v['fid']:.3f}, {v['images_per_s']:.1f} images/s"
                                     f" ({v.get('speedup', 1):.2f}×)" if v else "does not reach it in the grid"))
    if tmp is not None:
        tmp.cleanup()
    return summary


if __name__ == "__main__":
    main()
