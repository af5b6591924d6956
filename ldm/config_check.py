"""Type-check a composed config against the signatures it will be instantiated with, before anything is built.

Hydra checks types only for structured configs; ours are plain YAML, so `trainer.max_steps=abc` would reach
`pl.Trainer` and fail deep inside it with "'<' not supported between instances of 'str' and 'int'". This checks
every `_target_` node's plain values (int, float, bool, str, None and unions of them) against the target's type
hints and names the key, the value and the expected type. Values of any other annotated type are left alone.
"""

from __future__ import annotations

import inspect
import types
import typing

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

_SIMPLE = (int, float, bool, str, type(None))


class ConfigTypeError(TypeError):
    pass


def _allowed(hint) -> tuple[type, ...] | None:
    """The simple types `hint` allows, or None when it allows something we do not judge (Literal, classes...)."""
    if hint in _SIMPLE:
        return (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_allowed(a) for a in typing.get_args(hint)]
        return None if any(p is None for p in parts) else tuple(t for p in parts for t in p)
    return None


def _fits(value, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return isinstance(value, allowed)


def _hints(target: str) -> dict:
    try:
        obj = get_object(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        return typing.get_type_hints(fn)
    except Exception:  # unimportable or unresolvable annotations: instantiate will report what is wrong
        return {}


# Plain keys of the entry points' own configs (conf/train.yaml, conf/sample.yaml), which no `_target_` signature
# covers: dotted key -> the types it may hold. Free text (prompts, paths given as numbers) is left alone.
_NULL = type(None)
TRAIN_KEYS = {"task_name": (str,), "seed": (int,), "ckpt_path": (str, _NULL), "init_from.path": (str, _NULL),
              "init_from.strict": (bool,), "train": (bool,), "test": (bool,), "export": (bool,),
              "compile": (bool,), "trust_checkpoint": (bool,), "tune_malloc": (bool,)}
SAMPLE_KEYS = {"n": (int,), "batch_size": (int,), "steps": (int,), "guidance": (float,),
               "guidance_rescale": (float,), "seed": (int,), "height": (int, _NULL), "width": (int, _NULL),
               "use_ema": (bool,), "progress": (bool,), "trust_checkpoint": (bool,), "tune_malloc": (bool,),
               "mode": (str,), "strength": (float, _NULL), "paste": (bool,), "inversion_guidance": (float,),
               "seed2": (int, _NULL), "frames": (int,), "noise_level": (int,), "repaint": (int,)}


def _type_names(allowed: tuple[type, ...]) -> str:
    return " or ".join(sorted({"null" if t is _NULL else t.__name__ for t in allowed}))


def check_types(cfg: DictConfig, keys: typing.Iterable[str] = ("data", "model", "trainer"),
                plain: dict[str, tuple[type, ...]] | None = None) -> None:
    """Raise ConfigTypeError naming every value of the wrong type under `keys` (checked against the signatures
    of their `_target_`s) and among the `plain` dotted keys (checked against the types given there)."""
    problems: list[str] = []

    def visit(node, path: str) -> None:
        if isinstance(node, DictConfig):
            hints = _hints(node["_target_"]) if "_target_" in node else {}
            for key in node:
                if str(key).startswith("_") or OmegaConf.is_missing(node, key):
                    continue  # a missing value (???) is Hydra's to report
                child = node[key]
                if not isinstance(child, (DictConfig, ListConfig)) and key in hints:
                    allowed = _allowed(hints[key])
                    if allowed is not None and not _fits(child, allowed):
                        problems.append(f"{path}.{key}={child!r}: expected {_type_names(allowed)}")
                visit(child, f"{path}.{key}")
        elif isinstance(node, ListConfig):
            for i, child in enumerate(node):
                visit(child, f"{path}[{i}]")

    for key in keys:
        node = cfg.get(key)
        if node is not None:
            visit(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), key)
    for key, allowed in (plain or {}).items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if not isinstance(value, (DictConfig, ListConfig)) and not _fits(value, allowed):
            problems.append(f"{key}={value!r}: expected {_type_names(allowed)}")
    if problems:
        raise ConfigTypeError("wrong type in the config (fix the override or the YAML):\n  " + "\n  ".join(problems))
