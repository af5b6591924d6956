"""PatchGAN discriminator (Isola et al. 2017): a grid of real/fake logits, one per receptive-field patch."""

from __future__ import annotations

from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """conv(stride 2)-LeakyReLU, `n_layers` × conv-norm-LeakyReLU (stride 2 but the last), a 1-channel conv.

    norm: "batch" (as pix2pix / LDM), "group" (default: independent of the per-rank batch size) or "none".
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"discriminator norm must be 'batch', 'group' or 'none', got {norm!r}")

        def norm_layer(c: int) -> nn.Module:
            if norm == "none":
                return nn.Identity()
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for i in range(1, n_layers + 1):
            c_next = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            conv = nn.Conv2d(c, c_next, 4, stride, 1, bias=norm == "none")
            layers += [conv, norm_layer(c_next), nn.LeakyReLU(0.2, True)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


NLayerDiscriminator = PatchDiscriminator  # the name used by pix2pix / taming


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (nn.functional.relu(1.0 - logits_real).mean() + nn.functional.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    sp = nn.functional.softplus
    return 0.5 * (sp(-logits_real).mean() + sp(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
