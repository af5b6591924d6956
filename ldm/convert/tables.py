"""Key maps between our layout (= the original CompVis / Stable Diffusion names) and diffusers, as data.

A map is a list of (ours, theirs) module-path prefixes, generated from the architecture (levels, blocks per
level, which levels attend); `rename` applies it in either direction by longest-prefix match and refuses keys
it has no counterpart for. The sub-tables below say how one block's parameters are named on each side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

# (ours, diffusers) inside one U-Net ResBlock / ResnetBlock2D
UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
               ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
UNET_TOP = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
            ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
            ("label_emb", "class_embedding")]
# inside the autoencoder's ResnetBlock and its single-head attention
VAE_RESNET = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
              ("nin_shortcut", "conv_shortcut")]
VAE_ATTN = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
# diffusers < 0.14 named the autoencoder's attention differently; read-only aliases
VAE_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# OpenCLIP text tower (SD 2.x `cond_stage_model.model.*`) ↔ transformers CLIPTextModel; in_proj is split below
OPENCLIP_TOP = [("token_embedding", "text_model.embeddings.token_embedding"),
                ("ln_final", "text_model.final_layer_norm")]
OPENCLIP_LAYER = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                  ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
OPENCLIP_POSITIONS = ("positional_embedding", "text_model.embeddings.position_embedding.weight")
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")  # not part of CLIPTextModel's hidden states

Pairs = list[tuple[str, str]]


def _nest(ours: str, theirs: str, table: Iterable[tuple[str, str]]) -> Pairs:
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in table]


def unet_pairs(num_levels: int, num_res_blocks: int, attn_levels: Sequence[bool]) -> Pairs:
    """Prefix pairs of a UNetModel with `num_levels` levels; attn_levels[i]: level i has transformers."""
    n, pairs = num_res_blocks, list(UNET_TOP)
    for i in range(num_levels):
        for j in range(n):
            ours, theirs = f"input_blocks.{1 + i * (n + 1) + j}", f"down_blocks.{i}"
            pairs += _nest(f"{ours}.0", f"{theirs}.resnets.{j}", UNET_RESNET)
            pairs.append((f"{ours}.1", f"{theirs}.attentions.{j}"))
        if i < num_levels - 1:
            pairs.append((f"input_blocks.{(i + 1) * (n + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
    pairs += _nest("middle_block.0", "mid_block.resnets.0", UNET_RESNET)
    pairs += [("middle_block.1", "mid_block.attentions.0")]
    pairs += _nest("middle_block.2", "mid_block.resnets.1", UNET_RESNET)
    for b in range(num_levels):  # diffusers' up block b is our level num_levels - 1 - b
        has_attn = attn_levels[num_levels - 1 - b]
        for j in range(n + 1):
            ours = f"output_blocks.{b * (n + 1) + j}"
            pairs += _nest(f"{ours}.0", f"up_blocks.{b}.resnets.{j}", UNET_RESNET)
            pairs.append((f"{ours}.1", f"up_blocks.{b}.attentions.{j}"))
        if b < num_levels - 1:
            pairs.append((f"output_blocks.{b * (n + 1) + n}.{2 if has_attn else 1}.conv",
                          f"up_blocks.{b}.upsamplers.0.conv"))
    return pairs


def vae_pairs(num_levels: int, num_res_blocks: int) -> Pairs:
    """Prefix pairs of AutoencoderKLNet (no attention outside the middle block, as SD's KL-f8)."""
    pairs: Pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in"), (f"{side}.norm_out", f"{side}.conv_norm_out"),
                  (f"{side}.conv_out", f"{side}.conv_out")]
        pairs += _nest(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET)
        pairs += _nest(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTN)
        pairs += _nest(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET)
    for i in range(num_levels):
        for j in range(num_res_blocks):
            pairs += _nest(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < num_levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    for b in range(num_levels):  # diffusers' decoder up block b is our decoder.up.(num_levels - 1 - b)
        level = num_levels - 1 - b
        for j in range(num_res_blocks + 1):
            pairs += _nest(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", VAE_RESNET)
        if level:
            pairs.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv"))
    return pairs


def rename(sd: Mapping[str, Tensor], pairs: Pairs, *, to: str, what: str = "state dict") -> dict[str, Tensor]:
    """Rename every key by its longest matching module prefix: to="theirs" (ours → diffusers) or "ours"."""
    if to not in ("ours", "theirs"):
        raise ValueError(f"to must be 'ours' or 'theirs', got {to!r}")
    table = {t: o for o, t in pairs} if to == "ours" else dict(pairs)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                out[".".join([table[head], *parts[cut:]])] = value
                break
        else:
            raise KeyError(f"{what}: no counterpart for key {key!r} (an architecture this converter does not map)")
    return out


def vae_attention_shapes(sd: Mapping[str, Tensor], *, to: str) -> dict[str, Tensor]:
    """Our autoencoder attention projects with 1×1 convs (C, C, 1, 1), diffusers' with Linear (C, C)."""
    out = {}
    for k, v in sd.items():
        if ".mid.attn_1." in k or ".mid_block.attentions." in k:
            if k.endswith("weight") and "norm" not in k:
                v = v[:, :, None, None] if to == "ours" and v.ndim == 2 else v
                v = v[:, :, 0, 0] if to == "theirs" and v.ndim == 4 else v
        out[k] = v
    return out


def legacy_vae_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' old autoencoder attention names (query/key/value/proj_attn) → the current ones."""
    pattern = re.compile(r"(mid_block\.attentions\.0)\.(" + "|".join(VAE_ATTN_LEGACY) + r")\.")
    return {pattern.sub(lambda m: f"{m.group(1)}.{VAE_ATTN_LEGACY[m.group(2)]}.", k): v for k, v in sd.items()}


def unet_state_dict_from_diffusers(sd: Mapping[str, Tensor], num_res_blocks: int) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict in our keys, the architecture read off the keys."""
    downs = {int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    levels = max(downs) + 1 if downs else 1
    attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in range(levels)]
    return rename(sd, unet_pairs(levels, num_res_blocks, attn), to="ours", what="diffusers U-Net")


def openclip_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text-tower keys (prefix removed) → transformers CLIPTextModel keys (in_proj split in q, k, v)."""
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    pairs = list(OPENCLIP_TOP)
    for i in layers:
        pairs += _nest(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", OPENCLIP_LAYER)
    out, rest = {}, {}
    for k, v in sd.items():
        if k == OPENCLIP_POSITIONS[0]:
            out[OPENCLIP_POSITIONS[1]] = v
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0), strict=True):
                out[f"text_model.encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}"] = part.clone()
        elif k.split(".")[0] not in OPENCLIP_UNUSED:
            rest[k] = v
    out.update(rename(rest, pairs, to="theirs", what="OpenCLIP text encoder"))
    return out


def hf_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `openclip_to_hf` (CLIPTextModel keys → OpenCLIP text-tower keys)."""
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    pairs = list(OPENCLIP_TOP)
    for i in layers:
        pairs += _nest(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", OPENCLIP_LAYER)
    out, rest = {}, {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k == OPENCLIP_POSITIONS[1]:
            out[OPENCLIP_POSITIONS[0]] = v
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        elif k != "text_model.embeddings.position_ids":
            rest[k] = v
    for (i, kind), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    out.update(rename(rest, pairs, to="ours", what="CLIP text encoder"))
    return out

