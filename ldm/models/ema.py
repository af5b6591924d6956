"""Exponential moving average of a network's weights, for the LightningModules (autoencoder, latent diffusion)

    self.ema = EMA(self.net, decay=0.9999)   # in __init__: a sub-module, so its state is in every checkpoint
    self.ema.update(step)                   # after each optimizer step
    with self.ema.swap():                   # evaluate / export with the averaged weights in `self.net`
        ...
    self.ema.module                         # or use the averaged copy directly (same architecture as `net`)

The shadow copy is frozen (requires_grad=False), so optimizers and DDP never see it. Lightning's own
`EMAWeightAveraging` callback averages the whole LightningModule (discriminator, frozen VAE and text encoder
too) and keeps the average outside `state_dict`; this one averages exactly the network it is given.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow weights ← decay·shadow + (1 − decay)·weights; buffers (e.g. BatchNorm statistics) are copied.

    `warmup=True` uses min(decay, (1 + n) / (10 + n)) at update n, so early averages are not stuck at init.
    The state dict holds `module.<the network's keys>` and `num_updates`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = float(decay), warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # The live network, kept out of the module tree (it is registered where it belongs, by its owner).
        self.__dict__["_model"] = model

    @property
    def model(self) -> nn.Module:
        return self.__dict__["_model"]

    def train(self, mode: bool = True) -> EMA:
        """The shadow copy stays in eval mode (dropout off) whatever its owner does."""
        super().train(mode)
        self.module.eval()
        return self

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shadow = [p for p in self.module.parameters()]
        live = [p.detach() for p in self.model.parameters()]
        if len(shadow) != len(live):
            raise RuntimeError("EMA: the network's parameters changed since the EMA copy was made")
        return shadow, live

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        shadow, live = self._pairs()
        alike = all(s.dtype == p.dtype and s.device == p.device for s, p in zip(shadow, live, strict=True))
        if shadow and alike:
            torch._foreach_lerp_(shadow, live, 1.0 - decay)
        else:
            for s, p in zip(shadow, live, strict=True):
                s.lerp_(p.to(s), 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), self.model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite `model` (default: the live network) with the averaged weights."""
        (model or self.model).load_state_dict(self.module.state_dict())

    @torch.no_grad()
    def _exchange(self) -> None:
        shadow, live = self._pairs()
        for s, p in zip(shadow, live, strict=True):
            tmp = p.clone()
            p.copy_(s)
            s.copy_(tmp)

    @contextmanager
    def swap(self) -> Iterator[nn.Module]:
        """Within the block the live network holds the EMA weights (the shadow the live ones); restored after,
        also on error. In-place copies: optimizer state and DDP keep pointing at the same tensors."""
        self._exchange()
        try:
            yield self.model
        finally:
            self._exchange()
