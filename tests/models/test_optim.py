import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from ldm.models.optim import adamw, clip_gradients, lr_lambda


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


def test_lr_lambda_warms_up_then_holds_or_decays_to_the_floor():
    const, cos, lin = (lr_lambda(s, 4, 14, min_ratio=0.1) for s in ("constant", "cosine", "linear"))
    assert [const(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0] == [cos(s) for s in range(4)]
    assert const(13) == 1.0 and const(1000) == 1.0
    assert cos(4) == pytest.approx(1.0) and cos(9) == pytest.approx(0.55) and cos(14) == pytest.approx(0.1)
    assert lin(9) == pytest.approx(0.55) and lin(6) == pytest.approx(0.1 + 0.9 * 0.8) and lin(99) == pytest.approx(0.1)
    assert lr_lambda("cosine", 4, 0)(100) == 1.0  # no known end: no decay
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_lambda("step", 0, 10)


def test_adamw_is_not_fused_on_a_device_without_the_kernel():
    params = [nn.Parameter(torch.zeros(2, device="meta"))]
    assert not adamw(params, lr=1e-3).defaults["fused"]


class _Clipped(pl.LightningModule):
    """A linear model trained with clip value CLIP: manual optimization clips in on_before_optimizer_step, automatic
    through configure_gradient_clipping; records the norm of the gradients each optimizer step is handed."""

    CLIP = 0.05

    def __init__(self, fused: bool, manual: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.fused, self.automatic_optimization = fused, not manual
        self.norms: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = (self.net(batch[0]) - batch[1]).square().mean() * 100  # large gradients: always clipped
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def on_before_optimizer_step(self, optimizer):
        if not self.automatic_optimization:
            clip_gradients(self, optimizer, self.CLIP, "norm")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2, fused=self.fused or None)
        original = opt.step

        def step(closure=None):  # the gradients as the update sees them (a fused kernel divides by grad_scale)
            loss = closure() if closure is not None else None  # Lightning's closure: backward, then the clip hook
            scale = getattr(opt, "grad_scale", None)
            grads = [p.grad.float() / (scale if scale is not None else 1.0) for p in self.net.parameters()]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            original()
            return loss

        opt.step = step
        return opt


def _train(precision: str, fused: bool, manual: bool) -> _Clipped:
    model = _Clipped(fused, manual)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    # 16-mixed with its GradScaler on CPU (Trainer(precision="16-mixed") would fall back to bf16 there)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler)] if precision == "16-mixed" else None
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=None if plugins else precision, plugins=plugins,
                         max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=None if manual else _Clipped.CLIP)
    trainer.fit(model, loader)
    return model


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "automatic"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_clipping_works_with_the_fused_adamw_under_every_precision_plugin(precision, manual):
    # Lightning's AMP plugin raises for fused optimizers ("does not allow for gradient clipping"), also for bf16
    # where nothing is scaled; with a GradScaler (16-mixed) the gradients must be unscaled before they are clipped.
    fused, plain = _train(precision, True, manual), _train(precision, False, manual)
    for model in (fused, plain):
        assert len(model.norms) == 4
        assert max(model.norms) <= _Clipped.CLIP * (1 + 1e-3), model.norms  # clipped, in unscaled units
        assert min(model.norms) >= _Clipped.CLIP * 0.99  # and the clip was active every step
    for a, b in zip(fused.net.parameters(), plain.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_clipping_by_value_and_a_wrong_algorithm():
    net = nn.Linear(4, 1)
    net(torch.ones(2, 4)).sum().mul(100).backward()
    module = pl.LightningModule()
    clip_gradients(module, torch.optim.SGD(net.parameters(), lr=1.0), 0.5, "value")
    assert net.weight.grad.abs().max() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be one of"):
        clip_gradients(module, torch.optim.SGD(net.parameters(), lr=1.0), 0.5, "l2")
