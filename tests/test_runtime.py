import os
import time
from pathlib import Path

import pytest

from ldm import runtime


def test_resolve_last_prefers_own_run_then_newest(tmp_path):
    task = tmp_path / "logs" / "task"
    own = task / "runs" / "b"
    assert runtime.resolve_ckpt_path(None, own, task) is None
    assert runtime.resolve_ckpt_path("last", own, task) is None  # nothing yet: fresh start
    for name in ("a", "c"):
        (task / "runs" / name / "checkpoints").mkdir(parents=True)
        (task / "runs" / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        time.sleep(0.01)
    assert runtime.resolve_ckpt_path("last", own, task).endswith("runs/c/checkpoints/last.ckpt")
    (own / "checkpoints").mkdir(parents=True)
    (own / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert runtime.resolve_ckpt_path("last", own, task) == str(own / "checkpoints" / "last.ckpt")
    # killed after a step checkpoint was saved and before last.ckpt was: the step checkpoint is the newest state
    time.sleep(0.01)
    (own / "checkpoints" / "step0000004.ckpt").write_bytes(b"x")
    assert runtime.resolve_ckpt_path("last", own, task) == str(own / "checkpoints" / "step0000004.ckpt")
    with pytest.raises(FileNotFoundError):
        runtime.resolve_ckpt_path(str(tmp_path / "nope.ckpt"), own, task)


def test_nonzero_rank_gets_no_run_folder_of_its_own(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LDM_RUN_DIR", raising=False)
    argv = runtime.prepare_argv(["train.py", "experiment=x"])
    assert any(a.startswith("hydra.run.dir=") for a in argv) and "hydra.output_subdir=null" in argv
    monkeypatch.setenv("LDM_RUN_DIR", "/shared/run")
    argv = runtime.prepare_argv(["train.py"])
    assert not any(a.startswith("hydra.run.dir=") for a in argv) and "hydra.output_subdir=null" in argv
    monkeypatch.setenv("RANK", "0")
    assert runtime.prepare_argv(["train.py"]) == ["train.py"]


def test_nonzero_rank_shares_a_given_run_folder_without_writing_hydra_files(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("LDM_RUN_DIR", raising=False)
    argv = runtime.prepare_argv(["train.py", "hydra.run.dir=/shared/run"])
    assert argv == ["train.py", "hydra.run.dir=/shared/run", "hydra.output_subdir=null", "hydra.job.name=train_rank3"]
    assert runtime.prepare_argv(["train.py", "-m", "x=1,2"]) == ["train.py", "-m", "x=1,2"]


def test_wandb_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert runtime.wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert not runtime.wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert runtime.wandb_offline()


def test_link_latest(tmp_path):
    task = tmp_path / "task"
    run = task / "runs" / "r1"
    run.mkdir(parents=True)
    runtime.link_latest(task, run)
    assert (task / "latest").resolve() == run.resolve()
    run2 = task / "runs" / "r2"
    run2.mkdir()
    runtime.link_latest(task, run2)
    assert os.readlink(task / "latest") == os.path.join("runs", "r2")


@pytest.mark.parametrize("env,nodes", [
    ({}, 2),                                                          # composed outside a job: the default
    ({"SLURM_NNODES": "5"}, 5),                                       # srun / submitit
    ({"WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "4"}, 3),               # torchrun --nnodes=3 --nproc-per-node=4
    ({"WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "4", "SLURM_NNODES": "3"}, 3),
    ({"WORLD_SIZE": "10", "LOCAL_WORLD_SIZE": "4"}, 2),               # uneven: not a node count, the default
])
def test_multinode_trainer_takes_the_node_count_from_the_launcher(env, nodes, monkeypatch):
    from hydra import compose, initialize_config_dir

    for var in ("SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    runtime.register_resolvers()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=multinode"])
    assert cfg.trainer.num_nodes == nodes
    assert cfg.trainer.devices == int(env.get("LOCAL_WORLD_SIZE", -1))


def test_tune_malloc_sets_glibc_thresholds_unless_the_user_did(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: Libc())
    assert runtime.tune_malloc() is True
    assert calls == [(-3, 256 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD of <malloc.h>
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")  # the user's own setting wins
    assert runtime.tune_malloc() is False and calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(runtime.ctypes, "CDLL", no_glibc)
    assert runtime.tune_malloc() is False
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.tune_malloc() is False


def test_a_fresh_run_refuses_a_checkpoint_folder_of_an_earlier_run(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    runtime.refuse_used_checkpoint_dir(ckpts, run)  # no folder yet
    ckpts.mkdir(parents=True)
    (ckpts / "notes.txt").write_text("not a checkpoint")
    runtime.refuse_used_checkpoint_dir(ckpts, run)  # only checkpoints count
    for name in ("last.ckpt", "step0000100.ckpt", "step0000200.ckpt", "step0000300.ckpt"):
        (ckpts / name).write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"earlier run \(last.ckpt, step0000100.ckpt, step0000200.ckpt and 1 more"
                                              r"\).*ckpt_path=last.*hydra.run.dir"):
        runtime.refuse_used_checkpoint_dir(ckpts, run)
    assert sorted(p.name for p in ckpts.iterdir())[0] == "last.ckpt" and len(list(ckpts.iterdir())) == 5
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"x")  # Lightning's SLURM requeue resumes from it by itself
    runtime.refuse_used_checkpoint_dir(ckpts, run)
