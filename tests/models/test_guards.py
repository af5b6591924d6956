"""Numerical faults in both LightningModules: a NaN/Inf loss skips the step (no weight, optimizer-moment or EMA
change; counted and logged), a run of them stops training with a message, and NaN weights are never saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ldm import checkpoint
from ldm.callbacks.safety import CheckpointSafety, NonFiniteWeightsError
from ldm.models.guards import NonFiniteGuard, NonFiniteLossError
from ldm.models.latent_diffusion import LatentDiffusion

from .test_autoencoder import datamodule, tiny_model
from .test_latent_diffusion import Items, collate, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained

    from .test_latent_diffusion import DDCONFIG

    torch.manual_seed(0)
    return save_pretrained(AutoencoderKLNet(DDCONFIG, 4), tmp_path_factory.mktemp("ae"), scale_factor=0.5)


def tiny_ldm(ae_dir: Path) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(unet=tiny_unet(context_dim=None), first_stage=str(ae_dir), text_encoder=None,
                           schedule={"name": "linear", "num_timesteps": 100}, ema_decay=0.9, lr=3e-3)


def ldm_loader() -> DataLoader:
    return DataLoader(Items(32), batch_size=4, collate_fn=collate)


def make_trainer(tmp_path: Path, steps: int, callbacks=(), **kw) -> pl.Trainer:
    args = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=list(callbacks))
    return pl.Trainer(**(args | kw))


# ---- the two modules, each with its loss function and the state a skipped step must not touch ------------
def ae_case(ae_dir):
    model = tiny_model(ema_decay=0.9)
    return model, "reconstruction_nll", lambda: {"dm": datamodule()}


def ldm_case(ae_dir):
    model = tiny_ldm(ae_dir)
    return model, "_loss", lambda: {"train_dataloaders": ldm_loader()}


CASES = {"autoencoder": ae_case, "latent_diffusion": ldm_case}


def fit(trainer: pl.Trainer, model, data: dict, ckpt_path: str | None = None) -> None:
    if "dm" in data:
        trainer.fit(model, datamodule=data["dm"], ckpt_path=ckpt_path)
    else:
        trainer.fit(model, **data, ckpt_path=ckpt_path)


def poison_loss(monkeypatch, model, name: str, bad_calls: set[int], value=float("nan")) -> list[int]:
    """Make the module's loss function return `value` on the given (0-based) training calls."""
    original = getattr(model, name)
    calls = []

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        i = len(calls)
        calls.append(i)
        if i in bad_calls and model.training:
            first = out[0] + value  # keeps the graph: the loss is non-finite, the inputs are not
            return (first, *out[1:])
        return out

    monkeypatch.setattr(model, name, patched)
    return calls


class Snapshots(pl.Callback):
    """Weights, EMA and optimizer moments after every training batch."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sd = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        opt = trainer.optimizers[0].state_dict()["state"]
        moments = {k: s["exp_avg"].clone() for k, s in opt.items() if "exp_avg" in s}
        self.rows.append((sd, moments, dict(trainer.callback_metrics)))


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step_and_is_counted(name, value, ae_dir, tmp_path, monkeypatch):
    model, loss_fn, data = CASES[name](ae_dir)
    poison_loss(monkeypatch, model, loss_fn, bad_calls={2}, value=value)
    snaps = Snapshots()
    fit(make_trainer(tmp_path, 5, [snaps], limit_train_batches=5, max_epochs=1), model, data())
    assert len(snaps.rows) == 5
    (sd1, m1, _), (sd2, m2, metrics2), (sd3, m3, metrics3) = snaps.rows[1:4]
    # The poisoned batch (the third) changed nothing: weights, EMA, optimizer moments.
    assert same(sd1, sd2) and same(m1, m2)
    # The next finite batch trains again.
    assert not same(sd2, sd3) and not same(m2, m3)
    assert all(torch.isfinite(v).all() for v in sd3.values() if v.is_floating_point())
    assert float(metrics2["train/nonfinite_skipped"]) == 1.0 and float(metrics3["train/nonfinite_skipped"]) == 1.0
    assert model.guard.skipped == 1 and model.guard.consecutive == 0


@pytest.mark.parametrize("name", CASES)
def test_a_run_of_non_finite_losses_stops_training(name, ae_dir, tmp_path, monkeypatch, caplog):
    model, loss_fn, data = CASES[name](ae_dir)
    model.guard = NonFiniteGuard(max_consecutive=3)
    poison_loss(monkeypatch, model, loss_fn, bad_calls={1, 3, 4, 5, 6, 7})  # one isolated, then a run
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses") as err:
        fit(make_trainer(tmp_path, 20, limit_train_batches=20, max_epochs=1), model, data())
    assert "learning rate" in str(err.value)
    assert model.guard.skipped == 4
    assert "non-finite loss" in caplog.text and "step skipped" in caplog.text


def test_guard_counts_consecutive_only():
    guard = NonFiniteGuard(max_consecutive=2)
    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    assert guard.check(nan) is False and guard.check(ok) is True and guard.check(nan) is False
    assert (guard.skipped, guard.consecutive) == (2, 1)
    with pytest.raises(NonFiniteLossError):
        guard.check(torch.tensor([1.0, -math.inf]))


@pytest.mark.parametrize("name", CASES)
def test_nan_weights_are_never_saved_as_best_or_last(name, ae_dir, tmp_path, monkeypatch):
    """Weights turn NaN after a finite loss (an Inf gradient): the next save is refused, training stops,
    and last.ckpt and the step checkpoints written before stay finite and loadable."""
    model, _, data = CASES[name](ae_dir)
    net = model.net if name == "autoencoder" else model.unet
    original_step = torch.optim.AdamW.step
    steps = []

    def step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        steps.append(1)  # (the autoencoder's discriminator optimizer never steps: disc_factor=0)
        if len(steps) == 3:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    ckpt_dir = tmp_path / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                                 monitor="step", mode="max", save_top_k=2, save_last=True, every_n_train_steps=1),
                 CheckpointSafety()]
    with pytest.raises(NonFiniteWeightsError, match="NaN/Inf"):
        fit(make_trainer(tmp_path, 6, callbacks, enable_checkpointing=True, limit_train_batches=6, max_epochs=1),
            model, data())
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["last.ckpt", "step0000001.ckpt", "step0000002.ckpt"], names
    for f in names:
        sd = checkpoint.load_file(ckpt_dir / f)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), f
    assert checkpoint.load_file(ckpt_dir / "last.ckpt")["global_step"] == 2


@pytest.mark.parametrize("name", CASES)
def test_skipped_step_count_survives_a_resume(name, ae_dir, tmp_path, monkeypatch):
    model, loss_fn, data = CASES[name](ae_dir)
    poison_loss(monkeypatch, model, loss_fn, bad_calls={1})
    ckpt_dir = tmp_path / "checkpoints"
    saver = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1)
    fit(make_trainer(tmp_path, 3, [saver], enable_checkpointing=True, limit_train_batches=6, max_epochs=1),
        model, data())
    assert model.guard.skipped == 1
    assert checkpoint.load_file(ckpt_dir / "last.ckpt")["nonfinite_guard"] == {"skipped": 1, "consecutive": 0}
    resumed, _, data = CASES[name](ae_dir)
    snaps = Snapshots()
    fit(make_trainer(tmp_path, 5, [snaps], limit_train_batches=6, max_epochs=1), resumed, data(),
        ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert snaps.rows and all(float(m["train/nonfinite_skipped"]) == 1.0 for _, _, m in snaps.rows)
    assert resumed.guard.skipped == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_non_finite_loss_on_one_ddp_rank_is_skipped_by_both(name, tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "tests/models/_ddp_nan.py"), str(tmp_path), name], cwd=root,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1  # rank 0's loss was finite: it skipped with rank 1
    assert r0["checksum"] == r1["checksum"]  # and the two ranks stayed identical
    assert r0["batches"] == r1["batches"] and r0["global_step"] == r1["global_step"]
