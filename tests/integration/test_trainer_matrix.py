"""Every trainer config × both experiments, through `train.py` as a user launches them: train, checkpoint, resume.

Each `conf/trainer/*.yaml` is one of:
- run on CPU as shipped, or with the overrides a CPU user gives it (`trainer.accelerator=cpu`, the issue's
  multi-node command): real processes — Lightning's launcher for `ddp_sim` / `ddp`, two `torchrun` "nodes" on
  127.0.0.1 for `multinode`. Each trains 2 batches with a checkpoint at every step, then resumes from
  `ckpt_path=last` for one more batch; distributed runs must end with identical weights on both ranks;
- the same composed trainer as one that runs (`default` is `cpu`);
- GPU-only (`fsdp`): composed, and the data, model, callbacks and FSDP strategy instantiated; the Trainer
  itself is built and trained only where CUDA exists.
A new trainer config that is none of these fails `test_every_trainer_config_is_in_the_matrix`.

The autoencoder runs with its discriminator on from the second batch, so that both optimizers of its manual
optimization clip their gradients under every strategy and precision plugin (bf16-mixed via `ddp`, `multinode`
and `gpu` on CPU), and the LDM with `trainer.gradient_clip_val=1.0` (automatic optimization): the class of bug
where the fused AdamW met Lightning's AMP clipping check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm import checkpoint, runtime

from .conftest import QUICK, ROOT, TINY_AE, TINY_UNET, data_overrides, run_torchrun_nodes, run_train

pytestmark = pytest.mark.slow
TRAINERS = sorted(p.stem for p in (ROOT / "conf" / "trainer").glob("*.yaml"))
EXPERIMENTS = ["fmnist_autoencoder", "fmnist_ldm"]
RANK_WEIGHTS = "+callbacks.rank_weights._target_=tests.integration._rank_weights.RankWeights"


@dataclass(frozen=True)
class Launch:
    """How a CPU user starts a trainer config: plain `python train.py` (Lightning starts any other ranks) or one
    `torchrun` per node; `overrides` are the ones the user adds to run it on CPU."""

    ranks: int
    overrides: list[str] = field(default_factory=list)
    torchrun: bool = False


CPU_LAUNCHES = {
    "cpu": Launch(1),
    "ddp_sim": Launch(2),
    "ddp": Launch(2, ["trainer.accelerator=cpu", "trainer.devices=2"]),  # bf16-mixed, as shipped
    "gpu": Launch(1, ["trainer.accelerator=cpu"]),  # its bf16-mixed precision plugin, on CPU
    # the multi-node issue's command: two nodes of one process each, bf16-mixed as shipped
    "multinode": Launch(2, ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2"], torchrun=True),
}
SAME_AS = {"default": "cpu"}
GPU_ONLY = {"fsdp"}

# global step after the first run and after the resume; the autoencoder's counts both optimizers' steps
STEPS = {"fmnist_autoencoder": (3, 5), "fmnist_ldm": (2, 3)}


def test_every_trainer_config_is_in_the_matrix():
    assert set(TRAINERS) == set(CPU_LAUNCHES) | set(SAME_AS) | GPU_ONLY, "add the new trainer config to the matrix"


def compose_train(overrides: list[str], output_dir: Path):
    runtime.register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.run.dir={output_dir}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("name,same", SAME_AS.items())
def test_alias_trainer_configs_compose_to_the_trainer_that_runs(name, same, tmp_path):
    trainers = [OmegaConf.to_container(compose_train([f"trainer={t}"], tmp_path).trainer, resolve=True)
                for t in (name, same)]
    assert trainers[0] == trainers[1]


def experiment_args(name: str, fmnist_root: Path, ae_export: Path) -> list[str]:
    common = [f"experiment={name}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
              "callbacks.model_checkpoint.every_n_train_steps=1", *QUICK, *data_overrides(fmnist_root, batch_size=8)]
    if name == "fmnist_autoencoder":
        return [*common, *TINY_AE, "model.disc_start=1", "model.disc_factor=1.0", "model.warmup_steps=0"]
    # trainer.gradient_clip_val: Lightning's automatic-optimization clipping, through LatentDiffusion's hook
    return [*common, *TINY_UNET, f"model.first_stage={ae_export}", "model.sample_every_n_steps=0",
            "trainer.gradient_clip_val=1.0"]


def launch(spec: Launch, args: list[str]) -> str:
    if spec.torchrun:
        return "\n".join(run_torchrun_nodes(args, timeout=240))
    proc = run_train(args, timeout=240)
    return proc.stdout + proc.stderr


def global_step(ckpt: Path) -> int:
    return int(checkpoint.load_file(ckpt)["global_step"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("trainer", sorted(CPU_LAUNCHES))
def test_trains_checkpoints_and_resumes(trainer, experiment, fmnist_root, tiny_ae_f2_export, tmp_path):
    spec = CPU_LAUNCHES[trainer]
    run_dir, weights = tmp_path / "run", tmp_path / "weights"
    first, resumed = STEPS[experiment]
    args = [*experiment_args(experiment, fmnist_root, tiny_ae_f2_export), f"trainer={trainer}", *spec.overrides,
            f"hydra.run.dir={run_dir}"]
    launch(spec, [*args, f"trainer.max_steps={first}"])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert global_step(last) == first
    assert (run_dir / "export").is_dir()
    before = checkpoint.load_file(last)["state_dict"]

    out = launch(spec, [*args, f"trainer.max_steps={resumed}", "ckpt_path=last", RANK_WEIGHTS,
                        f"+callbacks.rank_weights.out_dir={weights}"])
    assert f"Resuming from {last}" in out
    assert global_step(last) == resumed
    ranks = [torch.load(weights / f"rank{r}.pt", weights_only=True) for r in range(spec.ranks)]
    assert [r["world_size"] for r in ranks] == [spec.ranks] * spec.ranks
    assert all(r["global_step"] == resumed for r in ranks)
    for other in ranks[1:]:
        unequal = [k for k, v in ranks[0]["state_dict"].items() if not torch.equal(v, other["state_dict"][k])]
        assert not unequal, f"ranks ended with different weights: {unequal[:5]}"
    # the resumed run trained on from the checkpoint and saved what it ended with
    after = checkpoint.load_file(last)["state_dict"]
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if v.is_floating_point())
    for k, v in ranks[0]["state_dict"].items():
        assert torch.equal(v, after[k]), k


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("trainer", sorted(GPU_ONLY | {"gpu", "ddp"}))
def test_gpu_configs_instantiate_up_to_the_trainer(trainer, experiment, fmnist_root, tiny_ae_f2_export,
                                                   tmp_path):
    cfg = compose_train([*experiment_args(experiment, fmnist_root, tiny_ae_f2_export), f"trainer={trainer}",
                         "trainer.max_steps=2"], tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert callbacks
    strategy = cfg.trainer.get("strategy")
    if OmegaConf.is_dict(strategy):
        strategy = instantiate(strategy)
        assert type(strategy).__name__ == "FSDPStrategy"
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="(?i)gpu|cuda"):
            instantiate(cfg.trainer, callbacks=callbacks, logger=False)
        return
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, devices=1)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    assert trainer.global_step == 2
