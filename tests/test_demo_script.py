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
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.csv").write_text("sampler\n")
    (tmp_path / "class_prompts.txt").write_text("a photo of a bag\n")  # rewritten every run, stays
    demo.set_aside_previous_run()
    (moved,) = (tmp_path / "previous").iterdir()
    assert (moved / "ldm" / "checkpoints" / "last.ckpt").read_bytes() == b"old model"
    assert {p.name for p in moved.iterdir()} == {"ldm", "autoencoder", "eval"}
    assert {p.name for p in tmp_path.iterdir()} == {"previous", "class_prompts.txt"}
    assert f"moved to {moved}" in capsys.readouterr().out


def test_summary_figures_come_from_the_eval_table(tmp_path):
    """eval.py's rows in order: the real baseline, the autoencoder floor, the samples."""
    table = tmp_path / "eval.csv"
    table.write_text("sampler,steps,guidance,n,fid,kid,adherence,psnr_db\n"
                     "real (train split),0,0.0,1000,0.5,0.001,0.93,\n"
                     "autoencoder reconstructions,0,0.0,1000,0.8,0.005,0.92,30.2\n"
                     "dpmpp_2m,20,2.0,1000,1.25,0.01,0.91,\n")
    figures = load_demo().read_eval(table)
    assert figures == {"fid": 1.25, "baseline_fid": 0.5, "fid_ratio": 2.5, "adherence": 0.91, "real_adherence": 0.93,
                       "autoencoder_fid": 0.8, "autoencoder_psnr_db": 30.2, "n": 1000}
