"""diffusers `UNet2DConditionModel` state-dict keys -> our CompVis/SD layout (`UNetModel`).

Lets diffusers-format U-Net weights (e.g. a `unet/diffusion_pytorch_model.safetensors`) load into `UNetModel`
by key. Only the pieces our U-Net has are mapped (no SDXL add_embedding, no timestep_cond); anything else is
reported as an error rather than dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
        "class_embedding": "label_emb"}


def unet_state_dict_from_diffusers(sd: Mapping[str, Tensor], num_res_blocks: int) -> dict[str, Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict (layers_per_block = num_res_blocks) to our keys."""
    n = num_res_blocks
    # an up-block's upsampler sits after its attention when the block has one
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = _rename(key, n, up_has_attn)
        if new is None:
            raise KeyError(f"no UNetModel counterpart for diffusers key {key!r}")
        out[new] = value
    return out


def _rename(key: str, n: int, up_has_attn: set[int]) -> str | None:
    for old, new in _TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        side, block, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        index = 1 + block * (n + 1) + j if side == "down" else block * (n + 1) + j
        prefix = f"{'input' if side == 'down' else 'output'}_blocks.{index}"
        return f"{prefix}.0.{_resnet(rest)}" if kind == "resnets" else f"{prefix}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m.group(1)) + 1) * (n + 1)}.0.op.{m.group(2)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m.group(1))
        return f"output_blocks.{block * (n + 1) + n}.{2 if block in up_has_attn else 1}.conv.{m.group(2)}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, j, rest = m.groups()
        return f"middle_block.{2 * int(j)}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    return None


def _resnet(rest: str) -> str:
    name, _, param = rest.partition(".")
    return f"{_RESNET[name]}.{param}" if name in _RESNET else rest
