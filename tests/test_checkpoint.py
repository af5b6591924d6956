import os
import pickle

import pytest
import torch
from torch import nn

from ldm import checkpoint
from ldm.checkpoint import AtomicCheckpointIO, CheckpointError


class Evil:
    """Unpickling this runs code: the loader must refuse it, not execute it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_pickled_code_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _net().state_dict(), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        checkpoint.load_file(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_legacy_plain_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        checkpoint.load_file(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_truncated_empty_and_wrong_type(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _net().state_dict()}, good)
    data = good.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "image.ckpt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    for name in ("trunc.ckpt", "empty.ckpt", "image.ckpt"):
        with pytest.raises(CheckpointError):
            checkpoint.load_file(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        checkpoint.load_file(tmp_path / "missing.ckpt")


def test_safetensors_and_folder(tmp_path):
    from safetensors.torch import save_file

    sd = _net().state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    for p in (tmp_path / "model.safetensors", tmp_path):
        loaded = checkpoint.load_file(p)
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes((tmp_path / "model.safetensors").read_bytes()[:-20])
    with pytest.raises(CheckpointError):
        checkpoint.load_file(trunc)


def test_init_from_renames_ignores_and_reports(tmp_path):
    src = _net()
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "a.ckpt")
    dst = _net()
    report = checkpoint.init_from(dst, tmp_path / "a.ckpt", rename={"model.": ""}, ignore=["model.2."])
    assert torch.equal(dst[0].weight, src[0].weight)
    assert not torch.equal(dst[2].weight, src[2].weight)
    assert report["missing"] == ["2.bias", "2.weight"] and report["unexpected"] == []


def test_wrong_architecture_reports_keys_and_shapes(tmp_path):
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.Linear(2, 2))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError) as err:
        checkpoint.init_from(_net(), tmp_path / "b.ckpt", strict=True)
    msg = str(err.value)
    assert "mismatched" in msg and "(5, 3)" in msg and "(4, 3)" in msg and "unexpected" in msg and "3.weight" in msg


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_file(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_read_metadata(tmp_path):
    torch.save({"state_dict": {}, "ldm": {"wandb_run_id": "abc123", "global_step": 7}}, tmp_path / "m.ckpt")
    assert checkpoint.read_metadata(tmp_path / "m.ckpt") == {"wandb_run_id": "abc123", "global_step": 7}
