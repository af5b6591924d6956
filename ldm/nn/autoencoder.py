"""The KL-regularized autoencoder of latent diffusion: Encoder, Decoder, diagonal Gaussian posterior.

Parameter names follow the CompVis / Stable Diffusion layout (encoder.down.N.block.M.conv1, quant_conv, ...)
so SD `first_stage_model.*` weights load by key. f = 2^(len(ch_mult) - 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import rng
from ldm.nn.layers import Upsample

DDCONFIG_KEYS = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
                 "resolution", "z_channels", "double_z", "mid_attn", "norm_groups"}


def norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with at most `groups` groups (fewer for narrow layers, a divisor of `channels`)."""
    g = min(groups, channels)
    if channels % g:
        g = math.gcd(g, channels)
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (1×1 conv projections, as in LDM), on SDPA."""

    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.norm = norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(-1, -2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as LDM


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return m


def _mid(ch: int, dropout: float, groups: int, attn: bool) -> nn.Module:
    m = nn.Module()
    m.block_1 = ResnetBlock(ch, ch, dropout, groups)
    m.attn_1 = AttnBlock(ch, groups) if attn else nn.Identity()
    m.block_2 = ResnetBlock(ch, ch, dropout, groups)
    return m


class Encoder(nn.Module):
    def __init__(self, *, ch: int = 128, ch_mult=(1, 2, 4, 4), num_res_blocks: int = 2, attn_resolutions=(),
                 dropout: float = 0.0, in_channels: int = 3, resolution: int = 256, z_channels: int = 4,
                 double_z: bool = True, mid_attn: bool = True, norm_groups: int = 32, **_unused):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult, res = (1, *ch_mult), resolution
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            c_in, c_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, dropout, norm_groups))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_out, norm_groups))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        self.mid = _mid(c_out, dropout, norm_groups, mid_attn)
        self.norm_out = norm(c_out, norm_groups)
        self.conv_out = nn.Conv2d(c_out, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_resolutions=(), dropout: float = 0.0, resolution: int = 256, z_channels: int = 4,
                 mid_attn: bool = True, norm_groups: int = 32, **_unused):
        super().__init__()
        c = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _mid(c, dropout, norm_groups, mid_attn)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            c_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, c_out, dropout, norm_groups))
                c = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_out, norm_groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)  # up[0] is the full-resolution level, as in the SD layout
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The weight the adaptive GAN weight is computed at."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from the encoder's 2·z channels; logvar clamped to [-30, 20]."""

    def __init__(self, params: Tensor):
        self.mean, logvar = params.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: rng.Generator = None) -> Tensor:
        m = self.mean
        eps = rng.randn(m.shape, generator, device=m.device, dtype=m.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent dimensions: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


def _plain(obj):
    """Config values as JSON-able Python (OmegaConf containers and tuples → dicts and lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


class AutoencoderKLNet(nn.Module):
    """Encoder + decoder with the SD names; `encode` → DiagonalGaussian, `decode(z)` → image."""

    def __init__(self, ddconfig: Mapping, embed_dim: int):
        super().__init__()
        ddconfig = _plain(ddconfig)
        unknown = sorted(set(ddconfig) - DDCONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown autoencoder ddconfig keys {unknown}; known: {sorted(DDCONFIG_KEYS)}")
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=true (mean and log-variance)")
        self.config = {"ddconfig": ddconfig, "embed_dim": int(embed_dim)}
        z = ddconfig.get("z_channels", 4)
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.embed_dim = int(embed_dim)
        self.image_channels = ddconfig.get("in_channels")  # None when the config leaves it to the default
        self.downsample_factor = 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4, 4))) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample: bool = True, generator: rng.Generator = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior


class PointMass:
    """The posterior of the identity first stage: all mass at x (std 0, so z = x exactly)."""

    def __init__(self, x: Tensor):
        self.mean, self.std, self.var = x, torch.zeros_like(x), torch.zeros_like(x)

    def sample(self, generator: rng.Generator = None) -> Tensor:
        return self.mean

    def mode(self) -> Tensor:
        return self.mean


class PixelSpace(nn.Module):
    """The identity first stage (f = 1): a LatentDiffusion on it is a pixel-space diffusion model, with the same
    U-Net, objectives, samplers and bits/dim evaluator. Config: `model.first_stage={type: PixelSpace,
    channels: 1}`; the scale factor is 1 (images in [-1, 1])."""

    downsample_factor = 1
    scale_factor = 1.0
    clip_x0 = 1.0  # the data range: samplers clip the predicted x0 to [-1, 1] (DDPM's clip_denoised)

    def __init__(self, channels: int = 1):
        super().__init__()
        self.embed_dim = self.image_channels = int(channels)
        self.config = {"type": "PixelSpace", "channels": self.embed_dim, "embed_dim": self.embed_dim}

    def encode(self, x: Tensor) -> PointMass:
        return PointMass(x)

    def decode(self, z: Tensor) -> Tensor:
        return z


def first_stage_from_config(config: Mapping) -> nn.Module:
    """The first stage a config describes, untrained: {type: PixelSpace, channels} or {ddconfig, embed_dim}."""
    if config.get("type") == "PixelSpace":
        return PixelSpace(config.get("channels", 1))
    return AutoencoderKLNet(config["ddconfig"], config["embed_dim"])


@torch.no_grad()
def latent_moments(net: AutoencoderKLNet, images: Iterable[Tensor], num_batches: int | None = None,
                   generator: rng.Generator = None, sample: bool = True) -> Tensor:
    """float64 [Σz, Σz², count] over posterior samples of up to `num_batches` image batches (sums, so that
    ranks can all-reduce them); 1/std of the latents is the LDM scale factor."""
    p = next(net.parameters())
    stats = torch.zeros(3, dtype=torch.float64, device=p.device)
    for i, x in enumerate(images):
        if num_batches is not None and i >= num_batches:
            break
        posterior = net.encode(x.to(p.device, p.dtype))
        z = (posterior.sample(generator) if sample else posterior.mode()).double()
        stats += torch.stack([z.sum(), z.pow(2).sum(), z.new_tensor(float(z.numel()))])
    return stats


def scale_factor_from_moments(stats: Tensor) -> float:
    if stats[2] < 2:
        raise ValueError("no latents to compute the scale factor from (empty data loader?)")
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean**2).clamp_min(1e-12)
    return float(1.0 / var.sqrt())


def save_pretrained(net: AutoencoderKLNet | PixelSpace, directory: str | Path, scale_factor: float) -> Path:
    """Write `model.safetensors` and `config.json` (architecture + latent scale factor)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(net, PixelSpace):  # no weights, and pixels are not rescaled: the config says everything
        config = {**net.config, "scale_factor": 1.0}
    else:
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()},
                  str(directory / "model.safetensors"))
        config = {"type": "AutoencoderKL", **net.config, "scale_factor": float(scale_factor)}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_pretrained(path: str | Path, *, trust: bool = False,
                    ema: bool = True) -> tuple[AutoencoderKLNet | PixelSpace, float]:
    """(net in eval mode, scale_factor) from an exported folder or an AutoencoderKL Lightning checkpoint
    (its EMA weights when it has them and `ema`)."""
    from ldm.checkpoint import CheckpointError, load_file, load_weights_into

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"autoencoder weights {path} do not exist (train one with "
                                "`python train.py experiment=fmnist_autoencoder`, or pass the export folder)")
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} has no config.json (expected an exported autoencoder folder)")
        config = json.loads(cfg_file.read_text())
        net = first_stage_from_config(config)
        if not isinstance(net, PixelSpace):
            load_weights_into(net, load_file(path / "model.safetensors"), source=str(path))
        return net.eval(), float(config.get("scale_factor", 1.0))
    ckpt = load_file(path, trust=trust)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, Mapping) else {}
    if "ddconfig" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an AutoencoderKL checkpoint (no ddconfig in hyper_parameters)")
    net = AutoencoderKLNet(hp["ddconfig"], hp["embed_dim"])
    sd = ckpt["state_dict"]
    prefix = "ema.module." if ema and any(k.startswith("ema.module.") for k in sd) else "net."
    weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    load_weights_into(net, weights, source=str(path))
    return net.eval(), float(sd.get("scale_factor", torch.tensor(1.0)))
