"""Exact resume through train.py: a run killed with SIGKILL and resumed with `ckpt_path=last` ends bit-identical to
an uninterrupted run (weights, EMA, optimizer and scheduler state), for the autoencoder and the LDM.
(SIGTERM/SIGUSR1, rotation and crash-while-saving are in test_signals.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ldm import checkpoint

from .conftest import QUICK, ROOT, TINY_AE, TINY_UNET, data_overrides, run_train


def train_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def start_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, path: Path, timeout: float = 120) -> None:
    """Block until `path` exists (or fail with the process output if it ends or times out first)."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            out = proc.communicate()[0]
            raise AssertionError(f"{path} never appeared (rc={proc.returncode}):\n{out[-6000:]}")
        time.sleep(0.02)


def assert_same(a, b, where: str = "") -> int:
    """torch.equal on every tensor of two nested checkpoint structures; returns how many tensors were compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        return sum(assert_same(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        return sum(assert_same(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def assert_resumed_exactly(full: Path, resumed: Path) -> None:
    a, b = checkpoint.load_file(full), checkpoint.load_file(resumed)
    assert a["global_step"] == b["global_step"]
    n = assert_same(a["state_dict"], b["state_dict"], "state_dict")
    n += assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert_same(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert n > 10


def kill_and_resume(args: list[str], run_dir: Path, kill_after: int) -> None:
    """Start `train.py args`, SIGKILL it once the step-`kill_after` checkpoint exists, then resume it in place."""
    proc = start_train(args)
    wait_for(proc, run_dir / "checkpoints" / f"step{kill_after:07d}.ckpt")
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in the following step(s)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed: lengthen it"
    run_train([*args, "ckpt_path=last"])


AE_STEPS = 10


def ae_args(root: Path, run_dir: Path, steps: int = AE_STEPS) -> list[str]:
    return ["experiment=fmnist_autoencoder", f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "model.ema_decay=0.9", "model.warmup_steps=3", "export=false", *TINY_AE, *QUICK,
            *data_overrides(root, batch_size=8)]


def test_autoencoder_sigkill_resume_is_bit_identical(fmnist_root: Path, tmp_path: Path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train(ae_args(fmnist_root, full))
    # 256 - 32 (val) = 224 training images = 28 batches of 8: an epoch is longer than the run, so the kill
    # lands mid-epoch and the data order has to continue where it stopped.
    kill_and_resume(ae_args(fmnist_root, cut), cut, kill_after=random.choice([2, 4, 6]))
    assert_resumed_exactly(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")


def tiny_autoencoder_export(directory: Path) -> Path:
    """An untrained f=2 autoencoder export (16×16×2 latents, as fmnist_ldm's U-Net takes; the LDM only needs a
    frozen first stage), without a train.py run."""
    from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained

    torch.manual_seed(0)
    ddconfig = {"in_channels": 1, "out_ch": 1, "resolution": 32, "ch": 8, "ch_mult": [1, 1], "num_res_blocks": 1,
                "attn_resolutions": [], "mid_attn": False, "dropout": 0.0, "z_channels": 2, "double_z": True,
                "norm_groups": 4}
    return save_pretrained(AutoencoderKLNet(ddconfig, 2), directory, scale_factor=0.9)


LDM_STEPS = 10


def ldm_args(root: Path, run_dir: Path, first_stage: Path) -> list[str]:
    # U-Net dropout > 0 draws from the global torch RNG: checks that its state is saved and restored too.
    return ["experiment=fmnist_ldm", f"hydra.run.dir={run_dir}", f"model.first_stage={first_stage}",
            f"trainer.max_steps={LDM_STEPS}", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
            "callbacks.model_checkpoint.every_n_train_steps=2", "model.sample_every_n_steps=0",
            "model.val_prompts=null", "model.cond_drop_prob=0.5", "model.ema_decay=0.9", "model.warmup_steps=4",
            "model.unet.dropout=0.2", "export=false", *TINY_UNET, *QUICK, *data_overrides(root, batch_size=8)]


def test_latent_diffusion_sigkill_resume_is_bit_identical(fmnist_root: Path, tmp_path: Path):
    first_stage = tiny_autoencoder_export(tmp_path / "ae")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train(ldm_args(fmnist_root, full, first_stage))
    kill_and_resume(ldm_args(fmnist_root, cut, first_stage), cut, kill_after=random.choice([2, 4, 6]))
    assert_resumed_exactly(full / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
