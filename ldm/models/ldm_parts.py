"""Building, checking, exporting and reloading the parts of `LatentDiffusion` (kept out of the module itself).

Exported folder layout (`export`): `unet.safetensors` (EMA weights by default), `first_stage/` (the
autoencoder's own export: model.safetensors + config.json) and `config.json` with the hyper-parameters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.log_step import metrics_step

log = logging.getLogger(__name__)

SCHEDULE_TARGET = "ldm.diffusion.schedule.NoiseSchedule.from_config"


def _container(v):
    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v, resolve=True)
    if isinstance(v, Mapping):
        return {k: _container(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_container(x) for x in v]
    return str(v) if isinstance(v, Path) else v


def _target(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def plain_hparams(args: dict) -> dict:
    """Constructor arguments as plain containers (safe for weights_only loading and YAML); modules become
    their config (`_target_` + `.config`) where they have one, else None."""
    out = {}
    for k, v in args.items():
        if isinstance(v, NoiseSchedule):
            v = {"_target_": SCHEDULE_TARGET, "name": v.name, "num_timesteps": v.num_timesteps,
                 "zero_terminal_snr": v.zero_terminal_snr}
        elif isinstance(v, nn.Module):
            cfg = getattr(v, "config", None)
            if k == "first_stage":
                v = dict(cfg) if isinstance(cfg, Mapping) else None
            else:
                v = {"_target_": _target(v), **cfg} if isinstance(cfg, Mapping) else None
        out[k] = _container(v)
    return out


def _instantiate(spec, default_target: str, what: str):
    spec = _container(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what}: expected a module or a config mapping, got {type(spec).__name__}")
    from hydra.utils import instantiate

    return instantiate({"_target_": default_target, **spec}, _convert_="all")


def build_schedule(spec) -> NoiseSchedule:
    if isinstance(spec, NoiseSchedule):
        return spec
    with torch.device("cpu"):  # tables are CPU float64, also when the model is built on the meta device
        if spec is None:
            return NoiseSchedule.from_config("scaled_linear")
        return _instantiate(spec, SCHEDULE_TARGET, "schedule")


def build_unet(spec) -> nn.Module:
    return spec if isinstance(spec, nn.Module) else _instantiate(spec, "ldm.nn.unet.UNetModel", "unet")


def build_text_encoder(spec) -> nn.Module | None:
    if spec is None or isinstance(spec, nn.Module):
        return spec
    return _instantiate(spec, "ldm.nn.text_encoder.FrozenTextEncoder", "text_encoder")


def load_first_stage(spec, trust: bool = False) -> tuple[nn.Module, float]:
    """(frozen autoencoder, its scale factor) from a path, a module or an architecture dict."""
    if isinstance(spec, nn.Module):
        scale = getattr(spec, "scale_factor", None)
        if scale is None:
            log.warning("first stage module has no scale_factor: using 1.0 (pass scale_factor= to set it)")
        return spec, float(scale if scale is not None else 1.0)
    if isinstance(spec, (str, Path)):
        from ldm.nn.autoencoder import load_pretrained

        try:
            return load_pretrained(spec, trust=trust)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"model.first_stage: {e}") from e
    spec = _container(spec)
    if isinstance(spec, Mapping) and ("ddconfig" in spec or spec.get("type") == "PixelSpace"):
        from ldm.nn.autoencoder import first_stage_from_config

        if "ddconfig" in spec:
            log.info("first stage built from its architecture only: its weights come from a checkpoint")
        return first_stage_from_config(spec), float(spec.get("scale_factor", 1.0))
    raise TypeError("first_stage must be a path to an exported autoencoder / AutoencoderKL checkpoint, a "
                    "module, an architecture dict with ddconfig and embed_dim, or {type: PixelSpace, channels: C}; "
                    f"got {type(spec).__name__}")


def latent_channels(first_stage: nn.Module) -> int | None:
    c = getattr(first_stage, "embed_dim", None)
    cfg = getattr(first_stage, "config", None)
    if c is None and isinstance(cfg, Mapping):
        c = cfg.get("embed_dim")
    return int(c) if c is not None else None


def check_channels(first_stage: nn.Module, unet: nn.Module, variance_type: str, concat_channels: int = 0) -> None:
    c = latent_channels(first_stage)
    u_in, u_out = getattr(unet, "in_channels", None), getattr(unet, "out_channels", None)
    if c is not None and u_in is not None and c + concat_channels != u_in:
        extra = f" + {concat_channels} concatenated" if concat_channels else ""
        raise ValueError(f"the first stage's latents have {c}{extra} channels but the U-Net has in_channels={u_in}: "
                         f"set model.unet.in_channels={c + concat_channels} (out_channels={c}) or use a matching "
                         "autoencoder")
    c = c if c is not None else (u_in - concat_channels if u_in is not None else None)
    want = c * (2 if variance_type == "learned_range" else 1) if c else None
    if want is not None and u_out is not None and u_out != want:
        raise ValueError(f"the U-Net has out_channels={u_out} but variance_type={variance_type!r} with "
                         f"{c} latent channels needs {want}")


def check_context_dim(text_encoder: nn.Module, unet: nn.Module) -> None:
    cd = getattr(unet, "context_dim", None)
    cd = cd[0] if isinstance(cd, (list, tuple)) and cd else cd
    if cd is not None and int(text_encoder.dim) != int(cd):
        name = getattr(text_encoder, "name_or_path", None) or "(default MiniLM)"
        raise ValueError(f"text encoder {name} gives {text_encoder.dim}-d context but the U-Net has "
                         f"context_dim={cd}: set model.unet.context_dim={text_encoder.dim}")


def dtype_of(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def first_stage_config(first_stage: nn.Module, scale_factor: float) -> dict | None:
    cfg = getattr(first_stage, "config", None)
    return {**_container(cfg), "scale_factor": float(scale_factor)} if isinstance(cfg, Mapping) else None


def image_channels(first_stage: nn.Module) -> int | None:
    """Input channels of the first stage (None when it does not say)."""
    c = getattr(first_stage, "image_channels", None)
    return int(c) if c is not None else None


def check_image_channels(x: torch.Tensor, first_stage: nn.Module, source) -> None:
    """Images (B, C, H, W) whose C the autoencoder (from `source`, for the message) does not take are refused."""
    channels = image_channels(first_stage)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"the images have {x.shape[1]} channel(s) but the autoencoder (model.first_stage={source}) "
                         f"takes {channels}: train the LDM on the data its autoencoder was trained on, or point "
                         "model.first_stage at a matching autoencoder")


def check_same_first_stage(checkpoint: Mapping, first_stage: nn.Module) -> None:
    """Refuse a resume whose `model.first_stage` now names an autoencoder of another architecture than the one the
    checkpoint was trained on (e.g. `.../latest/export` after a newer autoencoder run), naming what differs."""
    saved, now = checkpoint.get("first_stage_config"), first_stage_config(first_stage, 1.0)
    if not saved or not now:
        return
    saved, now = ({k: v for k, v in c.items() if k != "scale_factor"} for c in (saved, now))
    if saved == now:
        return
    flat = {}
    for name, cfg in (("checkpoint", saved), ("config", now)):
        for k, v in cfg.items():
            for kk, vv in (v.items() if isinstance(v, Mapping) else [(None, v)]):
                flat.setdefault(f"{k}.{kk}" if kk else k, {})[name] = vv
    diff = ", ".join(f"{k}: {v.get('checkpoint')} vs {v.get('config')}" for k, v in flat.items()
                     if v.get("checkpoint") != v.get("config"))
    trained_on = (checkpoint.get("hyper_parameters") or {}).get("first_stage")
    hint = f" It was trained with model.first_stage={trained_on}." if isinstance(trained_on, str) else ""
    raise ValueError(f"this checkpoint's autoencoder differs from the one model.first_stage gives now ({diff})."
                     f"{hint} Pass model.first_stage=<the autoencoder the checkpoint was trained on>.")


def log_sample_grid(model, prompts: list[str]) -> Path:
    """Sample `val_images_per_prompt` images per prompt with the EMA U-Net; write a PNG grid (one row per
    prompt) under the run folder and send it to loggers that take images. Rank 0 only; no collectives."""
    from ldm.images import make_grid, save_grid, to_pil, upscale_nearest

    hp, step = model.hparams, model.global_step
    log_step = metrics_step(model)  # the loggers' step of this validation run's metrics (files keep global_step)
    n = max(1, int(hp.val_images_per_prompt))
    images = model.sample([p for p in prompts for _ in range(n)], sampler=hp.val_sampler, steps=hp.val_steps,
                          guidance=hp.val_guidance, seed=hp.val_seed, sampler_options=hp.val_sampler_options)
    images = upscale_nearest(images.cpu(), max(1, 128 // images.shape[-1]))
    out = Path(hp.image_log_dir or Path(model.trainer.default_root_dir) / "images")
    meta = {"prompts": prompts, "step": step, "sampler": hp.val_sampler, "steps": hp.val_steps,
            "guidance": hp.val_guidance, "seed": hp.val_seed}
    path = save_grid(images, out / f"samples_step{step:07d}.png", nrow=n, metadata=meta)
    rows = [make_grid(images[i * n:(i + 1) * n], nrow=n) for i in range(len(prompts))]
    for logger in model.loggers:
        if callable(getattr(logger, "log_image", None)):  # W&B: one image per prompt, the prompt as caption
            logger.log_image(key="val/samples", images=[to_pil(r) for r in rows], caption=prompts, step=log_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image("val/samples", (make_grid(images, nrow=n) + 1) / 2, log_step)
            logger.experiment.add_text("val/prompts", "\n\n".join(prompts), log_step)
    return path


def export(model, directory: str | Path, use_ema: bool = True) -> Path:
    """Write unet.safetensors (EMA weights unless use_ema=False), first_stage/ and config.json."""
    from safetensors.torch import save_file

    from ldm.nn.autoencoder import save_pretrained

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    net = model.ema_unet if use_ema and model.ema_unet is not None else model.unet
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()},
              str(directory / "unet.safetensors"))
    if getattr(model.first_stage, "config", None) is None:
        raise ValueError("export needs a first stage with a .config (AutoencoderKLNet or PixelSpace)")
    save_pretrained(model.first_stage, directory / "first_stage", model.scale_factor)
    hp = dict(_container(dict(model.hparams)))
    if hp.get("unet") is None:
        log.warning("the U-Net has no config: loading this export needs unet=<module>")
    hp.update(first_stage="first_stage", scale_factor=model.scale_factor, ema_decay=None, latent_cache=False)
    cfg = {"type": "LatentDiffusion", "hyper_parameters": hp, "latent_size": model.latent_size.tolist(),
           "weights": "ema" if net is model.ema_unet else "raw"}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def load_latent_diffusion(cls, path: str | Path, *, trust: bool = False, map_location="cpu", **overrides):
    """A LatentDiffusion from a Lightning .ckpt (first stage rebuilt from the config stored in it) or an
    exported folder. The text encoder is reloaded from its name_or_path."""
    from ldm.checkpoint import CheckpointError, load_file, load_weights_into, state_dict_of

    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} has no config.json (expected a LatentDiffusion export folder)")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("type") != "LatentDiffusion":
            raise CheckpointError(f"{path} is a {cfg.get('type')!r} export, not LatentDiffusion")
        hp = {**cfg["hyper_parameters"], "first_stage": str(path / "first_stage"), **overrides}
        model = cls(**hp)
        load_weights_into(model.unet, load_file(path / "unet.safetensors", map_location=map_location),
                          source=str(path / "unet.safetensors"))
        model.latent_size.copy_(torch.tensor(cfg.get("latent_size", [0, 0])))
        return model.eval()
    ckpt = load_file(path, trust=trust, map_location=map_location)
    if not isinstance(ckpt, Mapping) or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a LatentDiffusion Lightning checkpoint (no hyper_parameters)")
    hp = dict(ckpt["hyper_parameters"])
    if "ddconfig" in hp and "unet" not in hp:
        raise CheckpointError(f"{path} is an autoencoder checkpoint, not a LatentDiffusion one: export it and train "
                              "a LatentDiffusion on it (experiment=fmnist_ldm model.first_stage=<run>/export)")
    fs = ckpt.get("first_stage_config")
    if fs is not None:
        hp["first_stage"] = fs  # the architecture; its weights are in the state dict
    hp.update(latent_cache=False, **overrides)
    if hp.get("unet") is None:
        raise CheckpointError(f"{path} holds no U-Net config (the model was built from a module): pass unet=")
    model = cls(**hp)
    load_weights_into(model, state_dict_of(ckpt, path), source=str(path))
    return model.eval()
