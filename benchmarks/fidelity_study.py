"""Where the demo's sample fidelity is lost: train the demo recipe and one-change variants of it, score each with
the domain FID and prompt adherence over a guidance sweep, and tabulate them beside the real-vs-real baseline and
each autoencoder's floor.

    python benchmarks/fidelity_study.py --out outputs/fidelity                   # every variant: hours on 2 cores
    python benchmarks/fidelity_study.py --out outputs/fidelity --only demo,old_recipe   # a subset
    python benchmarks/fidelity_study.py --smoke --data-root <tiny IDX dir> --out /tmp/fid_smoke   # the tests

Every run is a plain command (printed; a run whose checkpoint exists is reused): autoencoders
`train.py experiment=fmnist_autoencoder ...`, diffusion models `train.py experiment=fmnist_ldm ...` with one change
against the demo recipe each (`VARIANTS`), scored by `eval.py` (--n samples per class prompt, DPM-Solver++ 2M,
--steps, each --guidance) against the test split. A variant may also score a checkpoint of another run (an
intermediate one: training length) or with other eval settings (the raw weights: EMA off; other samplers).
Writes study.csv (one row per variant × guidance), study.md (the table: per variant the best FID with adherence
≥ --min-adherence, and the FID / adherence at each guidance), floors.csv (real-vs-real, autoencoder floors) and
fid_vs_adherence.png (the guidance trade-off curves of PLOTTED), and real_grid.png (test images in the demo grid's
layout).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from ldm_f_tradeoff import run, smoke_overrides  # noqa: E402  (the LDM-f benchmark's runner and smoke keys)

# Autoencoders: name → (experiment, overrides).
AUTOENCODERS = {
    "f4_1500": ("fmnist_autoencoder", ["trainer.max_steps=1500"]),
    "f4_3000": ("fmnist_autoencoder", ["trainer.max_steps=3000"]),
    "f4c8_1500": ("fmnist_autoencoder", ["trainer.max_steps=1500", "model.embed_dim=8", "model.ddconfig.z_channels=8"]),
    "f2_1500": ("fmnist_autoencoder_f2", []),
}
# Overrides of experiment=fmnist_ldm (the demo recipe) that give back the recipe before this study: the f=4 U-Net,
# ε-prediction, uniform loss weight, constant learning rate.
OLD = ["model/unet=fmnist", "model.prediction_type=eps", "model.min_snr_gamma=null", "model.lr_schedule=constant"]
V_MIN_SNR = ["model.prediction_type=v", "model.min_snr_gamma=5"]
F4_V = ["model/unet=fmnist", *V_MIN_SNR, "model.lr_schedule=constant"]
F2_UNET = ["model/unet=fmnist_f2", "model.unet.out_channels=2"]
HALF = "step0001300.ckpt"
# The study's training length for every experiment=fmnist_ldm variant (the demo recipe trained 2600 steps then; it
# trains 2100 since autoguidance, docs/fidelity.md): a variant's own overrides still win.
STUDY_LENGTH = ["trainer.max_steps=2600", "trainer.val_check_interval=2600", "model.sample_every_n_steps=2600",
                "callbacks.model_checkpoint.every_n_train_steps=1300"]


@dataclass
class Variant:
    """One row group of the table: a training run (autoencoder + overrides), or another scoring of one."""
    what: str
    autoencoder: str = "f2_1500"
    overrides: list[str] = field(default_factory=list)
    score_of: str | None = None          # score another variant's run instead of training
    checkpoint: str = "last.ckpt"        # which checkpoint of the run
    eval_overrides: list[str] = field(default_factory=list)
    experiment: str = "fmnist_ldm"


VARIANTS = {
    "old_recipe": Variant("before the study: f=4, ε, uniform weight, constant LR", "f4_1500", OLD),
    "old_recipe_1300": Variant("… its checkpoint at half the steps (training length)", score_of="old_recipe",
                               checkpoint=HALF),
    "old_recipe_raw": Variant("… its raw weights (EMA off)", score_of="old_recipe", eval_overrides=["use_ema=false"]),
    "c8": Variant("… on an 8-channel f=4 autoencoder", "f4c8_1500",
                  [*OLD, "model.unet.in_channels=8", "model.unet.out_channels=8"]),
    "pooled_cosine": Variant("… + pooled caption embedding + cosine LR", "f4_1500",
                             [*OLD, "model.unet.pooled_context=true", "model.lr_schedule=cosine"]),
    "min_snr": Variant("… + Min-SNR-γ = 5", "f4_1500", [*OLD, "model.min_snr_gamma=5"]),
    "v_min_snr": Variant("f=4, v-prediction + Min-SNR-γ = 5", "f4_1500", F4_V),
    "v_min_snr_ae3000": Variant("… on a 3000-step autoencoder", "f4_3000", F4_V),
    "v_min_snr_lr2e-3": Variant("… learning rate 2e-3", "f4_3000", [*F4_V, "model.lr=2e-3"]),
    "v_min_snr_b128": Variant("… batch 128, half the steps", "f4_3000",
                              [*F4_V, "data.batch_size=128", "trainer.max_steps=1300",
                               "callbacks.model_checkpoint.every_n_train_steps=650"]),
    "v_min_snr_pooled_cosine": Variant("… + pooled caption embedding + cosine LR", "f4_3000",
                                       [*F4_V, "model.unet.pooled_context=true", "model.lr_schedule=cosine"]),
    "f2_pooled_cosine": Variant("f=2 (16×16×2), 2.0 M U-Net, ε, uniform weight, pooled, cosine", "f2_1500",
                                [*OLD, *F2_UNET, "model.unet.pooled_context=true", "model.lr_schedule=cosine"]),
    "f2_min_snr": Variant("f=2, ε + Min-SNR-γ = 5", "f2_1500", [*OLD, *F2_UNET, "model.min_snr_gamma=5"]),
    "f2_min_snr_1300": Variant("… its checkpoint at half the steps", score_of="f2_min_snr", checkpoint=HALF),
    "f2_v_min_snr": Variant("f=2, v + Min-SNR-γ = 5", "f2_1500", [*F2_UNET, "model.lr_schedule=constant"]),
    "f2_v_min_snr_1500": Variant("… 1500 steps, cosine LR (the demo's time)", "f2_1500",
                                 [*F2_UNET, "trainer.max_steps=1500"]),
    "f2_small": Variant("f=2, 1.5 M U-Net (fmnist_f2_small), v + Min-SNR-γ = 5, constant LR", "f2_1500",
                        ["model.lr_schedule=constant"]),
    "f2_small_3000": Variant("… cosine LR, 3000 steps", "f2_1500", ["trainer.max_steps=3000"]),
    "f2_small_3000_raw": Variant("… its raw weights (EMA off)", score_of="f2_small_3000",
                                 eval_overrides=["use_ema=false"]),
    "demo": Variant("the demo recipe at 2600 steps, before autoguidance (`make demo`'s run, 2 threads)", "f2_1500"),
    "long": Variant("the longer recipe: experiment=fmnist_ldm_long as shipped", "f2_1500",
                    experiment="fmnist_ldm_long"),
}
# The trade-off curves drawn in fid_vs_adherence.png (those present): before, the steps of the study, after.
PLOTTED = ["old_recipe", "v_min_snr", "f2_v_min_snr", "demo", "long"]
SMOKE = ["old_recipe", "old_recipe_1300", "demo"]  # --smoke's default: a run, another scoring of it, the demo
COLUMNS = ["variant", "what", "autoencoder", "guidance", "fid", "kid", "adherence", "train_s", "steps"]


def with_later(args: list[str], later: list[str]) -> list[str]:
    """args with later overrides (--smoke's, a variant's): a key both set is taken from the later ones (Hydra
    refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in later}
    return [o for o in args if o.split("=", 1)[0] not in keys] + later


def train_autoencoder(name: str, a, out: Path) -> Path:
    run_dir = out / f"ae_{name}"
    if (run_dir / "export" / "config.json").is_file():
        return run_dir / "export"
    experiment, overrides = AUTOENCODERS[name]
    args = [sys.executable, "train.py", f"experiment={experiment}", f"hydra.run.dir={run_dir}",
            f"data.train.root={a.data_root}", "trainer.enable_progress_bar=false", *overrides]
    if a.smoke:
        args = with_later(args, [*smoke_overrides(), "trainer.max_steps=2", "trainer.val_check_interval=2",
                                 "callbacks.model_checkpoint.every_n_train_steps=2", "model.scale_factor_batches=2"])
    run(args, out / f"ae_{name}.log")
    return run_dir / "export"


def train_variant(name: str, v: Variant, a, out: Path, first_stage: Path) -> float:
    """Train (or reuse) a variant's run; its wall time in seconds."""
    run_dir = out / name
    timing = run_dir / "train_s.txt"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return float(timing.read_text()) if timing.is_file() else float("nan")
    args = [sys.executable, "train.py", f"experiment={v.experiment}", f"hydra.run.dir={run_dir}", "callbacks=default",
            f"model.first_stage={first_stage}", f"data.train.root={a.data_root}", "trainer.enable_progress_bar=false",
            *(STUDY_LENGTH if v.experiment == "fmnist_ldm" else [])]
    args = with_later(args, list(v.overrides))
    if a.smoke:
        args = with_later(args, [*smoke_overrides(), "trainer.max_steps=2",
                                 "trainer.val_check_interval=1", "callbacks.model_checkpoint.every_n_train_steps=1",
                                 "model.sample_every_n_steps=0"])
    seconds = round(run(args, out / f"{name}.log"), 1)
    timing.write_text(f"{seconds}\n")
    return seconds


def eval_args(a, out_dir: Path) -> list[str]:
    args = [sys.executable, "eval.py", f"n={a.n}", "samplers=[dpmpp_2m]", f"steps=[{a.steps}]",
            f"guidance=[{a.guidance}]", f"out={out_dir}", f"real.root={a.data_root}",
            f"metrics.classifier={a.classifier}"]
    if a.smoke:
        args += ["batch_size=20", "metrics.kid_subset_size=10", "baseline_n=20", "metrics.inception_score=false"]
    return args


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def floors(a, out: Path, exports: dict[str, Path]) -> list[dict]:
    """The real-vs-real baseline and each autoencoder's reconstruction FID (eval.py autoencoder=<export>)."""
    rows = []
    for name, export in exports.items():
        dest = out / f"floor_{name}"
        if not (dest / "eval.csv").is_file():
            run([*eval_args(a, dest), "baseline_only=true", f"autoencoder={export}"], out / f"floor_{name}.log")
        real, rec = read_rows(dest / "eval.csv")
        if not rows:
            rows.append({"what": "real (training images)", "fid": real["fid"], "adherence": real["adherence"]})
        rows.append({"what": f"autoencoder {name} reconstructions", "fid": rec["fid"], "adherence": rec["adherence"],
                     "psnr_db": rec["psnr_db"]})
    return rows


def score(name: str, v: Variant, a, out: Path) -> list[dict]:
    dest = out / f"eval_{name}"
    if not (dest / "eval.csv").is_file():
        ckpt = out / (v.score_of or name) / "checkpoints" / ("last.ckpt" if a.smoke else v.checkpoint)
        run([*eval_args(a, dest), f"ckpt={ckpt}", "baseline=false", *v.eval_overrides], out / f"eval_{name}.log")
    return [r for r in read_rows(dest / "eval.csv") if int(r["steps"]) > 0]


def best(rows: list[dict], min_adherence: float) -> dict | None:
    ok = [r for r in rows if float(r["adherence"]) >= min_adherence]
    return min(ok, key=lambda r: float(r["fid"])) if ok else None


def markdown(table: dict[str, list[dict]], base: list[dict], a, seconds: dict[str, float]) -> str:
    guidance = sorted({float(r["guidance"]) for rows in table.values() for r in rows})  # every scale scored
    head = ["variant", "what", "train s", f"best FID (adherence ≥ {a.min_adherence:.0%})",
            *(f"g={g:g}" for g in guidance)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in table.items():
        b = best(rows, a.min_adherence)
        cells = {float(r["guidance"]): f"{float(r['fid']):.2f} / {float(r['adherence']):.1%}" for r in rows}
        run_s = seconds.get(VARIANTS[name].score_of or name)
        lines.append("| " + " | ".join([
            name, VARIANTS[name].what, f"{run_s:.0f}" if run_s and not math.isnan(run_s) else "–",
            f"**{float(b['fid']):.2f}** (g={float(b['guidance']):g})" if b else "–",
            *[cells.get(g, "") for g in guidance]]) + " |")
    lines += ["", "| reference | FID | adherence | PSNR (dB) |", "|---|---|---|---|"]
    for r in base:
        psnr = f"{float(r['psnr_db']):.1f}" if r.get("psnr_db") else "–"
        lines.append(f"| {r['what']} | {float(r['fid']):.3f} | {float(r['adherence']):.1%} | {psnr} |")
    return "\n".join(lines) + "\n"


def real_grid(a, path: Path, per_class: int = 8) -> Path:
    """The first `per_class` test images of each class, one row per class: the demo grid's layout, for looking at
    samples beside real images."""
    import torch

    from ldm.data.fashion_mnist import FashionMNIST
    from ldm.images import save_grid

    test = FashionMNIST(a.data_root, split="test")
    rows: dict[int, list] = {c: [] for c in range(10)}
    for i in range(len(test)):
        item = test[i]
        if len(rows[item["label"]]) < per_class:
            rows[item["label"]].append(item["image"])
        if all(len(r) == per_class for r in rows.values()):
            break
    return save_grid(torch.stack([im for c in range(10) for im in rows[c]]), path, nrow=per_class)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/fidelity")
    p.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    p.add_argument("--n", type=int, default=100, help="samples per class prompt (10 prompts)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ 2M steps")
    p.add_argument("--guidance", default="1.5,2,3,4.5,6", help="comma-separated guidance scales")
    p.add_argument("--min-adherence", type=float, default=0.9)
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--classifier", default=str(ROOT / "outputs" / "classifier" / "fmnist_classifier.safetensors"))
    p.add_argument("--smoke", action="store_true", help="tiny runs and sample counts: checks that every stage runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.steps = 2, 2
    names = a.only.split(",") if a.only else (SMOKE if a.smoke else list(VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.smoke:  # an untrained judge: the smoke run checks the stages, not the figures
        from ldm.metrics.classifier import SmallCNN, save_classifier

        a.classifier = str(save_classifier(SmallCNN(), out / "smoke_classifier.safetensors"))
    runs = {n for n in names if VARIANTS[n].score_of is None} | {VARIANTS[n].score_of for n in names} - {None}
    trained = [n for n in VARIANTS if n in runs]  # in VARIANTS order: the autoencoders' and floors' order
    exports = {ae: train_autoencoder(ae, a, out) for ae in dict.fromkeys(VARIANTS[n].autoencoder for n in trained)}
    seconds = {n: train_variant(n, VARIANTS[n], a, out, exports[VARIANTS[n].autoencoder])
               for n in VARIANTS if n in trained}
    table, rows = {}, []
    for name in names:
        v = VARIANTS[name]
        table[name] = score(name, v, a, out)
        for r in table[name]:
            rows.append({"variant": name, "what": v.what, "autoencoder": VARIANTS[v.score_of or name].autoencoder,
                         "guidance": r["guidance"], "fid": r["fid"], "kid": r["kid"], "adherence": r["adherence"],
                         "train_s": seconds.get(v.score_of or name)})
    base = floors(a, out, exports)
    with (out / "study.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with (out / "floors.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["what", "fid", "adherence", "psnr_db"])
        w.writeheader()
        w.writerows(base)
    curves = [{"sampler": r["variant"], "steps": a.steps, "guidance": r["guidance"], "fid": r["fid"],
               "adherence": r["adherence"]} for r in rows if r["variant"] in PLOTTED or a.smoke]
    if curves:
        from ldm.metrics.plot import plot_fid_vs_adherence

        real = {"sampler": base[0]["what"], "steps": 0, "guidance": 0, "fid": base[0]["fid"],
                "adherence": base[0]["adherence"]}
        plot_fid_vs_adherence([real, *curves], out / "fid_vs_adherence.png",
                              title=f"domain FID vs prompt adherence over guidance ({a.n * 10} samples each)")
    if not a.smoke:  # the tiny smoke data set lacks classes
        real_grid(a, out / "real_grid.png")
    text = markdown(table, base, a, seconds)
    (out / "study.md").write_text(text)
    print(text)
    summary = {"rows": rows, "floors": base, "settings": vars(a)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out / 'study.md'}, study.csv, floors.csv and summary.json")
    return summary


if __name__ == "__main__":
    main()
