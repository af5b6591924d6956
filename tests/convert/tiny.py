"""Tiny random Stable Diffusion parts for the conversion tests: diffusers / transformers twins, a CLIP tokenizer
written from scratch (character-level BPE vocabulary, no download) and an OpenCLIP-layout text tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# v1: CLIP (quick_gelu), 8 heads, conv projections; v2: OpenCLIP (gelu), 64-wide heads, linear projections, v-pred
LAYOUTS = {
    "v1": {"text": dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=96,
                        hidden_act="quick_gelu"),
           "unet": dict(block_out_channels=(32, 64), attention_head_dim=8, use_linear_projection=False),
           "prediction_type": "epsilon"},
    "v2": {"text": dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=160,
                        hidden_act="gelu"),
           "unet": dict(block_out_channels=(64, 128), attention_head_dim=(1, 2), use_linear_projection=True),
           "prediction_type": "v_prediction"},
}


def byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-level BPE's printable stand-ins for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tokenizer(folder: Path) -> Path:
    """A CLIPTokenizer over single characters (every byte, word-final or not) plus the two special tokens."""
    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return folder


def randomize(module: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return module.eval()


def text_config(layout: str) -> dict:
    return dict(vocab_size=514, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=512,
                eos_token_id=513, pad_token_id=513, **LAYOUTS[layout]["text"])


def diffusers_parts(layout: str, seed: int = 0) -> dict:
    """Random tiny diffusers components of an SD pipeline in the given layout."""
    spec = LAYOUTS[layout]
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config(layout))), seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=spec["text"]["hidden_size"], **spec["unet"])
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.18215)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                        prediction_type=spec["prediction_type"])
    return {"unet": randomize(unet, seed + 1), "vae": randomize(vae, seed + 2), "text_encoder": text,
            "scheduler": scheduler}


def pipeline(parts: dict, tokenizer) -> diffusers.StableDiffusionPipeline:
    return diffusers.StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, unet=parts["unet"],
        scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class OpenCLIPText(nn.Module):
    """The OpenCLIP text tower as SD 2.x stores it (`cond_stage_model.model.*`), written here from its layout:
    nn.MultiheadAttention blocks (ln_1, attn, ln_2, mlp.c_fc / c_proj), causal mask, GELU; SD 2.x reads the
    penultimate block's output through ln_final."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, mlp: int, length: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(length, width))
        blocks = []
        for _ in range(layers):
            b = nn.Module()
            b.ln_1, b.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            b.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            b.mlp = nn.Sequential()
            b.mlp.add_module("c_fc", nn.Linear(width, mlp))
            b.mlp.add_module("gelu", nn.GELU())
            b.mlp.add_module("c_proj", nn.Linear(mlp, width))
            blocks.append(b)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(blocks)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        n = ids.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)
        for b in self.transformer.resblocks[:-1]:  # penultimate, as SD 2.x's FrozenOpenCLIPEmbedder
            h = b.ln_1(x)
            x = x + b.attn(h, h, h, need_weights=False, attn_mask=causal)[0]
            x = x + b.mlp(b.ln_2(x))
        return self.ln_final(x)
