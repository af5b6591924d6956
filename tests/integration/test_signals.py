"""Preemption and crashes through train.py: SIGTERM / SIGUSR1 save last.ckpt at a step boundary and exit; a crash
while a checkpoint is being written leaves the previous one readable (the write goes to a temporary file that is
renamed into place); old step checkpoints are rotated by `save_top_k`. (Exact resume after SIGKILL: test_resume.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm import checkpoint

from .conftest import QUICK, ROOT, TINY_AE, data_overrides

pytestmark = pytest.mark.slow


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def ae_args(root: Path, run_dir: Path, steps: int, every: int) -> list[str]:
    return ["experiment=fmnist_autoencoder", f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=1000", "trainer.limit_val_batches=1",
            f"callbacks.model_checkpoint.every_n_train_steps={every}", *TINY_AE, *QUICK,
            *data_overrides(root, batch_size=8)]


def wait_for(proc: subprocess.Popen, path: Path, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            out = proc.communicate()[0]
            raise AssertionError(f"{path} never appeared (rc={proc.returncode}):\n{out[-6000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_last_checkpoint_and_exits(sig, fmnist_root: Path, tmp_path: Path):
    """Also rotation: a checkpoint every step with save_top_k=2 keeps the two newest step checkpoints."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # A run far longer than the test: only the signal can end it.
    args = [*ae_args(fmnist_root, run_dir, 100_000, 1), "callbacks.model_checkpoint.save_top_k=2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(proc, ckpts / "step0000004.ckpt")
    time.sleep(0.1)  # land somewhere in a later step
    proc.send_signal(sig)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"train.py did not exit after {sig.name}:\n{proc.communicate()[0][-4000:]}") from None
    # 128 + SIGTERM, as for a process the signal ended: a preempted run must not look like a finished one.
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert "termination signal: saved" in out, out[-4000:]
    last = checkpoint.load_file(ckpts / "last.ckpt")  # weights_only: loads without trust
    assert last["global_step"] >= 4
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops"} <= set(last)
    steps = sorted(int(p.stem[4:]) for p in ckpts.glob("step*.ckpt"))
    assert len(steps) == 2 and steps[1] == steps[0] + 1 and 4 <= steps[1] <= last["global_step"], steps
    assert not list(ckpts.glob(".*tmp*")), "no temporary files left by a clean save"
    assert not (run_dir / "export").exists()  # an interrupted run is not exported as if finished


CRASH_IN_SAVE = """
import io, os, signal, runpy, sys
import torch

real_save, lasts = torch.save, []

def save(obj, f, *args, **kwargs):
    # The second write of last.ckpt: half the bytes reach the disk, then the process dies (power cut, OOM kill).
    if "last.ckpt" in str(getattr(f, "name", f)):
        lasts.append(1)
        if len(lasts) == 2:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_crash_while_saving_leaves_previous_last_checkpoint_readable(fmnist_root: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE, str(ROOT / "train.py"),
                           *ae_args(fmnist_root, run_dir, 8, 2)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    # Killed inside the write: proves train.py's checkpoints are written to a file object (the temporary file).
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    ckpts = run_dir / "checkpoints"
    partial = list(ckpts.glob(".last.ckpt.tmp*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written temporary file
    last = checkpoint.load_file(ckpts / "last.ckpt")
    assert last["global_step"] == 2  # the previous save, intact
    assert checkpoint.load_file(ckpts / "step0000004.ckpt")["global_step"] == 4  # written before the crash


FAKE_SUBMITIT = """
import runpy, signal, sys
from pathlib import Path

marker = Path(sys.argv.pop(1))

def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
    last = marker.parent / "run" / "checkpoints" / "last.ckpt"
    marker.write_text(f"{signal.Signals(signum).name} {last.stat().st_mtime if last.exists() else 0.0}")
    sys.exit(3)  # submitit requeues, then exits

signal.signal(signal.SIGUSR2, submitit_handler)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_submitit_preemption_signal_saves_then_reaches_submitits_handler(fmnist_root: Path, tmp_path: Path):
    """Under submitit (SUBMITIT_EXECUTOR set), USR2 saves last.ckpt first, then submitit's own handler requeues."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    wrapper, marker = tmp_path / "fake_submitit.py", tmp_path / "requeued.txt"
    wrapper.write_text(FAKE_SUBMITIT)
    args = ae_args(fmnist_root, run_dir, 100_000, 2)
    proc = subprocess.Popen([sys.executable, str(wrapper), str(marker), str(ROOT / "train.py"), *args], cwd=ROOT,
                            env={**env(), "SUBMITIT_EXECUTOR": "slurm"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(proc, ckpts / "step0000004.ckpt")
    sent = time.time()
    proc.send_signal(signal.SIGUSR2)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"train.py did not exit after SIGUSR2:\n{proc.communicate()[0][-4000:]}") from None
    assert "termination signal: saved" in out and "passing SIGUSR2 on to its previous handler" in out, out[-4000:]
    name, mtime = marker.read_text().split()
    assert name == "SIGUSR2" and float(mtime) >= sent - 0.01  # the handler ran after last.ckpt was saved
    assert proc.returncode == 3, out[-4000:]
    assert checkpoint.load_file(ckpts / "last.ckpt")["global_step"] >= 4
