"""The test-set bits/dim command: pixel-space models only, the caption per image reaches the U-Net in every
repeated chunk, the figure is the bound of `bits_per_dim` (per input dim and per 28×28 pixel), and the CLI
writes its JSON."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.likelihood import bits_per_dim
from ldm.diffusion.schedule import NoiseSchedule
from ldm.metrics import nll
from tests.integration.conftest import make_fmnist
from tests.models.test_pixel_space import pixel_ldm
from tests.tiny_models import tiny_ldm


class Oracle(nn.Module):
    """ε of x_t given the one image x0 every row shows; records the contexts it was given."""

    in_channels, out_channels = 1, 1

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0, self.contexts = schedule, x0, []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context=None, context_mask=None):
        self.contexts.append(context)
        s = self.schedule
        ab = s.gather("sqrt_alphas_cumprod", t, x)
        return (x - ab * self.x0) / s.gather("sqrt_one_minus_alphas_cumprod", t, x)


def test_latent_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pixel-space"):
        nll.check_pixel_space(tiny_ldm(tmp_path))


def test_bound_matches_bits_per_dim_and_captions_follow_their_images():
    x0 = torch.full((1, 1, 8, 8), 128 / 127.5 - 1)
    schedule = NoiseSchedule.from_config("linear", 50)
    oracle = Oracle(schedule, x0)
    model = pixel_ldm(unet=oracle, schedule=schedule, variance_type="fixed_small")
    images = x0.expand(3, -1, -1, -1)
    got = nll.test_set_bits_per_dim(model, images, ["a bag", "a coat", ""], timesteps=None, batch_size=150,
                                    images_per_call=3)
    want = bits_per_dim(Denoiser(lambda x, t: oracle(x, t), model.schedule), images, None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # exact x0: the bound does not depend on the noise
    ctx, _ = model.encode_text(["a bag", "a coat", ""])
    seen = torch.cat(oracle.contexts[:1])
    assert seen.shape[0] == 150 and torch.equal(seen[:3], ctx[:, :seen.shape[1]]) and torch.equal(seen[3:6], seen[:3])
    s = nll.summarize(got, dims=64, real_dims=49)
    assert s["bpd"] == pytest.approx(float(got.mean())) and s["bpd_per_real_pixel"] == pytest.approx(s["bpd"] * 64 / 49)


def test_cli_writes_the_bound(tmp_path):
    fmnist_root = make_fmnist(tmp_path / "fmnist", n_train=16, n_test=8)
    torch.manual_seed(0)
    model = pixel_ldm()
    model.latent_size.fill_(32)
    export = model.export(tmp_path / "export")
    r = nll.main([str(export), "--n", "4", "--timesteps", "3", "--full-check", "1", "--data-root", str(fmnist_root),
                  "--batch-size", "8", "--out", str(tmp_path / "nll.json")])
    saved = json.loads((tmp_path / "nll.json").read_text())
    assert saved == json.loads(json.dumps(r)) and saved["image_shape"] == [1, 32, 32]
    for cond in ("class", "null"):
        c = saved[cond]
        assert c["n"] == 4 and c["bpd"] > 0 and c["bpd_per_real_pixel"] == pytest.approx(c["bpd"] * 1024 / 784)
        assert c["full_check"]["n"] == 1 and c["full_check"]["bpd_all_t"] > 0
    with pytest.raises(SystemExit):
        nll.main([str(export), "--conditions", "both"])
