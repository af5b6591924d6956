"""eval.py on a tiny exported checkpoint writes its table (CSV + text), JSON and plots; the table and plot
helpers on their own."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.metrics.classifier import SmallCNN, save_classifier
from ldm.metrics.evaluate import format_table, read_csv, sample_grid, write_csv
from ldm.metrics.plot import plot_metric_vs_steps
from ldm.metrics.quality import SampleMetrics
from tests.tiny_models import tiny_ldm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny text-conditioned model making 16 px images, exported, and a 16 px classifier (random weights)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("eval")
    model = tiny_ldm(root, ema_decay=None)
    model.latent_size.fill_(8)
    model.export(root / "export")
    save_classifier(SmallCNN(width=4, image_size=16).eval(), root / "clf.safetensors")
    return root


def load_eval_script():
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_command_writes_its_table_and_plots(tiny, capsys):
    """eval.py's own function on the composed conf/eval.yaml, in-process (a subprocess would spend most of a
    test's budget importing torchmetrics and transformers again)."""
    out = tiny / "out"
    overrides = [f"ckpt={tiny / 'export'}", "n=2", "samplers=[ddim,dpmpp_2m]", "steps=[2,3]", "guidance=[3.0]",
                 f"metrics.classifier={tiny / 'clf.safetensors'}", "metrics.train_classifier_if_missing=false",
                 "metrics.kid_subset_size=10", "real.n=40", "baseline_n=30", "batch_size=20", "device=cpu",
                 f"out={out}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    load_eval_script().evaluate_checkpoint(cfg)
    assert "real baseline: 30 training images vs the test split (40)" in capsys.readouterr().out
    rows = read_csv(out / "eval.csv")
    assert [(r["sampler"], r["steps"]) for r in rows] == [("real (train split)", "0"), ("ddim", "2"), ("ddim", "3"),
                                                         ("dpmpp_2m", "2"), ("dpmpp_2m", "3")]
    for r in rows:
        assert float(r["fid"]) >= 0 and r["kid"] != "" and 0 <= float(r["adherence"]) <= 1
    assert all(r["n"] == "20" for r in rows[1:]) and float(rows[1]["images_per_s"]) > 0
    assert "dpmpp_2m" in (out / "eval.txt").read_text() and (out / "eval.json").is_file()
    for metric in ("fid", "kid", "adherence"):
        assert Image.open(out / f"{metric}_vs_steps.png").size == (640, 420)


def test_eval_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", f"out={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "give ckpt=" in proc.stderr


def test_sample_grid_table_and_plot(tmp_path):
    class Mean(torch.nn.Module):
        num_features = 2

        def forward(self, x):
            x = x.float()
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)

    quality = SampleMetrics(Mean(), kid_subset_size=8)
    quality.add_real(torch.rand(40, 1, 4, 4) * 2 - 1)
    calls = []

    def generate(prompts, n, sampler, steps, guidance, seed):  # more steps → closer to the real distribution
        calls.append((sampler, steps))
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(len(prompts) * n, 1, 4, 4, generator=g) * 2 - 1) * (1 - 1 / steps)

    rows = sample_grid(generate, quality, None, ["a", "b"], [0, 1], 10, ["ddim", "heun"], [2, 8], [1.0, 4.0])
    assert len(rows) == 8 and calls[:2] == [("ddim", 2), ("ddim", 8)]
    ddim = [r for r in rows if r["sampler"] == "ddim" and r["guidance"] == 1.0]
    assert ddim[0]["fid"] > ddim[1]["fid"] and "adherence" not in ddim[0]
    path = write_csv(rows, tmp_path / "t.csv")
    assert next(csv.reader(path.open()))[:3] == ["sampler", "steps", "guidance"]
    assert format_table(rows).splitlines()[0].split()[:4] == ["sampler", "steps", "guidance", "n"]
    png = plot_metric_vs_steps(read_csv(path), tmp_path / "fid.png", "fid")
    image = Image.open(png).convert("RGB")
    assert len(set(image.getdata())) > 4  # axes, grid, four coloured lines (sampler × guidance)
    with pytest.raises(ValueError, match="no rows"):
        plot_metric_vs_steps([], tmp_path / "empty.png")


def test_eval_guidance_sweep_plots_the_trade_off_and_scores_the_autoencoder(tiny, capsys):
    out = tiny / "sweep"
    overrides = [f"ckpt={tiny / 'export'}", "n=2", "samplers=[ddim]", "steps=[2]", "guidance=[1.0,3.0,6.0]",
                 "autoencoder=ckpt", f"metrics.classifier={tiny / 'clf.safetensors'}",
                 "metrics.train_classifier_if_missing=false", "metrics.kid_subset_size=10", "real.n=40",
                 "baseline_n=30", "batch_size=20", "device=cpu", f"out={out}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    load_eval_script().evaluate_checkpoint(cfg)
    assert "autoencoder floor: its reconstructions of 30 training images" in capsys.readouterr().out
    rows = read_csv(out / "eval.csv")
    assert [(r["sampler"], r["guidance"]) for r in rows] == [
        ("real (train split)", "0.0"), ("autoencoder reconstructions", "0.0"), ("ddim", "1.0"), ("ddim", "3.0"),
        ("ddim", "6.0")]
    assert float(rows[1]["psnr_db"]) > 0 and rows[1]["n"] == "30" and rows[2]["psnr_db"] == ""
    image = Image.open(out / "fid_vs_adherence.png").convert("RGB")
    assert image.size == (640, 420) and len(set(image.getdata())) > 3


def test_eval_autoencoder_from_the_checkpoint_needs_one(tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", "baseline_only=true", "autoencoder=ckpt", f"out={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "autoencoder=ckpt scores the checkpoint's own first stage" in proc.stderr


def test_reconstruction_row_scores_the_decoded_images():
    """An autoencoder that halves every pixel: its row is the score of x/2 and the PSNR of x/2 against x."""
    from ldm.metrics.evaluate import reconstruction_row, score
    from ldm.nn.autoencoder import PointMass

    class Halve(torch.nn.Module):
        def encode(self, x):
            return PointMass(x)

        def decode(self, z):
            return z / 2

    class Mean(torch.nn.Module):
        num_features = 2

        def forward(self, x):
            return torch.stack([x.float().mean((1, 2, 3)), x.float().std((1, 2, 3))], 1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 1, 4, 4, generator=g) * 2 - 1
    quality = SampleMetrics(Mean(), kid_subset_size=8)
    quality.add_real(torch.rand(40, 1, 4, 4, generator=g) * 2 - 1)
    row = reconstruction_row(Halve(), quality, x, torch.zeros(30, dtype=torch.long), None, batch_size=7)
    expected_psnr = sum(10 * torch.log10(4 / (xi / 2).pow(2).mean()).item() for xi in x) / len(x)
    assert row["sampler"] == "autoencoder reconstructions" and row["n"] == 30
    assert row["psnr_db"] == pytest.approx(expected_psnr, rel=1e-5)
    assert row["fid"] == pytest.approx(score(quality, x / 2, torch.zeros(30), None)["fid"], rel=1e-5)
