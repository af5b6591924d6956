"""SDWeights ↔ `LatentDiffusion`, and `convert` between the formats (SD single file, diffusers folder, ours)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.convert import configs
from ldm.convert.diffusers_folder import is_diffusers, load_tokenizer, read_diffusers, write_diffusers
from ldm.convert.text_encoder import SDTextEncoder, build_clip_text_model
from ldm.convert.weights import SDWeights, canonical_text, read_original, write_original

log = logging.getLogger(__name__)

FORMATS = ("sd", "diffusers", "ldm")
# Inference defaults for a converted model (fine-tuning configs override them).
INFERENCE = {"ema_decay": None, "cond_drop_prob": 0.1, "val_sampler": "ddim"}


def detect_format(path: str | Path, trust: bool = False) -> str:
    """'diffusers' (a folder with unet/config.json), 'ldm' (our export folder / Lightning .ckpt) or 'sd'."""
    path = Path(path)
    if is_diffusers(path):
        return "diffusers"
    if path.is_dir():
        return "ldm"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return "sd" if any(k.startswith("model.diffusion_model.") for k in f.keys()) else "ldm"
    from ldm.checkpoint import load_file

    obj = load_file(path, trust=trust)  # weights_only unless trusted; memory-mapped for zip checkpoints
    return "ldm" if isinstance(obj, Mapping) and "hyper_parameters" in obj else "sd"


def read_weights(path: str | Path, *, model_type: str | None = None, prediction_type: str | None = None,
                 use_ema: bool = False, num_heads: int | None = None, tokenizer: str | None = None,
                 tokenizer_subfolder: str | None = None, trust: bool = False) -> SDWeights:
    fmt = detect_format(path)
    if fmt == "diffusers":
        w = read_diffusers(path, prediction_type=prediction_type, trust=trust, model_type=model_type)
        if tokenizer:
            w.tokenizer, w.tokenizer_subfolder = tokenizer, tokenizer_subfolder
        return w
    if fmt == "sd":
        return read_original(path, model_type=model_type, prediction_type=prediction_type, use_ema=use_ema,
                             num_heads=num_heads, tokenizer=tokenizer, tokenizer_subfolder=tokenizer_subfolder,
                             trust=trust)
    from ldm.models.latent_diffusion import LatentDiffusion

    return weights_of(LatentDiffusion.load(path, trust=trust), use_ema=True)


def load_latent_diffusion(path: str | Path, *, model_type: str | None = None, prediction_type: str | None = None,
                          use_ema: bool = False, num_heads: int | None = None, tokenizer: str | None = None,
                          tokenizer_subfolder: str | None = None, trust: bool = False, unet: Mapping | None = None,
                          **overrides):
    """A LatentDiffusion from an SD single file or a diffusers folder (the model type detected unless given).

    unet: options merged into the detected U-Net config (e.g. {use_checkpoint: true}); overrides: LatentDiffusion
    arguments (lr, ema_decay, val_prompts, ...; inference defaults: no EMA copy). use_ema: the file's EMA weights.
    """
    from ldm.models.latent_diffusion import LatentDiffusion

    w = read_weights(path, model_type=model_type, prediction_type=prediction_type, use_ema=use_ema,
                     num_heads=num_heads, tokenizer=tokenizer, tokenizer_subfolder=tokenizer_subfolder, trust=trust)
    extra = w.unet_config["in_channels"] - w.vae_config["embed_dim"]
    if extra and extra != 1 + w.vae_config["embed_dim"]:
        raise ValueError(f"{path}: a {w.unet_config['in_channels']}-channel U-Net input over "
                         f"{w.vae_config['embed_dim']}-channel latents is no layout we know (SD inpainting: 4 + 1 + 4)")
    if extra:  # SD inpainting: cat([z_t, mask, latent of the masked image]), our `concat` key
        overrides = {"concat_channels": extra, "concat_source": "inpaint", **overrides}
    if w.text is None:
        raise ValueError(f"{path} holds no text encoder: LatentDiffusion needs one")
    unet_cfg = {**w.unet_config, **dict(unet or {})}
    fmt = detect_format(path)
    if fmt == "diffusers":
        from ldm.nn.text_encoder import FrozenTextEncoder

        text_encoder = FrozenTextEncoder(name_or_path=str(Path(path).resolve()), subfolder="text_encoder",
                                         tokenizer_subfolder="tokenizer", layer="last", pad_to_max_length=True,
                                         mask_padding=False, max_length=77, lazy=True)
    else:
        text_encoder = SDTextEncoder(str(Path(path).resolve()), text=w.text_kind, tokenizer=w.tokenizer,
                                     tokenizer_subfolder=w.tokenizer_subfolder, num_heads=num_heads,
                                     layer=w.text_layer, trust=trust)
    if isinstance(text_encoder, SDTextEncoder):  # built from the weights already read, not from the file again
        text_encoder.attach(build_clip_text_model(w.text_config, w.text),
                            load_tokenizer(w.tokenizer, w.tokenizer_subfolder))
    args = {**INFERENCE, "prediction_type": w.prediction_type, "scale_factor": w.scale_factor, **overrides}
    model = LatentDiffusion(unet=unet_cfg, first_stage={**w.vae_config, "scale_factor": w.scale_factor},
                            text_encoder=text_encoder, schedule=w.schedule, **args)
    _load(model.unet, w.unet, f"{path} (U-Net)")
    _load(model.first_stage, w.vae, f"{path} (autoencoder)")
    if model.ema is not None:
        model.ema.module.load_state_dict(model.unet.state_dict())
    log.info("loaded %s as Stable Diffusion %s (%s-prediction)", path, w.model_type, w.prediction_type)
    return model.eval()


def _load(module: torch.nn.Module, sd: dict, source: str) -> None:
    from ldm.checkpoint import load_weights_into

    load_weights_into(module, sd, strict=True, source=source)


def weights_of(model, use_ema: bool = True) -> SDWeights:
    """The SDWeights of one of our LatentDiffusion models (EMA U-Net by default) with a CLIP text encoder."""
    hp = model.hparams
    net = model.ema_unet if use_ema and model.ema_unet is not None else model.unet
    unet_cfg = dict(hp.unet or {})
    if not unet_cfg:
        raise ValueError("the model's U-Net has no config: it cannot be described to diffusers")
    enc = model.text_encoder
    if enc is None:
        raise ValueError("Stable Diffusion layouts need a text encoder; this model is unconditional")
    enc.load()
    if type(enc.model).__name__ != "CLIPTextModel":
        raise ValueError(f"Stable Diffusion layouts need a CLIP text encoder, not {type(enc.model).__name__}")
    cfg = enc.model.config
    kind = "openclip" if cfg.hidden_act == "gelu" else "clip"
    text = canonical_text(enc.model.state_dict())
    text_config = configs.clip_config_from_weights(text, kind, cfg.num_attention_heads)
    text_config["hidden_act"] = cfg.hidden_act
    schedule = dict(hp.schedule or configs.SD_SCHEDULE)
    schedule.pop("_target_", None)
    pred = hp.prediction_type
    model_type = configs.model_type_of(kind, unet_cfg["in_channels"], pred)
    w = SDWeights(model_type=model_type, unet_config=unet_cfg, unet=dict(net.state_dict()),
                  vae_config=dict(model.first_stage.config), vae=dict(model.first_stage.state_dict()),
                  text_kind=kind, text_config=text_config,
                  text=text,
                  text_layer=enc.layer, scale_factor=float(model.scale_factor), schedule=schedule,
                  prediction_type=pred, source="<LatentDiffusion>", tokenizer_object=enc.tokenizer)
    return w


def convert(src: str | Path, dst: str | Path, to: str, **options) -> Path:
    """src (SD file, diffusers folder, our export / .ckpt) → dst as `to` ('sd' | 'diffusers' | 'ldm')."""
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}, got {to!r}")
    if to == "ldm":
        return export_ldm(load_latent_diffusion(src, **options), dst)
    w = read_weights(src, **options)
    if to == "sd":
        return write_original(w, dst)
    return write_diffusers(w, dst, tokenizer=w.tokenizer_object)


def export_ldm(model, directory: str | Path) -> Path:
    """Our export folder, with the frozen text encoder and tokenizer saved next to it (transformers format)."""
    directory = Path(directory).resolve()
    enc = model.text_encoder
    enc.model.save_pretrained(directory / "text_encoder", safe_serialization=True)
    enc.tokenizer.save_pretrained(directory / "tokenizer")
    from ldm.nn.text_encoder import FrozenTextEncoder

    saved = FrozenTextEncoder(name_or_path=str(directory), subfolder="text_encoder", tokenizer_subfolder="tokenizer",
                              layer=enc.layer, max_length=enc.max_length, pad_to_max_length=enc.pad_to_max_length,
                              mask_padding=enc.mask_padding, lazy=True)
    model.hparams["text_encoder"] = {"_target_": "ldm.nn.text_encoder.FrozenTextEncoder", **saved.config}
    return model.export(directory)
