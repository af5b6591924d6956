"""The Fashion-MNIST classifier: its command trains and caches safetensors; stale weights are retrained, not
misloaded; shapes and the vectorised data path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.data.fashion_mnist import FashionMNIST
from ldm.metrics import classifier as C

ROOT = "/usr/share/datasets/fashion-mnist"


def test_shapes_and_embedding():
    model = C.SmallCNN(width=4).eval()
    x = torch.randn(5, 1, 32, 32)
    assert model(x).shape == (5, 10) and model.embedding(x).shape == (5, 128)
    assert C.SmallCNN(width=4, image_size=16)(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_dataset_tensors_match_the_items():
    data = FashionMNIST(root=ROOT, split="test", image_size=32)
    images, labels = C.dataset_tensors(data)
    assert images.shape == (10000, 1, 32, 32) and labels.shape == (10000,)
    for i in (0, 123, 9999):
        torch.testing.assert_close(images[i], data[i]["image"])
        assert int(labels[i]) == data[i]["label"]


def test_the_command_trains_saves_and_reloads(tmp_path, capsys):
    out = tmp_path / "clf.safetensors"
    C.main(["--out", str(out), "--limit", "256", "--epochs", "1", "--width", "4", "--data-root", ROOT])
    assert "on the test split" in capsys.readouterr().out and out.is_file()
    model = C.load_classifier(out)
    assert model.config["width"] == 4 and not model.training
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(model(x), C.load_classifier(out)(x))


def test_stale_or_missing_weights_name_the_command_and_are_retrained(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="python -m ldm.metrics.classifier"):
        C.load_classifier(tmp_path / "none.safetensors")
    old = tmp_path / "old.safetensors"  # version-1 weights: no "version" in the metadata
    save_file({"w": torch.zeros(1)}, str(old), metadata={"width": "16", "image_size": "32"})
    with pytest.raises(ValueError, match="retrain"):
        C.load_classifier(old)
    trained = []

    def fake_train(data, **kw):
        trained.append(kw["image_size"])
        return C.SmallCNN(width=2, image_size=kw["image_size"]).eval()

    monkeypatch.setattr(C, "train_classifier", fake_train)
    monkeypatch.setattr(C, "accuracy_on", lambda model, data: 0.5)
    model = C.load_or_train_classifier(old, 32, ROOT)  # stale → retrained and saved over it
    assert trained == [32] and C.load_classifier(old).config["width"] == 2
    assert C.load_or_train_classifier(old, 32, ROOT).config == model.config and trained == [32]  # reused
    C.load_or_train_classifier(old, 16, ROOT)  # other image size → retrained
    assert trained == [32, 16]


def test_trains_under_no_grad():
    """The sample-quality callback measures under torch.no_grad() and trains a missing classifier from there: the
    training must still build a graph and move the weights (it crashed with "does not require grad")."""
    data = torch.utils.data.Subset(FashionMNIST(root=ROOT, split="train", image_size=32), range(64))
    torch.manual_seed(0)
    before = C.SmallCNN(width=4).state_dict()
    with torch.no_grad():
        model = C.train_classifier(data, epochs=1, batch_size=32, width=4)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
