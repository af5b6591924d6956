"""Sample images from a LatentDiffusion checkpoint: compose config → load pipeline → write images.

    python sample.py ckpt=<path> prompt="a photo of a sneaker" n=16 sampler=dpmpp_2m steps=20 guidance=4 \
        seed=0 out=<dir>
    python sample.py ckpt=v1-5-pruned-emaonly.safetensors sd.tokenizer=<CLIP tokenizer> prompt="a cat" guidance=7.5 \
        steps=30 sampler.spacing=leading sampler.steps_offset=1 height=512 width=512
    python sample.py ckpt=<path> prompts_file=prompts.txt negative_prompt="blurry" sampler=ddim sampler.eta=0.5
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


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    config_check.check_types(cfg, keys=(), plain=config_check.SAMPLE_KEYS)  # `steps=abc` named before any work
    prompts = read_prompts(cfg)  # bad prompts fail before the heavy imports
    if cfg.tune_malloc:
        runtime.tune_malloc()
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_checkpoint(cfg.ckpt, device=cfg.device, trust=cfg.trust_checkpoint,
                                                   use_ema=cfg.use_ema, sd_options=cfg.get("sd"))
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    result = pipe.text_to_image(
        prompts, n=cfg.n, negative_prompt=cfg.negative_prompt, sampler=sampler.pop("name"), sampler_options=sampler,
        steps=cfg.steps, guidance=cfg.guidance, guidance_rescale=cfg.guidance_rescale, seed=cfg.seed,
        height=cfg.height, width=cfg.width, batch_size=cfg.batch_size, precision=cfg.precision,
        progress=cfg.progress,
    )
    files = pipe.save(result, cfg.out)
    log.info("wrote %d images and %s", len(files["images"]), files["grid"])
    print(f"wrote {len(files['images'])} images, grid {files['grid']}, metadata {files['metadata']}")


if __name__ == "__main__":
    main()
