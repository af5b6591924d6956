"""LatentDiffusionPipeline and sample.py on a tiny exported model: files, metadata, determinism, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.pipeline import LatentDiffusionPipeline
from tests.tiny_models import tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny text-conditioned model (random weights, EMA ≠ raw), exported as a user's run would be."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pipe")
    model = tiny_ldm(root, ema_decay=0.9)
    with torch.no_grad():  # give the U-Net a non-zero output layer, and make raw weights differ from EMA
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.latent_size.fill_(8)  # 16 px images through an f=2 autoencoder
    model.export(root / "raw", use_ema=False)
    model.export(root / "export", use_ema=True)
    return root


def test_text_to_image_shapes_seeds_and_determinism(export_dir):
    pipe = LatentDiffusionPipeline.from_checkpoint(export_dir / "raw", device="cpu")
    assert pipe.image_size == (16, 16)
    kw = dict(n=3, sampler="ddim", steps=4, guidance=3.0, seed=7, progress=False)
    a = pipe.text_to_image(["a photo of a bag", "a coat"], batch_size=6, **kw)
    assert a["images"].shape == (6, 1, 16, 16) and a["images"].abs().max() <= 1
    assert a["prompts"] == ["a photo of a bag"] * 3 + ["a coat"] * 3 and a["seeds"] == [7, 8, 9, 10, 11, 12]
    b = pipe.text_to_image(["a photo of a bag", "a coat"], batch_size=4, **kw)  # other batching
    torch.testing.assert_close(a["images"], b["images"], atol=1e-5, rtol=0)
    c = pipe.text_to_image(["a photo of a bag", "a coat"], batch_size=6, **{**kw, "seed": 8})
    assert not torch.allclose(a["images"], c["images"])
    torch.testing.assert_close(a["images"][1:3], c["images"][0:2], atol=1e-5, rtol=0)  # image k ← seed + k
    big = pipe.text_to_image("a coat", n=1, height=32, width=24, steps=2, progress=False)
    assert big["images"].shape == (1, 1, 32, 24)


def test_every_sampler_runs(export_dir):
    pipe = LatentDiffusionPipeline.from_checkpoint(export_dir / "export", device="cpu")
    for sampler in ["ddim", "ddpm", "dpmpp_2m", "euler", "euler_a", "heun"]:
        out = pipe.text_to_image("a sneaker", n=2, sampler=sampler, steps=3, progress=False)
        assert out["images"].shape == (2, 1, 16, 16) and torch.isfinite(out["images"]).all(), sampler


def test_ema_and_raw_weights_give_different_images(export_dir):
    ema = LatentDiffusionPipeline.from_checkpoint(export_dir / "export", device="cpu")
    raw = LatentDiffusionPipeline.from_checkpoint(export_dir / "raw", device="cpu")
    kw = dict(n=2, steps=3, seed=0, progress=False)
    assert not torch.allclose(ema.text_to_image("a bag", **kw)["images"], raw.text_to_image("a bag", **kw)["images"])


def test_save_writes_pngs_with_metadata_grid_and_json(export_dir, tmp_path):
    pipe = LatentDiffusionPipeline.from_checkpoint(export_dir / "export", device="cpu")
    result = pipe.text_to_image(["a bag", "a dress"], n=2, sampler="euler", steps=2, guidance=2.5, seed=3,
                                progress=False)
    files = pipe.save(result, tmp_path / "out")
    assert len(files["images"]) == 4 and all(p.is_file() for p in files["images"])
    text = Image.open(files["images"][2]).text
    assert text["prompt"] == "a dress" and json.loads(text["seed"]) == 5 and text["sampler"] == "euler"
    assert json.loads(text["steps"]) == 2 and json.loads(text["guidance"]) == 2.5
    assert text["checkpoint"].endswith("export")
    grid = Image.open(files["grid"])
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # one row per prompt, 2-px padding
    meta = json.loads(files["metadata"].read_text())
    assert [e["seed"] for e in meta["images"]] == [3, 4, 5, 6] and meta["settings"]["steps"] == 2


def test_clear_errors(export_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "nope.ckpt")
    pipe = LatentDiffusionPipeline.from_checkpoint(export_dir / "export", device="cpu")
    with pytest.raises(ValueError, match="multiples"):
        pipe.text_to_image("a bag", height=15, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        pipe.text_to_image([], progress=False)
    with pytest.raises(ValueError, match="n must be"):
        pipe.text_to_image("a bag", n=0, progress=False)
    with pytest.raises(ValueError, match="precision"):
        pipe.text_to_image("a bag", precision="fp8", progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.text_to_image("a bag", sampler="nope", progress=False)


def test_long_and_empty_prompts_are_handled(export_dir, caplog):
    pipe = LatentDiffusionPipeline.from_checkpoint(export_dir / "export", device="cpu")
    with pytest.warns(UserWarning, match="truncated"):  # max_length 16
        out = pipe.text_to_image(["", "a bag " * 200], steps=2, progress=False)
    assert out["images"].shape[0] == 2 and torch.isfinite(out["images"]).all()
    assert "empty prompt" in caplog.text


def run_sample(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                       "OMP_NUM_THREADS": "1"})


def test_autoguidance_by_another_checkpoint_of_the_model(export_dir, tmp_path):
    import shutil

    pipe = LatentDiffusionPipeline.from_checkpoint(export_dir / "export", device="cpu")
    kw = dict(n=2, sampler="dpmpp_2m", steps=3, guidance=3.0, seed=1, progress=False)
    plain = pipe.text_to_image("a photo of a bag", **kw)
    with pytest.raises(ValueError, match="needs a guide"):
        pipe.text_to_image("a photo of a bag", guide_scale=1.0, **kw)
    no_cfg = {**kw, "guidance": 1.0}
    plain_1 = pipe.text_to_image("a photo of a bag", **no_cfg)
    pipe.load_guide(export_dir / "export")  # the model itself as its guide: cond − guide(cond) = 0
    for settings, reference in ((kw, plain), (no_cfg, plain_1)):  # with CFG, and without (guidance 1)
        same = pipe.text_to_image("a photo of a bag", guide_scale=2.0, **settings)
        torch.testing.assert_close(same["images"], reference["images"], atol=1e-5, rtol=0)
    pipe.load_guide(export_dir / "raw")  # other weights of the same model
    guided = pipe.text_to_image("a photo of a bag", guide_scale=1.0, **kw)
    assert (guided["images"] - plain["images"]).abs().max() > 1e-3
    assert (pipe.text_to_image("a photo of a bag", guide_scale=1.0, **no_cfg)["images"]
            - plain_1["images"]).abs().max() > 1e-3
    assert guided["settings"]["guide_scale"] == 1.0 and guided["settings"]["guide"] == str(export_dir / "raw")
    assert "guide" not in plain["settings"]
    other = tmp_path / "other"  # a model of another kind (prediction type) cannot guide this one
    shutil.copytree(export_dir / "export", other)
    cfg = json.loads((other / "config.json").read_text())
    hp = cfg["hyper_parameters"]
    hp["prediction_type"] = "v" if hp.get("prediction_type", "eps") != "v" else "eps"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="prediction_type"):
        pipe.load_guide(other)
    with pytest.raises(FileNotFoundError, match="earlier checkpoint"):
        pipe.load_guide(tmp_path / "missing.ckpt")


def test_sample_py_end_to_end(export_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a bag\n\n  a dress  \n")
    proc = run_sample([f"ckpt={export_dir / 'export'}", f"prompts_file={prompts}", "n=2", "sampler=dpmpp_2m",
                       "steps=3", "guidance=4", "seed=0", f"out={tmp_path / 'out'}", "device=cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert [e["prompt"] for e in meta["images"]] == ["a photo of a bag"] * 2 + ["a dress"] * 2
    assert (tmp_path / "out" / "grid.png").is_file() and len(list((tmp_path / "out").glob("0000*.png"))) == 4
    proc = run_sample([f"ckpt={export_dir / 'export'}", "prompt=a photo of a bag", "n=2", "sampler=dpmpp_2m",
                       "steps=3", "guidance=2", f"guide={export_dir / 'raw'}", "guide_scale=1.5",
                       f"out={tmp_path / 'guided'}", "device=cpu"])  # autoguidance
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = json.loads((tmp_path / "guided" / "metadata.json").read_text())["settings"]
    assert settings["guide_scale"] == 1.5 and settings["guide"] == str(export_dir / "raw")

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    for args, message in [([f"prompts_file={empty}"], "holds no prompts"),
                          ([f"prompts_file={tmp_path / 'missing.txt'}"], "does not exist"),
                          (["prompt=a bag", "ckpt=/nonexistent/last.ckpt"], "does not exist"),
                          (["prompt=a bag", "sampler=nope"], "sampler"),
                          (["prompt=a bag", f"guide={tmp_path / 'none.ckpt'}"], "earlier checkpoint"),
                          (["prompt=a bag", f"guide={export_dir / 'raw'}", "mode=interpolate"], "txt2img")]:
        args = [f"ckpt={export_dir / 'export'}", f"out={tmp_path / 'bad'}", *args]
        proc = run_sample(args)
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, (args, proc.stderr[-2000:])


def test_device_choice(monkeypatch):
    from ldm.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=f"device={asked} asked for but CUDA is not available"):
            resolve_device(asked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_sample_py_empty_and_over_long_prompts(export_dir, tmp_path):
    base = [f"ckpt={export_dir / 'export'}", "n=1", "steps=2", "device=cpu"]
    proc = run_sample([*base, "prompt=", f"out={tmp_path / 'empty'}"])  # the shell's prompt=""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 empty prompt(s): those images are unconditional samples" in proc.stderr + proc.stdout
    assert json.loads((tmp_path / "empty" / "metadata.json").read_text())["images"][0]["prompt"] == ""
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("a bag " * 200 + "\n")
    proc = run_sample([*base, f"prompts_file={long_prompt}", f"out={tmp_path / 'long'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "are truncated" in proc.stderr + proc.stdout and len(list((tmp_path / "long").glob("0000*.png"))) == 1
