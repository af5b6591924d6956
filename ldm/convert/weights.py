"""`SDWeights`: a Stable Diffusion model as plain configs + state dicts in our keys, and the single-file layout.

Our U-Net and autoencoder already use the original CompVis names, so the original file is our state dicts under
`model.diffusion_model.`, `first_stage_model.` and `cond_stage_model.` (transformers CLIP keys for SD 1.x,
OpenCLIP keys for SD 2.x). EMA weights (`model_ema.<key without dots>`) are read on request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.convert import configs, tables

log = logging.getLogger(__name__)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP, EMA = "cond_stage_model.transformer.", "cond_stage_model.model.", "model_ema."


@dataclass
class SDWeights:
    """Everything a Stable Diffusion model is, independent of any file layout (our keys, CLIP as transformers)."""

    model_type: str
    unet_config: dict
    unet: dict[str, Tensor]
    vae_config: dict
    vae: dict[str, Tensor]
    text_kind: str = "clip"                       # clip (SD 1.x) | openclip (SD 2.x)
    text_config: dict | None = None               # transformers CLIPTextConfig kwargs
    text: dict[str, Tensor] | None = None         # CLIPTextModel keys
    text_layer: str = "last"                      # last | penultimate (SD 2.x original: all layers, penultimate)
    tokenizer: str | None = None                  # hub name or folder
    tokenizer_subfolder: str | None = None
    scale_factor: float = configs.SD_SCALE_FACTOR
    schedule: dict = field(default_factory=lambda: dict(configs.SD_SCHEDULE))
    prediction_type: str = "eps"
    source: str = ""
    tokenizer_object: Any = None                  # a loaded tokenizer, when there is one (instead of `tokenizer`)

    def text_with_last_layer(self) -> tuple[dict, dict]:
        """(config, weights) of a text model whose *last* layer gives the context (diffusers' convention):
        the unused final layer of a penultimate-layer encoder is dropped."""
        if self.text_layer == "last":
            return dict(self.text_config), dict(self.text)
        if self.text_kind != "openclip":
            raise ValueError("a CLIP (SD 1.x) text encoder on its penultimate layer has no diffusers counterpart")
        n = self.text_config["num_hidden_layers"] - 1
        drop = f"text_model.encoder.layers.{n}."
        return ({**self.text_config, "num_hidden_layers": n},
                {k: v for k, v in self.text.items() if not k.startswith(drop)})


def _state_dict(obj, path) -> tuple[dict[str, Tensor], int | None]:
    step = obj.get("global_step") if isinstance(obj, Mapping) else None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, (int(step) if isinstance(step, int) else None)


def is_original(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(UNET) for k in sd)


def _strip(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def canonical_text(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel keys as files store them (`text_model.` prefix; transformers 5 drops it in memory)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def text_from_original(sd: Mapping[str, Tensor]) -> tuple[str | None, dict[str, Tensor] | None]:
    """(family, CLIPTextModel keys) of an original checkpoint's cond_stage_model; (None, None) without one."""
    if clip := _strip(sd, CLIP):
        return "clip", canonical_text(clip)
    if openclip := _strip(sd, OPENCLIP):
        return "openclip", tables.openclip_to_hf(openclip)
    return None, None


def read_original(path: str | Path, *, model_type: str | None = None, prediction_type: str | None = None,
                  use_ema: bool = False, num_heads: int | None = None, tokenizer: str | None = None,
                  tokenizer_subfolder: str | None = None, trust: bool = False) -> SDWeights:
    """An original SD 1.x / 2.x `.ckpt` or `.safetensors` file; the model type detected unless given."""
    from ldm.checkpoint import load_file

    sd, step = _state_dict(load_file(path, trust=trust), path)
    if not is_original(sd):
        raise ValueError(f"{path} is not an original Stable Diffusion checkpoint (no {UNET}* keys)")
    unet = _strip(sd, UNET)
    if use_ema:
        ema = {k: sd.get(EMA + ("diffusion_model." + k).replace(".", "")) for k in unet}
        if missing := [k for k, v in ema.items() if v is None]:
            raise ValueError(f"{path} has no EMA weights for {len(missing)} U-Net keys (e.g. {missing[0]}): "
                             "it is probably pruned; load it without use_ema")
        unet = ema
    kind, text = text_from_original(sd)
    context = int(unet["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    kind = kind or ("openclip" if context == 1024 else "clip")
    if model_type is None:
        pred = prediction_type
        if pred is None and kind == "openclip" and step == configs.SD2_BASE_GLOBAL_STEP:
            pred = "eps"
        model_type = configs.model_type_of(kind, int(unet["input_blocks.0.0.weight"].shape[1]), pred)
        log.info("%s: detected Stable Diffusion %s (override with model_type=)", path, model_type)
    if model_type not in configs.MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(configs.MODEL_TYPES)}")
    preset = configs.MODEL_TYPES[model_type]
    vae = {k: v for k, v in _strip(sd, VAE).items() if not k.startswith("loss.")}
    return SDWeights(
        model_type=model_type, unet_config=configs.unet_config_from_weights(unet, model_type), unet=unet,
        vae_config=configs.vae_config_from_weights(vae), vae=vae, text_kind=kind,
        text_config=configs.clip_config_from_weights(text, kind, num_heads) if text else None, text=text,
        text_layer="penultimate" if kind == "openclip" else "last",
        tokenizer=tokenizer or preset["tokenizer"],
        tokenizer_subfolder=tokenizer_subfolder if tokenizer else preset["tokenizer_subfolder"],
        prediction_type=prediction_type or preset["prediction_type"], source=str(path))


def _dummy_last_layer(text: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """A zero final layer for an OpenCLIP tower: SD 2.x reads the penultimate layer, so it is never used."""
    src = f"text_model.encoder.layers.{n - 1}."
    return {f"text_model.encoder.layers.{n}." + k[len(src):]: (torch.ones_like(v) if "layer_norm" in k and
            k.endswith("weight") else torch.zeros_like(v)) for k, v in text.items() if k.startswith(src)}


def original_state_dict(w: SDWeights) -> dict[str, Tensor]:
    """The single-file layout of `w` (what CompVis / Stability's code and most UIs load)."""
    sd = {UNET + k: v for k, v in w.unet.items()}
    sd.update({VAE + k: v for k, v in w.vae.items()})
    if w.text is not None:
        if w.text_kind == "clip":
            if w.text_layer != "last":
                raise ValueError("SD 1.x checkpoints use CLIP's last layer; this text encoder uses another")
            sd.update({CLIP + k: v for k, v in w.text.items()})
        else:
            text = dict(w.text)
            if w.text_layer == "last":  # e.g. from diffusers, whose copy has the final layer removed
                text.update(_dummy_last_layer(text, w.text_config["num_hidden_layers"]))
            sd.update({OPENCLIP + k: v for k, v in tables.hf_to_openclip(text).items()})
    return sd


def write_original(w: SDWeights, path: str | Path) -> Path:
    """`.safetensors` (flat) or any other suffix as a torch file {"state_dict": ...} (loads with weights_only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in original_state_dict(w).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt", "ldm_model_type": w.model_type,
                                           "prediction_type": w.prediction_type})
    else:
        torch.save({"state_dict": sd}, path)
    return path


def with_text(w: SDWeights, kind: str, config: dict, text: dict, layer: str) -> SDWeights:
    return replace(w, text_kind=kind, text_config=config, text=text, text_layer=layer)
