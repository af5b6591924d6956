"""Attention on torch SDPA: CrossAttention, GEGLU feed-forward, BasicTransformerBlock, SpatialTransformer.

Names follow the CompVis / Stable Diffusion layout (attn1/attn2 with to_q/to_k/to_v/to_out.0, norm1-3,
ff.net.0.proj, ff.net.2, proj_in/proj_out) so SD weights load by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.layers import group_norm, zero_module

# On CPU, attention over few query×key pairs (8×8 and 4×4 maps attending to themselves or to a short caption) runs
# 2-4× faster as two batched matmuls and a softmax than through SDPA's flash kernel, whose blocking only pays off for
# long sequences (torch 2.13, 2 cores: (64, 2, 64, 64, 32) 0.9 vs 1.6 ms forward; (16, 2, 1024, 1024, 32) 137 vs
# 38 ms). Above this many query×key pairs, and on every other device, attention goes through SDPA.
CPU_SMALL_ATTENTION_PAIRS = 16384

# Without autograd on CPU, the feed-forward runs over row chunks whose GEGLU intermediates (rows × 4·dim values)
# take about this many bytes each, so that they stay in a core's L2 cache instead of streaming through memory
# (torch 2.13, 2 cores: FF of 16 × 1024 tokens × 64 ch 22 → 13.5 ms; 32×32 sampling step of the benchmark U-Net
# 520 → 471 ms). Training keeps one pass: autograd saves the intermediates anyway.
CPU_FF_CHUNK_BYTES = 1 << 20


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d) v for (B, H, N, d) queries and (B, H, L, d) keys/values; mask (B, 1, 1, L), True = keep."""
    if q.device.type != "cpu" or q.shape[-2] * k.shape[-2] > CPU_SMALL_ATTENTION_PAIRS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:  # expand_mask keeps at least one key per row, so no row is all -inf
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


def regroup_pays(tokens: int, query_dim: int, heads: int, dim_head: int, length: int) -> bool:
    """Whether cross-attention of `tokens` queries to `length` context tokens takes fewer multiply-adds per sample
    with the query and output projections folded into the context side (`CrossAttention._regrouped`).

    Per query token that saves H·(C·d + L·d − C·L) (two GEMMs of width H·L instead of four of width C or d) and costs
    2·H·L·d·C per sample for the folded products: it pays for short captions, few heads and many tokens (the fmnist
    and benchmark U-Nets on maps above 4×4), not for Stable Diffusion's 77 tokens × 8 heads or for 4×4 maps.
    """
    saved = tokens * heads * (query_dim * dim_head + length * dim_head - query_dim * length)
    return saved > 2 * heads * length * dim_head * query_dim


def expand_mask(context_mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """(B, L) bool key-padding mask (True = keep) -> (B, 1, 1, L) for SDPA; None stays None."""
    if context_mask is None:
        return None
    if context_mask.shape != (batch, length):
        raise ValueError(f"context_mask must have shape ({batch}, {length}), got {tuple(context_mask.shape)}")
    if context_mask.dtype != torch.bool:
        raise ValueError(f"context_mask must be bool (True = keep), got {context_mask.dtype}")
    # A row with every token masked would give NaN; such a row attends to all tokens instead.
    context_mask = context_mask | ~context_mask.any(-1, keepdim=True)
    return context_mask[:, None, None, :]


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) to context (B, L, context_dim), or to itself."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        if context is None:  # self-attention: one projection GEMM, q/k/v are strided views of its output
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = F.linear(x, w).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            mask = None
        else:  # keys and values in one GEMM: (B, L, 2, H, d)
            kv = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])).view(b, context.shape[1], 2, h, d)
            if x.device.type == "cpu" and regroup_pays(n, x.shape[-1], h, d, kv.shape[1]):
                return self._regrouped(x, kv, mask)
            q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, mask)  # (B, H, N, d)
        out = self.to_out[0](out.transpose(1, 2).reshape(b, n, h * d))
        return self.to_out[1](out) if self.to_out[1].p else out

    def _regrouped(self, x: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        """Cross-attention, given the context's keys and values kv (B, L, 2, H, d), with the query and output
        projections folded into the short context's side.

        Per head, scores = (x W_q,hᵀ) k_hᵀ = x (W_q,hᵀ k_hᵀ) and out = Σ_h P_h (v_h W_o,hᵀ): the (C, H·L) and
        (H·L, C) products are formed once per sample from the L context tokens, leaving two GEMMs over the N
        query tokens, of width H·L instead of four of width C (see `regroup_pays`).
        """
        b, n, c = x.shape
        h, d, length = self.heads, self.dim_head, kv.shape[1]
        # (H, B·L, d) keys and values, so that each folded product is one GEMM per head over all samples
        k, v = kv.reshape(b * length, 2, h, d).permute(1, 2, 0, 3).unbind(0)
        out_proj = self.to_out[0]
        qk = torch.bmm(k, self.to_q.weight.view(h, d, c) * d ** -0.5)  # (H, B·L, C): k_h W_q,h, i.e. (W_q,hᵀ k_hᵀ)ᵀ
        vo = torch.bmm(v, out_proj.weight.view(-1, h, d).permute(1, 2, 0))  # (H, B·L, C): v_h W_o,hᵀ
        qk, vo = (t.view(h, b, length, -1).transpose(0, 1).reshape(b, h * length, -1) for t in (qk, vo))
        scores = torch.bmm(x, qk.transpose(1, 2)).view(b, n, h, length)
        if mask is not None:  # (B, 1, 1, L) broadcasts over (B, N, H, L)
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.baddbmm(out_proj.bias, scores.softmax(-1).view(b, n, h * length), vo)
        return self.to_out[1](out) if self.to_out[1].p else out


class GEGLU(nn.Module):
    """Gated GELU: proj to 2×inner, value ⊙ GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        # Two GEMMs on the two row blocks of proj.weight instead of one GEMM and .chunk(): the same FLOPs, but
        # GELU and the product then run on contiguous tensors (CPU, 2 cores: the FF forward 1.2-4× faster).
        w, b = self.proj.weight, self.proj.bias
        half = w.shape[0] // 2
        return F.linear(x, w[:half], b[:half]) * F.gelu(F.linear(x, w[half:], b[half:]))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        net = self.net
        h = net[0](x)
        return net[2](net[1](h) if net[1].p else h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        # without a context (context_dim=None) attn2 is a second self-attention, as in LDM
        x = x + self.attn2(self.norm2(x), context, mask)
        return self._ff_residual(x)

    def _ff_residual(self, x: Tensor) -> Tensor:
        """x + ff(norm3(x)); on CPU without autograd, over cache-sized row chunks (CPU_FF_CHUNK_BYTES)."""
        rows = max(1, CPU_FF_CHUNK_BYTES // (self.ff.net[2].in_features * x.element_size()))
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() <= rows * x.shape[-1]:
            return x + self.ff(self.norm3(x))
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], rows):
            chunk = flat[start:start + rows]
            torch.add(chunk, self.ff(self.norm3(chunk)), out=out[start:start + rows])
        return out.view_as(x)


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H×W tokens -> zero-init proj_out, residual.

    proj_in/proj_out are 1×1 convs (SD v1) or Linear layers (SD v2, `use_linear`); both run as a GEMM on
    the token matrix, which is a free view of a channels-last feature map.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, use_linear: bool = False, use_checkpoint: bool = False,
                 norm_groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.use_linear, self.use_checkpoint = use_linear, use_checkpoint
        self.norm = group_norm(channels, norm_groups, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, dropout, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, mask, use_reentrant=False)
        return self._forward(x, context, mask)

    def _forward(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C), a view if channels-last
        tokens = F.linear(tokens, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, mask)
        tokens = F.linear(tokens, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + tokens.view(b, h, w, c).permute(0, 3, 1, 2)
