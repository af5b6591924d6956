"""The identity first stage: a LatentDiffusion on PixelSpace is a pixel-space diffusion model that trains, exports,
reloads from its checkpoint and folder, and refuses images of the wrong channel count."""

from __future__ import annotations

import pytest
import torch

from ldm.models.latent_diffusion import LatentDiffusion
from ldm.nn.autoencoder import PixelSpace, load_pretrained, save_pretrained

UNET = dict(in_channels=1, out_channels=2, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_head_channels=8, context_dim=384, norm_num_groups=8)


def pixel_ldm(**kw):
    args = dict(unet=UNET, first_stage={"type": "PixelSpace", "channels": 1}, text_encoder={"max_length": 16},
                schedule={"name": "linear", "num_timesteps": 50}, variance_type="learned_range", ema_decay=None)
    return LatentDiffusion(**{**args, **kw})


def test_pixel_space_is_the_identity_with_a_point_mass_posterior():
    ps = PixelSpace(3)
    x = torch.randn(2, 3, 8, 8)
    post = ps.encode(x)
    assert torch.equal(post.mean, x) and torch.equal(post.sample(), x) and not post.std.any()
    assert torch.equal(ps.decode(x), x) and ps.downsample_factor == 1 and ps.embed_dim == 3


def test_pixel_ldm_latents_are_the_images_and_a_training_step_runs():
    model = pixel_ldm()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert model.scale_factor == 1.0 and model.downsample_factor == 1 and model.latent_channels == 1
    assert torch.equal(model.get_latents({"image": x}), x)  # std 0: no noise is added to the data
    loss, logs = model._loss(model.unet, {"image": x, "caption": ["a bag"] * 4}, 0.0)
    loss.backward()
    assert torch.isfinite(loss) and "loss_vlb" in logs
    with pytest.raises(ValueError, match="3 channel"):
        model.get_latents({"image": torch.zeros(1, 3, 16, 16)})


def test_pixel_ldm_export_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = pixel_ldm()
    model.latent_size.fill_(16)
    folder = model.export(tmp_path / "export")
    assert not (folder / "first_stage" / "model.safetensors").exists()  # nothing to store
    again = LatentDiffusion.load(folder)
    assert isinstance(again.first_stage, PixelSpace) and again.scale_factor == 1.0
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    assert ckpt["first_stage_config"] == {"type": "PixelSpace", "channels": 1, "embed_dim": 1, "scale_factor": 1.0}
    torch.save(ckpt, tmp_path / "m.ckpt")
    from_ckpt = LatentDiffusion.load(tmp_path / "m.ckpt")
    a, b, c = (m.sample(["a bag"], steps=2, seed=3) for m in (model, again, from_ckpt))
    assert a.shape == (1, 1, 16, 16) and torch.equal(a, b) and torch.equal(a, c)


def test_pixel_space_folder_has_only_a_config(tmp_path):
    save_pretrained(PixelSpace(3), tmp_path / "fs", scale_factor=0.18)
    net, scale = load_pretrained(tmp_path / "fs")
    assert isinstance(net, PixelSpace) and net.embed_dim == 3 and scale == 1.0  # pixels are not rescaled


def test_pixel_space_sampling_clips_x0_to_the_data_range(tmp_path):
    from tests.tiny_models import tiny_ldm

    model = pixel_ldm()
    assert model.clip_x0 == 1.0 and model.make_denoiser(["a bag"], guidance=3.0).clip_x0 == 1.0
    assert tiny_ldm(tmp_path).clip_x0 is None  # latents have no fixed range
    torch.nn.init.normal_(model.unet.out[-1].weight, std=5.0)  # wild predictions: x0 would leave [-1, 1]
    den = model.make_denoiser(["a bag"], guidance=1.0)
    out = den(torch.randn(1, 1, 16, 16) * 3, torch.tensor([45]))
    assert out.x0.abs().max() <= 1.0
