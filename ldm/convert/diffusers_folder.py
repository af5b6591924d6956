"""diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) ↔ SDWeights.

Written without importing diffusers (JSON configs + safetensors), so exporting needs only transformers for the
text encoder's config and tokenizer files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import Tensor

from ldm.convert import configs, tables
from ldm.convert.weights import SDWeights, canonical_text

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers these configs were checked with


def is_diffusers(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "unet" / "config.json").is_file()


def _read(folder: Path, trust: bool = False) -> tuple[dict, dict[str, Tensor]]:
    from ldm.checkpoint import load_file

    config = json.loads((folder / "config.json").read_text())
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return config, {k: v.float() for k, v in load_file(folder / name, trust=trust).items()}
    raise FileNotFoundError(f"{folder} holds no weights (looked for {', '.join(WEIGHT_FILES)})")


def read_diffusers(folder: str | Path, *, prediction_type: str | None = None, trust: bool = False,
                   model_type: str | None = None) -> SDWeights:
    folder = Path(folder)
    ucfg, usd = _read(folder / "unet", trust)
    unet_config = configs.unet_config_from_diffusers(ucfg)
    attn = [2**i in unet_config["attention_resolutions"] for i in range(len(unet_config["channel_mult"]))]
    unet = tables.rename(usd, tables.unet_pairs(len(attn), unet_config["num_res_blocks"], attn), to="ours",
                         what="diffusers U-Net")
    vcfg, vsd = _read(folder / "vae", trust)
    vae_config, scale = configs.vae_config_from_diffusers(vcfg)
    dd = vae_config["ddconfig"]
    vae = tables.rename(tables.legacy_vae_keys(vsd), tables.vae_pairs(len(dd["ch_mult"]), dd["num_res_blocks"]),
                        to="ours", what="diffusers autoencoder")
    vae = tables.vae_attention_shapes(vae, to="ours")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        schedule, pred = configs.scheduler_from_diffusers(json.loads(sched_file.read_text()))
    else:
        log.warning("%s has no scheduler/scheduler_config.json: assuming SD's scaled_linear ε schedule", folder)
        schedule, pred = dict(configs.SD_SCHEDULE), "eps"
    pred = prediction_type or pred
    text_config = text = None
    if (folder / "text_encoder" / "config.json").is_file():
        tcfg, text = _read(folder / "text_encoder", trust)
        text = canonical_text(text)
        text_config = configs.clip_config_from_weights(text, "clip", tcfg.get("num_attention_heads"))
        text_config["hidden_act"] = tcfg.get("hidden_act", "quick_gelu")
    # OpenAI CLIP-L (SD 1.x) uses quick_gelu, OpenCLIP ViT-H (SD 2.x) gelu; without a text encoder: the width
    kind = ("openclip" if text_config["hidden_act"] == "gelu" else "clip") if text_config else \
        ("openclip" if unet_config["context_dim"] == 1024 else "clip")
    model_type = model_type or configs.model_type_of(kind, unet_config["in_channels"], pred)
    tok = folder / "tokenizer"
    return SDWeights(model_type=model_type, unet_config=unet_config, unet=unet, vae_config=vae_config, vae=vae,
                     text_kind=kind, text_config=text_config, text=text, text_layer="last",
                     tokenizer=str(folder) if tok.is_dir() else configs.MODEL_TYPES[model_type]["tokenizer"],
                     tokenizer_subfolder="tokenizer" if tok.is_dir() else
                     configs.MODEL_TYPES[model_type]["tokenizer_subfolder"],
                     scale_factor=scale, schedule=schedule, prediction_type=pred, source=str(folder))


def _save(folder: Path, config: dict, sd: dict[str, Tensor], weights: str = "diffusion_pytorch_model.safetensors"):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_diffusers_version": DIFFUSERS_VERSION, **config}, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(folder / weights),
              metadata={"format": "pt"})


def load_tokenizer(name: str, subfolder: str | None = None):
    import transformers

    from ldm.nn.text_encoder import TextEncoderNotFoundError, hub_offline

    try:
        return transformers.AutoTokenizer.from_pretrained(name, subfolder=subfolder or "",
                                                          local_files_only=hub_offline())
    except (OSError, ValueError) as e:
        raise TextEncoderNotFoundError(
            f"tokenizer {name!r} (subfolder {subfolder!r}) is not available locally ({str(e).splitlines()[0][:200]}). "
            "An original SD file carries no tokenizer: pass tokenizer=<folder with a CLIP tokenizer> (e.g. the "
            f"`tokenizer/` of a diffusers copy) or download it once (`huggingface-cli download {name}`)") from e


def write_diffusers(w: SDWeights, folder: str | Path, tokenizer=None) -> Path:
    """A folder `StableDiffusionPipeline.from_pretrained(folder)` loads (no safety checker)."""
    import transformers

    folder = Path(folder)
    u = w.unet_config
    attn = [2**i in u["attention_resolutions"] for i in range(len(u["channel_mult"]))]
    pairs = tables.unet_pairs(len(attn), u["num_res_blocks"], attn)
    _save(folder / "unet", configs.unet_config_to_diffusers(u), tables.rename(w.unet, pairs, to="theirs"))
    dd = w.vae_config["ddconfig"]
    vae = tables.rename(w.vae, tables.vae_pairs(len(dd["ch_mult"]), dd["num_res_blocks"]), to="theirs")
    _save(folder / "vae", configs.vae_config_to_diffusers(w.vae_config, w.scale_factor),
          tables.vae_attention_shapes(vae, to="theirs"))
    sched = folder / "scheduler"
    sched.mkdir(parents=True, exist_ok=True)
    (sched / "scheduler_config.json").write_text(json.dumps(
        {"_diffusers_version": DIFFUSERS_VERSION, **configs.scheduler_to_diffusers(w.schedule, w.prediction_type)},
        indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "image_encoder": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if w.text is not None:
        tcfg, text = w.text_with_last_layer()
        config = transformers.CLIPTextConfig(**tcfg)
        config.architectures = ["CLIPTextModel"]
        (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder / "text_encoder")
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in text.items()},
                  str(folder / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
        tok = tokenizer if tokenizer is not None else load_tokenizer(w.tokenizer, w.tokenizer_subfolder)
        tok.save_pretrained(folder / "tokenizer")
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", type(tok).__name__])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
