"""FrozenTextEncoder: shapes, masks, truncation, cache, frozen-ness, families, errors. No downloads."""

import warnings

import pytest
import torch
from torch import nn

from ldm.nn.text_encoder import FrozenTextEncoder, TextEncoderNotFoundError, pad_context


@pytest.fixture(scope="module")
def minilm():
    return FrozenTextEncoder(max_length=16)


def sibling(te: FrozenTextEncoder, **cfg) -> FrozenTextEncoder:
    """A new encoder sharing te's loaded weights and tokenizer (loading MiniLM again costs seconds)."""
    other = FrozenTextEncoder(**{**te.config, "lazy": True, **cfg})
    other.model, other.tokenizer, other.family = te.model, te.tokenizer, te.family
    return other


def test_shapes_mask_and_padding(minilm):
    te = sibling(minilm)
    ctx, mask = te.encode(["a photo of a sneaker", "a bag", ""])
    lengths = [len(te.tokenizer(c)["input_ids"]) for c in ["a photo of a sneaker", "a bag", ""]]
    assert ctx.shape == (3, max(lengths), 384) and ctx.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    assert torch.all(ctx[~mask] == 0)
    assert te.dim == 384 and te.family == "bert"
    # the same caption alone or in a batch with longer ones: bitwise the same embedding (exact resume needs it)
    alone, _ = sibling(minilm).encode(["a bag"])
    assert torch.equal(alone[0], ctx[1, : lengths[1]])
    # ... and among captions of its own token length, however many (a batch's row count changes GEMM blocking)
    same_length = ["a bag", "a coat", "a shirt", "a dress", "a hat", "a cap", "a sock", "a boot", "a belt", "a scarf"]
    assert len({len(te.tokenizer(c)["input_ids"]) for c in same_length}) == 1
    many, _ = sibling(minilm).encode(same_length)
    assert torch.equal(alone[0], many[0])


def test_pad_to_max_length_and_mask_padding(minilm):
    ctx, mask = sibling(minilm, pad_to_max_length=True).encode(["a bag", "a photo of a sneaker"])
    assert ctx.shape == (2, 16, 384) and mask[0].sum() == len(minilm.tokenizer("a bag")["input_ids"])
    _, mask = sibling(minilm, pad_to_max_length=True, mask_padding=False).encode(["a bag"])
    assert mask.all() and mask.shape == (1, 16)
    # padded to max_length too, a caption's embedding does not depend on how many captions it is encoded with
    alone, _ = sibling(minilm, pad_to_max_length=True).encode(["a bag"])
    many, _ = sibling(minilm, pad_to_max_length=True).encode(["a bag", "a coat", "a hat", "a cap", "a sock", "a tie"])
    assert torch.equal(alone[0], many[0])


def test_truncation_warns_once(minilm):
    te = sibling(minilm, max_length=8)
    with pytest.warns(UserWarning, match="truncated"):
        ctx, mask = te.encode(["one two three four five six seven eight nine ten", "short"])
    assert ctx.shape[1] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        te.encode(["eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen"])
        te.encode(["a bag"])


def test_cache_identity_lru_and_precompute(minilm):
    te = sibling(minilm, cache_size=3)
    a, _ = te.encode(["a bag"])
    entry = te.cached("a bag")
    b, _ = te.encode(["a bag", "a bag"])
    assert te.cached("a bag") is entry  # a hit returns the very same cached tensor
    assert torch.equal(a[0], b[0]) and torch.equal(b[0], b[1])
    assert te.cache_info()["hits"] == 2 and te.cache_info()["misses"] == 1
    te.encode(["c1", "c2"])
    te.encode(["a bag"])  # refresh: "c1" is now the least recently used
    te.encode(["c3"])
    assert te.cache_info()["size"] == 3
    assert te.cached("c1") is None and te.cached("a bag") is entry
    # precompute fills the cache; a bigger set than the cache warns
    te2 = sibling(minilm, cache_size=8)
    assert te2.precompute(["x", "y", "x", "z"]) == 3
    misses = te2.misses
    te2.encode(["z", "x", "y"])
    assert te2.misses == misses
    with pytest.warns(UserWarning, match="cache_size"):
        sibling(minilm, cache_size=2).precompute(["p", "q", "r"])
    off = sibling(minilm, cache_size=0)
    off.encode(["a bag"])
    assert off.cache_info()["size"] == 0


def test_frozen_and_not_in_state_dict(minilm):
    te = sibling(minilm)
    assert all(not p.requires_grad for p in te.parameters()) and sum(p.numel() for p in te.parameters()) > 1e6
    te.train()
    assert not te.training and not te.model.training
    te.requires_grad_(True)
    assert all(not p.requires_grad for p in te.parameters())
    ctx, _ = te.encode(["a coat"])
    assert not ctx.requires_grad

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.text_encoder = te

    parent = Parent()
    parent.train()
    assert not te.training
    sd = parent.state_dict()
    assert set(sd) == {"head.weight", "head.bias"}
    Parent().load_state_dict(sd, strict=True)  # text-encoder weights are not expected back


def test_autocast_does_not_change_embeddings(minilm):
    ref, _ = sibling(minilm).encode(["a dress"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = sibling(minilm).encode(["a dress"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_missing_path_and_unknown_hub_name():
    with pytest.raises(TextEncoderNotFoundError, match="/no/such/text_encoder") as err:
        FrozenTextEncoder("/no/such/text_encoder")
    assert "name_or_path" in str(err.value)
    lazy = FrozenTextEncoder("/no/such/text_encoder", lazy=True)  # configs instantiate without weights
    assert not lazy.loaded
    with pytest.raises(TextEncoderNotFoundError):
        lazy.encode(["a bag"])
    with pytest.raises(TextEncoderNotFoundError, match="no-such-org/no-such-model.*HF_HUB_OFFLINE"):
        FrozenTextEncoder("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="layer"):
        FrozenTextEncoder(layer="middle", lazy=True)


def _save_tiny(folder, model, minilm):
    model.save_pretrained(folder)
    minilm.tokenizer.save_pretrained(folder)
    return str(folder)


def test_clip_layers_and_bf16(tmp_path, minilm):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=101, eos_token_id=102, pad_token_id=0)
    folder = _save_tiny(tmp_path / "clip", CLIPTextModel(cfg), minilm)
    last = FrozenTextEncoder(folder, max_length=77, pad_to_max_length=True, mask_padding=False)
    assert last.family == "clip" and last.dim == 32
    ctx, mask = last.encode(["a sneaker"])
    assert ctx.shape == (1, 77, 32) and mask.all()
    pen = FrozenTextEncoder(folder, max_length=77, layer="penultimate", pad_to_max_length=True)
    ids = pen.tokenizer(["a sneaker"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = pen.model(input_ids=ids, output_hidden_states=True)
        norm = getattr(pen.model, "text_model", pen.model).final_layer_norm
        expected = norm(out.hidden_states[-2])
    got, _ = pen.encode(["a sneaker"])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, ctx)
    half = FrozenTextEncoder(folder, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.encode(["a sneaker"])[0].dtype == torch.float32


def test_t5_encoder(tmp_path, minilm):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=minilm.tokenizer.vocab_size, d_model=24, d_kv=8, d_ff=48, num_layers=2,
                   num_heads=3)
    te = FrozenTextEncoder(_save_tiny(tmp_path / "t5", T5EncoderModel(cfg), minilm), max_length=32)
    ctx, mask = te.encode(["a bag", "a photo of an ankle boot"])
    assert te.family == "t5" and te.dim == 24 and ctx.shape[::2] == (2, 24) and mask[0].sum() < mask[1].sum()


def test_pad_context():
    ctx, mask = torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    c, m = pad_context(ctx, mask, 5)
    assert c.shape == (2, 5, 4) and m[:, 3:].sum() == 0 and c[:, 3:].abs().sum() == 0
    assert pad_context(ctx, mask, 3)[0] is ctx
