"""Sample images from a LatentDiffusion checkpoint: compose config → load pipeline → write images.

    python sample.py ckpt=<path> prompt="a photo of a sneaker" n=16 sampler=dpmpp_2m steps=20 guidance=4 \
        seed=0 out=<dir>
    python sample.py ckpt=v1-5-pruned-emaonly.safetensors sd.tokenizer=<CLIP tokenizer> prompt="a cat" guidance=7.5 \
        steps=30 sampler.spacing=leading sampler.steps_offset=1 height=512 width=512
    python sample.py ckpt=<path> prompts_file=prompts.txt negative_prompt="blurry" sampler=ddim sampler.eta=0.5
    python sample.py ckpt=<path> mode=img2img init_image=in.png strength=0.6 prompt="a photo of a dress"
    python sample.py ckpt=<path> mode=inpaint init_image=in.png mask=mask.png prompt="a photo of a coat"
    python sample.py ckpt=<path> mode=invert init_image=in.png prompt="a shirt" edit_prompt="a coat"
    python sample.py ckpt=<path> mode=interpolate prompt="a sneaker" prompt2="an ankle boot" frames=8
    python sample.py ckpt=<upscaler> mode=upscale init_image=small.png prompt="a shirt" noise_level=20
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm import config_check, runtime

log = logging.getLogger("sample")
runtime.register_resolvers()


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"prompts_file={path} holds no prompts (one per line)")
        return prompts
    if cfg.prompt is None:
        raise ValueError("give prompt=\"...\" or prompts_file=<file>")
    return [str(cfg.prompt)]


MODES = ("txt2img", "img2img", "inpaint", "invert", "interpolate", "upscale")


def check_mode(cfg: DictConfig) -> None:
    """Mode and its inputs, checked before any model is loaded."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}: choose one of {', '.join(MODES)}")
    if cfg.mode in ("img2img", "inpaint", "invert", "upscale") and not cfg.init_image:
        raise ValueError(f"mode={cfg.mode} needs init_image=<image file>")
    if cfg.init_image and not Path(cfg.init_image).is_file():
        raise FileNotFoundError(f"init_image={cfg.init_image} does not exist")
    if cfg.mode == "inpaint" and not cfg.mask:
        raise ValueError("mode=inpaint needs mask=<image file> (white = repaint, black = keep)")
    if cfg.strength is not None and not 0.0 <= float(cfg.strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {cfg.strength}")
    if cfg.guide and cfg.mode != "txt2img":
        raise ValueError(f"guide= (autoguidance) applies to mode=txt2img, not mode={cfg.mode}")
    if cfg.guide and not Path(cfg.guide).exists():
        raise FileNotFoundError(f"guide={cfg.guide} does not exist: pass an earlier checkpoint of the same run, "
                                "e.g. <run>/checkpoints/step0001050.ckpt")


def run_mode(pipe, cfg: DictConfig, prompts: list[str]) -> dict:
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    common = dict(negative_prompt=cfg.negative_prompt, sampler=sampler.pop("name"), sampler_options=sampler,
                  steps=cfg.steps, guidance=cfg.guidance, guidance_rescale=cfg.guidance_rescale, seed=cfg.seed,
                  progress=cfg.progress)
    batch = dict(n=cfg.n, batch_size=cfg.batch_size, precision=cfg.precision)
    if cfg.mode == "txt2img":
        if cfg.guide:
            pipe.load_guide(cfg.guide, trust=cfg.trust_checkpoint)
        return pipe.text_to_image(prompts, height=cfg.height, width=cfg.width, guide_scale=cfg.guide_scale if cfg.guide
                                  else 0.0, **batch, **common)
    if cfg.mode == "img2img":
        strength = 0.6 if cfg.strength is None else cfg.strength
        return pipe.img2img(cfg.init_image, prompts, strength=strength, **batch, **common)
    if cfg.mode == "inpaint":
        strength = 1.0 if cfg.strength is None else cfg.strength
        return pipe.inpaint(cfg.init_image, cfg.mask, prompts, strength=strength, paste=cfg.paste, repaint=cfg.repaint,
                            **batch, **common)
    if cfg.mode == "invert":
        return pipe.invert(cfg.init_image, prompts[0], [cfg.edit_prompt] if cfg.edit_prompt else [], steps=cfg.steps,
                           guidance=cfg.inversion_guidance, edit_guidance=cfg.guidance,
                           negative_prompt=cfg.negative_prompt, spacing=sampler.get("spacing", "leading"),
                           seed=cfg.seed, progress=cfg.progress)
    if cfg.mode == "upscale":
        return pipe.upscale(cfg.init_image, prompts, noise_level=cfg.noise_level, reference=cfg.reference, **batch,
                            **common)
    both = prompts[:1] + ([str(cfg.prompt2)] if cfg.prompt2 is not None else [])
    return pipe.interpolate(both, frames=cfg.frames, seed2=cfg.seed2, **common)


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    config_check.check_types(cfg, keys=(), plain=config_check.SAMPLE_KEYS)  # `steps=abc` named before any work
    prompts = read_prompts(cfg)  # bad prompts and inputs fail before the heavy imports
    check_mode(cfg)
    if cfg.tune_malloc:
        runtime.tune_malloc()
    from ldm.editing_pipeline import EditingPipeline

    pipe = EditingPipeline.from_checkpoint(cfg.ckpt, device=cfg.device, trust=cfg.trust_checkpoint,
                                           use_ema=cfg.use_ema, sd_options=cfg.get("sd"))
    result = run_mode(pipe, cfg, prompts)
    files = pipe.save(result, cfg.out)
    metrics = {k: v for k, v in result["settings"].items() if "error" in k} or result["settings"].get("metrics")
    if metrics:
        log.info("%s: %s", cfg.mode, metrics)
    log.info("wrote %d images and %s", len(files["images"]), files["grid"])
    print(f"wrote {len(files['images'])} images, grid {files['grid']}, metadata {files['metadata']}")


if __name__ == "__main__":
    main()
