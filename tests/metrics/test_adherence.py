"""Prompt adherence of a perfect and of a random generator, judged by an oracle classifier; the SampleQuality
callback end to end on a stub generator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ldm.callbacks.sample_quality import SampleQuality as SampleQualityCallback
from ldm.metrics.classifier import prompt_adherence
from ldm.metrics.evaluate import class_prompts

LEVELS = torch.linspace(-0.9, 0.9, 10)  # class c ⇔ images of mean brightness LEVELS[c]


class Oracle(nn.Module):
    """Labels an image by its mean brightness: a perfect judge of the synthetic 'class c' images below."""

    config = {"image_size": 8, "in_channels": 1, "embed_dim": 3, "num_classes": 10}

    def embedding(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0]], 1)

    def forward(self, x):
        return -100 * (x.mean((1, 2, 3))[:, None] - LEVELS[None]) ** 2


def images_of(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    noise = 0.02 * torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return LEVELS[labels][:, None, None, None] + noise


def test_a_perfect_generator_adheres_fully_and_a_random_one_at_chance():
    labels = torch.arange(10).repeat_interleave(200)
    perfect = prompt_adherence(Oracle(), images_of(labels), labels)
    assert perfect["accuracy"] == 1.0 and set(perfect["per_class"].values()) == {1.0}
    random_labels = torch.randint(0, 10, labels.shape, generator=torch.Generator().manual_seed(1))
    chance = prompt_adherence(Oracle(), images_of(random_labels), labels)
    assert 0.07 < chance["accuracy"] < 0.13
    swapped = prompt_adherence(Oracle(), images_of((labels + 1) % 10), labels)  # always the wrong class
    assert swapped["accuracy"] == 0.0


def test_class_prompts_name_every_class_with_the_right_article():
    prompts, labels = class_prompts()
    assert len(prompts) == 10 and labels == list(range(10))
    assert prompts[9] == "a photo of an ankle boot" and prompts[0] == "a photo of a t-shirt"
    assert class_prompts("a {}", [7, 8]) == (["a sneaker", "a bag"], [7, 8])


class Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


class StubModule:
    """`sample()` returns the prompted class's synthetic images (perfect) or class 0 for every prompt."""

    def __init__(self, perfect: bool):
        self.perfect, self.global_step, self.calls = perfect, 0, []
        self.trainer = None

    def sample(self, prompts, sampler, steps, guidance, seed):
        self.calls.append((len(prompts), sampler, steps, guidance, seed))
        names, labels = class_prompts()
        lab = torch.tensor([labels[names.index(p)] if self.perfect else 0 for p in prompts])
        return images_of(lab, seed)


@pytest.mark.parametrize("perfect", [True, False])
def test_the_callback_logs_fid_kid_and_adherence_every_n_steps(perfect, monkeypatch, tmp_path):
    val_labels = torch.arange(10).repeat(30)
    val = SimpleNamespace(images=None)
    monkeypatch.setattr("ldm.metrics.classifier.load_or_train_classifier", lambda path, size: Oracle())
    monkeypatch.setattr("ldm.metrics.classifier.dataset_tensors",
                        lambda data, size: (images_of(val_labels, seed=5), val_labels))
    logger = Logger()
    trainer = SimpleNamespace(sanity_checking=False, global_step=0, is_global_zero=True, loggers=[logger],
                              datamodule=SimpleNamespace(dataset=lambda split: val))
    module = StubModule(perfect)
    module.trainer = trainer
    cb = SampleQualityCallback(every_n_steps=100, images_per_prompt=10, seed=3, kid_subset_size=50,
                               classifier=str(tmp_path / "c.safetensors"))
    for step in (50, 100, 150, 250):  # validation runs at these steps: measures at 100 and 250
        trainer.global_step = module.global_step = step
        cb.on_validation_epoch_end(trainer, module)
    assert [h["step"] for h in cb.history] == [100, 250]
    assert module.calls[0] == (100, "dpmpp_2m", 20, 6.0, 3)
    step, metrics = logger.logged[0]
    assert set(metrics) == {"val/fid", "val/kid", "val/is", "val/adherence"}
    if perfect:
        assert metrics["val/adherence"] == 1.0 and metrics["val/fid"] < 0.05
    else:
        assert metrics["val/adherence"] == pytest.approx(0.1) and metrics["val/fid"] > 0.5
    assert cb.history[0]["fid"] == cb.history[1]["fid"]  # fixed prompts and seed: same model → same figures
    state = cb.state_dict()
    fresh = SampleQualityCallback(every_n_steps=100)
    fresh.load_state_dict(state)
    assert fresh._next_step == 300 and len(fresh.history) == 2
