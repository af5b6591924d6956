"""scripts/demo.py: a second `make demo` sets the first run's outputs aside instead of training beside them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_previous_outputs_move_aside_and_nothing_is_deleted(tmp_path, monkeypatch, capsys):
    demo = load_demo()
    monkeypatch.setattr(demo, "OUT", tmp_path)
    demo.set_aside_previous_run()  # first run: nothing to move
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ldm" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ldm" / "checkpoints" / "last.ckpt").write_bytes(b"old model")
    (tmp_path / "autoencoder").mkdir()
    (tmp_path / "adherence.json").write_text("{}")
    (tmp_path / "class_prompts.txt").write_text("a photo of a bag\n")  # rewritten every run, stays
    demo.set_aside_previous_run()
    (moved,) = (tmp_path / "previous").iterdir()
    assert (moved / "ldm" / "checkpoints" / "last.ckpt").read_bytes() == b"old model"
    assert {p.name for p in moved.iterdir()} == {"ldm", "autoencoder", "adherence.json"}
    assert {p.name for p in tmp_path.iterdir()} == {"previous", "class_prompts.txt"}
    assert f"moved to {moved}" in capsys.readouterr().out
