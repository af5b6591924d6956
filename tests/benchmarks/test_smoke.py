"""The speed-suite benchmarks run end to end in their smoke modes (tiny sizes, one step) and report figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ldm_caching_smoke(tmp_path, capsys):
    figures = load("ldm_caching").main(["--smoke", "--out", str(tmp_path / "c.json")])
    assert figures["cached_images_per_s"] > 0 and figures["uncached_images_per_s"] > 0
    assert figures["speedup"] == pytest.approx(figures["cached_images_per_s"] / figures["uncached_images_per_s"],
                                               rel=1e-2)
    assert json.loads((tmp_path / "c.json").read_text())["smoke"] is True
    assert "speed-up" in capsys.readouterr().out


def test_sampler_steps_smoke(tmp_path):
    summary = load("sampler_steps").main(["--smoke", "--out", str(tmp_path)])
    assert set(summary["samplers"]) == {"ddim", "dpmpp_2m"} and len(summary["rows"]) == 4
    reached = [v for v in summary["samplers"].values() if v is not None]  # at least the best cell's sampler
    assert reached and all(v["steps"] in (1, 2) and v["fid"] <= summary["target_fid"] for v in reached)
    assert (tmp_path / "steps.csv").is_file() and (tmp_path / "fid_vs_steps.png").is_file()


def test_sampler_steps_summarises_an_eval_table(tmp_path, capsys):
    from ldm.metrics.evaluate import write_csv

    rows = [{"sampler": "real (train split)", "steps": 0, "guidance": 0.0, "n": 1000, "fid": 0.4}]
    rows += [{"sampler": s, "steps": k, "guidance": 6.0, "n": 1000, "fid": f, "images_per_s": 500 / k}
             for s, k, f in [("ddim", 10, 3.0), ("ddim", 50, 2.0), ("dpmpp_2m", 10, 2.1), ("dpmpp_2m", 50, 2.0)]]
    summary = load("sampler_steps").main(["--from-csv", str(write_csv(rows, tmp_path / "eval.csv")),
                                          "--out", str(tmp_path / "s")])
    assert summary["samplers"]["ddim"]["steps"] == 50 and summary["samplers"]["dpmpp_2m"]["steps"] == 10
    assert summary["samplers"]["dpmpp_2m"]["speedup"] == 5.0 and summary["samples_per_cell"] == 1000
    assert "does not reach" not in capsys.readouterr().out and (tmp_path / "s" / "fid_vs_steps.png").is_file()


def test_steps_to_target_picks_the_fewest_steps_within_tolerance():
    mod = load("sampler_steps")
    rows = [{"sampler": "ddim", "steps": s, "fid": f, "images_per_s": 100 / s}
            for s, f in [(10, 9.0), (20, 5.2), (50, 5.0)]]
    rows += [{"sampler": "dpmpp_2m", "steps": s, "fid": f, "images_per_s": 100 / s} for s, f in [(10, 5.4), (20, 5.1)]]
    out = mod.steps_to_target(rows, tolerance=0.1)  # target 5.5
    assert out["target_fid"] == pytest.approx(5.5)
    assert out["samplers"]["ddim"]["steps"] == 20 and out["samplers"]["dpmpp_2m"]["steps"] == 10
    assert mod.steps_to_target(rows, tolerance=0.0)["samplers"]["dpmpp_2m"] is None


def test_gpu_speed_smoke_on_the_cpu(tmp_path):
    """The GPU suite's code path on the CPU: every setting row, FLOPs counted, the diffusers ratio; no MFU without a
    known peak, and one with --peak-tflops."""
    out = load("gpu_speed").main(["--smoke", "--sdpa", "math", "--peak-tflops", "1", "--out", str(tmp_path / "g.json")])
    settings = [r["setting"] for r in out["rows"]]
    assert settings[:5] == ["fp32", "+ bf16 autocast", "+ channels_last", "+ fused AdamW", "+ SDPA math"]
    assert out["rows"][-1]["model"] == "diffusers" and out["ours_over_diffusers"]["train"] > 0
    assert out["train_tflop_per_step"] > 0 and all(0 < r["mfu"] < 1 for r in out["rows"])
    assert json.loads((tmp_path / "g.json").read_text())["smoke"] is True


def test_gpu_speed_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="no CUDA device"):
        load("gpu_speed").main(["--device", "cuda"])


@pytest.mark.slow
def test_ldm_f_tradeoff_smoke(tmp_path):
    """f = 1 and f = 8 end to end on a tiny data set: two diffusion runs and one autoencoder run through train.py,
    scored, timed, tabulated and plotted; a second call reuses the runs."""
    from tests.integration.conftest import make_fmnist

    root = make_fmnist(tmp_path / "fmnist", n_train=96, n_test=32)
    args = ["--smoke", "--data-root", str(root), "--out", str(tmp_path / "f")]
    summary = load("ldm_f_tradeoff").main(args)
    rows = {r["f"]: r for r in summary["rows"]}
    assert set(rows) == {1, 8} and rows[1]["latent"] == "32×32×1" and rows[8]["latent"] == "4×4×8"
    assert rows[1]["ae_psnr_db"] is None and rows[8]["ae_psnr_db"] > 0 and rows[8]["ae_rec_fid"] >= 0
    assert all(r["train_images_per_s"] > 0 and r["sampling_images_per_s"] > 0 and r["fid"] >= 0 for r in rows.values())
    for name in ("tradeoff.csv", "summary.json", "fid_vs_train_throughput.png", "fid_vs_sampling_speed.png"):
        assert (tmp_path / "f" / name).is_file()
    again = load("ldm_f_tradeoff").main(args)
    assert [r["train_wall_s"] for r in again["rows"]] == [r["train_wall_s"] for r in summary["rows"]]


def test_fidelity_study_smoke(tmp_path, capsys):
    """A variant run, another checkpoint of it and the demo recipe end to end on a tiny data set: two autoencoders
    and two diffusion runs through train.py, scored by eval.py, tabulated with the floors; a second call reuses
    every run and score."""
    from tests.integration.conftest import make_fmnist

    root = make_fmnist(tmp_path / "fmnist", n_train=96, n_test=32)
    args = ["--smoke", "--data-root", str(root), "--out", str(tmp_path / "s"), "--guidance", "1,2"]
    summary = load("fidelity_study").main(args)
    rows = summary["rows"]
    assert [(r["variant"], float(r["guidance"])) for r in rows] == [
        (v, g) for v in ("old_recipe", "old_recipe_1300", "demo") for g in (1.0, 2.0)]
    assert all(float(r["fid"]) >= 0 and 0 <= float(r["adherence"]) <= 1 for r in rows)
    assert rows[0]["autoencoder"] == "f4_1500" and rows[-1]["autoencoder"] == "f2_1500"
    assert rows[2]["train_s"] == rows[0]["train_s"]  # the half-way checkpoint is a scoring of the same run
    floors = summary["floors"]
    assert [f["what"] for f in floors] == ["real (training images)", "autoencoder f4_1500 reconstructions",
                                           "autoencoder f2_1500 reconstructions"]
    assert all(float(f["psnr_db"]) > 0 for f in floors[1:])
    table = (tmp_path / "s" / "study.md").read_text()
    assert "| old_recipe_1300 |" in table and "| g=1 | g=2 |" in table
    for name in ("study.csv", "floors.csv", "summary.json", "fid_vs_adherence.png"):
        assert (tmp_path / "s" / name).is_file()
    capsys.readouterr()
    again = load("fidelity_study").main(args)
    assert again["rows"] == rows
    assert "$ " not in capsys.readouterr().out  # nothing ran again
