import re
from pathlib import Path

import pytest
import torch
import yaml

from ldm.nn.autoencoder import (
    AutoencoderKLNet,
    DiagonalGaussian,
    latent_moments,
    load_pretrained,
    norm,
    save_pretrained,
    scale_factor_from_moments,
)
from ldm.nn.discriminator import D_LOSSES, PatchDiscriminator

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "autoencoder"
TINY_F8 = dict(in_channels=3, out_ch=3, resolution=32, ch=8, ch_mult=[1, 1, 2, 2], num_res_blocks=1,
               attn_resolutions=[8], z_channels=4, double_z=True, norm_groups=4)


def group_config(name: str) -> dict:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["fmnist_f4", "fmnist_f4_large"])
def test_f4_config_shapes(name):
    cfg = group_config(name)
    net = AutoencoderKLNet(cfg["ddconfig"], cfg["embed_dim"])
    assert net.downsample_factor == 4
    x = torch.randn(2, 1, 32, 32)
    post = net.encode(x)
    assert post.mean.shape == (2, 4, 8, 8) and post.logvar.shape == (2, 4, 8, 8)
    assert net.decode(post.sample()).shape == x.shape


def test_f8_shapes_with_attention():
    net = AutoencoderKLNet(TINY_F8, embed_dim=3)
    assert net.downsample_factor == 8
    assert len(net.encoder.down[2].attn) == 1 and len(net.decoder.up[2].attn) == 2  # at resolution 8 = 32 / 4
    assert not len(net.encoder.down[1].attn) and not len(net.decoder.up[3].attn)
    post = net.encode(torch.randn(2, 3, 32, 32))
    assert post.mean.shape == (2, 3, 4, 4)
    assert net.decode(post.mode()).shape == (2, 3, 32, 32)


def test_sd_kl_f8_layout_on_meta_device():
    cfg = group_config("kl_f8")
    with torch.device("meta"):
        net = AutoencoderKLNet(cfg["ddconfig"], cfg["embed_dim"])
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 83_653_863  # SD v1 `first_stage_model`
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.norm2.weight": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 248
    assert not any(k.startswith("decoder.up.0.upsample") for k in sd)


def _from_diffusers(sd: dict, n_levels: int) -> dict:
    """diffusers AutoencoderKL keys → CompVis/SD keys (what SD checkpoints use)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
        k = re.sub(r"down_blocks\.(\d+)\.resnets", r"down.\1.block", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{n_levels - 1 - int(m.group(1))}.", k)
        k = k.replace(".resnets.", ".block.").replace("upsamplers.0", "upsample")
        k = k.replace("conv_shortcut", "nin_shortcut")
        attn = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
        for a, b in attn:
            if f"attn_1.{a}." in k:
                k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
                v = v[..., None, None] if v.ndim == 2 else v
        out[k] = v
    return out


def test_matches_diffusers_reference():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                  sample_size=16).eval()
    dd = dict(in_channels=1, out_ch=1, resolution=16, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
              norm_groups=4)
    net = AutoencoderKLNet(dd, embed_dim=4).eval()
    missing, unexpected = net.load_state_dict(_from_diffusers(ref.state_dict(), 3), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ours, theirs = net.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.logvar, theirs.logvar, atol=1e-5, rtol=1e-4)
        z = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(net.decode(z), ref.decode(z).sample, atol=1e-5, rtol=1e-4)


def test_diagonal_gaussian_kl_matches_torch_distributions():
    params = torch.randn(3, 8, 4, 4) * 2
    post = DiagonalGaussian(params)
    q = torch.distributions.Normal(post.mean, post.std)
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-5)
    assert post.kl().shape == (3,)
    g = torch.Generator().manual_seed(0)
    s = post.sample(g)
    assert s.shape == post.mean.shape and torch.equal(post.mode(), post.mean)
    torch.testing.assert_close(s, post.sample(torch.Generator().manual_seed(0)))


def test_diagonal_gaussian_clamps_logvar():
    mean, logvar = torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(post.kl()).all()


def test_norm_groups_fit_narrow_layers():
    assert norm(8).num_groups == 8 and norm(64).num_groups == 32 and norm(48).num_groups == 16
    assert norm(64, groups=8).num_groups == 8


def test_unknown_or_single_z_ddconfig_rejected():
    with pytest.raises(ValueError, match="unknown autoencoder ddconfig keys.*chmult"):
        AutoencoderKLNet({"chmult": [1, 2]}, 4)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKLNet({"double_z": False}, 4)


def test_save_load_pretrained_round_trip(tmp_path):
    net = AutoencoderKLNet(TINY_F8, embed_dim=4).eval()
    save_pretrained(net, tmp_path / "export", scale_factor=0.5)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    loaded, sf = load_pretrained(tmp_path / "export")
    assert sf == 0.5 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x, sample=False)[0], loaded(x, sample=False)[0])


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


def test_latent_moments_give_inverse_std():
    net = AutoencoderKLNet(TINY_F8, embed_dim=4).eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    stats = latent_moments(net, batches, num_batches=2, sample=False)
    z = torch.cat([net.encode(b).mode() for b in batches[:2]]).double()
    assert int(stats[2]) == z.numel()
    assert scale_factor_from_moments(stats) == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-6)


def test_patch_discriminator_and_losses():
    for norm_kind in ("group", "batch", "none"):
        d = PatchDiscriminator(in_channels=1, channels=8, n_layers=2, norm=norm_kind)
        assert d(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert D_LOSSES["hinge"](real, fake).item() == 0.0  # both beyond the margin
    expected = torch.nn.functional.softplus(torch.tensor(-2.0)).item()
    assert D_LOSSES["vanilla"](real, fake).item() == pytest.approx(expected)


def test_lpips_needs_local_weights(tmp_path):
    from ldm.nn.lpips import LPIPS, load_lpips

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_lpips(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="lpips_path=None"):
        load_lpips(None)
    torch.save(LPIPS().state_dict(), tmp_path / "lpips.pth")  # random weights, the real layout
    lp = load_lpips(tmp_path / "lpips.pth")
    x, y = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    assert lp(x, y).shape == (2, 1, 1, 1)
    assert lp(x, x).abs().max() == 0
    assert "net.slice1.0.weight" in lp.state_dict() and "lin4.model.1.weight" in lp.state_dict()
