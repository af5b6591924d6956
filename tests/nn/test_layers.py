import pytest
import torch
import torch.nn.functional as F

from ldm.nn.layers import Upsample, nearest2x_conv_kernel


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


def test_upsample_on_cpu_takes_the_transposed_conv(monkeypatch):
    def no_interpolate(*args, **kwargs):
        raise AssertionError("the CPU path should not upsample a copy")

    monkeypatch.setattr(F, "interpolate", no_interpolate)  # layers.py calls F.interpolate on other devices only
    assert Upsample(4)(torch.randn(1, 4, 3, 3)).shape == (1, 4, 6, 6)
