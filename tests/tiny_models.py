"""Tiny model configs shared by the pipeline, editing, conditioning and metrics tests: random weights, 16 px
single-channel images, 8×8×4 latents, a 16-channel U-Net with cross-attention to MiniLM's 384-d context."""

from __future__ import annotations

from pathlib import Path

DDCONFIG = dict(in_channels=1, out_ch=1, resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1,
                attn_resolutions=[], mid_attn=False, dropout=0.0, z_channels=4, double_z=True, norm_groups=4)
UNET = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1], num_res_blocks=1,
            attention_resolutions=[1], num_head_channels=8, context_dim=384, norm_num_groups=8)


def tiny_autoencoder(directory: Path) -> Path:
    """An untrained DDCONFIG autoencoder exported to `directory` (scale factor 0.5)."""
    from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained

    return save_pretrained(AutoencoderKLNet(DDCONFIG, 4), directory, scale_factor=0.5)


def tiny_ldm(root: Path, **overrides):
    """A text-conditioned LatentDiffusion (UNET, 100-step linear schedule, no EMA unless asked) over a tiny
    autoencoder exported to `root/ae`; `overrides` replace its arguments."""
    from ldm.models.latent_diffusion import LatentDiffusion

    args = dict(unet=UNET, first_stage=str(tiny_autoencoder(root / "ae")), text_encoder={"max_length": 16},
                schedule={"name": "linear", "num_timesteps": 100}, ema_decay=None)
    return LatentDiffusion(**{**args, **overrides})
