"""config_check: wrong types are named before anything is built; every shipped config passes."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from ldm import runtime
from ldm.config_check import SAMPLE_KEYS, TRAIN_KEYS, ConfigTypeError, check_types

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
    check_types(composed([f"experiment={experiment}", f"trainer={trainer}"]), plain=TRAIN_KEYS)


def test_wrong_types_are_named():
    cfg = composed(["experiment=fmnist_autoencoder", "trainer.max_steps=abc", "model.lr=fast", "data.batch_size=1.5",
                    "trainer.enable_progress_bar=3", "trainer.limit_val_batches=0.5", "trainer.devices=auto"])
    with pytest.raises(ConfigTypeError) as err:
        check_types(cfg)
    lines = str(err.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "data.batch_size=1.5: expected int", "model.lr='fast': expected float",
        "trainer.max_steps='abc': expected int", "trainer.enable_progress_bar=3: expected bool or null"]


def test_wrong_types_in_the_entry_points_own_keys_are_named():
    cfg = composed(["seed=abc", "export=maybe", "ckpt_path=3", "init_from.strict=1", "compile=true", "test=false"])
    with pytest.raises(ConfigTypeError) as err:
        check_types(cfg, plain=TRAIN_KEYS)
    assert [line.strip() for line in str(err.value).splitlines()[1:]] == [
        "data.seed='abc': expected int", "data.train.seed='abc': expected int", "data.val.seed='abc': expected int",
        "seed='abc': expected int", "ckpt_path=3: expected null or str", "init_from.strict=1: expected bool",
        "export='maybe': expected bool"]


def test_sample_config_keys(tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        good = compose("sample", overrides=["ckpt=x.ckpt", "prompt=2024", "guidance=7", "height=64"])
        bad = compose("sample", overrides=["ckpt=x.ckpt", "steps=many", "guidance=high", "n=2.5", "use_ema=no"])
    check_types(good, keys=(), plain=SAMPLE_KEYS)  # an int guidance is a float; a number is a prompt too
    with pytest.raises(ConfigTypeError) as err:
        check_types(bad, keys=(), plain=SAMPLE_KEYS)
    assert [line.strip() for line in str(err.value).splitlines()[1:]] == [
        "n=2.5: expected int", "steps='many': expected int", "guidance='high': expected float",
        "use_ema='no': expected bool"]
