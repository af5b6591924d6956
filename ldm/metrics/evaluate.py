"""Score a text-to-image model on class prompts: FID/KID (and IS) against a real reference set and prompt
adherence, over a grid of samplers × steps × guidance scales; tables as CSV and text. Used by eval.py, the
validation callback and the sampler benchmark."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.metrics.classifier import dataset_tensors, prompt_adherence
from ldm.metrics.quality import SampleMetrics, build_extractors

COLUMNS = ["sampler", "steps", "guidance", "guide_scale", "n", "fid", "kid", "kid_std", "is", "adherence", "clip_score",
           "sampling_s", "images_per_s", "psnr_db"]


def class_prompts(template: str = "a photo of a {}", classes: Sequence[int] | None = None
                  ) -> tuple[list[str], list[int]]:
    """One caption per Fashion-MNIST class ("a photo of an ankle boot") and its label."""
    from ldm.data.fashion_mnist import CLASS_NAMES, caption_for

    labels = list(range(len(CLASS_NAMES))) if classes is None else [int(c) for c in classes]
    return [caption_for(c, template) for c in labels], labels


def real_images(split: str = "test", n: int | None = None, image_size: int = 32, root: str | None = None,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Up to `n` Fashion-MNIST images of a split (a seeded random subset) in [-1, 1], with labels; "train" is the
    whole training file (no validation hold-out: the reference is another split)."""
    from ldm.data.fashion_mnist import FashionMNIST

    kw = {"root": root} if root else {}
    if split == "train":
        kw["val_size"] = 0
    data = FashionMNIST(split=split, image_size=image_size, **kw)
    images, labels = dataset_tensors(data, image_size)
    if n is not None and n < len(images):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        images, labels = images[idx], labels[idx]
    return images, labels


def make_quality(classifier: nn.Module | None, features: str = "classifier", inception_weights: str | None = None,
                 kid_subset_size: int = 1000, inception_score: bool = True) -> SampleMetrics:
    feature, logits = build_extractors(features, classifier, inception_weights)
    return SampleMetrics(feature, logits if inception_score else None, kid_subset_size=kid_subset_size)


def score(quality: SampleMetrics, images: Tensor, labels: Tensor, classifier: nn.Module | None,
          seed: int = 0) -> dict:
    """FID/KID/IS of `images` (in [-1, 1]) against the quality object's real set, and prompt adherence."""
    quality.reset()
    quality.add_fake(images)
    out = quality.compute(seed=seed)
    out["n"] = len(images)
    if classifier is not None:
        out["adherence"] = prompt_adherence(classifier, images, labels)["accuracy"]
    return out


def real_baseline(quality: SampleMetrics, images: Tensor, labels: Tensor, classifier: nn.Module | None) -> dict:
    """The figures real images get against the reference set: the floor a generator is compared with."""
    row = score(quality, images, labels, classifier)
    return {"sampler": "real (train split)", "steps": 0, "guidance": 0.0, **row}


def reconstruction_row(autoencoder: nn.Module, quality: SampleMetrics, images: Tensor, labels: Tensor,
                       classifier: nn.Module | None, batch_size: int = 250, seed: int = 0) -> dict:
    """What a first stage alone allows: its reconstructions (posterior mode, decoded) of real `images` scored like
    samples (FID/KID against the quality object's reference, adherence to the images' labels) and their mean
    per-image PSNR. No latent model on this autoencoder can beat these figures. Give images from another split
    than the reference (as for the real-vs-real baseline): reconstructions of the reference itself score too low."""
    from ldm.editing_pipeline import psnr

    with torch.no_grad():
        rec = torch.cat([autoencoder.decode(autoencoder.encode(b).mode()).clamp(-1, 1)
                         for b in images.split(batch_size)])
    row = score(quality, rec, labels, classifier, seed=seed)
    row["psnr_db"] = sum(psnr(r, x) for r, x in zip(rec, images, strict=True)) / len(images)
    return {"sampler": "autoencoder reconstructions", "steps": 0, "guidance": 0.0, **row}


def sample_grid(generate: Callable[..., Tensor], quality: SampleMetrics, classifier: nn.Module | None,
                prompts: Sequence[str], labels: Sequence[int], per_prompt: int, samplers: Sequence[str],
                steps: Sequence[int], guidance: Sequence[float], seed: int = 0,
                clip: Callable[[Tensor, list[str]], float | None] | None = None,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """For each (sampler, steps, guidance): `generate(prompts, n=, sampler=, steps=, guidance=, seed=)` → images
    (len(prompts)·n, C, H, W) in [-1, 1], prompts in order, n each; scored by `score`. The same seed in every
    cell, so cells differ only by their settings."""
    label_t = torch.tensor(list(labels)).repeat_interleave(per_prompt)
    items = [p for p in prompts for _ in range(per_prompt)]
    rows = []
    for sampler in samplers:
        for g in guidance:
            for k in steps:
                t0 = time.perf_counter()
                images = generate(list(prompts), n=per_prompt, sampler=sampler, steps=int(k), guidance=float(g),
                                  seed=seed)
                seconds = time.perf_counter() - t0
                row = {"sampler": sampler, "steps": int(k), "guidance": float(g),
                       **score(quality, images, label_t, classifier, seed=seed),
                       "sampling_s": round(seconds, 2), "images_per_s": round(len(images) / seconds, 2)}
                if clip is not None:
                    row["clip_score"] = clip(images, items)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def pipeline_generator(pipe, batch_size: int = 250, guide_scale: float = 0.0) -> Callable[..., Tensor]:
    """`generate` for sample_grid from a LatentDiffusionPipeline (guide_scale > 0: autoguidance by its guide)."""
    def generate(prompts, n, sampler, steps, guidance, seed):
        return pipe.text_to_image(prompts, n=n, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                                  batch_size=batch_size, progress=False, guide_scale=guide_scale)["images"]
    return generate


def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_csv(rows: Sequence[dict], path: str | Path, columns: Sequence[str] = COLUMNS) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") if row.get(k) is not None else "" for k in columns})
    return path


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def format_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """A fixed-width text table of the columns that hold any value."""
    cols = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
