"""diffusers folder → ldm: U-Net, autoencoder and text encoder outputs, and a whole DDIM run, match diffusers'
(saved by diffusers itself, tiny random weights); ldm → diffusers → ldm is the identity."""

import pytest
import torch

from ldm.convert import convert, load_latent_diffusion, read_diffusers, weights_of, write_diffusers
from tests.convert.tiny import diffusers, diffusers_parts, pipeline, randomize, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


@pytest.fixture(scope="module", params=["v1", "v2"])
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"sd_{request.param}")
    tok = pipeline_tokenizer(root)
    parts = diffusers_parts(request.param)
    pipe = pipeline(parts, tok)
    pipe.save_pretrained(root / "diffusers", safe_serialization=True)
    return request.param, root / "diffusers", pipe


def pipeline_tokenizer(root):
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(write_tokenizer(root / "tok"))


def _max(a, b) -> float:
    return float((a - b).abs().max())


def test_detects_the_layout(saved):
    layout, folder, _ = saved
    w = read_diffusers(folder)
    assert w.model_type == ("v1" if layout == "v1" else "v2-v")
    assert w.prediction_type == ("eps" if layout == "v1" else "v")
    assert w.unet_config["use_linear_in_transformer"] is (layout == "v2")
    heads = {"num_heads": 8, "num_head_channels": -1} if layout == "v1" else {"num_heads": -1, "num_head_channels": 64}
    assert {k: w.unet_config[k] for k in heads} == heads


def test_parts_match_diffusers(saved):
    _, folder, pipe = saved
    model = load_latent_diffusion(folder)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g)
    t = torch.tensor([999, 321])
    img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    ids = pipe.tokenizer(["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        unet = _max(model.unet(x, t, ctx), pipe.unet(x, t, ctx).sample)
        post, ref = model.first_stage.encode(img), pipe.vae.encode(img).latent_dist
        enc = max(_max(post.mean, ref.mean), _max(post.logvar, ref.logvar))
        dec = _max(model.first_stage.decode(x), pipe.vae.decode(x).sample)
        text = _max(model.encode_text(["a photo of a cat", ""])[0], pipe.text_encoder(ids)[0])
    print(f"max abs diff vs diffusers: unet {unet:.2e} vae-enc {enc:.2e} vae-dec {dec:.2e} text {text:.2e}")
    assert max(unet, enc, dec, text) <= ATOL
    assert model.scale_factor == pytest.approx(0.18215)


def test_ddim_sampling_matches_the_diffusers_pipeline(saved):
    _, folder, pipe = saved
    model = load_latent_diffusion(folder)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a cat", "a red house"]
    with torch.no_grad():
        ref = pipe(prompts, height=16, width=16, num_inference_steps=5, guidance_scale=4.0, latents=x_T.clone(),
                   output_type="pt").images
        ours = model.sample(prompts, sampler="ddim", steps=5, guidance=4.0, x_T=x_T, height=8, width=8,
                            sampler_options={"steps_offset": pipe.scheduler.config.steps_offset})
    diff = _max((ours + 1) / 2, ref)
    print(f"DDIM 5 steps, CFG 4: max abs diff of the images vs StableDiffusionPipeline {diff:.2e}")
    assert ref.std() > 0.01 and diff <= ATOL


def test_round_trip_ldm_diffusers_ldm_is_the_identity(saved, tmp_path):
    _, folder, _ = saved
    model = load_latent_diffusion(folder)
    w = weights_of(model)
    write_diffusers(w, tmp_path / "again", tokenizer=model.text_encoder.tokenizer)
    back = read_diffusers(tmp_path / "again")
    for a, b in ((w.unet, back.unet), (w.vae, back.vae), (w.text, back.text)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.unet_config == w.unet_config and back.vae_config == w.vae_config
    assert (back.prediction_type, back.schedule["name"]) == (w.prediction_type, "scaled_linear")
    again = convert(tmp_path / "again", tmp_path / "sd.safetensors", to="sd")
    assert again.is_file()


def test_an_inpainting_model_loads_with_its_mask_and_masked_image_concatenated(tmp_path):
    # SD-inpainting's U-Net input: cat([z_t (4), mask (1), latent of the masked image (4)]), mask 1 = repaint
    from ldm.editing_pipeline import EditingPipeline
    from ldm.models.conditioning import inpainting_concat, with_concat

    parts = diffusers_parts("v1")
    config = {**parts["unet"].config, "in_channels": 9}
    parts["unet"] = randomize(diffusers.UNet2DConditionModel.from_config(config), 5)
    pipe = pipeline(parts, pipeline_tokenizer(tmp_path))
    pipe.save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    model = load_latent_diffusion(tmp_path / "inpaint")
    assert read_diffusers(tmp_path / "inpaint").model_type == "v1-inpaint"
    assert (model.concat_channels, model.hparams.concat_source) == (5, "inpaint")
    g = torch.Generator().manual_seed(0)
    image, x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1
    ctx, t = torch.randn(2, 77, 64, generator=g), torch.tensor([900, 250])
    with torch.no_grad():
        ours = with_concat(model.unet, 5)(x, t, context=ctx, concat=inpainting_concat(model, image, mask))
        masked = pipe.vae.encode(image * (mask < 0.5)).latent_dist.mean * pipe.vae.config.scaling_factor
        small = torch.nn.functional.interpolate(mask, size=(8, 8))
        ref = pipe.unet(torch.cat([x, small, masked], 1), t, ctx).sample
    assert _max(ours, ref) <= ATOL
    out = EditingPipeline(model).inpaint(image[:1], mask[:1], ["a photo of a cat"], steps=3, guidance=4.0,
                                         progress=False)
    known = (mask[:1] < 0.5).expand(-1, 3, -1, -1)
    assert out["images"].shape == (1, 3, 16, 16)
    torch.testing.assert_close(((out["images"] + 1) / 2)[known], ((image[:1].clamp(-1, 1) + 1) / 2)[known],
                               atol=1 / 255, rtol=0)
