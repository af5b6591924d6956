import pytest
import torch
import torch.nn.functional as F

from ldm.nn.layers import GroupNorm, Upsample, _GroupNormNHWC, nearest2x_conv_kernel


def test_folded_kernel_taps_by_hand():
    # one input and output channel, a kernel that is one row [k0, k1, k2] repeated down the rows
    k = torch.tensor([1.0, 10.0, 100.0])
    w = k.expand(3, 3)[None, None]
    folded = nearest2x_conv_kernel(w)[0, 0]
    taps = torch.tensor([100.0, 110.0, 11.0, 1.0])  # [k2, k1+k2, k0+k1, k0] along each axis
    row_sums = torch.tensor([1.0, 2.0, 2.0, 1.0])  # along the other axis every row is summed the same way
    torch.testing.assert_close(folded, row_sums[:, None] * taps[None, :])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(5, 3), (1, 1), (4, 4)])
def test_upsample_is_nearest_then_conv(channels_last, size):
    torch.manual_seed(0)
    up = Upsample(6, 4)
    x = torch.randn(3, 6, *size)
    if channels_last:
        up.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out = up(x)
    ref = up.conv(F.interpolate(ref_x, scale_factor=2.0, mode="nearest"))
    assert out.shape == (3, 4, 2 * size[0], 2 * size[1])
    if size != (1, 1):  # a 1×1 map is both NCHW- and NHWC-contiguous
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, up.conv.weight, up.conv.bias), grad)
    want = torch.autograd.grad(ref, (ref_x, up.conv.weight, up.conv.bias), grad)
    for g, w, name in zip(got, want, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_upsample_keeps_the_ldm_parameter_names():
    assert set(Upsample(8).state_dict()) == {"conv.weight", "conv.bias"}


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,groups", [((3, 64, 32, 32), 32), ((2, 12, 5, 7), 4),
                                          ((4, 8, 2, 3), 8),  # one channel per group
                                          ((2, 6, 4, 4), 1)])  # one group
@pytest.mark.parametrize("offset", [0.0, 300.0])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_channels_last_matches_float64(shape, groups, offset, affine):
    torch.manual_seed(0)
    gn = GroupNorm(groups, shape[1], affine=affine)
    if affine:
        with torch.no_grad():
            gn.weight.normal_()
            gn.bias.normal_()
    # offset 300 against a spread of 0.5: a one-pass E[x²] - E[x]² variance (torch's channels-last forward kernel)
    # is off by ~0.6 there; NCHW torch and ours stay within fp32 rounding of the input
    base = torch.randn(shape) * 0.5 + offset
    x = _nhwc(base).requires_grad_()
    out = gn(x)
    assert type(out.grad_fn).__name__ == "_GroupNormNHWCBackward"
    assert out.is_contiguous(memory_format=torch.channels_last)
    params = [gn.weight, gn.bias] if affine else []
    params64 = [p.detach().double().requires_grad_() for p in params]
    ref_x = base.double().requires_grad_()
    ref = F.group_norm(ref_x, groups, *params64, eps=gn.eps)
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-3)
    for grad in (_nhwc(torch.randn(shape)), torch.randn(shape)):  # the gradient in either layout
        got = torch.autograd.grad(out, [x, *params], grad, retain_graph=True)
        want = torch.autograd.grad(ref, [ref_x, *params64], grad.double(), retain_graph=True)
        for g, w, name in zip(got, want, ("x", "weight", "bias"), strict=False):
            torch.testing.assert_close(g, w.float(), rtol=1e-3, atol=1e-3 * max(1.0, w.abs().max().item()), msg=name)
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 7), 3), ((1, 2, 32, 33), 1)])
def test_group_norm_channels_last_gradcheck(shape, groups):
    torch.manual_seed(0)
    gn = GroupNorm(groups, shape[1]).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = _nhwc(torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _GroupNormNHWC.apply(x, groups, w, b, gn.eps),
                                    (x, gn.weight, gn.bias))


def test_group_norm_other_inputs_use_torch_kernel():
    gn = GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert type(gn(x).grad_fn).__name__ == "NativeGroupNormBackward0"  # NCHW
    assert type(gn(x[:, :, :1, :1]).grad_fn).__name__ == "NativeGroupNormBackward0"  # 1×1: NCHW and NHWC alike
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "NHWC" not in type(gn(_nhwc(x)).grad_fn).__name__
    assert isinstance(gn, torch.nn.GroupNorm) and set(gn.state_dict()) == {"weight", "bias"}
    with pytest.raises(ValueError, match="4 channels"):
        gn(_nhwc(torch.randn(2, 6, 3, 3)))
