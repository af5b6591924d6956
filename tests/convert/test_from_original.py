"""Original SD single files → ldm → diffusers. The files are written here from their own layout (our modules carry
the CompVis names; SD 1.x's text tower is transformers' CLIP under `cond_stage_model.transformer.`, SD 2.x's an
OpenCLIP tower under `cond_stage_model.model.`), not through our mapping; diffusers then loads our export and its
outputs must match ours. sd → ldm → sd is the identity."""

import pytest
import torch

from ldm.cli import main as cli
from ldm.convert import detect_format, load_latent_diffusion, original_state_dict, read_original
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.nn.autoencoder import AutoencoderKLNet
from ldm.nn.unet import UNetModel
from tests.convert.tiny import LAYOUTS, OpenCLIPText, diffusers, randomize, text_config, transformers, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
UNETS = {"v1": dict(model_channels=32, num_heads=8, context_dim=64),
         "v2": dict(model_channels=64, num_head_channels=64, context_dim=128, use_linear_in_transformer=True)}


def original_file(layout: str, path, global_step: int = 123):
    """An SD-layout checkpoint with EMA weights, and the reference text tower it holds."""
    unet = randomize(UNetModel(in_channels=4, out_channels=4, channel_mult=[1, 2], num_res_blocks=1,
                               attention_resolutions=[1], **UNETS[layout]), 1)
    vae = randomize(AutoencoderKLNet(dict(ch=32, ch_mult=[1, 1], num_res_blocks=1, z_channels=4, resolution=16,
                                          in_channels=3, out_ch=3), 4), 2)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd |= {f"model_ema.{('diffusion_model.' + k).replace('.', '')}": v + 0.01 for k, v in unet.state_dict().items()}
    sd |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)}
    sd |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    sd |= {"betas": torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2}  # schedule buffers: informative only
    if layout == "v1":
        text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config("v1"))), 3)
        sd |= {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
               for k, v in text.state_dict().items()}
    else:
        c = LAYOUTS["v2"]["text"]
        text = randomize(OpenCLIPText(514, c["hidden_size"], c["num_attention_heads"], 3, c["intermediate_size"]), 3)
        sd |= {f"cond_stage_model.model.{k}": v for k, v in text.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": global_step}, path)
    return unet, vae, text, sd


@pytest.fixture(scope="module", params=["v1", "v2"])
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"orig_{request.param}")
    tok = write_tokenizer(root / "tok")
    unet, vae, text, sd = original_file(request.param, root / "model.ckpt")
    return request.param, root, tok, (unet, vae, text, sd)


def test_detection_and_ema(case):
    layout, root, tok, (unet, *_) = case
    assert detect_format(root / "model.ckpt") == "sd"
    w = read_original(root / "model.ckpt", tokenizer=str(tok))
    assert w.model_type == {"v1": "v1", "v2": "v2-v"}[layout]
    assert w.prediction_type == {"v1": "eps", "v2": "v"}[layout]
    key = "input_blocks.1.1.proj_in.weight"
    assert w.unet[key].ndim == (2 if layout == "v2" else 4)
    assert torch.equal(w.unet[key], unet.state_dict()[key])
    ema = read_original(root / "model.ckpt", tokenizer=str(tok), use_ema=True)
    assert torch.allclose(ema.unet[key], unet.state_dict()[key] + 0.01)
    base = read_original(root / "model.ckpt", tokenizer=str(tok), model_type="v2-base" if layout == "v2" else None)
    assert base.prediction_type == "eps"


def test_sd_to_ldm_to_sd_is_the_identity(case):
    layout, root, tok, (*_, sd) = case
    back = original_state_dict(read_original(root / "model.ckpt", tokenizer=str(tok)))
    skip = ("model_ema.", "betas", "cond_stage_model.model.text_projection")
    want = {k: v for k, v in sd.items() if not k.startswith(skip)}
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


def test_ldm_matches_the_file_and_diffusers_loads_our_export(case, tmp_path):
    layout, root, tok, (unet, vae, text, _) = case
    model = load_latent_diffusion(root / "model.ckpt", tokenizer=str(tok))
    prompts = ["a photo of a cat", ""]
    ids = transformers.CLIPTokenizer.from_pretrained(tok)(prompts, padding="max_length", max_length=77,
                                                          return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 321])
    img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        ctx = model.encode_text(prompts)[0]
        ref_text = text(ids)[0] if layout == "v1" else text(ids)  # OpenCLIP: penultimate block + ln_final
        ref_diff = float((ctx - ref_text).abs().max())
        print(f"{layout} text encoder vs the file's own tower (no mapping involved): {ref_diff:.1e}")
        assert ref_diff <= ATOL
        assert torch.equal(model.unet(x, t, ctx), unet(x, t, ctx))
        # our export → diffusers' own loader → the same numbers
        assert cli(["convert", str(root / "model.ckpt"), str(tmp_path / "d"), "--to", "diffusers",
                    "--tokenizer", str(tok)]) == 0
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "d")
        diffs = {"unet": (model.unet(x, t, ctx), pipe.unet(x, t, ctx).sample),
                 "vae-enc": (model.first_stage.encode(img).mean, pipe.vae.encode(img).latent_dist.mean),
                 "vae-dec": (model.first_stage.decode(x), pipe.vae.decode(x).sample),
                 "text": (ctx, pipe.text_encoder(ids)[0])}
        diffs = {k: float((a - b).abs().max()) for k, (a, b) in diffs.items()}
    print(f"{layout} original → ldm → diffusers, max abs diff:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= ATOL
    assert pipe.scheduler.config.prediction_type == {"v1": "epsilon", "v2": "v_prediction"}[layout]
    assert pipe.text_encoder.config.num_hidden_layers == 2  # v2: the file's 3 blocks less the unused last one


def test_fine_tuned_model_reloads_its_text_encoder_from_the_file(case, tmp_path):
    layout, root, tok, _ = case
    model = load_latent_diffusion(root / "model.ckpt", tokenizer=str(tok), ema_decay=0.999, lr=1e-5)
    assert torch.equal(model.ema_unet.input_blocks[0][0].weight, model.unet.input_blocks[0][0].weight)
    hp = model.hparams
    assert hp.text_encoder["_target_"] == "ldm.convert.text_encoder.SDTextEncoder"
    rebuilt = LatentDiffusion(**{**hp, "first_stage": {**hp.first_stage}})
    ctx, ref = rebuilt.encode_text(["a cat"])[0], model.encode_text(["a cat"])[0]
    assert torch.equal(ctx, ref)
    out = cli(["convert", str(root / "model.ckpt"), str(tmp_path / "ours"), "--to", "ldm", "--tokenizer", str(tok)])
    assert out == 0 and detect_format(tmp_path / "ours") == "ldm"
    again = LatentDiffusion.load(tmp_path / "ours")
    assert torch.equal(again.encode_text(["a cat"])[0], ref)
    assert again.hparams.prediction_type == model.hparams.prediction_type


def test_the_ldm_console_script_is_installed():
    # pyproject's [project.scripts]: `ldm` next to the interpreter of the environment that installed the package
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "ldm"
    if not script.exists() and shutil.which("ldm") is None:
        pytest.fail("the `ldm` console script is not installed: reinstall with pip install -e '.[dev]' (make install)")
    proc = subprocess.run([str(script if script.exists() else shutil.which("ldm")), "convert", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--to" in proc.stdout
