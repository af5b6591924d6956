"""Classifier-free guidance (Ho & Salimans 2022), wrapped once around the network for every sampler.

out = uncond + scale · (cond − uncond), from one batched call on [cond; uncond]. Optional guidance
rescale φ (Lin et al. 2023, eq. 15–16): match the guided output's per-sample std to the conditional
output's and blend, out = φ · out · std(cond)/std(out) + (1 − φ) · out.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): a weaker network of
the same model family (here: an earlier checkpoint of the same run) under the same condition adds
a · (cond − guide(cond)), which pulls samples away from the errors the weaker network makes more of; it mends
fidelity where CFG's term mends prompt adherence, and the two add (a = 0: plain CFG).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

UNetFn = Callable[..., Tensor]  # unet_fn(x, t, **cond) -> raw output


def _batch(name: str, cond: Any, uncond: Any, batch: int) -> Any:
    """Stack one conditioning entry as [cond; uncond] along the batch (a size-1 batch is broadcast)."""
    if not isinstance(cond, Tensor) and not isinstance(uncond, Tensor):
        if cond == uncond:  # None, or a shared non-tensor option: passed once
            return cond
        raise ValueError(f"conditioning {name!r}: non-tensor values {cond!r} and {uncond!r} differ")
    if not (isinstance(cond, Tensor) and isinstance(uncond, Tensor)):
        raise TypeError(f"conditioning {name!r}: cond and uncond must both be tensors (or both None)")
    parts = []
    for which, v in (("cond", cond), ("uncond", uncond)):
        if v.shape[0] not in (1, batch):
            raise ValueError(f"conditioning {name!r} ({which}) has batch {v.shape[0]}, expected {batch} or 1")
        parts.append(v.expand(batch, *v.shape[1:]))
    if parts[0].shape[1:] != parts[1].shape[1:]:
        raise ValueError(f"conditioning {name!r}: cond shape {tuple(cond.shape)} and uncond shape "
                         f"{tuple(uncond.shape)} differ beyond the batch (pad contexts to one length)")
    return torch.cat(parts)


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Blend `guided` with itself rescaled to `cond`'s per-sample std (std over all non-batch dims)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cfg_model_fn(
    unet_fn: UNetFn,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    scale: float,
    rescale: float = 0.0,
    learned_variance: bool = False,
    guide_fn: UNetFn | None = None,
    guide_scale: float = 0.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """model_fn(x, t) guided at `scale` (1: the conditional model, one pass; 0: the unconditional one).

    cond / uncond are keyword arguments for unet_fn (same keys). With learned_variance the network's
    output is [mean; variance values] along channels: only the mean half is guided, the conditional
    variance values are kept. guide_fn (same signature as unet_fn) with guide_scale a > 0 adds autoguidance,
    a · (cond − guide_fn(x, t, **cond)), one more pass of the guide network per step (applied before rescale)."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    check_guide(guide_fn, guide_scale)
    cond, uncond = dict(cond), dict(uncond)
    autoguide = guide_fn is not None and guide_scale > 0

    if scale == 1.0 and not autoguide:
        return lambda x, t: unet_fn(x, t, **cond)
    if scale == 1.0:
        return autoguided_fn(lambda x, t: unet_fn(x, t, **cond), lambda x, t: guide_fn(x, t, **cond), guide_scale,
                             learned_variance)

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(1).expand(b) if t.numel() == 1 else t
        kwargs = {k: _batch(k, cond[k], uncond[k], b) for k in cond}
        out = unet_fn(torch.cat([x, x]), torch.cat([t, t]), **kwargs)
        out_c, out_u = out[:b], out[b:]
        var_values = None
        if learned_variance:
            (out_c, var_values), (out_u, _) = out_c.chunk(2, dim=1), out_u.chunk(2, dim=1)
        guided = out_u + scale * (out_c - out_u)
        if autoguide:
            guided = guided + guide_scale * (out_c - _mean(guide_fn(x, t, **cond), learned_variance))
        if rescale > 0:
            guided = rescale_guidance(guided, out_c, rescale)
        return guided if var_values is None else torch.cat([guided, var_values], dim=1)

    return model_fn


def check_guide(guide_fn: UNetFn | None, guide_scale: float) -> None:
    if not guide_scale >= 0:
        raise ValueError(f"guide_scale must be >= 0, got {guide_scale}")
    if guide_scale > 0 and guide_fn is None:
        raise ValueError(f"guide_scale={guide_scale} needs a guide network (an earlier checkpoint of the model)")


def _mean(out: Tensor, learned_variance: bool) -> Tensor:
    return out.chunk(2, dim=1)[0] if learned_variance else out


def autoguided_fn(model_fn: Callable[[Tensor, Tensor], Tensor], guide_fn: Callable[[Tensor, Tensor], Tensor],
                  scale: float, learned_variance: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """model_fn(x, t) + scale · (model_fn(x, t) − guide_fn(x, t)) on the mean part (autoguidance without CFG:
    an unconditional model, or guidance 1)."""
    def fn(x: Tensor, t: Tensor) -> Tensor:
        out = model_fn(x, t)
        if learned_variance:
            mean, var_values = out.chunk(2, dim=1)
            return torch.cat([mean + scale * (mean - _mean(guide_fn(x, t), True)), var_values], dim=1)
        return out + scale * (out - guide_fn(x, t))
    return fn
