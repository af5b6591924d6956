"""UNetModel: shapes over its options, gradients, checkpointing, SD parameter counts, errors, diffusers parity."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.convert.tables import unet_state_dict_from_diffusers
from ldm.nn.embeddings import timestep_embedding
from ldm.nn.unet import ResBlock, UNetModel, masked_mean

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "unet"
TINY = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_head_channels=8, context_dim=12, norm_num_groups=8)


def tiny(**overrides) -> UNetModel:
    return UNetModel(**{**TINY, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised output layers would hide gradients and errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(b=2, c=4, hw=8, ctx_len=5, ctx_dim=12):
    return torch.randn(b, c, hw, hw), torch.randint(0, 1000, (b,)), torch.randn(b, ctx_len, ctx_dim)


CASES = {
    "base": ({}, {}),
    "learned_variance": ({"out_channels": 8}, {}),
    "concat_channels": ({"in_channels": 9}, {}),  # e.g. inpainting: latent + mask + masked latent
    "class_labels": ({"num_classes": 10}, {"y": torch.tensor([3, 7])}),
    "vector_y": ({"num_classes": "sequential", "adm_in_channels": 6}, {"y": torch.randn(2, 6)}),
    "continuous_y": ({"num_classes": "continuous"}, {"y": torch.tensor([0.25, 2.0])}),
    "linear_proj": ({"use_linear_in_transformer": True}, {}),
    "num_heads": ({"num_heads": 2, "num_head_channels": -1}, {}),
    "depth2": ({"transformer_depth": 2, "attention_resolutions": [1, 2]}, {}),
    "scale_shift_norm": ({"use_scale_shift_norm": True, "num_res_blocks": 2}, {}),
    "three_levels": ({"channel_mult": [1, 2, 2], "attention_resolutions": [4, 2, 1]}, {}),
    "no_context": ({"context_dim": None}, {"context": None}),
    "first_mult_not_1": ({"channel_mult": [2, 4]}, {}),
    "pooled_context": ({"pooled_context": True}, {}),  # the output conv takes model_channels × channel_mult[0]
}


@pytest.mark.parametrize("name", CASES)
def test_output_shapes(name):
    overrides, extra = CASES[name]
    model = tiny(**overrides)
    x, t, ctx = inputs(c=model.in_channels)
    out = model(x, t, **{"context": ctx, **extra})
    assert out.shape == (2, model.out_channels, 8, 8)
    assert torch.isfinite(out).all()


def test_structure_follows_the_config():
    model = tiny(transformer_depth=2, channel_mult=[1, 2, 4], num_res_blocks=2, attention_resolutions=[2])
    # 1 conv_in + 3 levels × 2 res blocks + 2 downsamplers; output side 3 levels × 3
    assert len(model.input_blocks) == 9 and len(model.output_blocks) == 9
    attn = model.input_blocks[4][1]  # level 1 (ds=2), first res block
    assert len(attn.transformer_blocks) == 2 and attn.transformer_blocks[0].attn1.heads == 4
    assert all(len(b) == 1 for b in model.input_blocks[1:3])  # ds=1: no attention
    assert type(model.output_blocks[2][-1]).__name__ == "Upsample"


def test_heads_versus_head_channels():
    by_channels = tiny(num_head_channels=4)  # width 16 -> 4 heads, width 32 -> 8 heads
    by_heads = tiny(num_heads=4, num_head_channels=-1)  # 4 heads everywhere
    assert [by_channels.input_blocks[3][1].transformer_blocks[0].attn1.heads,
            by_channels.middle_block[1].transformer_blocks[0].attn1.heads] == [8, 8]
    blk = by_heads.middle_block[1].transformer_blocks[0].attn1
    assert (blk.heads, blk.dim_head) == (4, 8)


def test_float_and_scalar_timesteps():
    model = randomize(tiny()).eval()
    x, _, ctx = inputs()
    with torch.no_grad():
        out = {t: model(x, torch.full((2,), t), ctx) for t in (500.0, 500.5, 501.0)}
        torch.testing.assert_close(model(x, 500.5, ctx), out[500.5])  # a scalar is broadcast over the batch
        torch.testing.assert_close(model(x, torch.tensor([500]), ctx), out[500.0])
    assert not torch.allclose(out[500.5], out[500.0]) and not torch.allclose(out[500.5], out[501.0])


def test_context_mask_hides_padding_tokens():
    model = randomize(tiny(attention_resolutions=[1, 2])).eval()
    x, t, ctx = inputs()
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = model(x, t, ctx, context_mask=keep)
        ctx2 = torch.where(keep[..., None], ctx, torch.randn_like(ctx))
        torch.testing.assert_close(model(x, t, ctx2, context_mask=keep), out, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x[:1], t[:1], ctx[:1, :3]), out[:1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, t, ctx, context_mask=torch.ones(2, 5, dtype=torch.bool)),
                                   model(x, t, ctx), rtol=0, atol=1e-6)


def test_masked_mean_averages_the_kept_tokens_only():
    ctx = torch.arange(12.0).reshape(2, 3, 2)
    keep = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(masked_mean(ctx, keep), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    torch.testing.assert_close(masked_mean(ctx, None), ctx.mean(1))


def test_pooled_context_reaches_the_res_blocks():
    """pooled_context=True adds the caption's masked mean (through context_emb) to the embedding every ResBlock
    sees: padding tokens change nothing, another caption changes it; without it the embedding ignores the caption."""

    def block_embedding(model, ctx, keep=None):
        seen = []
        block = next(m for m in model.modules() if isinstance(m, ResBlock))
        handle = block.register_forward_pre_hook(lambda _, args: seen.append(args[1]))
        with torch.no_grad():
            model(x, t, ctx, context_mask=keep)
        handle.remove()
        return seen[0]

    x, t, ctx = inputs()
    keep = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = torch.where(keep[..., None], ctx, torch.randn_like(ctx))
    pooled = randomize(tiny(pooled_context=True)).eval()
    emb = block_embedding(pooled, ctx, keep)
    torch.testing.assert_close(block_embedding(pooled, padded, keep), emb, rtol=0, atol=1e-5)
    assert (block_embedding(pooled, ctx + 1.0, keep) - emb).abs().max() > 1e-3
    plain = randomize(tiny()).eval()
    assert plain.context_emb is None
    torch.testing.assert_close(block_embedding(plain, ctx), block_embedding(plain, ctx + 1.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooled_context=True needs a context"):
        tiny(context_dim=None, pooled_context=True)


def test_gradients_reach_every_parameter():
    model = randomize(tiny(num_classes=10, attention_resolutions=[1, 2], transformer_depth=2, out_channels=8,
                           pooled_context=True))
    x, t, ctx = inputs()
    (model(x, t, ctx, y=torch.tensor([1, 2])) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name == "label_emb.weight":  # only the rows of the labels used
            assert p.grad[[1, 2]].abs().sum() > 0 and p.grad[[0, 3, 4, 5, 6, 7, 8, 9]].abs().sum() == 0
        else:
            assert p.grad.abs().sum() > 0, name


def test_zero_initialised_output_layer():
    model = tiny()
    x, t, ctx = inputs()
    assert model(x, t, ctx).abs().max() == 0  # LDM init: the out conv is zero


@pytest.mark.parametrize("linear", [False, True])
def test_gradient_checkpointing_gives_identical_outputs_and_gradients(linear, monkeypatch):
    cfg = dict(attention_resolutions=[1, 2], transformer_depth=2, use_linear_in_transformer=linear, num_classes=3)
    plain, ckpt = randomize(tiny(**cfg)), tiny(**cfg, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs()
    y = torch.tensor([0, 2])
    keep = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    calls = {"n": 0}
    orig = ResBlock._forward

    def counting(self, *args):
        calls["n"] += 1
        return orig(self, *args)

    monkeypatch.setattr(ResBlock, "_forward", counting)
    results = []
    for model in (plain, ckpt):
        calls["n"] = 0
        xx, cc = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        out = model(xx, t, cc, context_mask=keep, y=y)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.detach(), xx.grad, cc.grad, grads, calls["n"]))
    (o1, gx1, gc1, g1, n1), (o2, gx2, gc2, g2, n2) = results
    n_res = sum(isinstance(m, ResBlock) for m in plain.modules())
    assert (n1, n2) == (n_res, 2 * n_res)  # checkpointed blocks are recomputed in the backward pass
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    torch.testing.assert_close(gx2, gx1, rtol=0, atol=0)
    torch.testing.assert_close(gc2, gc1, rtol=0, atol=0)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=0, msg=name)


def test_checkpointing_is_off_without_grad():
    model = tiny(use_checkpoint=True)
    x, t, ctx = inputs()
    with torch.no_grad():
        assert model(x, t, ctx).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("name, count", [("sd_v1", 859_520_964), ("sd_v2", 865_910_724)])
def test_stable_diffusion_parameter_count_on_meta_device(name, count):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    with torch.device("meta"):
        model = instantiate(cfg)
    assert isinstance(model, UNetModel)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == count
    heads = model.input_blocks[1][1].transformer_blocks[0].attn1
    assert (heads.heads, heads.dim_head) == ((8, 40) if name == "sd_v1" else (5, 64))
    assert isinstance(model.input_blocks[1][1].proj_in, torch.nn.Linear) == (name == "sd_v2")


def test_fmnist_config_instantiates_and_runs():
    model = instantiate(OmegaConf.load(CONF / "fmnist.yaml"))
    x = torch.randn(2, 4, 8, 8)
    assert model(x, torch.tensor([1, 999]), torch.randn(2, 7, 384)).shape == (2, 4, 8, 8)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    dim, half = 10, 5
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim)
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            freq = math.exp(-math.log(10000.0) * j / half)
            assert emb[i, j].item() == pytest.approx(math.cos(ti * freq), abs=1e-4)
            assert emb[i, half + j].item() == pytest.approx(math.sin(ti * freq), abs=1e-4)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and (odd[:, -1] == 0).all()
    torch.testing.assert_close(odd[:, :6], timestep_embedding(t, 6))


@pytest.mark.parametrize("overrides, match", [
    ({"num_head_channels": -1}, "set num_heads or num_head_channels"),
    ({"num_heads": 3, "num_head_channels": -1}, "num_heads=3 does not divide the width 32"),
    ({"num_head_channels": 12}, "num_head_channels=12 does not divide the width 32"),
    ({"num_res_blocks": 0}, "num_res_blocks >= 1"),
    ({"channel_mult": []}, "channel_mult"),
    ({"conv_resample": False}, "conv_resample=False"),
    ({"num_classes": "sequential"}, "adm_in_channels"),
    ({"num_classes": "words"}, "unknown num_classes"),
    ({"num_classes": 0}, "num_classes must be >= 1"),
    ({"transformer_depth": 0}, "transformer_depth"),
    ({"attention_resolutions": [3]}, "attention_resolutions"),
])
def test_bad_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_bad_call_errors():
    model = tiny()
    x, t, ctx = inputs()
    with pytest.raises(ValueError, match="pass context"):
        model(x, t)
    with pytest.raises(ValueError, match=r"context must have shape \(2, L, 12\)"):
        model(x, t, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="no class embedding"):
        model(x, t, ctx, y=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timesteps must be a scalar or have shape"):
        model(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="context_mask must have shape"):
        model(x, t, ctx, context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(2, 5, 8, 8), t, ctx)
    with pytest.raises(ValueError, match="divisible by 2"):  # one downsampling level
        model(torch.randn(2, 4, 7, 7), t, ctx)
    with pytest.raises(ValueError, match="no cross-attention"):
        tiny(context_dim=None)(x, t, ctx)
    labelled = tiny(num_classes=10)
    with pytest.raises(ValueError, match="pass y"):
        labelled(x, t, ctx)
    with pytest.raises(ValueError, match="y has batch 3"):
        labelled(x, t, ctx, y=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class labels"):
        labelled(x, t, ctx, y=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"y must have shape \(2, 6\)"):
        tiny(num_classes="sequential", adm_in_channels=6)(x, t, ctx, y=torch.randn(2, 5))


def _diffusers_twin(model_kwargs: dict):
    """The same architecture as diffusers' UNet2DConditionModel."""
    diffusers = pytest.importorskip("diffusers")
    k = model_kwargs
    chans = tuple(k["model_channels"] * m for m in k["channel_mult"])
    attn = [2 ** i in k["attention_resolutions"] for i in range(len(chans))]
    return diffusers.UNet2DConditionModel(
        in_channels=k["in_channels"], out_channels=k["out_channels"], block_out_channels=chans,
        layers_per_block=k["num_res_blocks"], norm_num_groups=k["norm_num_groups"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=k["context_dim"], attention_head_dim=tuple(c // k["num_head_channels"] for c in chans),
        transformer_layers_per_block=k.get("transformer_depth", 1),
        use_linear_projection=k.get("use_linear_in_transformer", False), num_class_embeds=k.get("num_classes"))


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_resolutions": [1, 2], "use_linear_in_transformer": True, "transformer_depth": 2, "num_classes": 5,
     "num_res_blocks": 2},
    {"channel_mult": [1, 2, 2], "attention_resolutions": [1, 4], "in_channels": 5, "out_channels": 8},
])
def test_matches_diffusers_unet(overrides):
    kwargs = {**TINY, **overrides}
    theirs = _diffusers_twin(kwargs).eval()
    randomize(theirs, seed=1)
    ours = UNetModel(**kwargs).eval()
    ours.load_state_dict(unet_state_dict_from_diffusers(theirs.state_dict(), kwargs["num_res_blocks"]), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x, _, ctx = inputs(c=kwargs["in_channels"])
    t = torch.tensor([3.0, 640.5])
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = torch.tensor([4, 1]) if kwargs.get("num_classes") else None
    with torch.no_grad():
        ref = theirs(x, t, ctx, class_labels=y, encoder_attention_mask=keep, return_dict=False)[0]
        out = ours(x, t, ctx, context_mask=keep, y=y)
    assert ref.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_diffusers_key_mapping_rejects_unknown_keys():
    with pytest.raises(KeyError, match="add_embedding"):
        unet_state_dict_from_diffusers({"add_embedding.linear_1.weight": torch.zeros(1)}, 2)


def test_channels_last_is_internal_and_matches_the_nchw_network():
    cl, plain = randomize(tiny(attention_resolutions=[1, 2])), tiny(attention_resolutions=[1, 2], channels_last=False)
    plain.load_state_dict(cl.state_dict())
    conv_w = cl.input_blocks[0][0].weight
    assert conv_w.is_contiguous(memory_format=torch.channels_last) and not conv_w.is_contiguous()
    assert plain.input_blocks[0][0].weight.is_contiguous()
    # loading NCHW weights (a checkpoint, SD weights) keeps the NHWC strides of the parameters
    cl.load_state_dict({k: v.contiguous() for k, v in plain.state_dict().items()})
    assert cl.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    layouts = []
    cl.input_blocks[1].register_forward_hook(
        lambda m, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    x, t, ctx = inputs()
    out_cl, out = cl(x, t, ctx), plain(x, t, ctx)
    assert layouts == [True]  # feature maps inside the network are NHWC
    assert out_cl.is_contiguous() and out_cl.shape == out.shape
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    out_cl.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(cl.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
