"""Foreign weight layouts: Stable Diffusion single files (`.ckpt` / `.safetensors`) and diffusers folders, in and out.

    model = load_latent_diffusion("v1-5-pruned-emaonly.safetensors", tokenizer="<CLIP tokenizer folder>")
    convert("sd21.safetensors", "sd21-diffusers", to="diffusers")      # or: ldm convert <in> <out> --to diffusers

Key maps are tables (`tables.py`), architectures are read off weight shapes (`configs.py`).
"""

from ldm.convert.configs import MODEL_TYPES
from ldm.convert.diffusers_folder import is_diffusers, read_diffusers, write_diffusers
from ldm.convert.model import (
                               FORMATS,
                               convert,
                               detect_format,
                               export_ldm,
                               load_latent_diffusion,
                               read_weights,
                               weights_of,
)
from ldm.convert.weights import SDWeights, original_state_dict, read_original, write_original

__all__ = ["FORMATS", "MODEL_TYPES", "SDWeights", "convert", "detect_format", "export_ldm", "is_diffusers",
           "load_latent_diffusion", "original_state_dict", "read_diffusers", "read_original", "read_weights",
           "weights_of", "write_diffusers", "write_original"]
