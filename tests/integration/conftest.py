"""Shared pieces of the end-to-end tests: a tiny generated Fashion-MNIST, tiny model overrides, train.py runner.

CI machines may not have Fashion-MNIST installed; these tests never need it.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

# A ~20 K-parameter f=4 autoencoder (32×32×1 -> 8×8×4) and a ~60 K-parameter U-Net over its latents.
TINY_AE = [
    "model.ddconfig.ch=8", "model.ddconfig.ch_mult=[1,1,1]", "model.ddconfig.norm_groups=4",
    "model.scale_factor_batches=2", "model.num_image_samples=4",
]
# Its f=2 sibling for experiment=fmnist_autoencoder_f2, the first stage of fmnist_ldm (32×32×1 -> 16×16×2).
TINY_AE_F2 = [o if not o.startswith("model.ddconfig.ch_mult=") else "model.ddconfig.ch_mult=[1,1]" for o in TINY_AE]
TINY_UNET = [
    "model.unet.model_channels=16", "model.unet.channel_mult=[1]", "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[1]", "model.unet.num_head_channels=8",
]
QUICK = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) as a gzip IDX file."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_fmnist(root: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST look-alike: class k is a bright bar whose position depends on k, plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k: 5 + 2 * k, 4:24] = 220
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    return make_fmnist(tmp_path_factory.mktemp("fmnist"))


def _tiny_export(directory: Path, experiment: str, overrides: list[str]) -> Path:
    """An untrained tiny autoencoder of `experiment`, exported as `model.first_stage` (built here, not trained)."""
    import torch
    from hydra import compose, initialize_config_dir

    from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
    torch.manual_seed(0)
    net = AutoencoderKLNet(cfg.model.ddconfig, cfg.model.embed_dim)
    return save_pretrained(net, directory / "export", scale_factor=1.0)


@pytest.fixture(scope="session")
def tiny_ae_export(tmp_path_factory) -> Path:
    """TINY_AE (f=4, 8×8×4 latents): the first stage of the editing experiments."""
    return _tiny_export(tmp_path_factory.mktemp("tiny_ae"), "fmnist_autoencoder", TINY_AE)


@pytest.fixture(scope="session")
def tiny_ae_f2_export(tmp_path_factory) -> Path:
    """TINY_AE_F2 (f=2, 16×16×2 latents): the first stage of experiment=fmnist_ldm."""
    return _tiny_export(tmp_path_factory.mktemp("tiny_ae_f2"), "fmnist_autoencoder_f2", TINY_AE_F2)


def data_overrides(root: Path, batch_size: int = 8, val_size: int = 32) -> list[str]:
    return [f"data.train.root={root}", f"data.batch_size={batch_size}", f"data.train.val_size={val_size}"]


def run_train(args: list[str], *, env: dict | None = None, timeout: float = 300, check: bool = True,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `train.py args` in a fresh process (as a user would) and return the finished process."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
                "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(env or {})}
    cmd = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun_nodes(args: list[str], env: dict | None = None, timeout: float = 240) -> list[str]:
    """Two torchrun "nodes" of one process each on 127.0.0.1, started the way a cluster script would; both must
    exit 0. Returns each node's output."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
                "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(env or {})}
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
               str(ROOT / "train.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun did not finish in {timeout} s (deadlock?)") from None
    for node, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"node {node} failed ({p.returncode}):\n{out[-6000:]}"
    return outputs
