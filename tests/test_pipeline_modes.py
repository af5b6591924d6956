"""EditingPipeline and sample.py's editing modes on a tiny exported model: known answers, files, metadata, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.diffusion.samplers import get_sampler
from ldm.editing_pipeline import EditingPipeline
from ldm.images import save_png
from ldm.models.latent_diffusion import LatentDiffusion
from tests.tiny_models import UNET, tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A tiny text-conditioned model (random weights) exported, a 16×16 input image and a mask."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("modes")
    model = tiny_ldm(root, ema_decay=None)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.latent_size.fill_(8)
    model.export(root / "export", use_ema=False)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    image = ((xx + yy) / 15.0 - 1).float()[None]  # a ramp in [-1, 1]
    save_png(image, root / "in.png")
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 6:14] = 1
    save_png(mask * 2 - 1, root / "mask.png")
    save_png(torch.zeros(1, 8, 8), root / "small_mask.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    return {"root": root, "export": root / "export", "image": root / "in.png", "mask": root / "mask.png"}


@pytest.fixture(scope="module")
def pipe(files) -> EditingPipeline:
    return EditingPipeline.from_checkpoint(files["export"], device="cpu")


KW = dict(steps=6, guidance=3.0, seed=1, progress=False)


def test_img2img_strength_zero_returns_the_input_and_strength_moves_away(pipe, files):
    image = pipe.load_image(files["image"])
    out0 = pipe.img2img(files["image"], "a bag", strength=0.0, n=2, **KW)
    assert torch.equal(out0["images"], image.expand(2, -1, -1, -1))
    assert out0["settings"]["strength"] == 0.0 and out0["settings"]["mode"] == "img2img"
    diffs = []
    for strength in (0.3, 1.0):
        out = pipe.img2img(files["image"], "a bag", strength=strength, n=2, **KW)
        assert out["images"].shape == (2, 1, 16, 16) and out["settings"]["steps_run"] == int(6 * strength)
        diffs.append(float((out["images"] - image).abs().mean()))
    assert 0 < diffs[0] < diffs[1]
    a = pipe.img2img(files["image"], "a bag", strength=0.5, sampler="dpmpp_2m", **KW)["images"]
    b = pipe.img2img(files["image"], "a bag", strength=0.5, sampler="dpmpp_2m", **KW)["images"]
    c = pipe.img2img(files["image"], "a coat", strength=0.5, sampler="dpmpp_2m", **KW)["images"]
    assert torch.equal(a, b) and not torch.allclose(a, c)  # deterministic, and the prompt matters


def test_inpaint_keeps_the_known_region_exactly(pipe, files):
    image = pipe.load_image(files["image"])
    keep = (pipe._mask(files["mask"], (16, 16)) == 0).expand(3, 1, 16, 16)
    for sampler in ("ddim", "euler_a"):
        out = pipe.inpaint(files["image"], files["mask"], "a coat", n=3, sampler=sampler, **KW)
        err = (out["images"] - image).abs()
        assert float(err[keep].max()) == 0.0 and out["settings"]["known_region_max_abs_error"] == 0.0
        assert float(err[~keep].mean()) > 0.01  # the masked region is generated
        assert out["settings"]["masked_fraction"] == pytest.approx(64 / 256)
    rp = pipe.inpaint(files["image"], files["mask"], "a coat", n=1, repaint=2, **KW)
    assert rp["settings"]["known_region_max_abs_error"] == 0.0 and rp["settings"]["repaint"] == 2
    with pytest.raises(ValueError, match="repaint > 1 needs"):
        pipe.inpaint(files["image"], files["mask"], "a coat", repaint=2, sampler="euler", **KW)
    raw = pipe.inpaint(files["image"], files["mask"], "a coat", n=1, paste=False, **KW)
    # without the pixel paste only the autoencoder separates the kept region from the input
    assert raw["settings"]["known_region_max_abs_error"] == raw["settings"]["known_region_max_abs_error_unpasted"]


def test_invert_and_interpolate(pipe, files):
    out = pipe.invert(files["image"], "a bag", edit_prompts=["a coat"], steps=20, progress=False)
    assert out["images"].shape == (4, 1, 16, 16) and out["noise"].shape == (1, 4, 8, 8)
    m = out["settings"]["metrics"]
    # the inverted noise leads back much nearer the image's latent than a random noise does
    den = pipe.model.make_denoiser(["a bag"], guidance=1.0, use_ema=False)
    z0 = pipe.model.encode_images(pipe.load_image(files["image"]))
    z_rand = get_sampler("ddim")(den, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)), 20)
    assert m["latent_rmse"] < 0.3 * float(((z_rand - z0) ** 2).mean().sqrt())
    z_rec = get_sampler("ddim")(den, out["noise"], 20)
    assert float(((z_rec - z0) ** 2).mean().sqrt()) == pytest.approx(m["latent_rmse"], rel=1e-4)
    assert out["prompts"][3] == "edit: a coat"

    strip = pipe.interpolate("a bag", frames=5, seed=3, steps=4, guidance=2.0, progress=False)
    assert strip["images"].shape == (5, 1, 16, 16)
    ends = pipe.text_to_image("a bag", n=2, seed=3, steps=4, guidance=2.0, progress=False)["images"]
    torch.testing.assert_close(strip["images"][[0, -1]], ends, atol=1e-4, rtol=0)  # endpoints: seeds 3 and 4
    two = pipe.interpolate(["a bag", "a coat"], frames=3, seed=3, steps=4, guidance=2.0, progress=False)
    torch.testing.assert_close(two["images"][0], ends[0], atol=1e-4, rtol=0)
    coat = pipe.text_to_image("a coat", n=1, seed=3, steps=4, guidance=2.0, progress=False)["images"][0]
    torch.testing.assert_close(two["images"][-1], coat, atol=1e-4, rtol=0)
    assert not torch.allclose(two["images"][1], two["images"][0], atol=1e-3)


def test_bad_inputs_get_clear_errors(pipe, files):
    root = files["root"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.img2img(root / "missing.png", "a bag", **KW)
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.img2img(root / "corrupt.png", "a bag", **KW)
    with pytest.raises(ValueError, match="strength must be in"):
        pipe.img2img(files["image"], "a bag", strength=1.5, **KW)
    with pytest.raises(ValueError, match="8×8 .* but the image is 16×16"):
        pipe.inpaint(files["image"], root / "small_mask.png", "a bag", **KW)
    with pytest.raises(ValueError, match="needs a mask"):
        pipe.inpaint(files["image"], None, "a bag", **KW)
    with pytest.raises(ValueError, match="one prompt .* or two"):
        pipe.interpolate(["a", "b", "c"], progress=False)


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "invert", "interpolate"])
def test_sample_py_modes_write_files_with_metadata(files, tmp_path, mode):
    import sample

    args = {"img2img": [f"init_image={files['image']}", "strength=0.5"],
            "inpaint": [f"init_image={files['image']}", f"mask={files['mask']}"],
            "invert": [f"init_image={files['image']}", "edit_prompt=a coat"],
            "interpolate": ["prompt2=a coat", "frames=3"]}[mode]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={files['export']}", f"mode={mode}", "prompt=a bag", "n=2",
                                           "steps=4", "device=cpu", "progress=false", f"out={tmp_path}", *args])
    sample.check_mode(cfg)
    pipe = EditingPipeline.from_checkpoint(cfg.ckpt, device="cpu")
    written = pipe.save(sample.run_mode(pipe, cfg, sample.read_prompts(cfg)), cfg.out)
    count = {"img2img": 2, "inpaint": 2, "invert": 4, "interpolate": 3}[mode]
    assert len(written["images"]) == count and written["grid"].is_file()
    meta = json.loads(written["metadata"].read_text())
    assert meta["settings"]["mode"] == mode and len(meta["images"]) == count
    assert json.loads(Image.open(written["images"][0]).text["steps"]) == 4
    if mode == "inpaint":
        assert meta["settings"]["known_region_max_abs_error"] == 0.0
    if mode == "invert":
        assert "latent_rmse" in meta["settings"]["metrics"]


@pytest.mark.slow
def test_sample_py_img2img_end_to_end_and_errors(files, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={files['export']}", "prompt=a bag",
                               "steps=3", "n=1", "device=cpu", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    proc = run("mode=img2img", f"init_image={files['image']}", "strength=0.5", f"out={tmp_path / 'ok'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "metadata.json").read_text())["settings"]["strength"] == 0.5
    for args, message in [(["mode=img2img"], "needs init_image"),
                          (["mode=img2img", "init_image=/nonexistent.png"], "does not exist"),
                          (["mode=inpaint", f"init_image={files['image']}"], "needs mask"),
                          (["mode=img2img", f"init_image={files['image']}", "strength=2"], "strength must be in"),
                          (["mode=paint"], "choose one of")]:
        proc = run(*args, f"out={tmp_path / 'bad'}")
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, (args, proc.stderr[-2000:])


def test_inpainting_model_sees_mask_and_masked_image(files, tmp_path):
    """A 9-channel model (concat_source='inpaint'): no blending needed, known pixels pasted, the condition wired."""
    torch.manual_seed(0)
    model = LatentDiffusion(unet={**UNET, "in_channels": 9}, first_stage=str(files["root"] / "ae"),
                            text_encoder={"max_length": 16}, schedule={"name": "linear", "num_timesteps": 100},
                            ema_decay=None, concat_channels=5, concat_source="inpaint")
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.latent_size.fill_(8)
    model.export(tmp_path / "inpaint", use_ema=False)
    pipe = EditingPipeline.from_checkpoint(tmp_path / "inpaint", device="cpu")
    assert pipe.is_inpainting_model
    image = pipe.load_image(files["image"])
    out = pipe.inpaint(files["image"], files["mask"], "a coat", **KW)
    keep = (pipe._mask(files["mask"], (16, 16)) == 0)
    assert out["settings"]["known_region_max_abs_error"] == 0.0 and out["settings"]["blend"] is False
    assert float((out["images"] - image).abs()[keep].max()) == 0.0
    other = pipe.inpaint(-image, files["mask"], "a coat", paste=False, **KW)["images"]
    raw = pipe.inpaint(files["image"], files["mask"], "a coat", paste=False, **KW)["images"]
    assert float((other - raw).abs()[~keep].mean()) > 1e-3  # the masked image's latent reaches the U-Net
    with pytest.raises(ValueError, match="inpainting model: give a mask"):
        pipe.img2img(files["image"], "a coat", **KW)


def tiny_concat_model(files, path: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    unet = {**UNET, **kwargs.pop("unet")}
    model = LatentDiffusion(unet=unet, first_stage=str(files["root"] / "ae"), text_encoder={"max_length": 16},
                            schedule={"name": "linear", "num_timesteps": 100}, ema_decay=None, **kwargs)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.latent_size.fill_(8)
    model.export(path, use_ema=False)
    return path


def test_upscale_mode_reports_psnr_ssim_against_bicubic(files, tmp_path):
    import sample

    export = tiny_concat_model(files, tmp_path / "up", unet={"in_channels": 8, "num_classes": 20},
                               concat_channels=4, concat_source="upscale")
    small = files["root"] / "small.png"
    save_png(torch.linspace(-1, 1, 64).view(1, 8, 8), small)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={export}", "mode=upscale", f"init_image={small}", "prompt=a bag",
                                           "n=2", "steps=3", "noise_level=5", f"reference={files['image']}",
                                           "device=cpu", "progress=false", f"out={tmp_path / 'out'}"])
    sample.check_mode(cfg)
    pipe = EditingPipeline.from_checkpoint(export, device="cpu")
    written = pipe.save(sample.run_mode(pipe, cfg, sample.read_prompts(cfg)), cfg.out)
    meta = json.loads(written["metadata"].read_text())["settings"]
    assert meta["mode"] == "upscale" and meta["noise_level"] == 5 and meta["lowres_size"] == [8, 8]
    assert {"psnr_db", "ssim", "bicubic_psnr_db", "bicubic_ssim"} <= set(meta) and len(written["images"]) == 2
    a = pipe.upscale(small, "a bag", noise_level=0, steps=3, progress=False)["images"]
    b = pipe.upscale(small, "a bag", noise_level=19, steps=3, progress=False)["images"]
    assert not torch.allclose(a, b)  # the noise level is a condition
    with pytest.raises(ValueError, match="noise_level must be in"):
        pipe.upscale(small, "a bag", noise_level=20, progress=False)
    plain = EditingPipeline.from_checkpoint(files["export"], device="cpu")
    with pytest.raises(ValueError, match="needs a super-resolution model"):
        plain.upscale(small, "a bag", progress=False)


def test_semantic_map_condition_reaches_text_to_image(files, tmp_path):
    from ldm.data.segmentation import one_hot_map

    export = tiny_concat_model(files, tmp_path / "sem", unet={"in_channels": 7}, concat_channels=3,
                               concat_source="batch")
    pipe = EditingPipeline.from_checkpoint(export, device="cpu")
    maps = torch.zeros(2, 16, 16, dtype=torch.long)
    maps[1, 4:12, 4:12] = 2
    out = pipe.text_to_image("a bag", n=2, steps=3, progress=False, concat=one_hot_map(maps))["images"]
    same = pipe.text_to_image("a bag", n=2, steps=3, progress=False, concat=one_hot_map(maps[:1]))["images"]
    assert torch.allclose(out[0], same[0], atol=1e-5) and not torch.allclose(out[1], same[1], atol=1e-3)
    with pytest.raises(ValueError, match="3 conditions for 2 images"):
        pipe.text_to_image("a bag", n=2, steps=2, progress=False, concat=one_hot_map(maps[[0, 1, 1]]))
