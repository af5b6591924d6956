"""RNGState: the global RNG state round-trips through a weights_only checkpoint and validation leaves it alone."""

import random
from types import SimpleNamespace

import numpy as np
import torch

from ldm.callbacks.rng_state import RNGState, collect_rng_state, restore_rng_state


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.save({"callbacks": {"RNGState": RNGState().state_dict()}}, tmp_path / "c.ckpt")
    expected = draws()
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["RNGState"]
    draws()
    restore_rng_state(state)
    assert draws() == expected


def test_restored_before_the_first_batch_and_neutral_around_validation():
    cb = RNGState()
    cb.load_state_dict(collect_rng_state())
    expected = draws()
    draws()  # what Lightning draws between reading the checkpoint and the first batch
    cb.on_train_batch_start(None, None, None, 0)
    assert draws() == expected
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    cb.on_train_batch_end(trainer, None, None, None, 0)
    expected = draws()  # validation draws these
    cb.on_validation_end(trainer, None)
    assert draws() == expected
