"""The LDM paper's downsampling-factor trade-off on Fashion-MNIST: quality against training and sampling speed for
latent models at f = 1 (pixel space), 2, 4 and 8 trained on the same budget.

    python benchmarks/ldm_f_tradeoff.py --out outputs/ldm_f                 # ≈1 hour on 2 CPU cores
    python benchmarks/ldm_f_tradeoff.py --smoke --out /tmp/ldm_f_smoke      # tiny (the tests run this)

For each f it runs, with plain `train.py` commands (printed; a run whose checkpoint exists is reused):
  - f > 1: the autoencoder `experiment=fmnist_autoencoder model/autoencoder@model=fmnist_f{f}` (--ae-steps);
  - the diffusion model `experiment=fmnist_pixel_ddpm` (f = 1) or the same experiment on that autoencoder with
    `model/unet=fmnist_f{f}`, cached latents and the LDM's scaled-linear schedule (--latent-schedule): one U-Net
    width (32), objective (ε, learned_range, hybrid loss), batch (64) and number of steps (--ldm-steps) for every
    f. The schedule is each space's standard: DDPM's linear one for pixels, the LDM's for unit-variance latents —
    with DDPM's linear schedule the latent models learn far more slowly (docs/metrics.md has the comparison).
Then it scores each model with the domain FID / KID and prompt adherence (--n samples per class prompt, DDIM,
--steps, --guidance; the Fashion-MNIST classifier's features against the test split), scores its autoencoder's
reconstructions of --psnr-n training images the same way (PSNR and `ae_rec_fid`: the floor for that f), and times
  - training throughput: images/s of the U-Net training step (forward, backward, AdamW) on cached latents, the
    steady state of each run (the one-off latent cache is timed apart: `cache_s`);
  - sampling: images/s of the whole sampler (all steps, both guidance branches, the decoder).
Writes tradeoff.csv, summary.json and fid_vs_train_throughput.png / fid_vs_sampling_speed.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLUMNS = ["f", "latent", "unet_params_m", "fid", "kid", "adherence", "train_images_per_s", "sampling_images_per_s",
           "train_wall_s", "ae_psnr_db", "ae_rec_fid"]


def run(args: list[str], log_file: Path) -> float:
    """Run a command (printed) with its output in log_file; its wall time, or an error naming the log."""
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.time()
    with log_file.open("w") as f:
        rc = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"command failed (exit {rc}); see {log_file}")
    return time.time() - t0


def smoke_overrides() -> list[str]:
    """Small batches and validation for --smoke (with --data-root at a tiny data set): every stage runs, quickly."""
    return ["data.train.val_size=32", "data.batch_size=8", "trainer.limit_val_batches=1", "callbacks=default",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def train_autoencoder(f: int, a, out: Path) -> Path:
    run_dir = out / f"ae_f{f}"
    export = run_dir / "export"
    if (export / "config.json").is_file():
        print(f"f={f}: reusing the autoencoder {export}", flush=True)
        return export
    args = [sys.executable, "train.py", "experiment=fmnist_autoencoder", f"model/autoencoder@model=fmnist_f{f}",
            f"trainer.max_steps={a.ae_steps}", f"trainer.val_check_interval={min(500, a.ae_steps)}",
            f"callbacks.model_checkpoint.every_n_train_steps={a.ae_steps}", f"hydra.run.dir={run_dir}",
            f"data.train.root={a.data_root}", *a.extra]
    if a.smoke:
        args += smoke_overrides() + ["model.scale_factor_batches=2"]
    run(args, out / f"ae_f{f}.log")
    return export


def train_ldm(f: int, a, out: Path, first_stage: Path | None) -> tuple[Path, float]:
    run_dir = out / f"ldm_f{f}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    timing = run_dir / "train_wall_s.txt"
    if ckpt.is_file():
        print(f"f={f}: reusing the diffusion model {ckpt}", flush=True)
        return ckpt, float(timing.read_text()) if timing.is_file() else float("nan")
    args = [sys.executable, "train.py", "experiment=fmnist_pixel_ddpm", f"trainer.max_steps={a.ldm_steps}",
            f"trainer.val_check_interval={min(500, a.ldm_steps)}", f"model.sample_every_n_steps={a.ldm_steps}",
            f"callbacks.model_checkpoint.every_n_train_steps={a.ldm_steps}", "callbacks=default",
            f"hydra.run.dir={run_dir}", f"data.train.root={a.data_root}", *a.extra]
    if f > 1:
        args += [f"model.first_stage={first_stage}", f"model/unet=fmnist_f{f}", "model.latent_cache=true",
                 f"model/schedule={a.latent_schedule}"]
    if a.smoke:
        args += smoke_overrides() + ["model.val_steps=2", "model.val_images_per_prompt=1"]
    seconds = run(args, out / f"ldm_f{f}.log")
    timing.write_text(f"{seconds:.1f}\n")
    return ckpt, seconds


def autoencoder_ceiling(first_stage: Path | None, a, quality, clf) -> dict:
    """What the first stage alone allows (evaluate.reconstruction_row on --psnr-n training images): PSNR and the
    domain FID of its reconstructions, the floor no latent model on it can beat."""
    if first_stage is None:
        return {"ae_psnr_db": None, "ae_rec_fid": None}
    from ldm.metrics import evaluate as ev
    from ldm.nn.autoencoder import load_pretrained

    net, _ = load_pretrained(first_stage)
    x, labels = ev.real_images("train", a.psnr_n, 32, a.data_root, seed=a.seed)  # not the FID reference split
    row = ev.reconstruction_row(net, quality, x, labels, clf, seed=a.seed)
    return {"ae_psnr_db": row["psnr_db"], "ae_rec_fid": row["fid"]}


def train_throughput(model, batch: int, steps: int, reps: int) -> float:
    """Median images/s of LatentDiffusion training steps on a batch of cached latents (fixed captions)."""
    import torch

    from ldm.models.optim import adamw

    z_shape = (model.latent_channels, *[int(v) for v in model.latent_size.tolist()])
    g = torch.Generator().manual_seed(0)
    post = torch.stack([torch.randn(batch, *z_shape, generator=g), torch.full((batch, *z_shape), 0.1)], dim=1)
    captions = [f"a photo of a {c}" for c in ("shirt", "bag", "sandal", "coat")] * (batch // 4 + 1)
    data = {"image": post, "caption": captions[:batch]}
    model.train()
    model.unet.requires_grad_(True)
    opt = adamw(model.unet.parameters(), lr=1e-4)
    model.text_encoder.encode(list(dict.fromkeys(data["caption"])) + [""])  # the cache the training run builds

    def step():
        loss, _ = model._loss(model.unet, data, model.hparams.cond_drop_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t0))
    model.eval()
    return statistics.median(rates)


def evaluate(f: int, ckpt: Path, first_stage: Path | None, a, clf, quality) -> dict:
    from ldm.metrics import evaluate as ev
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt, device="cpu")
    model = pipe.model
    prompts, labels = ev.class_prompts()
    rows = ev.sample_grid(ev.pipeline_generator(pipe, a.batch_size), quality, clf, prompts, labels, a.n,
                          ["ddim"], [a.steps], [a.guidance], seed=a.seed)
    h, w = (int(v) for v in model.latent_size.tolist())
    return {"f": f, "latent": f"{h}×{w}×{model.latent_channels}",
            "unet_params_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 3),
            "fid": rows[0]["fid"], "kid": rows[0]["kid"], "adherence": rows[0]["adherence"],
            "sampling_images_per_s": rows[0]["images_per_s"],
            "train_images_per_s": round(train_throughput(model, a.train_batch, a.time_steps, a.reps), 2),
            **autoencoder_ceiling(first_stage, a, quality, clf)}


def plots(rows: list[dict], out: Path) -> list[Path]:
    from ldm.metrics.plot import line_plot

    paths = []
    for key, label, name in (("train_images_per_s", "training throughput (images/s, log)", "fid_vs_train_throughput"),
                             ("sampling_images_per_s", "sampling throughput (images/s, log)",
                              "fid_vs_sampling_speed")):
        pts = [(float(r[key]), float(r["fid"]), f"f={r['f']}") for r in rows]
        paths.append(line_plot({"LDM-f, same budget": pts}, out / f"{name}.png", x_label=label, log_x=True,
                               title="domain FID (lower is better) vs " + label.split(" (")[0]))
    return paths


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/ldm_f")
    p.add_argument("--factors", default=None, help="comma-separated f (default 1,2,4,8; --smoke: 1,8)")
    p.add_argument("--ae-steps", type=int, default=2000, help="autoencoder steps (each f > 1)")
    p.add_argument("--ldm-steps", type=int, default=1000, help="diffusion training steps (each f)")
    p.add_argument("--latent-schedule", default="scaled_linear",
                   help="noise schedule of the f > 1 models (f = 1 keeps fmnist_pixel_ddpm's DDPM linear)")
    p.add_argument("--n", type=int, default=100, help="samples per class prompt (10 prompts)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch")
    p.add_argument("--train-batch", type=int, default=64, help="batch of the throughput measurement")
    p.add_argument("--time-steps", type=int, default=5, help="timed training steps per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--psnr-n", type=int, default=1000,
                   help="training images reconstructed for the autoencoder's PSNR and reconstruction FID")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--classifier", default=str(ROOT / "outputs" / "classifier" / "fmnist_classifier.safetensors"))
    p.add_argument("--real-n", type=int, default=None, help="test images in the FID reference (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny runs and sample counts: checks that every stage runs")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every train.py run (e.g. trainer=gpu)")
    a = p.parse_args(argv)
    if a.smoke:
        a.ae_steps, a.ldm_steps, a.n, a.steps, a.train_batch, a.time_steps, a.reps = 2, 2, 2, 2, 4, 1, 1
        a.psnr_n, a.real_n, a.batch_size = 8, a.real_n or 64, 20
    a.factors = a.factors or ("1,8" if a.smoke else "1,2,4,8")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from ldm.metrics import evaluate as ev
    from ldm.metrics.classifier import SmallCNN, load_or_train_classifier

    torch.manual_seed(0)
    clf = SmallCNN().eval() if a.smoke else load_or_train_classifier(a.classifier, 32, a.data_root)
    quality = ev.make_quality(clf, kid_subset_size=min(1000, 10 * a.n), inception_score=False)
    real, _ = ev.real_images("test", a.real_n, 32, a.data_root)
    quality.add_real(real)
    rows = []
    for f in (int(v) for v in a.factors.split(",")):
        first_stage = train_autoencoder(f, a, out) if f > 1 else None
        ckpt, wall = train_ldm(f, a, out, first_stage)
        row = {**evaluate(f, ckpt, first_stage, a, clf, quality), "train_wall_s": round(wall, 1)}
        rows.append(row)
        print("  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in COLUMNS
                        if row.get(k) is not None), flush=True)
    table = ev.format_table(rows, COLUMNS)
    print(table)
    (out / "tradeoff.txt").write_text(table + "\n")
    ev.write_csv(rows, out / "tradeoff.csv", COLUMNS)
    paths = plots(rows, out)
    summary = {"rows": rows, "settings": {k: v for k, v in vars(a).items()}, "plots": [str(q) for q in paths]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'tradeoff.csv'}, {out / 'summary.json'} and the plots in {out}")
    return summary


if __name__ == "__main__":
    main()
