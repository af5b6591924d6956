"""FID / KID / IS through torchmetrics with pluggable extractors, on tiny cases with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.metrics.classifier import SmallCNN
from ldm.metrics.quality import (
    ClassifierFeatures,
    SampleMetrics,
    build_extractors,
    clip_score,
    fit_to,
    frechet_distance_of,
    inception_extractor,
    to_uint8,
)


class FirstPixels(nn.Module):
    """The first `d` pixel values (0..255) as features: FID of a shift by c grey levels is exactly d·c²."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.float().flatten(1)[:, :self.num_features]


def grey_levels(n: int, seed: int = 0, lo: int = 60, hi: int = 180) -> torch.Tensor:
    """Images in [-1, 1] whose uint8 versions are exactly the integers drawn here."""
    k = torch.randint(lo, hi, (n, 1, 4, 4), generator=torch.Generator().manual_seed(seed))
    return k.float() / 127.5 - 1


def test_to_uint8_round_trips_integer_levels():
    x = grey_levels(8)
    assert to_uint8(x).dtype == torch.uint8
    torch.testing.assert_close(to_uint8(x).float() / 127.5 - 1, x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shift_is_d_c_squared():
    x = grey_levels(400)
    assert abs(frechet_distance_of(FirstPixels(), x, x)) < 1e-3
    shifted = x + 20 / 127.5  # +20 grey levels, same covariance
    assert frechet_distance_of(FirstPixels(), x, shifted) == pytest.approx(6 * 20**2, rel=1e-3)
    other = grey_levels(400, seed=1)  # another draw of the same distribution: small, not zero
    assert 0 < frechet_distance_of(FirstPixels(), x, other) < 0.1 * 6 * 20**2


def test_kid_is_near_zero_for_the_same_distribution_and_positive_for_a_shift():
    x = grey_levels(300)
    q = SampleMetrics(FirstPixels(), kid_subset_size=100, kid_subsets=10)
    q.add_real(x)
    q.add_fake(grey_levels(300, seed=1))
    same = q.compute(seed=0)
    q.reset()  # the real statistics stay
    q.add_fake(x + 30 / 127.5)
    shifted = q.compute(seed=0)
    assert q.n_real == 300 and q.n_fake == 300
    assert abs(same["kid"]) < 0.05 * shifted["kid"] and shifted["kid"] > 0
    assert shifted["fid"] > 10 * same["fid"] > 0
    assert q.compute(seed=0)["kid"] == shifted["kid"]  # seeded subsets: reproducible


def test_compute_needs_samples_and_kid_subsets_shrink_to_small_sets():
    q = SampleMetrics(FirstPixels(), kid_subset_size=1000)
    q.add_real(grey_levels(50))
    with pytest.raises(RuntimeError, match="at least 2"):
        q.compute()
    q.add_fake(grey_levels(20, seed=3))
    assert q.compute()["kid"] == q.compute()["kid"]  # 20 < 1000: runs with subsets of 20


def test_classifier_features_take_torchmetrics_inputs_of_any_size_and_channels():
    clf = SmallCNN(width=4, image_size=32).eval()
    feat = ClassifierFeatures(clf)
    assert feat.num_features == 128 and ClassifierFeatures(clf, "logits").num_features == 10
    grey28 = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    rgb64 = torch.rand(3, 3, 64, 64)  # torchmetrics' normalize=True convention: floats in [0, 1]
    assert feat(grey28).shape == (3, 128) and feat(rgb64).shape == (3, 128)
    padded = fit_to(grey28.float() / 127.5 - 1, 32, 1)  # 28 → 32 px: background padding, as the data set
    assert padded.shape == (3, 1, 32, 32) and (padded[..., :2, :] == -1).all()
    torch.testing.assert_close(feat(grey28), clf.embedding(padded))
    feat.train()
    assert not clf.training  # BatchNorm statistics never move
    fid, logits = build_extractors("classifier", clf)
    q = SampleMetrics(fid, logits, kid_subset_size=4)  # torchmetrics accepts it (num_features: no dummy pass)
    q.add_real(torch.rand(6, 1, 32, 32) * 2 - 1)
    q.add_fake(torch.rand(6, 1, 32, 32) * 2 - 1)
    out = q.compute()
    assert set(out) == {"fid", "kid", "kid_std", "is", "is_std"} and out["is"] >= 1 - 1e-5


def test_inception_needs_a_local_weights_file_named_by_its_config_key(tmp_path):
    with pytest.raises(ValueError, match="metrics.inception_weights"):
        build_extractors("inception")
    with pytest.raises(FileNotFoundError, match="metrics.inception_weights"):
        inception_extractor(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="classifier"):
        build_extractors("pixels")
    with pytest.raises(FileNotFoundError, match="metrics.clip_model"):
        clip_score(torch.zeros(1, 1, 8, 8), ["a bag"], tmp_path / "no-clip")
    assert clip_score(torch.zeros(1, 1, 8, 8), ["a bag"], None) is None
