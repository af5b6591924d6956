"""Recompute an autoencoder's latent scale factor (1 / std of posterior samples) on data; rewrite its export.

    python -m ldm.scale_factor ckpt=outputs/.../checkpoints/last.ckpt            # → outputs/.../export
    python -m ldm.scale_factor ckpt=outputs/.../export batches=200 data.batch_size=128
    python -m ldm.scale_factor ckpt=path/to/export data=my_images out=path/to/new_export

`ckpt` is an AutoencoderKL Lightning checkpoint (EMA weights when it has them) or an exported folder;
`out` defaults to the export folder itself, or `<run dir>/export` for a checkpoint in `<run dir>/checkpoints`;
every other `key=value` is a Hydra override of conf/train.yaml, of which only `data` is used (training split).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from ldm.nn.autoencoder import latent_moments, load_pretrained, save_pretrained, scale_factor_from_moments

log = logging.getLogger("ldm.scale_factor")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
USAGE = ("usage: python -m ldm.scale_factor ckpt=PATH [out=DIR] [batches=50] [seed=0] "
         "[trust_checkpoint=false] [data=NAME] [data.KEY=VALUE ...]")


def default_out(ckpt: Path) -> Path:
    if ckpt.is_dir():
        return ckpt
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "export"
    return ckpt.with_name(ckpt.stem + "_export")


def train_images(overrides: list[str]):
    """Image batches of the training split of the composed `data` config."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm import runtime

    runtime.register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=autoencoder_kl", *overrides])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return (batch["image"] for batch in dm.train_dataloader())


def recompute(ckpt: str | Path, images, *, batches: int = 50, out: str | Path | None = None, seed: int = 0,
              trust: bool = False, device: str | None = None) -> tuple[float, float, Path]:
    """(old, new scale factor, export folder written)."""
    ckpt = Path(ckpt)
    net, old = load_pretrained(ckpt, trust=trust)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    new = scale_factor_from_moments(latent_moments(net, images, batches, gen))
    out = Path(out) if out else default_out(ckpt)
    save_pretrained(net.cpu(), out, new)
    return old, new, out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    own = {"ckpt": None, "out": None, "batches": "50", "seed": "0", "trust_checkpoint": "false"}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            print(USAGE, file=sys.stderr)
            return 2
        if key in own:
            own[key] = value
        else:
            overrides.append(arg)
    if not own["ckpt"]:
        print(USAGE, file=sys.stderr)
        return 2
    old, new, out = recompute(own["ckpt"], train_images(overrides), batches=int(own["batches"]),
                              out=own["out"], seed=int(own["seed"]),
                              trust=own["trust_checkpoint"].lower() == "true")
    log.info("scale factor %.5f → %.5f; wrote %s", old, new, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
