"""Attention blocks: SDPA attention against a naive softmax(QKᵀ/√d)V written here, GEGLU, SpatialTransformer."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.nn.attention import GEGLU, BasicTransformerBlock, CrossAttention, SpatialTransformer, expand_mask, regroup_pays


def naive_attention(attn: CrossAttention, x, context=None, keep=None):
    """Multi-head attention from the module's weights, step by step; keep (B, L) bool masks keys."""
    src = x if context is None else context
    b, n, _ = x.shape
    h, d = attn.heads, attn.dim_head

    def heads(t):  # (B, N, h·d) -> (B, h, N, d)
        return t.reshape(b, t.shape[1], h, d).permute(0, 2, 1, 3)

    q, k, v = heads(x @ attn.to_q.weight.T), heads(src @ attn.to_k.weight.T), heads(src @ attn.to_v.weight.T)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, N, L)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    out = out.permute(0, 2, 1, 3).reshape(b, n, h * d)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_self_attention_matches_naive():
    attn = CrossAttention(24, None, heads=3, dim_head=8).eval()
    x = torch.randn(2, 10, 24)
    torch.testing.assert_close(attn(x), naive_attention(attn, x), rtol=0, atol=1e-5)


def test_cross_attention_matches_naive():
    attn = CrossAttention(16, context_dim=12, heads=2, dim_head=16).eval()
    x, ctx = torch.randn(3, 7, 16), torch.randn(3, 5, 12)
    torch.testing.assert_close(attn(x, ctx), naive_attention(attn, x, ctx), rtol=0, atol=1e-5)


def test_masked_cross_attention_matches_naive_and_ignores_masked_tokens():
    attn = CrossAttention(16, context_dim=12, heads=4, dim_head=4).eval()
    x, ctx = torch.randn(3, 6, 16), torch.randn(3, 5, 12)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = attn(x, ctx, expand_mask(keep, 3, 5))
    torch.testing.assert_close(out, naive_attention(attn, x, ctx, keep), rtol=0, atol=1e-5)
    ctx2 = torch.where(keep[..., None], ctx, torch.randn_like(ctx) * 100)  # change only the masked tokens
    torch.testing.assert_close(attn(x, ctx2, expand_mask(keep, 3, 5)), out, rtol=0, atol=1e-5)
    assert not torch.allclose(attn(x, ctx2), attn(x, ctx), atol=1e-3)  # and they do matter unmasked


def test_fully_masked_row_attends_to_all_tokens():
    attn = CrossAttention(8, context_dim=8, heads=2, dim_head=4).eval()
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    keep = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = attn(x, ctx, expand_mask(keep, 2, 4))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], attn(x[:1], ctx[:1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:], naive_attention(attn, x[1:], ctx[1:], keep[1:]), rtol=0, atol=1e-5)


def test_regroup_pays_by_multiply_add_count():
    # the benchmark U-Net's 32×32 and 16×16 levels and the fmnist U-Net (one head) with short captions: regrouped
    assert regroup_pays(1024, 64, 2, 32, 16) and regroup_pays(256, 128, 4, 32, 16) and regroup_pays(256, 32, 1, 32, 77)
    assert not regroup_pays(16, 128, 4, 32, 16)  # a 4×4 map: the per-sample products cost more than they save
    assert not regroup_pays(4096, 320, 8, 40, 77)  # Stable Diffusion v1 at 64×64: 77 tokens × 8 heads
    # the rule is the multiply-add count: four GEMMs of width C or d per query token against two of width H·L
    n, c, h, d, length = 100, 48, 3, 16, 12
    plain = n * (c * h * d + 2 * h * length * d + h * d * c)
    regrouped = n * 2 * c * h * length + 2 * h * length * d * c
    assert regroup_pays(n, c, h, d, length) == (regrouped < plain)


@pytest.mark.parametrize("masked", [False, True])
def test_regrouped_cross_attention_matches_naive_with_gradients(masked, monkeypatch):
    """The folded form (scores = x·(W_qᵀkᵀ), out = P·(v W_oᵀ)) is the same function, gradients included."""
    g = torch.Generator().manual_seed(0)
    attn = CrossAttention(32, context_dim=24, heads=2, dim_head=16).double().eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=g)
    x = torch.randn(3, 64, 32, generator=g, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(3, 5, 24, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool) if masked else None
    assert regroup_pays(64, 32, 2, 16, 5)
    calls = []
    regrouped = CrossAttention._regrouped
    monkeypatch.setattr(CrossAttention, "_regrouped", lambda self, *a: calls.append(1) or regrouped(self, *a))
    out = attn(x, ctx, expand_mask(keep, 3, 5) if masked else None)
    assert calls == [1]
    ref = naive_attention(attn, x, ctx, keep)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    params = [x, ctx, *attn.parameters()]
    grads = torch.autograd.grad(out, params, go)
    for a, b in zip(grads, torch.autograd.grad(ref, params, go), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if masked:  # masked context tokens get no gradient
        assert grads[1][0, 3:].abs().max() == 0 and grads[1][2, 1:].abs().max() == 0


def test_expand_mask_shape_and_errors():
    keep = torch.ones(2, 5, dtype=torch.bool)
    assert expand_mask(keep, 2, 5).shape == (2, 1, 1, 5)
    assert expand_mask(None, 2, 5) is None
    with pytest.raises(ValueError, match="context_mask must have shape"):
        expand_mask(keep, 2, 6)
    with pytest.raises(ValueError, match="must be bool"):
        expand_mask(keep.long(), 2, 5)


def test_geglu_closed_form():
    geglu = GEGLU(6, 5)
    x = torch.randn(4, 6)
    proj = x @ geglu.proj.weight.T + geglu.proj.bias
    value, gate = proj[:, :5], proj[:, 5:]
    expected = value * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    torch.testing.assert_close(geglu(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_spatial_transformer_conv_and_linear_projections_agree(depth):
    """proj_in/out as 1×1 convs (SD v1) and as Linear layers (SD v2) compute the same function."""
    conv = SpatialTransformer(16, heads=2, dim_head=8, depth=depth, context_dim=12, norm_groups=8).eval()
    lin = SpatialTransformer(16, heads=2, dim_head=8, depth=depth, context_dim=12, use_linear=True,
                             norm_groups=8).eval()
    torch.nn.init.normal_(conv.proj_out.weight)  # zero-initialised: give it weights so the test means something
    sd = {k: (v.flatten(1) if k.startswith(("proj_in.weight", "proj_out.weight")) else v)
          for k, v in conv.state_dict().items()}
    lin.load_state_dict(sd)
    x, ctx = torch.randn(2, 16, 4, 3), torch.randn(2, 5, 12)
    out = conv(x, ctx)
    assert out.shape == x.shape
    torch.testing.assert_close(lin(x, ctx), out, rtol=0, atol=1e-5)
    assert len(conv.transformer_blocks) == depth
    # and the whole block against a reference: GroupNorm -> 1×1 conv -> blocks -> 1×1 conv, residual
    tokens = F.conv2d(conv.norm(x), conv.proj_in.weight, conv.proj_in.bias).flatten(2).transpose(1, 2)
    for blk in conv.transformer_blocks:
        tokens = tokens + naive_attention(blk.attn1, blk.norm1(tokens))
        tokens = tokens + naive_attention(blk.attn2, blk.norm2(tokens), ctx)
        tokens = tokens + blk.ff(blk.norm3(tokens))
    h = tokens.transpose(1, 2).reshape(2, 16, 4, 3)
    torch.testing.assert_close(out, x + F.conv2d(h, conv.proj_out.weight, conv.proj_out.bias), rtol=0, atol=1e-5)


def test_spatial_transformer_proj_out_is_zero_initialised():
    st = SpatialTransformer(8, heads=2, dim_head=4, context_dim=4, norm_groups=4)
    x = torch.randn(1, 8, 2, 2)
    torch.testing.assert_close(st(x, torch.randn(1, 3, 4)), x)  # starts as the identity


@pytest.mark.parametrize("n,keys", [(64, 64), (16, 7), (130, 130)])  # the last is above the small-problem limit
def test_small_cpu_attention_path_matches_sdpa(n, keys, monkeypatch):
    from ldm.nn.attention import CPU_SMALL_ATTENTION_PAIRS, attention

    sdpa, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, s, 8, generator=g, requires_grad=True) for s in (n, keys, keys))
    keep = torch.arange(keys)[None] < torch.tensor([keys, 3, 1])[:, None]
    mask = keep[:, None, None, :]
    out = attention(q, k, v, mask)
    small = n * keys <= CPU_SMALL_ATTENTION_PAIRS
    assert calls == ([] if small else [1])  # the small problem really took the matmul-softmax path
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = sdpa(qr, kr, vr, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    go = torch.randn(out.shape, generator=g)
    out.backward(go)
    ref.backward(go)
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert small == (n < 130)  # both paths are exercised
    assert v.grad[1, :, 3:].abs().max() == 0  # masked keys get no gradient


@pytest.mark.parametrize("rows", [7, 120, 500])  # chunks that do not divide the 120 rows, one chunk, no chunking
def test_feed_forward_row_chunks_without_grad_match_one_pass(rows, monkeypatch):
    import ldm.nn.attention as attention_module

    block = BasicTransformerBlock(32, heads=2, dim_head=16, context_dim=24).eval()
    x, ctx = torch.randn(3, 40, 32), torch.randn(3, 5, 24)
    ref = block(x, ctx).detach()  # grad enabled: one pass through the feed-forward
    inner = block.ff.net[2].in_features
    monkeypatch.setattr(attention_module, "CPU_FF_CHUNK_BYTES", rows * inner * x.element_size())
    calls = []
    block.ff.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].numel() // 32))
    with torch.no_grad():
        out = block(x, ctx)
    assert calls == ([120] if rows >= 120 else [rows] * 17 + [1])  # really chunked, every row once
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
