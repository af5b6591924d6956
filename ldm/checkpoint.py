"""Checkpoints and weights: safe loading, atomic saving, init-from with key renaming, SD key layouts.

Resume (full trainer state, `ckpt_path=`) is Lightning's; this module covers everything that reads weights:
a file is loaded with `torch.load(weights_only=True)` or safetensors, never unpickled unless the user opts in.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and what to do about it."""


def _kind(path: Path) -> str:
    """'safetensors', 'torch-zip' (torch.save since 1.6) or 'torch-legacy', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path} is empty or truncated ({path.stat().st_size} bytes)")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":  # a bare pickle protocol marker: legacy torch.save or a plain pickle
        return "torch-legacy"
    header_len = int.from_bytes(head[:8], "little")
    if 2 <= header_len < 100_000_000 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(f"{path} is not a checkpoint (neither a torch file nor safetensors)")


def load_file(path: str | Path, *, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """Load a .ckpt/.pt/.pth (weights_only) or .safetensors file with clear errors.

    `trust=True` allows full unpickling, for files you made yourself and only then.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if not candidates:
            raise CheckpointError(f"{path} is a folder without a .safetensors file")
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    kind = _kind(path)
    if kind == "safetensors":
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for truncation/corruption
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    if kind == "torch-zip":
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path} is truncated or corrupt ({e})") from e
        if bad is not None:
            raise CheckpointError(f"{path} is corrupt (bad member {bad})")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust, mmap=kind == "torch-zip")
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains pickled Python objects that could run code "
            f"({str(e).splitlines()[0][:200]}). Load only checkpoints you trust, and then pass "
            "trust_checkpoint=true; or export plain weights as .safetensors."
        ) from e
    except (EOFError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from e


def state_dict_of(obj: Any, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The weights inside a loaded file: a Lightning checkpoint's `state_dict`, or the mapping itself."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def rename_keys(sd: Mapping[str, torch.Tensor], rename: Mapping[str, str] | None = None,
                ignore: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Drop keys starting with an `ignore` prefix, then replace the first matching `rename` prefix."""
    out = {}
    for k, v in sd.items():
        if any(k.startswith(p) for p in ignore):
            continue
        for old, new in (rename or {}).items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def load_weights_into(module: nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool = True,
                      source: str = "<weights>") -> dict[str, list[str]]:
    """Copy matching weights; report missing, unexpected and wrong-shape keys (an error when `strict`)."""
    own = module.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    report = {
        "missing": sorted(set(own) - set(sd)),
        "unexpected": sorted(set(sd) - set(own)),
        "mismatched": mismatched,
    }
    if strict and any(report.values()):
        lines = [f"{source} does not match the model architecture:"]
        for what, keys in report.items():
            if keys:
                lines.append(f"  {what} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(usable, strict=False)
    for what, keys in report.items():
        if keys:
            log.warning("%s: %d %s keys (e.g. %s)", source, len(keys), what, keys[0])
    return report


def init_from(module: nn.Module, path: str | Path, *, rename: Mapping[str, str] | None = None,
              ignore: list[str] | tuple[str, ...] = (), strict: bool = False, trust: bool = False) -> dict:
    """Initialise `module` from another checkpoint's weights only (no optimizer, step or EMA state)."""
    sd = rename_keys(state_dict_of(load_file(path, trust=trust), path), rename, ignore)
    return load_weights_into(module, sd, strict=strict, source=str(path))


def read_metadata(path: str | Path, *, trust: bool = False) -> dict:
    """The `ldm` metadata block (run dir, W&B run id, ...) a checkpoint carries, {} if none."""
    ckpt = load_file(path, trust=trust)
    return dict(ckpt.get("ldm", {})) if isinstance(ckpt, Mapping) else {}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a crash while saving leaves the
    previous checkpoint intact and readable."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
