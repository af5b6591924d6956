"""Score a LatentDiffusion checkpoint: compose config → load pipeline and judge → sample the grid → table + plots.

    python eval.py ckpt=<path> n=100 samplers=[ddim,dpmpp_2m] steps=[10,20,50] guidance=[6] out=<dir>
    python eval.py baseline_only=true out=<dir>      # real-vs-real baseline only
    python eval.py ckpt=<path> guidance=[1,1.5,2,3,4.5,6,9] samplers=[dpmpp_2m] steps=[20] autoencoder=ckpt
        # the guidance trade-off (fid_vs_adherence.png) and the floor of the checkpoint's own autoencoder
    python eval.py ckpt=<run>/checkpoints/last.ckpt guide=<run>/checkpoints/step0001050.ckpt guide_scale=1 ...
        # autoguidance by an earlier checkpoint of the run (docs/fidelity.md)

The feature space is the Fashion-MNIST classifier's (metrics.features=classifier, offline) or Inception's from
local weights (metrics.features=inception metrics.inception_weights=<file>). See docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm import runtime

log = logging.getLogger("eval")
runtime.register_resolvers()


def check(cfg: DictConfig) -> None:
    if not cfg.baseline_only and not cfg.ckpt:
        raise ValueError("give ckpt=<run>/checkpoints/last.ckpt (or baseline_only=true)")
    if cfg.guide and not cfg.ckpt:
        raise ValueError("guide= (autoguidance) needs the checkpoint it guides: ckpt=<run>/checkpoints/last.ckpt")
    if cfg.guide and not Path(cfg.guide).exists():
        raise FileNotFoundError(f"guide={cfg.guide} does not exist: pass an earlier checkpoint of the same run")
    if cfg.autoencoder == "ckpt" and not cfg.ckpt:
        raise ValueError("autoencoder=ckpt scores the checkpoint's own first stage: give ckpt=<path> too, or "
                         "autoencoder=<exported autoencoder folder or .ckpt>")


def evaluate_checkpoint(cfg: DictConfig) -> list[dict]:
    """The whole evaluation for a composed config; returns the table's rows (also written under cfg.out)."""
    check(cfg)
    from ldm.metrics import evaluate as ev
    from ldm.metrics.classifier import load_classifier, load_or_train_classifier
    from ldm.metrics.plot import plot_fid_vs_adherence, plot_metric_vs_steps

    pipe = None
    if not cfg.baseline_only:
        from ldm.pipeline import LatentDiffusionPipeline

        pipe = LatentDiffusionPipeline.from_checkpoint(cfg.ckpt, device=cfg.device, trust=cfg.trust_checkpoint,
                                                       use_ema=cfg.use_ema)
        if cfg.guide:
            pipe.load_guide(cfg.guide, trust=cfg.trust_checkpoint)
    size = int(cfg.image_size or (pipe.image_size[0] if pipe else 32))
    m = cfg.metrics
    clf = (load_or_train_classifier(m.classifier, size, cfg.real.root) if m.train_classifier_if_missing
           else load_classifier(m.classifier))
    quality = ev.make_quality(clf, m.features, m.inception_weights, m.kid_subset_size, m.inception_score)
    real, _ = ev.real_images(cfg.real.split, cfg.real.n, size, cfg.real.root)
    quality.add_real(real)
    rows = []
    if cfg.baseline or cfg.baseline_only:
        base, base_labels = ev.real_images("train", cfg.baseline_n, size, cfg.real.root, seed=cfg.seed)
        rows.append(ev.real_baseline(quality, base, base_labels, clf))
        print(f"real baseline: {cfg.baseline_n} training images vs the {cfg.real.split} split "
              f"({len(real)}): FID {rows[0]['fid']:.3f}, KID {rows[0]['kid']:.4f}", flush=True)
    if cfg.autoencoder:
        from ldm.nn.autoencoder import load_pretrained

        net = (pipe.model.first_stage if cfg.autoencoder == "ckpt"
               else load_pretrained(cfg.autoencoder, trust=cfg.trust_checkpoint)[0])
        images, labels = ev.real_images("train", cfg.baseline_n, size, cfg.real.root, seed=cfg.seed)
        rows.append(ev.reconstruction_row(net, quality, images, labels, clf))
        print(f"autoencoder floor: its reconstructions of {cfg.baseline_n} training images: FID {rows[-1]['fid']:.3f}, "
              f"PSNR {rows[-1]['psnr_db']:.2f} dB", flush=True)
    if pipe is not None:
        from ldm.metrics.quality import clip_score

        prompts, labels = ev.class_prompts(cfg.prompt_template)
        clip = (lambda images, items: clip_score(images, items, m.clip_model)) if m.clip_model else None
        guide_scale = float(cfg.guide_scale) if cfg.guide else 0.0
        sampled = ev.sample_grid(ev.pipeline_generator(pipe, cfg.batch_size, guide_scale), quality, clf, prompts,
                                 labels, cfg.n, list(cfg.samplers), list(cfg.steps), list(cfg.guidance), seed=cfg.seed,
                                 clip=clip, on_row=lambda r: print(ev.format_table([r]).splitlines()[1], flush=True))
        rows += [{**r, "guide_scale": guide_scale or None} for r in sampled]
    out = Path(cfg.out)
    table = ev.format_table(rows)
    print(table)
    ev.write_csv(rows, out / "eval.csv")
    (out / "eval.txt").write_text(table + "\n")
    (out / "eval.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True), "rows": rows},
                                              indent=2))
    sampled = [r for r in rows if r["steps"] > 0]
    if sampled:
        for metric in ("fid", "kid", "adherence"):
            plot_metric_vs_steps(sampled, out / f"{metric}_vs_steps.png", metric,
                                 title=f"{metric} vs steps ({cfg.n} per prompt, {m.features} features)")
        if len(cfg.guidance) > 1 and m.classifier:
            plot_fid_vs_adherence(rows, out / "fid_vs_adherence.png",
                                  title=f"FID vs adherence over guidance ({cfg.n} per prompt, {m.features} features)")
    print(f"wrote {out / 'eval.csv'} and the plots in {out}")
    return rows


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    check(cfg)  # a missing ckpt fails before the heavy imports
    if cfg.tune_malloc:
        runtime.tune_malloc()
    evaluate_checkpoint(cfg)


if __name__ == "__main__":
    main()
