"""Super-resolution pairs: blur, bicubic down-sampling and noise against known answers; determinism per item."""

from __future__ import annotations

import random

import pytest
import torch

from ldm.data.superres import bicubic, degrade, gaussian_blur


def test_blur_and_bicubic_known_answers():
    flat = torch.full((1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.0), flat)  # a constant stays constant (normalised kernel)
    impulse = torch.zeros(1, 9, 9)
    impulse[0, 4, 4] = 1
    blurred = gaussian_blur(impulse, 1.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5) and blurred[0, 4, 4] < 0.2
    assert torch.equal(gaussian_blur(impulse, 0.0), impulse)
    torch.testing.assert_close(bicubic(flat, (4, 4)), torch.full((1, 4, 4), 0.3))


def test_degrade_is_seeded_and_sized():
    hr = torch.rand(1, 32, 32) * 2 - 1
    a = degrade(hr, 2, random.Random("x"))
    assert a.shape == (1, 16, 16) and torch.equal(a, degrade(hr, 2, random.Random("x")))
    assert not torch.equal(a, degrade(hr, 2, random.Random("y")))
    clean = degrade(hr, 2, random.Random(0), max_blur=0.0, max_noise=0.0)
    torch.testing.assert_close(clean, bicubic(hr, (16, 16)))
    with pytest.raises(ValueError, match="not divisible"):
        degrade(torch.zeros(1, 30, 30), 4, random.Random(0))
