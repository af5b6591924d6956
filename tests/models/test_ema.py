import pytest
import torch
from torch import nn

from ldm.models.ema import EMA


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


def test_update_is_an_exponential_average_with_warmup():
    net = _net()
    ema = EMA(net, decay=0.9, warmup=False)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update()
    torch.testing.assert_close(ema.module[0].weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)  # buffers are copied
    assert int(ema.num_updates) == 1
    warm = EMA(net, decay=0.999)
    assert warm.current_decay() == pytest.approx(1 / 10)  # (1 + 0) / (10 + 0)
    with pytest.raises(ValueError):
        EMA(net, decay=1.5)


def test_shadow_is_frozen_in_eval_mode_and_in_the_state_dict():
    owner = nn.Module()
    owner.net = _net()
    owner.ema = EMA(owner.net, 0.99)
    owner.train()
    assert not owner.ema.module.training and owner.net.training
    assert all(not p.requires_grad for p in owner.ema.parameters())
    assert sum(p.requires_grad for p in owner.parameters()) == len(list(owner.net.parameters()))
    sd = owner.state_dict()
    assert "ema.module.0.weight" in sd and "ema.num_updates" in sd and "ema._model.0.weight" not in sd
    other = nn.Module()
    other.net = _net()
    other.ema = EMA(other.net, 0.99)
    other.load_state_dict(sd)
    assert torch.equal(other.ema.module[3].weight, owner.ema.module[3].weight)


def test_swap_uses_ema_weights_and_restores_them_even_on_error():
    net = _net().eval()
    ema = EMA(net, 0.5, warmup=False)
    with torch.no_grad():
        net[3].weight.add_(2.0)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected, raw = ema.module(x), net(x)
        with ema.swap() as swapped:
            assert swapped is net
            torch.testing.assert_close(net(x), expected)
        torch.testing.assert_close(net(x), raw)
    assert all(torch.equal(v, live[k]) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), ema.swap():
        raise RuntimeError("boom")
    assert all(torch.equal(v, live[k]) for k, v in net.state_dict().items())
    ema.copy_to()
    assert torch.equal(net[3].weight, ema.module[3].weight)


def test_optimizer_keeps_working_after_swap():
    net = nn.Linear(2, 1)
    ema = EMA(net, 0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    params_before = [id(p) for p in net.parameters()]
    with ema.swap():
        pass
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    ema.update()
    assert [id(p) for p in net.parameters()] == params_before
