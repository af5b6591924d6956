"""The latent-diffusion U-Net (LDM / Stable Diffusion v1-v2 architecture).

Module and parameter names follow the CompVis layout (time_embed, label_emb, input_blocks.N.M, middle_block,
output_blocks.N.M, out) so Stable Diffusion `model.diffusion_model.*` weights load by key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.attention import SpatialTransformer, expand_mask
from ldm.nn.embeddings import as_batch_timesteps, label_embedding, timestep_embedding
from ldm.nn.layers import Upsample, group_norm, zero_module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding (or scale-shift of the second norm), dropout, conv."""

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False, norm_groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(group_norm(channels, norm_groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels, norm_groups), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm1, _, conv1 = self.in_layers
        norm2, _, dropout, conv2 = self.out_layers
        h = conv1(F.silu(norm1(x)))
        e = self.emb_layers[1](F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, norm2(h), 1 + scale)
        else:
            h = norm2(h + e)
        h = F.silu(h)
        if dropout.p:
            h = dropout(h)
        return self.skip_connection(x) + conv2(h)


class Downsample(nn.Module):
    """Stride-2 3×3 conv (`op`, as LDM)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class EmbedSequential(nn.Sequential):
    """A U-Net stage: passes the time embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


def _heads(ch: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """(heads, dim_head) for a width `ch`, from either a head count or a head width."""
    if num_head_channels != -1:
        if ch % num_head_channels:
            raise ValueError(f"num_head_channels={num_head_channels} does not divide the width {ch}")
        return ch // num_head_channels, num_head_channels
    if ch % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the width {ch}")
    return num_heads, ch // num_heads


def masked_mean(context: Tensor, mask: Tensor | None) -> Tensor:
    """(B, L, D) context, (B, L) bool mask (True = keep) or None → (B, D) mean over the kept tokens."""
    if mask is None:
        return context.mean(1)
    w = mask.to(context.dtype)[..., None]
    return (context * w).sum(1) / w.sum(1).clamp_min(1.0)


class UNetModel(nn.Module):
    """Timestep- (and optionally class-) conditioned U-Net with cross-attention to a context sequence.

    attention_resolutions are downsample factors (SD: [4, 2, 1]); give num_heads or num_head_channels.
    forward(x (B, in, H, W), timesteps (B,) int/float, context (B, L, context_dim), context_mask (B, L) bool
    (True = keep), y (B,) labels or (B, adm_in_channels)) -> (B, out, H, W).

    pooled_context=True also adds the context's masked mean, through an MLP (`context_emb`), to the time
    embedding, as SDXL adds its pooled text embedding: every ResBlock then sees the caption, not only the
    cross-attention layers (for MiniLM the masked mean is the sentence embedding). It follows the context given,
    so caption dropout and both branches of classifier-free guidance need nothing else.

    channels_last (default): conv weights and feature maps are kept in NHWC memory order inside the network
    (faster convolutions and GroupNorm on CPU and GPU, and the transformer's token matrix is a free view); the
    input may have any layout and the output is returned contiguous (NCHW), so callers never see the difference.
    """

    def __init__(self, in_channels: int, out_channels: int | None, model_channels: int,
                 channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int],
                 num_heads: int = -1, num_head_channels: int = -1, transformer_depth: int = 1,
                 context_dim: int | None = None, use_linear_in_transformer: bool = False, dropout: float = 0.0,
                 num_classes: int | str | None = None, adm_in_channels: int | None = None,
                 use_checkpoint: bool = False, use_scale_shift_norm: bool = False, conv_resample: bool = True,
                 norm_num_groups: int = 32, image_size: int | None = None, channels_last: bool = True,
                 pooled_context: bool = False):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (the other stays -1)")
        if not conv_resample:
            raise ValueError("conv_resample=False is not supported: LDM/SD resample with convolutions")
        if num_res_blocks < 1 or not channel_mult:
            raise ValueError(f"need num_res_blocks >= 1 and a channel_mult, got {num_res_blocks}, {channel_mult}")
        if transformer_depth < 1:
            raise ValueError(f"transformer_depth must be >= 1, got {transformer_depth}")
        factors = [2**i for i in range(len(channel_mult))]
        if unknown := [r for r in attention_resolutions if r not in factors]:
            raise ValueError(f"attention_resolutions {list(attention_resolutions)}: {unknown} match no level "
                             f"(downsample factors of this U-Net: {factors})")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.context_dim, self.num_classes, self.image_size = context_dim, num_classes, image_size
        self.adm_in_channels, self.num_levels = adm_in_channels, len(channel_mult)
        self.channels_last = channels_last
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = label_embedding(num_classes, emb_dim, adm_in_channels)
        if pooled_context and not context_dim:
            raise ValueError("pooled_context=True needs a context (context_dim)")
        self.pooled_context = bool(pooled_context)
        self.context_emb = (nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                            if pooled_context else None)

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, use_checkpoint, norm_num_groups)

        def attn(ch: int) -> SpatialTransformer:
            heads, dim_head = _heads(ch, num_heads, num_head_channels)
            return SpatialTransformer(ch, heads, dim_head, transformer_depth, dropout, context_dim,
                                      use_linear_in_transformer, use_checkpoint, norm_num_groups)

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(group_norm(ch, norm_num_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))
        if channels_last:  # 4-D conv weights to NHWC strides; load_state_dict/.to() keep these strides
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, timesteps: Tensor | float, context: Tensor | None = None,
                context_mask: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        self._check_input(x)
        mask = self._check_context(b, context, context_mask)
        t = as_batch_timesteps(timesteps, b, x.device)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(self._check_y(b, y, emb.dtype))
        elif y is not None:
            raise ValueError("y given but this U-Net has no class embedding (num_classes=None)")
        if self.context_emb is not None:
            emb = emb + self.context_emb(masked_mean(context, context_mask).to(emb.dtype))
        h, skips = (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), []
        for block in self.input_blocks:
            h = block(h, emb, context, mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, mask)
        norm, _, conv = self.out
        return conv(F.silu(norm(h))).contiguous()

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, in_channels={self.in_channels}, H, W), got {tuple(x.shape)}")
        step = 2 ** (self.num_levels - 1)
        if x.shape[2] % step or x.shape[3] % step:
            raise ValueError(f"H and W must be divisible by {step} ({self.num_levels} levels), got "
                             f"{tuple(x.shape[2:])}")

    def _check_y(self, b: int, y: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Validate the class labels / conditioning vector y for the label embedding."""
        if y is None:
            raise ValueError(f"this U-Net is class-conditional (num_classes={self.num_classes!r}): pass y")
        if y.shape[0] != b:
            raise ValueError(f"y has batch {y.shape[0]}, x has {b}")
        if isinstance(self.num_classes, int):
            if y.shape != (b,) or y.is_floating_point() or y.is_complex():
                raise ValueError(f"y must be integer class labels of shape ({b},), got {y.dtype} {tuple(y.shape)}")
            return y
        if self.num_classes == "continuous" and y.ndim == 1:
            y = y[:, None]
        width = 1 if self.num_classes == "continuous" else self.adm_in_channels
        if y.shape != (b, width):
            raise ValueError(f"y must have shape ({b}, {width}), got {tuple(y.shape)}")
        return y.to(dtype)

    def _check_context(self, b: int, context: Tensor | None, context_mask: Tensor | None) -> Tensor | None:
        """Validate the context and return the SDPA key-padding mask (B, 1, 1, L) or None."""
        if self.context_dim is None:
            if context is not None:
                raise ValueError("context given but this U-Net has no cross-attention (context_dim=None)")
            return None
        if context is None:
            raise ValueError(f"this U-Net cross-attends to a context (context_dim={self.context_dim}): pass "
                             "context (B, L, context_dim)")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
            raise ValueError(f"context must have shape ({b}, L, {self.context_dim}), got {tuple(context.shape)}")
        return expand_mask(context_mask, b, context.shape[1])
