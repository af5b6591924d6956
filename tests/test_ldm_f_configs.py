"""The LDM-f configs of benchmarks/ldm_f_tradeoff.py fit together: each autoencoder's latents have the shape its
U-Net takes, and the U-Net maps them to ε and the learned-range variance values."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm import runtime
from ldm.nn.autoencoder import AutoencoderKLNet
from ldm.nn.unet import UNetModel

CONF = Path(__file__).resolve().parents[1] / "conf"
PAIRS = {1: (None, "fmnist_pixel"), 2: ("fmnist_f2", "fmnist_f2"), 4: ("fmnist_f4", "fmnist_f4"),
         8: ("fmnist_f8", "fmnist_f8")}


def compose_train(overrides):
    runtime.register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("f", sorted(PAIRS))
def test_autoencoder_latents_fit_the_unet(f):
    ae, unet = PAIRS[f]
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    if ae is None:
        z = x
    else:
        cfg = compose_train(["experiment=fmnist_autoencoder", f"model/autoencoder@model={ae}"])
        net = AutoencoderKLNet(cfg.model.ddconfig, cfg.model.embed_dim)
        assert net.downsample_factor == f
        z = net.encode(x).mean
    assert z.shape[-1] == 32 // f
    overrides = ["experiment=fmnist_pixel_ddpm"] + ([f"model/unet={unet}"] if f != 1 else [])
    cfg = compose_train(overrides)
    u = {k: v for k, v in cfg.model.unet.items() if k != "_target_"}
    assert u["in_channels"] == z.shape[1] and u["image_size"] == z.shape[-1]
    out = UNetModel(**u)(z, torch.tensor([10, 900]), context=torch.randn(2, 5, 384))
    assert out.shape == (2, 2 * z.shape[1], *z.shape[-2:])  # ε and v (variance_type learned_range)
    assert cfg.model.variance_type == "learned_range" and cfg.model.schedule.name == "linear"
