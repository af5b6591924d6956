"""Distributed training through `train.py` on CPU processes (gloo on loopback), for both experiments.

Each experiment runs once as a single process (the reference) and then as 2 DDP ranks with the same global
batch, launched two ways: Lightning's own launcher (`trainer=ddp_sim`) and `torchrun` as two "nodes"
(`trainer=multinode trainer.num_nodes=2`, one torchrun per node rank, as on a cluster). Every run must end with
the same weights on both ranks, the same per-step loss curve as the reference, one output folder, and
checkpoints/images/exports written by rank 0 only.

Why the curves agree this closely: the DataModule hands rank r the r-th half of each global batch of the same
seeded order, and all training noise (posterior samples, t, ε, condition dropout) is a function of (seed, step,
global sample index) (`ldm.rng.GlobalBatchGenerator`), so 2 × B/2 trains on exactly what 1 × B does. What is
left is float summation order (DDP averages two half-batch gradients; `sync_dist` averages two half-batch
losses): differences of ~1e-7 relative, so the tolerance below (1e-4 relative on losses, 1e-5 on weights)
is tight enough that one shared noise draw or one wrongly split batch would fail it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from .conftest import QUICK, TINY_AE, TINY_AE_F2, TINY_UNET, data_overrides, run_torchrun_nodes, run_train

pytestmark = pytest.mark.slow
TIMEOUT = 240  # seconds per launch: a deadlock fails the test instead of hanging it

RANK_WEIGHTS = "+callbacks.rank_weights._target_=tests.integration._rank_weights.RankWeights"
# fp32 here (multinode ships bf16-mixed) so that the runs can be compared with the fp32 reference to 1e-4;
# test_trainer_matrix.py launches multinode as shipped.
CPU_MULTINODE = ["trainer=multinode", "trainer.num_nodes=2", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def experiment_args(name: str, fmnist_root: Path, first_stage: Path | None = None) -> list[str]:
    common = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", *QUICK,
              *data_overrides(fmnist_root, batch_size=8)]
    if name == "fmnist_autoencoder":
        return [f"experiment={name}", *TINY_AE, *common]
    if name == "fmnist_autoencoder_f2":  # fmnist_ldm's first stage
        return [f"experiment={name}", *TINY_AE_F2, *common]
    return [f"experiment={name}", f"model.first_stage={first_stage}", "model.sample_every_n_steps=2",
            "model.val_steps=2", "model.val_images_per_prompt=1", "model.val_prompts=[a photo of a bag]",
            *TINY_UNET, *common]


def loss_curve(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def rank_weights(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(fmnist_root, tmp_path_factory):
    """Single-process runs (global batch 8) of both experiments; the LDM trains on the autoencoder's export."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            run = tmp_path_factory.mktemp(f"ref_{name}")
            first_stage = get("fmnist_autoencoder_f2") / "export" if name == "fmnist_ldm" else None
            run_train([*experiment_args(name, fmnist_root, first_stage), f"hydra.run.dir={run}", RANK_WEIGHTS,
                       f"+callbacks.rank_weights.out_dir={run / 'weights'}"], timeout=TIMEOUT)
            runs[name] = run
        return runs[name]

    return get


def assert_matches_reference(weights_dir: Path, run_dir: Path, ref_dir: Path) -> None:
    r0, r1 = rank_weights(weights_dir, 0), rank_weights(weights_dir, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == rank_weights(ref_dir / "weights", 0)["global_step"]
    s0, s1 = r0["state_dict"], r1["state_dict"]
    assert s0.keys() == s1.keys()
    unequal = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not unequal, f"ranks ended with different weights: {unequal[:5]}"

    ref = rank_weights(ref_dir / "weights", 0)["state_dict"]
    assert ref.keys() == s0.keys()
    for k in ref:  # includes the autoencoder's all-reduced scale factor and the LDM's EMA U-Net
        torch.testing.assert_close(s0[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")

    curve, ref_curve = loss_curve(run_dir), loss_curve(ref_dir)
    assert sorted(curve) == sorted(ref_curve) == list(range(4))  # one averaged value per step, every step
    for step, loss in ref_curve.items():
        assert curve[step] == pytest.approx(loss, rel=1e-4), f"step {step}: {curve[step]} vs {loss}"


def assert_rank0_outputs(run_dir: Path, name: str) -> None:
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    export = {"model.safetensors"} if name == "fmnist_autoencoder" else {"unet.safetensors"}
    assert export <= {p.name for p in (run_dir / "export").iterdir()}
    assert list((run_dir / "images").glob("*.png"))


@pytest.mark.parametrize("name", ["fmnist_autoencoder", "fmnist_ldm"])
def test_ddp_sim_two_processes(name, fmnist_root, reference, tmp_path):
    ref = reference(name)
    first_stage = reference("fmnist_autoencoder_f2") / "export" if name == "fmnist_ldm" else None
    weights = tmp_path / "weights"
    # The default run folder (logs/<task>/runs/<time>): rank 1, started later by Lightning, must not make its own.
    run_train([*experiment_args(name, fmnist_root, first_stage), "trainer=ddp_sim", f"paths.log_dir={tmp_path}",
               RANK_WEIGHTS, f"+callbacks.rank_weights.out_dir={weights}"], timeout=TIMEOUT)
    runs = list((tmp_path / name / "runs").iterdir())
    assert len(runs) == 1, f"one output folder per run, found {runs}"
    run_dir = runs[0]
    assert (tmp_path / name / "latest").resolve() == run_dir.resolve()
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran in the same folder
    assert_rank0_outputs(run_dir, name)
    assert_matches_reference(weights, run_dir, ref)


@pytest.mark.parametrize("name", ["fmnist_autoencoder", "fmnist_ldm"])
def test_torchrun_two_nodes(name, fmnist_root, reference, tmp_path):
    ref = reference(name)
    first_stage = reference("fmnist_autoencoder_f2") / "export" if name == "fmnist_ldm" else None
    weights, scratch = tmp_path / "weights", tmp_path / "tmp"
    scratch.mkdir()
    # Same command on both nodes, no shared run folder given: rank 0 makes the run folder, rank 1 gets a
    # scratch folder under TMPDIR and must leave nothing there but its log.
    args = [*experiment_args(name, fmnist_root, first_stage), *CPU_MULTINODE, f"paths.log_dir={tmp_path / 'logs'}",
            RANK_WEIGHTS, f"+callbacks.rank_weights.out_dir={weights}"]
    run_torchrun_nodes(args, env={"TMPDIR": str(scratch)}, timeout=TIMEOUT)
    runs = list((tmp_path / "logs" / name / "runs").iterdir())
    assert len(runs) == 1, f"one output folder per run, found {runs}"
    assert_rank0_outputs(runs[0], name)
    rank1_dirs = list(scratch.glob("ldm-rank1-*"))
    assert len(rank1_dirs) == 1
    assert sorted(p.name for p in rank1_dirs[0].rglob("*")) == ["train_rank1.log"]  # no checkpoints, images, csv
    assert_matches_reference(weights, runs[0], ref)


def test_a_global_batch_that_does_not_divide_across_ranks_stops_both(fmnist_root, tmp_path):
    proc = run_train(["experiment=fmnist_autoencoder", *TINY_AE, *QUICK, *data_overrides(fmnist_root, batch_size=3),
                      "trainer=ddp_sim", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "data.batch_size=3 (global) does not divide across 2 ranks; use a multiple of 2" in out, out[-3000:]
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("*.ckpt"))
