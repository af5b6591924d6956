"""The `concat` conditioning key: one resize to the latent grid, cat([z_t, c]) in training and sampling alike."""

from __future__ import annotations

import pytest
import torch

from ldm.models.conditioning import concat_to_latent_grid, inpainting_concat, upscale_condition, with_concat
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.nn.unet import UNetModel
from tests.tiny_models import tiny_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")


def unet(in_channels: int, context_dim: int | None = None) -> dict:
    """A U-Net config (a config, not a module, so that the model can be exported and rebuilt)."""
    return dict(_target_=f"{UNetModel.__module__}.UNetModel", in_channels=in_channels, out_channels=4,
                model_channels=16, channel_mult=[1], num_res_blocks=1,
                attention_resolutions=[1] if context_dim else [], num_head_channels=8, context_dim=context_dim,
                norm_num_groups=8)


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("concat")
    return tiny_autoencoder(root / "ae")


def model(ae_dir, text: bool = False) -> LatentDiffusion:
    torch.manual_seed(0)
    m = LatentDiffusion(unet=unet(6, 384 if text else None), first_stage=str(ae_dir), concat_channels=2,
                        text_encoder={"max_length": 16} if text else None,
                        schedule={"name": "linear", "num_timesteps": 50}, ema_decay=None)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.latent_size.fill_(8)
    return m


def test_resize_to_the_latent_grid():
    c = torch.arange(16.0).view(1, 1, 4, 4)
    down = concat_to_latent_grid(c, (2, 2), batch=3)
    assert down.shape == (3, 1, 2, 2)
    torch.testing.assert_close(down[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # block means
    assert torch.equal(concat_to_latent_grid(c, (4, 4)), c)
    assert concat_to_latent_grid(c, (8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="batch 2, expected 3"):
        concat_to_latent_grid(torch.zeros(2, 1, 4, 4), (2, 2), batch=3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        concat_to_latent_grid(torch.zeros(4, 4), (2, 2))


def test_with_concat_feeds_the_network_cat_of_state_and_condition():
    seen = {}

    def net(x, t):
        seen["x"] = x
        return x[:, :4]
    fn = with_concat(net, 2)
    x, c = torch.randn(2, 4, 4, 4), torch.randn(1, 2, 8, 8)
    fn(x, torch.zeros(2), concat=c)
    assert torch.equal(seen["x"][:, :4], x)
    torch.testing.assert_close(seen["x"][:, 4:], concat_to_latent_grid(c, (4, 4), 2))
    with pytest.raises(ValueError, match="pass concat="):
        fn(x, torch.zeros(2))
    with pytest.raises(ValueError, match="must have 2 channels"):
        fn(x, torch.zeros(2), concat=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="concat_channels=0"):
        with_concat(net, 0)(x, torch.zeros(2), concat=c)


def test_the_channels_are_wired_in_training_and_sampling(ae_dir):
    m = model(ae_dir)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    c1, c2 = torch.zeros(2, 2, 16, 16), torch.ones(2, 2, 16, 16)
    losses = []
    for c in (c1, c1, c2):
        loss, _ = m._loss(m.unet, {"image": image, "caption": ["", ""], "concat": c}, 0.0,
                          torch.Generator().manual_seed(1))
        losses.append(float(loss))
    assert losses[0] == losses[1] != losses[2]
    with pytest.raises(ValueError, match="needs a 'concat' tensor"):
        m._loss(m.unet, {"image": image, "caption": ["", ""]}, 0.0)
    a = m.sample(["", ""], steps=3, concat=c1)
    b = m.sample(["", ""], steps=3, concat=c2)
    assert a.shape == (2, 1, 16, 16) and float((a - b).abs().mean()) > 1e-3
    with pytest.raises(ValueError, match="pass concat="):
        m.sample([""], steps=2)


def test_concat_reaches_both_guidance_branches_and_survives_export(ae_dir, tmp_path):
    m = model(ae_dir, text=True)
    c1, c2 = torch.zeros(1, 2, 8, 8), torch.ones(1, 2, 8, 8)
    a = m.sample(["a bag"], steps=3, guidance=3.0, concat=c1)
    b = m.sample(["a bag"], steps=3, guidance=3.0, concat=c2)
    assert float((a - b).abs().mean()) > 1e-3
    m.export(tmp_path / "export", use_ema=False)
    back = LatentDiffusion.load(tmp_path / "export")
    assert back.concat_channels == 2
    torch.testing.assert_close(back.sample(["a bag"], steps=3, guidance=3.0, concat=c1), a, atol=1e-5, rtol=0)


def test_unet_input_channels_must_add_up(ae_dir):
    with pytest.raises(ValueError, match=r"4 \+ 2 concatenated channels .* in_channels=4"):
        LatentDiffusion(unet=unet(4), first_stage=str(ae_dir), concat_channels=2, text_encoder=None,
                        schedule={"name": "linear", "num_timesteps": 50}, ema_decay=None)


def test_inpainting_concat_is_mask_and_masked_latent(ae_dir):
    m = LatentDiffusion(unet=unet(9), first_stage=str(ae_dir), concat_channels=5, concat_source="inpaint",
                        text_encoder=None, schedule={"name": "linear", "num_timesteps": 50}, ema_decay=None)
    with torch.no_grad():  # a non-zero output layer
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8, :4] = 1
    c = inpainting_concat(m, image, mask)
    assert c.shape == (2, 5, 8, 8)
    expected = torch.zeros(8, 8)
    expected[:4, :2] = 1
    torch.testing.assert_close(c[0, 0], expected)  # the mask, area-averaged onto the latent grid
    torch.testing.assert_close(c[:, 1:], m.encode_images(image * (1 - mask)))
    loss = [float(m._loss(m.unet, {"image": image, "caption": ["", ""], "mask": mk}, 0.0,
                          torch.Generator().manual_seed(1))[0]) for mk in (mask, 1 - mask)]
    assert loss[0] != loss[1]  # the mask reaches the U-Net in training
    with pytest.raises(ValueError, match="needs pixel images and a 'mask'"):
        m._loss(m.unet, {"image": image, "caption": ["", ""]}, 0.0)
    with pytest.raises(ValueError, match="like the image"):
        inpainting_concat(m, image, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="concat_source must be one of"):
        LatentDiffusion(unet=unet(9), first_stage=str(ae_dir), concat_channels=5, concat_source="paint",
                        text_encoder=None, ema_decay=None)


def test_upscale_condition_noise_augmentation_and_level(ae_dir):
    m = LatentDiffusion(unet={**unet(8), "num_classes": 10}, first_stage=str(ae_dir), concat_channels=4,
                        concat_source="upscale", text_encoder=None, schedule={"name": "linear", "num_timesteps": 50},
                        ema_decay=None)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.latent_size.fill_(8)
    low = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    from ldm.data.superres import bicubic
    clean = m.encode_images(bicubic(low, (16, 16)))
    c0 = upscale_condition(m, low, (16, 16), torch.tensor([0]), torch.Generator().manual_seed(0))
    c9 = upscale_condition(m, low, (16, 16), torch.tensor([9]), torch.Generator().manual_seed(0))
    assert c0["concat"].shape == (2, 4, 8, 8) and c0["y"].tolist() == [0, 0]
    ab = m.schedule.alphas_cumprod
    assert float((c0["concat"] - clean).abs().max()) < 0.1  # level 0: nearly the clean latent
    noise = (c9["concat"] - ab[9].sqrt() * clean) / (1 - ab[9]).sqrt()
    assert 0.5 < float(noise.std()) < 1.5  # level 9: √ᾱ₉ z + √(1−ᾱ₉) ε
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    losses = [float(m._loss(m.unet, {"image": image, "caption": ["", ""], "lowres": lo}, 0.0,
                            torch.Generator().manual_seed(1))[0]) for lo in (low, -low)]
    assert losses[0] != losses[1]
    a = m.sample([""], steps=3, concat=c0["concat"][:1], y=c0["y"][:1])
    b = m.sample([""], steps=3, concat=c0["concat"][:1], y=c9["y"][:1])
    assert float((a - b).abs().mean()) > 1e-4  # the level reaches the U-Net through its class embedding
    with pytest.raises(ValueError, match="needs pixel images and a 'lowres'"):
        m._loss(m.unet, {"image": image, "caption": ["", ""]}, 0.0)
