"""Sample-quality metrics through torchmetrics (FID, KID, Inception Score, CLIP score) with a pluggable extractor.

The feature extractor is any `nn.Module` mapping uint8 images (N, C, H, W) in [0, 255] to (N, D) features
(torchmetrics' `feature=`): the standard FID Inception network from a local weights file
(`inception_extractor`; nothing is downloaded), or a domain classifier (`ClassifierFeatures`, e.g. the
Fashion-MNIST CNN of `ldm.metrics.classifier`). Images enter every metric as `to_uint8(x)` of x in [-1, 1].
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

FEATURE_KINDS = ("classifier", "inception")


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] → uint8 in [0, 255] (the input torchmetrics' FID/KID/IS expect with normalize=False)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _to_range(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] (torchmetrics' two conventions) → float in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1)
    return images.float().mul(2).sub(1)


def fit_to(images: Tensor, size: int, channels: int) -> Tensor:
    """(N, C, H, W) in [-1, 1] → (N, channels, size, size): RGB averaged to grey (or grey repeated), 28 px
    padded with background to 32 px as the data set does, other sizes resized bilinearly."""
    x = images
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h == w and size > h and (size - h) % 2 == 0 and size - h <= 4:
        p = (size - h) // 2
        return F.pad(x, (p, p, p, p), value=-1.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class ClassifierFeatures(nn.Module):
    """A trained classifier as a torchmetrics feature extractor: uint8 (or [0, 1] float) images of any size and
    channel count → its penultimate embedding (`output="embedding"`, for FID/KID) or its logits (for IS)."""

    def __init__(self, classifier: nn.Module, output: str = "embedding"):
        super().__init__()
        if output not in ("embedding", "logits"):
            raise ValueError(f"output must be 'embedding' or 'logits', got {output!r}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.output = output
        cfg = getattr(classifier, "config", {})
        self.image_size = int(cfg.get("image_size", 32))
        self.in_channels = int(cfg.get("in_channels", 1))
        self.num_features = int(cfg.get("embed_dim", 128) if output == "embedding" else cfg.get("num_classes", 10))

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # BatchNorm / dropout stay in eval mode: features are a fixed function

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = fit_to(_to_range(images), self.image_size, self.in_channels)
        return self.classifier.embedding(x) if self.output == "embedding" else self.classifier(x)


class _GreyToRGB(nn.Module):
    """Repeat 1-channel uint8 images to 3 channels in front of the Inception network (which resizes to 299)."""

    def __init__(self, net: nn.Module, num_features: int):
        super().__init__()
        self.net, self.num_features = net, num_features

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images).reshape(len(images), -1)


def inception_extractor(weights: str | Path | None, feature: str = "2048", key: str = "metrics.inception_weights"):
    """torchmetrics' FID Inception-v3 (torch-fidelity's port) from a local weights file
    (pt_inception-2015-12-05-6726825d.pth); `feature` "2048" (FID/KID) or "logits_unbiased" (IS)."""
    if not weights:
        raise ValueError(f"Inception features need the FID Inception weights as a local file: set {key}=<path to "
                         "pt_inception-2015-12-05-6726825d.pth> (nothing is downloaded), or use the domain "
                         "classifier (features=classifier)")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{key}={weights}: no such file (the FID Inception weights, "
                                "pt_inception-2015-12-05-6726825d.pth)")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(f"{key} is set but torch-fidelity (torchmetrics' Inception port) is not "
                                  "installed: `pip install torch-fidelity`, or use features=classifier")
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                             feature_extractor_weights_path=str(weights))
    return _GreyToRGB(net, 1008 if feature == "logits_unbiased" else int(feature))


def build_extractors(features: str = "classifier", classifier: nn.Module | None = None,
                     inception_weights: str | None = None) -> tuple[nn.Module, nn.Module]:
    """(FID/KID feature module, IS logits module) for `features` = "classifier" or "inception"."""
    if features == "classifier":
        if classifier is None:
            raise ValueError("features=classifier needs a classifier (see ldm.metrics.classifier)")
        return ClassifierFeatures(classifier, "embedding"), ClassifierFeatures(classifier, "logits")
    if features == "inception":
        return inception_extractor(inception_weights), inception_extractor(inception_weights, "logits_unbiased")
    raise ValueError(f"features={features!r}: use one of {FEATURE_KINDS}")


class SampleMetrics(nn.Module):
    """FID, KID (and Inception Score) of generated images against a real reference set, in one feature space.

    Real statistics survive `reset()` (reset_real_features=False), so a reference set is fed once and each
    evaluation only adds its samples. `add_real` / `add_fake` take images in [-1, 1]."""

    def __init__(self, feature: nn.Module, logits: nn.Module | None = None, kid_subsets: int = 50,
                 kid_subset_size: int = 1000, is_splits: int = 10):
        super().__init__()
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False)
        with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=feature, subsets=kid_subsets, subset_size=kid_subset_size,
                                               reset_real_features=False)
            self.inception_score = InceptionScore(feature=logits, splits=is_splits) if logits is not None else None
        self.kid_subset_size = kid_subset_size
        self.n_real = 0
        self.n_fake = 0

    @torch.no_grad()
    def _feed(self, images: Tensor, real: bool, batch_size: int) -> None:
        for i in range(0, len(images), batch_size):
            x = to_uint8(images[i:i + batch_size])
            self.fid.update(x, real=real)
            self.kid.update(x, real=real)
            if not real and self.inception_score is not None:
                self.inception_score.update(x)

    def add_real(self, images: Tensor, batch_size: int = 500) -> None:
        self._feed(images, True, batch_size)
        self.n_real += len(images)

    def add_fake(self, images: Tensor, batch_size: int = 500) -> None:
        self._feed(images, False, batch_size)
        self.n_fake += len(images)

    def reset(self) -> None:
        """Forget the generated images (the real reference statistics stay)."""
        self.fid.reset()
        self.kid.reset()
        if self.inception_score is not None:
            self.inception_score.reset()
        self.n_fake = 0

    @torch.no_grad()
    def compute(self, seed: int = 0) -> dict:
        """{"fid", "kid", "kid_std", "is", "is_std"}; KID subsets shrink to the smaller set where needed.
        KID and IS draw random subsets from a generator seeded with `seed` (the global RNG state is kept)."""
        if self.n_real < 2 or self.n_fake < 2:
            raise RuntimeError(f"need at least 2 real and 2 generated images (have {self.n_real}, {self.n_fake})")
        out = {"fid": float(self.fid.compute())}
        self.kid.subset_size = min(self.kid_subset_size, self.n_real, self.n_fake)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid_mean, kid_std = self.kid.compute()
            out.update(kid=float(kid_mean), kid_std=float(kid_std))
            if self.inception_score is not None:
                is_mean, is_std = self.inception_score.compute()
                out.update({"is": float(is_mean), "is_std": float(is_std)})
        return out


def frechet_distance_of(feature: nn.Module, real: Tensor, fake: Tensor) -> float:
    """FID of two image sets in [-1, 1] in `feature`'s space (a one-off; SampleMetrics for repeated use)."""
    q = SampleMetrics(feature, kid_subset_size=min(len(real), len(fake)))
    q.add_real(real)
    q.add_fake(fake)
    return q.compute()["fid"]


def clip_score(images: Tensor, prompts: list[str], model_path: str | Path | None,
               key: str = "metrics.clip_model") -> float | None:
    """Mean CLIP score (torchmetrics) of images in [-1, 1] against their prompts; None without CLIP weights
    (`model_path`: a local transformers CLIP folder; nothing is downloaded)."""
    if not model_path:
        return None
    if not Path(model_path).exists():
        raise FileNotFoundError(f"{key}={model_path}: no such folder (a local transformers CLIP model)")
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(model_path))
    rgb = to_uint8(images).expand(-1, 3, -1, -1) if images.shape[1] == 1 else to_uint8(images)
    for i in range(0, len(rgb), 64):
        metric.update(list(rgb[i:i + 64]), prompts[i:i + 64])
    return float(metric.compute())
