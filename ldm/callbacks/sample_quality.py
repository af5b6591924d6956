"""Sample quality in the training loop: every N steps, sample a fixed set of class prompts with a fixed seed and
log FID / KID against the validation set and prompt adherence (`val/fid`, `val/kid`, `val/adherence`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from ldm.models.log_step import metrics_step

log = logging.getLogger(__name__)


class SampleQuality(pl.Callback):
    """After a validation run at or past each multiple of `every_n_steps`, rank 0 samples `images_per_prompt`
    images for each class prompt (the same seed every time: the figures move only with the weights) with the
    EMA U-Net and logs FID/KID (and IS) in the classifier's feature space against up to `max_real` validation
    images, and prompt adherence. Everything heavy (the classifier, the real features) is loaded at the first
    measurement, so the callback costs nothing in runs too short to reach it.

    classifier: path of the Fashion-MNIST classifier's safetensors (trained there first if missing and
    `train_classifier_if_missing`). classes: class indices to prompt (default: all ten).
    """

    def __init__(self, every_n_steps: int = 1000, images_per_prompt: int = 20, classes: Sequence[int] | None = None,
                 prompt_template: str = "a photo of a {}", sampler: str = "dpmpp_2m", steps: int = 20,
                 guidance: float = 6.0, seed: int = 1234, classifier: str = "outputs/classifier/"
                 "fmnist_classifier.safetensors", train_classifier_if_missing: bool = True,
                 features: str = "classifier", inception_weights: str | None = None, max_real: int = 2000,
                 kid_subset_size: int = 100, batch_size: int = 250):
        if every_n_steps < 1 or images_per_prompt < 2:
            raise ValueError(f"every_n_steps must be >= 1 and images_per_prompt >= 2, got {every_n_steps}, "
                             f"{images_per_prompt}")
        self.every_n_steps, self.images_per_prompt = int(every_n_steps), int(images_per_prompt)
        self.classes, self.prompt_template = classes, prompt_template
        self.sampler, self.steps, self.guidance, self.seed = sampler, int(steps), float(guidance), int(seed)
        self.classifier_path, self.train_if_missing = classifier, train_classifier_if_missing
        self.features, self.inception_weights = features, inception_weights
        self.max_real, self.kid_subset_size, self.batch_size = int(max_real), int(kid_subset_size), int(batch_size)
        self._next_step = self.every_n_steps
        self._classifier = None
        self._quality = None
        self.history: list[dict] = []  # every measurement: {"step", "fid", "kid", "adherence", ...}

    def _setup(self, trainer: pl.Trainer, image_size: int) -> None:
        from ldm.metrics.classifier import dataset_tensors, load_classifier, load_or_train_classifier
        from ldm.metrics.evaluate import make_quality

        self._classifier = (load_or_train_classifier(self.classifier_path, image_size) if self.train_if_missing
                            else load_classifier(self.classifier_path))
        dm = trainer.datamodule
        val = dm.dataset("val") if dm is not None and hasattr(dm, "dataset") else None
        if val is None:
            raise ValueError("SampleQuality needs a validation set (data.val) as its FID reference")
        real, _ = dataset_tensors(val, image_size)
        if len(real) > self.max_real:
            idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:self.max_real]
            real = real[idx.sort().values]
        self._quality = make_quality(self._classifier, self.features, self.inception_weights,
                                     self.kid_subset_size, inception_score=True)
        self._quality.add_real(real)
        log.info("sample quality: %d validation images as the FID/KID reference", len(real))

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Sample, score and log now; returns the figures."""
        from ldm.metrics.evaluate import class_prompts, score

        t0 = time.perf_counter()
        prompts, labels = class_prompts(self.prompt_template, self.classes)
        items = [p for p in prompts for _ in range(self.images_per_prompt)]
        chunks = []
        for i in range(0, len(items), self.batch_size):
            chunks.append(pl_module.sample(items[i:i + self.batch_size], sampler=self.sampler, steps=self.steps,
                                           guidance=self.guidance, seed=self.seed + i).float().cpu())
        images = torch.cat(chunks)
        if self._quality is None:
            self._setup(trainer, int(images.shape[-1]))
        label_t = torch.tensor(labels).repeat_interleave(self.images_per_prompt)
        figures = score(self._quality, images, label_t, self._classifier, seed=self.seed)
        metrics = {f"val/{k}": float(v) for k, v in figures.items() if k in ("fid", "kid", "is", "adherence")}
        step = metrics_step(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        entry = {"step": int(trainer.global_step), **figures, "seconds": round(time.perf_counter() - t0, 1)}
        self.history.append(entry)
        log.info("step %d: FID %.3f, KID %.4f, adherence %.1f %% (%d samples, %.0f s)", entry["step"],
                 figures["fid"], figures["kid"], 100 * figures.get("adherence", float("nan")), len(images),
                 entry["seconds"])
        return entry

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step < self._next_step:
            return
        self._next_step = (trainer.global_step // self.every_n_steps + 1) * self.every_n_steps
        if trainer.is_global_zero:  # rank 0 only: no collective calls below
            self.measure(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"next_step": self._next_step, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self._next_step = int(state_dict.get("next_step", self._next_step))
        self.history = list(state_dict.get("history", []))
