"""A small Fashion-MNIST CNN: the judge of prompt adherence and the offline domain feature extractor for FID/KID.

"Does a sample for 'a photo of a sneaker' look like a sneaker?" is the share of samples it labels as a sneaker;
its penultimate layer (`embed`, 128-d) is the feature space of the domain FID/KID (no Inception weights needed).
Train and cache it with

    python -m ldm.metrics.classifier --out outputs/classifier/fmnist_classifier.safetensors

(≈5–6 minutes on one CPU thread, 92.5 % on the test split). Weights are safetensors with the architecture in the
metadata; `load_or_train_classifier` reuses a cached file and trains one where none exists.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

ARCH_VERSION = 2  # bumped when the architecture changes: older cached weights are retrained, not misloaded
DEFAULT_PATH = "outputs/classifier/fmnist_classifier.safetensors"


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Five 3×3 convs with BatchNorm over three scales (32 → 16 → 8 → 4 px), a 128-d embedding, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 32,
                 embed_dim: int = 128, version: int = ARCH_VERSION):
        super().__init__()
        if version != ARCH_VERSION:
            raise ValueError(f"classifier weights of architecture version {version}; this code builds version "
                             f"{ARCH_VERSION}: retrain with `python -m ldm.metrics.classifier --out <path>`")
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w), *_block(w, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w), nn.MaxPool2d(2), nn.Flatten(),
        )
        flat = 4 * w * (image_size // 8) ** 2
        self.embed = nn.Sequential(nn.Linear(flat, embed_dim), nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(embed_dim, num_classes))
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                       "image_size": image_size, "embed_dim": embed_dim, "version": ARCH_VERSION}

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def embedding(self, x: Tensor) -> Tensor:  # x: (B, C, S, S) in [-1, 1] → (B, embed_dim)
        return self.embed(self.features(x))

    def forward(self, x: Tensor) -> Tensor:  # logits (B, num_classes)
        return self.head(self.embedding(x))


def dataset_tensors(dataset: Dataset, image_size: int | None = None) -> tuple[Tensor, Tensor]:
    """All (images in [-1, 1] (N, 1, S, S), labels (N,)) of a dataset, vectorised for ldm's FashionMNIST."""
    if hasattr(dataset, "images") and hasattr(dataset, "to_image") and hasattr(dataset, "labels"):
        x = dataset.images.float().div(127.5).sub(1)[:, None]  # (N, 1, 28, 28)
        size = int(image_size or dataset.image_size)
        pad = (size - x.shape[-1]) // 2
        if size > x.shape[-1] and (size - x.shape[-1]) % 2 == 0:
            x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        elif size != x.shape[-1]:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
        return x.contiguous(), dataset.labels.long()
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flips (per image) and one random shift of up to 2 px per batch (background-filled)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    s = x.shape[-1] - 4
    return x[..., 2 + dy:2 + dy + s, 2 + dx:2 + dx + s]


@torch.enable_grad()  # also when called from evaluation code under no_grad (the sample-quality callback)
def train_classifier(train_set: Dataset, *, epochs: int = 5, batch_size: int = 128, lr: float = 3e-3,
                     seed: int = 0, max_seconds: float | None = None, **model_kw) -> SmallCNN:
    """Train `SmallCNN` with AdamW + one-cycle LR, label smoothing, flips and shifts."""
    torch.manual_seed(seed)
    image_size = int(model_kw.get("image_size", 32))
    model = SmallCNN(**model_kw)
    images, labels = dataset_tensors(train_set, image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    per_epoch = len(images) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(epochs * per_epoch, 1))
    gen = torch.Generator().manual_seed(seed)
    start, step = time.time(), 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for b in range(per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            loss = F.cross_entropy(model(_augment(images[idx], gen)), labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if max_seconds is not None and time.time() - start > max_seconds:
                log.warning("classifier training cut off at %d s (step %d of %d)", max_seconds, step,
                            epochs * per_epoch)
                return model.eval()
    log.info("classifier: %d steps in %.0f s", step, time.time() - start)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Class indices for images in [-1, 1], shape (N, C, H, W)."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def accuracy_on(model: SmallCNN, dataset: Dataset) -> float:
    images, labels = dataset_tensors(dataset, getattr(model, "image_size", None))
    return float((predict(model, images) == labels).float().mean()) if len(labels) else 0.0


def prompt_adherence(model: nn.Module, images: Tensor, labels: Tensor) -> dict:
    """Share of generated images the classifier assigns to their prompted class, overall and per class."""
    pred = predict(model, images)
    labels = labels.to(pred.device)
    per_class = {int(c): float((pred[labels == c] == c).float().mean()) for c in labels.unique()}
    return {"accuracy": float((pred == labels).float().mean()), "per_class": per_class}


def save_classifier(model: SmallCNN, path: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in {**model.config, **(extra or {})}.items()}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path) -> SmallCNN:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier weights at {path}: train them with "
                                f"`python -m ldm.metrics.classifier --out {path}`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    keys = ("in_channels", "num_classes", "width", "image_size", "embed_dim", "version")
    model = SmallCNN(**{k: int(meta[k]) for k in keys if k in meta}, **({} if "version" in meta else {"version": 1}))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_or_train_classifier(path: str | Path, image_size: int = 32, root: str | None = None,
                             max_seconds: float | None = None) -> SmallCNN:
    """The cached classifier at `path`, or a freshly trained one (saved there) if none exists or it is stale."""
    path = Path(path)
    if path.is_file():
        try:
            model = load_classifier(path)
            if model.image_size == image_size:
                return model
            log.info("classifier at %s is for %d px, need %d: retraining", path, model.image_size, image_size)
        except ValueError as e:
            log.info("%s", e)
    from ldm.data.fashion_mnist import FashionMNIST

    kw = {"root": root} if root else {}
    t0 = time.time()
    model = train_classifier(FashionMNIST(split="train", image_size=image_size, **kw), image_size=image_size,
                             max_seconds=max_seconds)
    acc = accuracy_on(model, FashionMNIST(split="test", image_size=image_size, **kw))
    save_classifier(model, path, {"test_accuracy": round(acc, 4), "train_seconds": round(time.time() - t0)})
    log.info("trained the classifier in %.0f s (test accuracy %.1f %%) → %s", time.time() - t0, 100 * acc, path)
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the Fashion-MNIST classifier (prompt adherence, domain FID).")
    p.add_argument("--out", default=DEFAULT_PATH)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--data-root", default=None)
    p.add_argument("--val-size", type=int, default=None, help="training images held out (default: the data set's 5000)")
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke tests)")
    args = p.parse_args(argv)
    from torch.utils.data import Subset

    from ldm.data.fashion_mnist import FashionMNIST

    kw = {"root": args.data_root} if args.data_root else {}
    if args.val_size is not None:
        kw["val_size"] = args.val_size
    train = FashionMNIST(split="train", image_size=args.image_size, **kw)
    if args.limit:
        images, labels = dataset_tensors(train, args.image_size)
        train = _TensorSet(images[:args.limit], labels[:args.limit])
    t0, c0 = time.time(), time.process_time()
    model = train_classifier(train, epochs=args.epochs, width=args.width, image_size=args.image_size,
                             max_seconds=args.max_seconds)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    test = FashionMNIST(split="test", image_size=args.image_size, **kw)
    acc = accuracy_on(model, test if not args.limit else Subset(test, range(min(args.limit, len(test)))))
    save_classifier(model, args.out, {"test_accuracy": round(acc, 4), "train_seconds": round(seconds),
                                      "train_cpu_seconds": round(cpu)})
    print(f"classifier: {acc:.2%} on the test split, trained in {seconds:.0f} s wall / {cpu:.0f} s CPU "
          f"({torch.get_num_threads()} threads) → {args.out}")


class _TensorSet(Dataset):
    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


if __name__ == "__main__":
    main()
