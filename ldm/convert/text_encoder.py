"""The frozen CLIP text encoder of a Stable Diffusion single file, as a `FrozenTextEncoder`.

Its weights come from the file's `cond_stage_model.*` (an original SD file has no tokenizer: that comes from
`tokenizer`, a hub name or folder). Its config names the file, so a LatentDiffusion fine-tuned from it reloads
the encoder from the same file (text-encoder weights are never part of our checkpoints: they stay frozen).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.convert import configs
from ldm.nn.text_encoder import FrozenTextEncoder, TextEncoderNotFoundError


def build_clip_text_model(config: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A transformers CLIPTextModel with `weights` (every key must match)."""
    import transformers

    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"text encoder weights do not match the CLIP config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.eval()


class SDTextEncoder(FrozenTextEncoder):
    """FrozenTextEncoder over the CLIP (SD 1.x) or OpenCLIP (SD 2.x) text tower stored in an SD checkpoint."""

    def __init__(self, checkpoint: str, text: str = "clip", tokenizer: str | None = None,
                 tokenizer_subfolder: str | None = None, num_heads: int | None = None, layer: str | None = None,
                 max_length: int = 77, dtype: str = "float32", cache_size: int = 4096,
                 pad_to_max_length: bool = True, mask_padding: bool = False, trust: bool = False,
                 lazy: bool = True):
        if text not in configs.CLIP_ACT:
            raise ValueError(f"text must be one of {sorted(configs.CLIP_ACT)}, got {text!r}")
        layer = layer or ("penultimate" if text == "openclip" else "last")
        super().__init__(name_or_path=str(checkpoint), max_length=max_length, layer=layer, dtype=dtype,
                         cache_size=cache_size, pad_to_max_length=pad_to_max_length, mask_padding=mask_padding,
                         lazy=True)
        preset = configs.MODEL_TYPES["v1" if text == "clip" else "v2-v"]
        self.checkpoint, self.text, self.num_heads, self.trust = str(checkpoint), text, num_heads, trust
        self.tokenizer_name = tokenizer or preset["tokenizer"]
        self.tokenizer_subfolder = tokenizer_subfolder if tokenizer else preset["tokenizer_subfolder"]
        self.config = dict(checkpoint=self.checkpoint, text=text, tokenizer=self.tokenizer_name,
                           tokenizer_subfolder=self.tokenizer_subfolder, num_heads=num_heads, layer=layer,
                           max_length=max_length, dtype=dtype, cache_size=cache_size,
                           pad_to_max_length=pad_to_max_length, mask_padding=mask_padding, trust=trust, lazy=lazy)
        if not lazy:
            self.load()

    def attach(self, model: nn.Module, tokenizer) -> SDTextEncoder:
        """Use an already-built CLIPTextModel and tokenizer (e.g. converted along with the rest of the file)."""
        self.model = model.to(device=self._anchor.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer, self.family = tokenizer, "clip"
        return self

    def load(self) -> SDTextEncoder:
        if self.model is not None:
            return self
        from ldm.checkpoint import load_file
        from ldm.convert.diffusers_folder import load_tokenizer
        from ldm.convert.weights import _state_dict, text_from_original

        if not Path(self.checkpoint).is_file():
            raise TextEncoderNotFoundError(f"Stable Diffusion checkpoint {self.checkpoint} (its text encoder) does "
                                           "not exist")
        tokenizer = load_tokenizer(self.tokenizer_name, self.tokenizer_subfolder)
        sd, _ = _state_dict(load_file(self.checkpoint, trust=self.trust), self.checkpoint)
        kind, weights = text_from_original(sd)
        if weights is None:
            raise TextEncoderNotFoundError(f"{self.checkpoint} holds no text encoder (cond_stage_model.*)")
        config = configs.clip_config_from_weights(weights, kind, self.num_heads)
        return self.attach(build_clip_text_model(config, weights), tokenizer)
