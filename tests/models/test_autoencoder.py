"""AutoencoderKL on CPU with a tiny network: training, discriminator gating, EMA export, scale factor, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Dataset

from ldm.data.datamodule import DataModule
from ldm.models.autoencoder import AutoencoderKL
from ldm.nn.autoencoder import load_pretrained

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(in_channels=1, out_ch=1, resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=2,
            mid_attn=False, norm_groups=4)


class TinyImages(Dataset):
    """Smooth random 16×16 images in [-1, 1] (learnable fast), as data-module items."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
        self.images = torch.nn.functional.interpolate(low, size=16, mode="bilinear", align_corners=False)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": "", "label": -1}


def tiny_model(**kw) -> AutoencoderKL:
    args = dict(rec_loss="l2", lr=3e-3, betas=(0.9, 0.99), disc_channels=8, disc_layers=1, disc_factor=0.0,
                scale_factor_batches=2, num_image_samples=4)
    return AutoencoderKL(TINY, embed_dim=2, **(args | kw))


def trainer(tmp_path, max_steps: int, **kw) -> pl.Trainer:
    args = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                limit_val_batches=0, default_root_dir=str(tmp_path))
    return pl.Trainer(**(args | kw))


def datamodule(n: int = 64, batch_size: int = 8) -> DataModule:
    return DataModule(TinyImages(n), val=TinyImages(16, seed=1), batch_size=batch_size, seed=0)


def test_training_lowers_reconstruction_loss(tmp_path):
    model = tiny_model(lr_schedule="cosine", warmup_steps=5)
    x = TinyImages(16).images
    before = float((model.reconstruct(x, model.net) - x).pow(2).mean())
    t = trainer(tmp_path, 60)
    t.fit(model, datamodule=datamodule())
    assert all(opt.defaults["fused"] for opt in t.optimizers)  # fused AdamW on CPU, both optimizers
    after = float((model.reconstruct(x, model.net) - x).pow(2).mean())
    assert after < 0.5 * before
    assert model.ae_step == 60
    assert model.scale_factor.item() != 1.0  # computed in the last step
    assert model.lr_schedulers()[0].get_last_lr()[0] < 1e-4  # cosine reached ~0


class Record(Callback):
    def __init__(self, model):
        self.d0 = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        d_same = all(torch.equal(v, self.d0[k]) for k, v in pl_module.discriminator.state_dict().items())
        self.rows.append((pl_module.ae_step, d_same, sorted(trainer.callback_metrics)))


def test_discriminator_inactive_before_disc_start(tmp_path):
    model = tiny_model(disc_start=3, disc_factor=1.0)
    rec = Record(model)
    # global steps: 1 per batch for the 3 batches before disc_start, then 2 per batch → 5 batches
    trainer(tmp_path, 3 + 2 * 2, callbacks=[rec]).fit(model, datamodule=datamodule())
    assert [r[0] for r in rec.rows] == [1, 2, 3, 4, 5]
    for _, d_same, keys in rec.rows[:3]:
        assert d_same and "train/d_loss" not in keys and "train/g_loss" not in keys
    for _, d_same, keys in rec.rows[3:]:
        assert not d_same
        assert {"train/d_loss", "train/g_loss", "train/d_weight", "train/logits_real",
                "train/logits_fake"} <= set(keys)
    metrics = rec.rows[-1][2]
    assert {"train/rec_loss", "train/kl", "train/nll", "train/logvar", "train/lr"} <= set(metrics)


def test_adaptive_weight_is_gradient_norm_ratio():
    model = tiny_model(disc_weight=0.5)
    x = TinyImages(4).images
    rec = model.net.decode(model.net.encode(x).mode())
    nll, _ = model.reconstruction_nll(x, rec)
    g_loss = -model.discriminator(rec).mean()
    last = model.net.decoder.last_layer
    a = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    b = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
    torch.testing.assert_close(model.adaptive_weight(nll, g_loss), (a / (b + 1e-4)).clamp(0, 1e4) * 0.5)


def test_perceptual_loss_needs_lpips_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_lpips.pth"):
        tiny_model(perceptual_weight=1.0, lpips_path=str(tmp_path / "no_lpips.pth"))
    with pytest.raises(ValueError, match="rec_loss"):
        tiny_model(rec_loss="l3")
    from ldm.nn.lpips import LPIPS

    sd = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}
    torch.save(sd, tmp_path / "lpips.pth")  # random weights in the real layout (linear heads ≥ 0, as LPIPS's)
    model = tiny_model(perceptual_weight=1.0, lpips_path=str(tmp_path / "lpips.pth"))
    assert not any("perceptual" in k or "lin0" in k for k in model.state_dict())  # frozen, not checkpointed
    x = TinyImages(2).images
    rec = x + 0.1 * torch.randn_like(x)
    with_p, _ = model.reconstruction_nll(x, rec)
    without_p, _ = tiny_model().reconstruction_nll(x, rec)
    assert with_p > without_p


def test_validation_metrics_and_image_grids(tmp_path):
    model = tiny_model()
    t = trainer(tmp_path, 1, limit_val_batches=2)
    metrics = t.validate(model, datamodule=datamodule(), verbose=False)[0]
    assert {"val/psnr", "val/ssim", "val/rec_loss"} <= set(metrics)
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == [
        "step0000000_inputs.png", "step0000000_reconstructions.png", "step0000000_samples.png"]


def test_ema_export_and_checkpoint_load_give_identical_outputs(tmp_path):
    model = tiny_model(ema_decay=0.9)
    t = trainer(tmp_path, 8)
    t.fit(model, datamodule=datamodule())
    assert int(model.ema.num_updates) == 8
    x = TinyImages(4, seed=3).images
    ema_out, raw_out = model.reconstruct(x), model.reconstruct(x, model.net)
    assert not torch.allclose(ema_out, raw_out)
    model.export(tmp_path / "export")
    net, sf = load_pretrained(tmp_path / "export")
    assert sf == pytest.approx(float(model.scale_factor)) and sf != 1.0
    assert torch.equal(net.decode(net.encode(x).mode()).clamp(-1, 1), ema_out)
    t.save_checkpoint(tmp_path / "ae.ckpt")
    net2, sf2 = load_pretrained(tmp_path / "ae.ckpt")  # weights_only load of the Lightning checkpoint
    assert sf2 == sf and torch.equal(net2.decode(net2.encode(x).mode()).clamp(-1, 1), ema_out)
    raw, _ = load_pretrained(tmp_path / "ae.ckpt", ema=False)
    assert torch.equal(raw.decode(raw.encode(x).mode()).clamp(-1, 1), raw_out)


def test_compute_scale_factor_is_inverse_std():
    model = tiny_model().eval()
    loader = torch.utils.data.DataLoader(TinyImages(32), batch_size=8)
    sf = model.compute_scale_factor(loader, num_batches=4)
    g = torch.Generator().manual_seed(1234)
    z = torch.cat([model.net.encode(b["image"]).sample(g) for b in loader]).double()
    assert sf == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-6)
    assert float(model.scale_factor) == pytest.approx(sf)


def test_scale_factor_cli_rewrites_export(tmp_path):
    from ldm import scale_factor as cli

    model = tiny_model()
    model.export(tmp_path / "export")
    old, new, out = cli.recompute(tmp_path / "export", (b for b in TinyImages(32).images.split(8)), batches=3)
    assert old == 1.0 and new != 1.0 and out == tmp_path / "export"
    assert json.loads((out / "config.json").read_text())["scale_factor"] == pytest.approx(new)
    assert cli.main(["batches=2"]) == 2  # no ckpt: usage
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    fm = AutoencoderKL({**TINY, "resolution": 32}, 2)
    fm.export(tmp_path / "fm")
    args = [f"ckpt={tmp_path / 'fm'}", f"out={tmp_path / 'fm2'}", "batches=2", "data.batch_size=8"]
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "fm2" / "config.json").read_text())["scale_factor"] != 1.0


@pytest.mark.slow
def test_ddp_scale_factor_identical_on_every_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests/models/_ddp_autoencoder.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["ae_step"] == r1["ae_step"] == 4  # 2 batches before disc_start=2, then 2 with both optimizers
    assert r0["checksum"] == r1["checksum"] and r0["checksum_d"] == r1["checksum_d"]  # DDP kept ranks in sync
    (l0,), (l1,) = r0["local"], r1["local"]
    assert l0 != l1  # each rank saw its own shard...
    from ldm.nn.autoencoder import scale_factor_from_moments

    total = torch.tensor(l0, dtype=torch.float64) + torch.tensor(l1, dtype=torch.float64)
    expected = scale_factor_from_moments(total)
    assert r0["scale_factor"] == r1["scale_factor"] == pytest.approx(expected, rel=1e-6)
