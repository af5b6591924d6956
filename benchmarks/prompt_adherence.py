"""Prompt adherence on Fashion-MNIST: sample N images per class prompt, label them with a small CNN classifier,
and report the share labelled as the prompted class beside the classifier's accuracy on the real test split.

    python benchmarks/prompt_adherence.py --ckpt outputs/demo/ldm/checkpoints/last.ckpt --per-class 100

The classifier (ldm.metrics.classifier: ≥ 92 % on the test split) is trained once if missing (≈2–3 minutes on 2
CPU cores; or `python -m ldm.metrics.classifier`) and cached as safetensors. For FID/KID beside adherence, and a
grid of samplers and steps, use eval.py (docs/metrics.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm.data.fashion_mnist import CLASS_NAMES, FashionMNIST, caption_for
from ldm.metrics.classifier import DEFAULT_PATH, accuracy_on, load_or_train_classifier, prompt_adherence
from ldm.pipeline import LatentDiffusionPipeline


def get_classifier(path: Path, root: str | None, image_size: int):
    kw = {"root": root} if root else {}
    model = load_or_train_classifier(path, image_size, root)
    return model, accuracy_on(model, FashionMNIST(split="test", image_size=image_size, **kw))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--template", default="a photo of a {}")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--classifier", default=DEFAULT_PATH)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    pipe = LatentDiffusionPipeline.from_checkpoint(args.ckpt)
    height, width = pipe.image_size  # the classifier is trained at the model's (square) image size
    if height != width:
        raise ValueError(f"the classifier needs square images; the model makes {height}×{width}")
    image_size = height
    clf, test_acc = get_classifier(Path(args.classifier), args.data_root, image_size)

    t0 = time.time()
    prompts = [caption_for(c, args.template) for c in range(len(CLASS_NAMES))]  # "an ankle boot"
    result = pipe.text_to_image(prompts, n=args.per_class, sampler=args.sampler, steps=args.steps,
                                guidance=args.guidance, seed=args.seed, batch_size=250, progress=False)
    images = result["images"]
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.per_class)
    scores = prompt_adherence(clf, images, labels)
    figures = {
        "sample_accuracy": scores["accuracy"],
        "per_class": {CLASS_NAMES[c]: acc for c, acc in scores["per_class"].items()},
        "classifier_test_accuracy": test_acc,
        "samples": len(images), "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
        "sampling_seconds": round(time.time() - t0, 1), "ckpt": str(args.ckpt),
    }
    print(f"classifier accuracy on the real test split: {test_acc:.1%}")
    print(f"samples labelled as their prompted class:  {scores['accuracy']:.1%} "
          f"({args.per_class} per class, {args.sampler} {args.steps} steps, guidance {args.guidance})")
    for name, acc in figures["per_class"].items():
        print(f"  {name:<12} {acc:.0%}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
