"""Classifier-free guidance: scale endpoints, one batched network call, guidance rescale, learned variance; and
autoguidance by a weaker network (Karras et al. 2024)."""

import pytest
import torch

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.guidance import autoguided_fn, cfg_model_fn
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedule import NoiseSchedule


class Net:
    """unet_fn(x, t, context=, y=) with a call log; out_channels = 2C when learned variance."""

    def __init__(self, learned_variance=False):
        self.calls, self.learned_variance = [], learned_variance

    def __call__(self, x, t, context=None, y=None):
        self.calls.append((x.shape[0], t.shape, None if context is None else context.shape))
        t = t.to(x.dtype).reshape(-1, 1, 1, 1)
        c = 0 if context is None else context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        out = 0.5 * x + 2 * c * x.square() + 0.01 * t + (0 if y is None else y.reshape(-1, 1, 1, 1))
        if self.learned_variance:
            out = torch.cat([out, torch.tanh(c + x)], dim=1)
        return out


def setup(b=3, learned_variance=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 2, 4, 4, generator=g)
    t = torch.tensor([5, 500, 999][:b])
    cond = {"context": torch.randn(b, 7, 8, generator=g), "y": None}
    uncond = {"context": torch.zeros(1, 7, 8), "y": None}  # one "empty prompt", broadcast over the batch
    return Net(learned_variance), x, t, cond, uncond


def test_scale_one_is_the_conditional_model_in_one_pass():
    net, x, t, cond, uncond = setup()
    out = cfg_model_fn(net, cond, uncond, 1.0)(x, t)
    assert net.calls == [(3, (3,), (3, 7, 8))]
    torch.testing.assert_close(out, net(x, t, **cond))


def test_scale_zero_is_unconditional_and_guidance_is_one_batched_call():
    net, x, t, cond, uncond = setup()
    out0 = cfg_model_fn(net, cond, uncond, 0.0)(x, t)
    torch.testing.assert_close(out0, net(x, t, context=uncond["context"].expand(3, -1, -1)))
    net.calls.clear()
    out = cfg_model_fn(net, cond, uncond, 7.5)(x, t)
    assert net.calls == [(6, (6,), (6, 7, 8))]  # [cond; uncond] in one call
    c, u = net(x, t, **cond), net(x, t, context=torch.zeros(3, 7, 8))
    torch.testing.assert_close(out, u + 7.5 * (c - u))


def test_scalar_timestep_is_broadcast():
    net, x, _, cond, uncond = setup()
    cfg_model_fn(net, cond, uncond, 3.0)(x, torch.tensor(10))
    assert net.calls[-1][:2] == (6, (6,))


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale(phi):
    net, x, t, cond, uncond = setup()
    scale = 5.0
    out = cfg_model_fn(net, cond, uncond, scale, rescale=phi)(x, t)
    c, u = net(x, t, **cond), net(x, t, context=torch.zeros(3, 7, 8))
    guided = u + scale * (c - u)
    std = lambda v: v.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    torch.testing.assert_close(out, phi * guided * std(c) / std(guided) + (1 - phi) * guided)
    if phi == 1.0:
        torch.testing.assert_close(std(out), std(c))


def test_learned_variance_guides_only_the_mean_half():
    net, x, t, cond, uncond = setup(learned_variance=True)
    out = cfg_model_fn(net, cond, uncond, 4.0, rescale=0.5, learned_variance=True)(x, t)
    c, u = net(x, t, **cond), net(x, t, context=torch.zeros(3, 7, 8))
    assert out.shape == (3, 4, 4, 4)
    torch.testing.assert_close(out[:, 2:], c[:, 2:])  # conditional variance values, untouched
    plain = cfg_model_fn(net, cond, uncond, 4.0, learned_variance=True)(x, t)
    torch.testing.assert_close(plain[:, :2], u[:, :2] + 4.0 * (c[:, :2] - u[:, :2]))


def test_bad_conditioning_is_a_clear_error():
    net, x, t, cond, uncond = setup()
    with pytest.raises(ValueError, match="same keys"):
        cfg_model_fn(net, cond, {"context": uncond["context"]}, 2.0)
    with pytest.raises(ValueError, match="rescale"):
        cfg_model_fn(net, cond, uncond, 2.0, rescale=1.5)
    with pytest.raises(ValueError, match="'context'.*differ beyond the batch"):
        cfg_model_fn(net, cond, {"context": torch.zeros(3, 5, 8), "y": None}, 2.0)(x, t)
    with pytest.raises(ValueError, match="'context'.*batch 2"):
        cfg_model_fn(net, cond, {"context": torch.zeros(2, 7, 8), "y": None}, 2.0)(x, t)
    with pytest.raises(TypeError, match="'y'"):
        cfg_model_fn(net, cond, {"context": uncond["context"], "y": torch.zeros(3)}, 2.0)(x, t)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_guided_model_runs_in_samplers(name):
    net, x, _, cond, uncond = setup(learned_variance=True)
    s = NoiseSchedule.from_config("scaled_linear", 1000)
    d = Denoiser(cfg_model_fn(net, cond, uncond, 3.0, learned_variance=True), s, "eps", "learned_range")
    out = SAMPLERS[name](d, x, 4)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(net.calls) == 4 and all(c[0] == 6 for c in net.calls)


class Weaker(Net):
    """A "bad version" of Net: the same function, damped."""

    def __call__(self, x, t, context=None, y=None):
        return 0.7 * super().__call__(x, t, context=context, y=y)


def test_autoguidance_adds_scale_times_cond_minus_guide():
    net, x, t, cond, uncond = setup()
    guide = Weaker()
    out = cfg_model_fn(net, cond, uncond, 3.0, guide_fn=guide, guide_scale=1.5)(x, t)
    c, u, g = net(x, t, **cond), net(x, t, context=torch.zeros(3, 7, 8)), guide(x, t, **cond)
    torch.testing.assert_close(out, u + 3.0 * (c - u) + 1.5 * (c - g))
    assert guide.calls[0] == (3, (3,), (3, 7, 8))  # the guide sees the conditional branch only
    # without CFG (scale 1): the conditional model plus the autoguidance term
    one = cfg_model_fn(net, cond, uncond, 1.0, guide_fn=guide, guide_scale=2.0)(x, t)
    torch.testing.assert_close(one, c + 2.0 * (c - g))
    # scale 0 or a guide identical to the model: plain CFG
    torch.testing.assert_close(cfg_model_fn(net, cond, uncond, 3.0, guide_fn=guide, guide_scale=0.0)(x, t),
                               u + 3.0 * (c - u))
    torch.testing.assert_close(cfg_model_fn(net, cond, uncond, 3.0, guide_fn=Net(), guide_scale=2.0)(x, t),
                               u + 3.0 * (c - u))


def test_autoguidance_with_learned_variance_guides_only_the_mean():
    net, x, t, cond, uncond = setup(learned_variance=True)
    guide = Weaker(learned_variance=True)
    out = cfg_model_fn(net, cond, uncond, 2.0, learned_variance=True, guide_fn=guide, guide_scale=1.0)(x, t)
    c, u, g = net(x, t, **cond), net(x, t, context=torch.zeros(3, 7, 8)), guide(x, t, **cond)
    torch.testing.assert_close(out[:, :2], u[:, :2] + 2.0 * (c[:, :2] - u[:, :2]) + (c[:, :2] - g[:, :2]))
    torch.testing.assert_close(out[:, 2:], c[:, 2:])
    alone = autoguided_fn(lambda x, t: net(x, t, **cond), lambda x, t: guide(x, t, **cond), 0.5, True)(x, t)
    torch.testing.assert_close(alone, torch.cat([c[:, :2] + 0.5 * (c[:, :2] - g[:, :2]), c[:, 2:]], dim=1))


def test_autoguidance_needs_a_guide_and_a_nonnegative_scale():
    net, x, t, cond, uncond = setup()
    with pytest.raises(ValueError, match="needs a guide"):
        cfg_model_fn(net, cond, uncond, 3.0, guide_scale=1.0)
    with pytest.raises(ValueError, match="guide_scale must be >= 0"):
        cfg_model_fn(net, cond, uncond, 3.0, guide_fn=Weaker(), guide_scale=-1.0)
