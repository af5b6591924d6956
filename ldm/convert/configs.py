"""Architectures: Stable Diffusion model types, configs read off weight shapes, and diffusers' JSON configs.

Everything here is data in, data out (dicts of hyper-parameters); nothing is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

# What a model type fixes beyond what the weights' shapes say (heads are not visible in shapes; neither is ε vs v).
MODEL_TYPES: dict[str, dict] = {
    "v1": {"text": "clip", "prediction_type": "eps", "in_channels": 4, "heads": {"num_heads": 8},
           "image_size": 512, "tokenizer": "openai/clip-vit-large-patch14", "tokenizer_subfolder": None},
    "v1-inpaint": {"text": "clip", "prediction_type": "eps", "in_channels": 9, "heads": {"num_heads": 8},
                   "image_size": 512, "tokenizer": "openai/clip-vit-large-patch14", "tokenizer_subfolder": None},
    "v2-base": {"text": "openclip", "prediction_type": "eps", "in_channels": 4, "heads": {"num_head_channels": 64},
                "image_size": 512, "tokenizer": "stabilityai/stable-diffusion-2-1-base",
                "tokenizer_subfolder": "tokenizer"},
    "v2-v": {"text": "openclip", "prediction_type": "v", "in_channels": 4, "heads": {"num_head_channels": 64},
             "image_size": 768, "tokenizer": "stabilityai/stable-diffusion-2-1", "tokenizer_subfolder": "tokenizer"},
    "v2-inpaint": {"text": "openclip", "prediction_type": "eps", "in_channels": 9,
                   "heads": {"num_head_channels": 64}, "image_size": 512,
                   "tokenizer": "stabilityai/stable-diffusion-2-inpainting", "tokenizer_subfolder": "tokenizer"},
}
SD_SCALE_FACTOR = 0.18215
SD_SCHEDULE = {"name": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
CLIP_ACT = {"clip": "quick_gelu", "openclip": "gelu"}  # OpenAI CLIP-L/14 vs OpenCLIP ViT-H/14
SD2_BASE_GLOBAL_STEP = 875000  # the step SD 2.0-base's original checkpoint was saved at (512 px, ε-prediction)
PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_TO_DIFFUSERS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


def model_type_of(text: str, in_channels: int, prediction_type: str | None = None) -> str:
    """The model type name for a text-encoder family ('clip' | 'openclip'), U-Net input width and prediction."""
    if text == "clip":
        return "v1-inpaint" if in_channels == 9 else "v1"
    if in_channels == 9:
        return "v2-inpaint"
    return "v2-base" if prediction_type == "eps" else "v2-v"


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def unet_config_from_weights(sd: Mapping[str, Tensor], model_type: str) -> dict:
    """UNetModel kwargs from a U-Net state dict in our (= SD) keys; heads and image size from the model type."""
    if "label_emb.0.0.weight" in sd or "label_emb.weight" in sd:
        raise ValueError("this U-Net has a class/vector embedding (SD 2.x unCLIP / upscaler): not supported")
    mc, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
    ops = sorted(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    levels, blocks = len(ops) + 1, _count(sd, r"input_blocks\.(\d+)\.")
    n = (blocks - 1 - len(ops)) // levels
    first = [1 + i * (n + 1) for i in range(levels)]
    mult = [int(sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0]) // int(mc) for b in first]
    attn = [2**i for i, b in enumerate(first) if f"input_blocks.{b}.1.proj_in.weight" in sd]
    mid = "middle_block.1."
    return {"_target_": "ldm.nn.unet.UNetModel", "in_channels": int(in_ch),
            "out_channels": int(sd["out.2.weight"].shape[0]), "model_channels": int(mc), "channel_mult": mult,
            "num_res_blocks": n, "attention_resolutions": attn, "num_heads": -1, "num_head_channels": -1,
            **MODEL_TYPES[model_type]["heads"],
            "transformer_depth": _count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
            "context_dim": int(sd[mid + "transformer_blocks.0.attn2.to_k.weight"].shape[1]),
            "use_linear_in_transformer": sd[mid + "proj_in.weight"].ndim == 2,
            "image_size": MODEL_TYPES[model_type]["image_size"] // 8}


def vae_config_from_weights(sd: Mapping[str, Tensor]) -> dict:
    """AutoencoderKLNet {ddconfig, embed_dim} from its state dict (SD `first_stage_model.*` without the prefix)."""
    if any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in sd):
        raise ValueError("autoencoders with attention outside the middle block are not supported (SD's KL-f8 has none)")
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    levels, n = _count(sd, r"encoder\.down\.(\d+)\."), _count(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    mult = [int(sd[f"encoder.down.{i}.block.{n - 1}.conv2.weight"].shape[0]) // int(ch) for i in range(levels)]
    ddconfig = {"in_channels": int(in_ch), "out_ch": int(sd["decoder.conv_out.weight"].shape[0]), "resolution": 256,
                "ch": int(ch), "ch_mult": mult, "num_res_blocks": n, "attn_resolutions": [],
                "mid_attn": "encoder.mid.attn_1.q.weight" in sd, "dropout": 0.0,
                "z_channels": int(sd["encoder.conv_out.weight"].shape[0]) // 2, "double_z": True, "norm_groups": 32}
    return {"ddconfig": ddconfig, "embed_dim": int(sd["quant_conv.weight"].shape[0]) // 2}


def clip_config_from_weights(sd: Mapping[str, Tensor], text: str, num_heads: int | None = None) -> dict:
    """transformers CLIPTextConfig kwargs from CLIPTextModel keys (64-wide heads unless `num_heads`)."""
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    return {"vocab_size": int(vocab), "hidden_size": int(hidden),
            "intermediate_size": int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": _count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
            "num_attention_heads": int(num_heads or hidden // 64),
            "max_position_embeddings": int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
            "hidden_act": CLIP_ACT[text], "layer_norm_eps": 1e-5, "projection_dim": int(hidden),
            # CLIP's start/end tokens are the last two of its vocabulary; they only pick the pooled output (unused)
            "bos_token_id": int(vocab) - 2, "eos_token_id": int(vocab) - 1, "pad_token_id": 1}


# ---- diffusers JSON configs ------------------------------------------------------------------------------
_UNET_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "act_fn": "silu",
               "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "only_cross_attention": False,
               "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
               "num_class_embeds": None, "time_cond_proj_dim": None, "mid_block_type": "UNetMidBlock2DCrossAttn"}


def unet_config_to_diffusers(cfg: Mapping) -> dict:
    chans = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    attn = [2**i in cfg["attention_resolutions"] for i in range(len(chans))]
    if cfg.get("num_classes") is not None:
        raise ValueError("class-conditional U-Nets have no Stable Diffusion / diffusers counterpart here")
    hc = cfg.get("num_head_channels", -1)
    heads = [c // hc for c in chans] if hc not in (-1, None) else cfg["num_heads"]
    return {"_class_name": "UNet2DConditionModel", **_UNET_FIXED, "in_channels": cfg["in_channels"],
            "out_channels": cfg.get("out_channels") or cfg["in_channels"], "block_out_channels": chans,
            "layers_per_block": cfg["num_res_blocks"], "norm_num_groups": cfg.get("norm_num_groups", 32),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "cross_attention_dim": cfg["context_dim"], "attention_head_dim": heads,
            "transformer_layers_per_block": cfg.get("transformer_depth", 1),
            "use_linear_projection": bool(cfg.get("use_linear_in_transformer", False)),
            "upcast_attention": False, "sample_size": cfg.get("image_size") or 64}


def unet_config_from_diffusers(d: Mapping) -> dict:
    wrong = {k: d.get(k) for k, v in _UNET_FIXED.items() if k in d and d[k] != v and not
             (k == "mid_block_type" and d[k] is None)}
    if wrong:
        raise ValueError(f"diffusers U-Net options this converter does not map: {wrong}")
    chans, types = list(d["block_out_channels"]), list(d["down_block_types"])
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in types):
        raise ValueError(f"unsupported diffusers down blocks {types}")
    for key in ("layers_per_block", "transformer_layers_per_block"):
        if isinstance(d.get(key), (list, tuple)) and len(set(d[key])) > 1:
            raise ValueError(f"per-level {key}={d[key]} is not supported (one value for all levels)")
    per = lambda key, default=None: (lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * len(chans))(
        d.get(key, default) if d.get(key, default) is not None else default)
    heads = per("num_attention_heads") if d.get("num_attention_heads") else per("attention_head_dim", 8)
    attn = [t == "CrossAttnDownBlock2D" for t in types]
    used = [(c, h) for c, h, a in zip(chans, heads, attn, strict=True) if a] + [(chans[-1], heads[-1])]
    if len({h for _, h in used}) == 1:
        head_cfg = {"num_heads": int(used[0][1]), "num_head_channels": -1}
    elif len({c // h for c, h in used}) == 1:
        head_cfg = {"num_heads": -1, "num_head_channels": int(used[0][0] // used[0][1])}
    else:
        raise ValueError(f"attention heads {heads} over widths {chans}: neither a fixed count nor a fixed width")
    one = lambda v: int(v[0] if isinstance(v, (list, tuple)) else v)
    return {"_target_": "ldm.nn.unet.UNetModel", "in_channels": d["in_channels"], "out_channels": d["out_channels"],
            "model_channels": chans[0], "channel_mult": [c // chans[0] for c in chans],
            "num_res_blocks": one(d["layers_per_block"]),
            "attention_resolutions": [2**i for i, a in enumerate(attn) if a],
            **head_cfg, "transformer_depth": one(d.get("transformer_layers_per_block", 1)),
            "context_dim": one(d["cross_attention_dim"]),
            "use_linear_in_transformer": bool(d.get("use_linear_projection")),
            "norm_num_groups": d.get("norm_num_groups", 32), "image_size": d.get("sample_size")}


def vae_config_to_diffusers(cfg: Mapping, scale_factor: float) -> dict:
    dd = cfg["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ValueError("autoencoders with attention outside the middle block have no diffusers AutoencoderKL twin")
    if cfg["embed_dim"] != dd.get("z_channels", 4):
        raise ValueError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    levels = len(dd["ch_mult"])
    return {"_class_name": "AutoencoderKL", "in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"],
            "act_fn": "silu", "latent_channels": cfg["embed_dim"], "norm_num_groups": dd.get("norm_groups", 32),
            "sample_size": dd.get("resolution", 256), "scaling_factor": float(scale_factor),
            "mid_block_add_attention": bool(dd.get("mid_attn", True))}


def vae_config_from_diffusers(d: Mapping) -> tuple[dict, float]:
    chans = list(d["block_out_channels"])
    if any(t != "DownEncoderBlock2D" for t in d["down_block_types"]) or d.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported diffusers autoencoder blocks {d['down_block_types']} / act_fn {d.get('act_fn')}")
    ddconfig = {"in_channels": d["in_channels"], "out_ch": d["out_channels"], "resolution": d.get("sample_size", 256),
                "ch": chans[0], "ch_mult": [c // chans[0] for c in chans], "num_res_blocks": d["layers_per_block"],
                "attn_resolutions": [], "mid_attn": bool(d.get("mid_block_add_attention", True)), "dropout": 0.0,
                "z_channels": d["latent_channels"], "double_z": True, "norm_groups": d.get("norm_num_groups", 32)}
    return {"ddconfig": ddconfig, "embed_dim": d["latent_channels"]}, float(d.get("scaling_factor", SD_SCALE_FACTOR))


def scheduler_to_diffusers(schedule: Mapping, prediction_type: str) -> dict:
    """A DDIMScheduler config (any diffusers scheduler reads it) for our schedule + prediction type."""
    name = schedule.get("name", "scaled_linear")
    if name not in SCHEDULE_TO_DIFFUSERS:
        raise ValueError(f"schedule {name!r} has no diffusers beta_schedule")
    defaults = {"scaled_linear": (0.00085, 0.012), "linear": (1e-4, 2e-2), "cosine": (1e-4, 2e-2)}[name]
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": schedule.get("num_timesteps", 1000),
            "beta_schedule": SCHEDULE_TO_DIFFUSERS[name], "beta_start": schedule.get("beta_start") or defaults[0],
            "beta_end": schedule.get("beta_end") or defaults[1],
            "prediction_type": PREDICTION_TO_DIFFUSERS[prediction_type],
            "rescale_betas_zero_snr": bool(schedule.get("zero_terminal_snr", False)), "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def scheduler_from_diffusers(d: Mapping) -> tuple[dict, str]:
    """(our schedule config, prediction_type) from a diffusers scheduler_config.json."""
    names = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
    beta = d.get("beta_schedule", "linear")
    if beta not in names or d.get("trained_betas") is not None:
        raise ValueError(f"diffusers beta_schedule {beta!r} (or trained_betas) has no counterpart here")
    schedule = {"_target_": "ldm.diffusion.schedule.NoiseSchedule.from_config", "name": names[beta],
                "num_timesteps": int(d.get("num_train_timesteps", 1000)),
                "zero_terminal_snr": bool(d.get("rescale_betas_zero_snr", False))}
    if names[beta] != "cosine":
        schedule.update(beta_start=float(d.get("beta_start", 1e-4)), beta_end=float(d.get("beta_end", 0.02)))
    pred = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}.get(d.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(f"diffusers prediction_type {d.get('prediction_type')!r} has no counterpart here")
    return schedule, pred
