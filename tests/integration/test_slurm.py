"""SLURM: the example sbatch script run as a 2-node job under a stand-in `srun` (two CPU processes with the
environment srun gives its tasks), its requeue path resuming in the same folder, the `hydra/launcher=submitit_slurm`
config and the sbatch file submitit would write from it, and `ckpt_path=last` picking Lightning's hpc checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm import runtime

from .conftest import QUICK, ROOT, TINY_AE, data_overrides

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"

# What srun does for a job step, minus the cluster: start SLURM_NTASKS copies of the command, each with its
# SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID, and fail if any task fails.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) SLURM_NODEID=$((i / SLURM_NTASKS_PER_NODE)) \\
    "$@" > "$SRUN_LOG_DIR/task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    for line in ("#SBATCH --signal=SIGUSR1@90", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", 'trainer.num_nodes="${SLURM_NNODES}"',
                 'trainer.devices="${SLURM_NTASKS_PER_NODE}"'):
        assert line in text


@pytest.fixture(scope="module")
def slurm_job(fmnist_root: Path, tmp_path_factory):
    """Runs the sbatch script as job 4242 on 2 "nodes" x 1 task; returns a function (max_steps) -> process."""
    tmp = tmp_path_factory.mktemp("slurm")
    bin_dir, logs = tmp / "bin", tmp / "srun"
    bin_dir.mkdir()
    logs.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ldm-train", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1", "SLURM_CPUS_PER_TASK": "1",
           "MASTER_PORT": str(free_port()), "LDM_RUN_DIR": str(tmp / "run"), "LDM_PROBE_DIR": str(tmp / "probe"),
           "SRUN_LOG_DIR": str(logs), "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    args = ["experiment=fmnist_autoencoder", "trainer.accelerator=cpu", "trainer.precision=32-true",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", *TINY_AE, *QUICK,
            *data_overrides(fmnist_root), "+callbacks.probe._target_=tests.integration._slurm_probe.ClusterProbe"]

    def run(max_steps: int) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(SBATCH), *args, f"trainer.max_steps={max_steps}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        task_logs = {p.name: p.read_text() for p in sorted(logs.glob("task*.log"))}
        if proc.returncode != 0:
            raise AssertionError(f"sbatch script failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                                 + "\n".join(f"--- {k}\n{v[-4000:]}" for k, v in task_logs.items()))
        proc.task_logs = task_logs
        return proc

    return tmp, run


@pytest.mark.slow
def test_sbatch_two_nodes_use_lightning_slurm_environment_then_requeue_resumes(slurm_job):
    import torch

    tmp, run = slurm_job
    run(2)
    probes = [json.loads((tmp / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, p in enumerate(probes):
        assert p == {"environment": "SLURMEnvironment", "global_rank": rank, "world_size": 2, "node_rank": rank,
                     "num_nodes": 2, "local_rank": 0, "strategy": "DDPStrategy"}
    run_dir = tmp / "run"
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train_rank1.log").is_file()
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 2
    # The requeued job (same SLURM_JOB_ID, same folder) resumes from its checkpoint instead of starting over.
    time.sleep(0.01)
    second = run(4)
    assert "Resuming from" in second.task_logs["task0.log"] + (run_dir / "train.log").read_text()
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["ldm"]["run_dir"] == str(run_dir)


def compose_launcher(overrides: list[str], tmp_path: Path):
    runtime.register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={tmp_path}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")
def test_submitit_slurm_launcher_config_and_the_sbatch_file_it_makes(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf

    cfg = compose_launcher(["hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu",
                            "hydra.launcher.timeout_min=60", "experiment=fmnist_ldm", "trainer=multinode"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert set(launcher) == set(OmegaConf.structured(SlurmQueueConf))  # every field of the plugin, nothing else
    made = instantiate(launcher)
    params = dict(made.params)
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 4, 4)
    assert params["max_num_timeout"] == 3 and params["signal_delay_s"] == 120 and params["mem_gb"] is None
    # The sbatch text submitit would submit, built the way the launcher builds its executor (it wants an srun).
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf))
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=60",
                 "--cpus-per-task=8", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in text
    # trainer=multinode takes nodes and tasks per node from the job's environment on the compute node.
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")


def test_ckpt_last_prefers_the_newest_of_last_and_hpc_checkpoints(tmp_path):
    run_dir, task = tmp_path / "logs" / "t" / "runs" / "r", tmp_path / "logs" / "t"
    (run_dir / "checkpoints").mkdir(parents=True)
    last, hpc = run_dir / "checkpoints" / "last.ckpt", run_dir / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    os.utime(last, (time.time() - 60, time.time() - 60))  # SIGUSR1 saved hpc_ckpt_1 after the last step checkpoint
    assert runtime.resolve_ckpt_path("last", run_dir, task) == str(hpc)
    os.utime(hpc, (time.time() - 120, time.time() - 120))  # ...and the resumed run has saved since
    assert runtime.resolve_ckpt_path("last", run_dir, task) == str(last)
