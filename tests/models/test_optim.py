import torch
from torch import nn

from ldm.models.optim import adamw


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))


def test_adamw_is_fused_on_cpu_and_takes_the_same_steps_as_the_plain_one():
    fused_net, plain_net = _net(0), _net(0)
    opt = adamw(fused_net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW(plain_net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    assert opt.defaults["fused"] and not ref.defaults["fused"]
    x = torch.randn(4, 3, 6, 6)
    for step in range(5):
        for net, o in ((fused_net, opt), (plain_net, ref)):
            o.zero_grad()
            net(x + step).square().mean().backward()
            o.step()
    moved = [(a - b).abs().max() for a, b in zip(fused_net.parameters(), _net(0).parameters(), strict=True)]
    assert min(moved) > 1e-3  # five steps of lr 1e-2 moved every tensor
    for a, b in zip(fused_net.parameters(), plain_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_is_not_fused_on_a_device_without_the_kernel():
    params = [nn.Parameter(torch.zeros(2, device="meta"))]
    assert not adamw(params, lr=1e-3).defaults["fused"]
