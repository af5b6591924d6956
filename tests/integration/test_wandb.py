"""`logger=wandb` through train.py, offline: what lands in the offline run folder, and a resumed run continuing it.

Three short runs: the autoencoder with csv + tensorboard + W&B and no W&B credentials at all (offline by default),
the same run resumed with `ckpt_path=last`, and the LDM on its export with checkpoints logged as artifacts. The
offline run is read straight from its transaction log (`wandb/offline-run-*/run-<id>.wandb`, the file
`wandb sync` uploads): W&B 0.2x/0.3x no longer ship a Python reader for it, so `read_offline_run` below parses
the format (a LevelDB-style log of `wandb_internal_pb2.Record` protobufs) itself.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from PIL import Image

from .conftest import QUICK, TINY_AE, TINY_UNET, data_overrides, run_train

pytestmark = pytest.mark.slow

PROMPTS = ["a photo of a bag", "a photo of a dress"]


# ---- reading an offline run -------------------------------------------------------------------------------------
def _records(path: Path) -> list:
    """Every Record in a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block tail too short for a
    header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf, out = head, b"", []
    while pos + head <= len(data):
        if block - pos % block < head:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + head])
        if kind == 0:
            break
        chunk, pos = data[pos + head:pos + head + length], pos + head + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def read_offline_run(folder: Path) -> dict:
    """{"run": RunRecord, "config": {key: value}, "history": [{key: value}], "artifacts": [ArtifactRecord]}."""
    (path,) = folder.glob("run-*.wandb")
    run, config, history, artifacts = None, {}, [], []
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "artifact":
            artifacts.append(r.artifact)
    return {"run": run, "config": config, "history": history, "artifacts": artifacts}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def series(history: list[dict], key: str) -> dict[int, object]:
    """{trainer/global_step: value} of one logged key."""
    return {h["trainer/global_step"]: h[key] for h in history if key in h}


# ---- the runs ---------------------------------------------------------------------------------------------------
def wandb_env(tmp: Path) -> dict:
    # No credentials anywhere (no API key, no netrc, no settings file), nothing written outside tmp.
    return {"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": str(tmp / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp / "cfg"),
            "WANDB_CACHE_DIR": str(tmp / "cache"), "WANDB_DATA_DIR": str(tmp / "data")}


AE_ARGS = ["experiment=fmnist_autoencoder", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
           "callbacks.model_checkpoint.every_n_train_steps=2", *TINY_AE, *QUICK]


@pytest.fixture(scope="module")
def ae_runs(fmnist_root: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wandb_ae")
    run_dir, env = tmp / "run", wandb_env(tmp)
    run_train([*AE_ARGS, f"hydra.run.dir={run_dir}", "trainer.max_steps=4", "logger=[csv,tensorboard,wandb]",
               "logger.wandb.group=sweep-a", "tags=[fmnist,ci]", *data_overrides(fmnist_root)], env=env)
    first = offline_runs(run_dir)
    run_train([*AE_ARGS, f"hydra.run.dir={run_dir}", "trainer.max_steps=6", "ckpt_path=last", "logger=wandb",
               *data_overrides(fmnist_root)], env=env)
    resumed = [p for p in offline_runs(run_dir) if p not in first]
    return {"dir": run_dir, "first": first, "resumed": resumed}


@pytest.fixture(scope="module")
def ldm_run(tiny_ae_f2_export: Path, fmnist_root: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wandb_ldm")
    # Lightning refuses log_model with offline=True; W&B's own offline mode (WANDB_MODE) records the artifacts
    # for a later `wandb sync`.
    run_train(["experiment=fmnist_ldm", f"hydra.run.dir={tmp / 'run'}", f"model.first_stage={tiny_ae_f2_export}",
               "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
               "model.sample_every_n_steps=2", "model.val_steps=2", "model.val_images_per_prompt=2",
               f"model.val_prompts=[{','.join(PROMPTS)}]", "callbacks.model_checkpoint.every_n_train_steps=2",
               "logger=wandb", "logger.wandb.offline=false", "logger.wandb.log_model=all", *TINY_UNET, *QUICK,
               *data_overrides(fmnist_root)], env={**wandb_env(tmp), "WANDB_MODE": "offline"})
    return tmp / "run"


# ---- tests ------------------------------------------------------------------------------------------------------
def test_offline_by_default_with_metrics_config_and_run_identity(ae_runs):
    assert len(ae_runs["first"]) == 1, "one offline run folder (no credentials → offline)"
    run = read_offline_run(ae_runs["first"][0])
    r = run["run"]
    assert (r.project, r.run_group, list(r.tags)) == ("ldm", "sweep-a", ["fmnist", "ci"])
    assert r.display_name == r.job_type == "fmnist_autoencoder"
    losses = series(run["history"], "train/loss")
    assert sorted(losses) == [0, 1, 2, 3] and all(0 < v < 1e6 for v in losses.values())
    assert set(series(run["history"], "lr-AdamW")) == {0, 1, 2, 3}  # LearningRateMonitor, every step
    assert len(series(run["history"], "val/psnr")) == 2
    cfg = run["config"]  # the resolved Hydra config (plus the model's own hyper-parameters)
    assert cfg["model"]["_target_"] == "ldm.models.autoencoder.AutoencoderKL"
    assert cfg["trainer"]["max_steps"] == 4 and cfg["data"]["batch_size"] == 8 and cfg["tags"] == ["fmnist", "ci"]
    assert cfg["paths"]["output_dir"] == str(ae_runs["dir"])  # resolved, no ${...} left
    assert cfg["logger"]["wandb"]["offline"] is True


def test_autoencoder_image_grids_reach_the_offline_run(ae_runs):
    folder = ae_runs["first"][0]
    history = read_offline_run(folder)["history"]
    images = [h for h in history if "val/images.filenames" in h]
    # at the x-axis position of the validation run they belong to (after batches 2 and 4: Lightning's steps 1, 3)
    assert [h["trainer/global_step"] for h in images] == sorted(series(history, "val/psnr")) == [1, 3]
    for h in images:
        assert h["val/images.captions"] == ["inputs", "reconstructions", "samples"]
        for name in h["val/images.filenames"]:
            with Image.open(folder / "files" / name) as im:
                assert im.format == "PNG" and im.size == (h["val/images.width"], h["val/images.height"])


def test_csv_and_tensorboard_log_the_same_losses(ae_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = ae_runs["dir"]
    wandb_losses = series(read_offline_run(ae_runs["first"][0])["history"], "train/loss")
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    csv_losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert csv_losses == pytest.approx(wandb_losses, rel=1e-6)
    assert any(r.get("val/psnr") for r in rows) and any(r.get("lr-AdamW") for r in rows)
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tb_losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_losses == pytest.approx(wandb_losses, rel=1e-6)
    assert {"val/inputs", "val/reconstructions", "val/samples"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("val/samples")] == [e.step for e in acc.Scalars("val/psnr")]


def test_resumed_run_continues_the_same_wandb_run(ae_runs):
    import torch

    first = read_offline_run(ae_runs["first"][0])
    stored = torch.load(ae_runs["dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["ldm"]
    assert stored["wandb_run_id"] == first["run"].run_id
    assert len(ae_runs["resumed"]) == 1
    resumed = read_offline_run(ae_runs["resumed"][0])
    assert resumed["run"].run_id == first["run"].run_id and resumed["run"].project == "ldm"
    assert sorted(series(resumed["history"], "train/loss")) == [4, 5]  # continues where the checkpoint stopped


def test_ldm_sample_grids_carry_prompts_and_checkpoints_become_artifacts(ldm_run: Path):
    (folder,) = offline_runs(ldm_run)
    run = read_offline_run(folder)
    (grid,) = [h for h in run["history"] if "val/samples.filenames" in h]
    assert [grid["trainer/global_step"]] == sorted(series(run["history"], "val/loss"))  # with its validation metrics
    assert grid["val/samples.captions"] == PROMPTS and len(grid["val/samples.filenames"]) == len(PROMPTS)
    for name in grid["val/samples.filenames"]:
        assert (folder / "files" / name).is_file()
    assert set(series(run["history"], "train/loss")) == {0, 1}
    run_id = run["run"].run_id
    logged = {json.loads(a.metadata)["original_filename"] for a in run["artifacts"]}
    assert {a.name for a in run["artifacts"]} == {f"model-{run_id}"} and {a.type for a in run["artifacts"]} == {"model"}
    assert logged == {"step0000002.ckpt", "last.ckpt"}
