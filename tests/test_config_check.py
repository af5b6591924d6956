"""config_check: wrong types are named before anything is built; every shipped config passes."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from ldm import runtime
from ldm.config_check import ConfigTypeError, check_types

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))


def composed(overrides: list[str]):
    runtime.register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra.runtime.output_dir=/tmp/x", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_shipped_configs_pass(experiment, trainer):
    check_types(composed([f"experiment={experiment}", f"trainer={trainer}"]))


def test_wrong_types_are_named():
    cfg = composed(["experiment=fmnist_autoencoder", "trainer.max_steps=abc", "model.lr=fast", "data.batch_size=1.5",
                    "trainer.enable_progress_bar=3", "trainer.limit_val_batches=0.5", "trainer.devices=auto"])
    with pytest.raises(ConfigTypeError) as err:
        check_types(cfg)
    lines = str(err.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "data.batch_size=1.5: expected int", "model.lr='fast': expected float",
        "trainer.max_steps='abc': expected int", "trainer.enable_progress_bar=3: expected bool or null"]
