"""Every `logger=` choice composes with both experiments and instantiates the Lightning loggers it promises, writing
under the run folder; W&B is offline without credentials and asks for an online run before uploading checkpoints.
(What the loggers write during a run is checked in test_wandb.py, which trains with csv + tensorboard + wandb.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from ldm import runtime

from .conftest import ROOT

CHOICES = {"csv": [CSVLogger], "tensorboard": [TensorBoardLogger], "many": [CSVLogger, TensorBoardLogger],
           "wandb": [WandbLogger]}


def loggers(overrides: list[str], out: Path) -> list:
    runtime.register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out}"])
    return [instantiate(c) for c in cfg.logger.values()]


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.mark.parametrize("experiment", ["fmnist_autoencoder", "fmnist_ldm"])
@pytest.mark.parametrize("choice", sorted(CHOICES))
def test_logger_choice_composes_and_instantiates(choice, experiment, tmp_path, no_wandb_credentials):
    made = loggers([f"experiment={experiment}", f"logger={choice}"], tmp_path)
    assert [type(lg) for lg in made] == CHOICES[choice]
    for lg in made:
        assert Path(lg.save_dir) == tmp_path
        if isinstance(lg, WandbLogger):  # no run is started by instantiating; these are the wandb.init arguments
            init = lg._wandb_init
            assert (init["project"], init["name"], init["job_type"]) == ("ldm", experiment, experiment)
            assert init["tags"] == ["fmnist", experiment.split("_")[1]] and lg._offline is True
        else:
            assert Path(lg.log_dir) == tmp_path / choice if choice != "many" else lg.log_dir.startswith(str(tmp_path))


def test_wandb_options_reach_wandb_init(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k")  # a key: online unless WANDB_MODE says otherwise
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (lg,) = loggers(["logger=wandb", "logger.wandb.project=p", "logger.wandb.entity=team", "logger.wandb.group=g",
                     "tags=[a,b]", "logger.wandb.log_model=all"], tmp_path)
    init = lg._wandb_init
    assert (init["project"], init["entity"], init["group"], init["tags"]) == ("p", "team", "g", ["a", "b"])
    assert lg._offline is False and lg._log_model == "all" and init["resume"] == "allow"


def test_wandb_log_model_offline_is_a_clear_error(tmp_path, no_wandb_credentials):
    with pytest.raises(InstantiationException, match="log_model=True and offline=True"):
        loggers(["logger=wandb", "logger.wandb.log_model=true"], tmp_path)
