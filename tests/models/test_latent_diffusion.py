"""LatentDiffusion on CPU with tiny parts: training, condition dropout, EMA, latent cache, sampling, errors"""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ldm.models.latent_cache import LatentCache
from ldm.models.latent_diffusion import LatentDiffusion, drop_condition
from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained
from ldm.nn.text_encoder import FrozenTextEncoder
from ldm.nn.unet import UNetModel

pytestmark = pytest.mark.usefixtures("one_thread")

DDCONFIG = dict(in_channels=1, out_ch=1, resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1,
                attn_resolutions=[], mid_attn=False, dropout=0.0, z_channels=4, double_z=True, norm_groups=4)
CAPTIONS = ["a photo of a bag", "a sneaker", "a coat", "a photo of a dress"]


def tiny_unet(in_channels=4, out_channels=4, context_dim=384) -> nn.Module:
    return UNetModel(in_channels=in_channels, out_channels=out_channels, model_channels=16,
                     channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1], num_head_channels=8,
                     context_dim=context_dim, norm_num_groups=8)


class Items(Dataset):
    def __init__(self, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(n, 1, 16, 16, generator=g)
        self.images = (F.avg_pool2d(base, 3, 1, 1) * 4 - 2).clamp(-1, 1)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": CAPTIONS[i % len(CAPTIONS)], "label": i % len(CAPTIONS)}


def collate(items):
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "label": torch.tensor([it["label"] for it in items])}


@pytest.fixture(scope="module")
def text_encoder():
    return FrozenTextEncoder(max_length=16)


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(AutoencoderKLNet(DDCONFIG, 4), tmp_path_factory.mktemp("ae"), scale_factor=0.5)


def make_model(text_encoder, ae_dir, **kw):
    torch.manual_seed(0)
    args = dict(unet=tiny_unet(), first_stage=str(ae_dir), text_encoder=text_encoder,
                schedule={"name": "linear", "num_timesteps": 100}, ema_decay=0.9, lr=3e-3, cond_drop_prob=0.1)
    args.update(kw)
    return LatentDiffusion(**args)


def trainer(tmp_path, steps, **kw):
    args = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def fixed_loss(model, batch, seeds=range(4)):
    with torch.no_grad():
        return sum(float(model._loss(model.unet, batch, 0.0, torch.Generator().manual_seed(s))[0])
                   for s in seeds) / len(seeds)


def test_training_reduces_loss_frozen_parts_and_ema(tmp_path, text_encoder, ae_dir):
    model = make_model(text_encoder, ae_dir, warmup_steps=5)
    assert model.scale_factor == 0.5
    data = Items(8)
    batch = collate([data[i] for i in range(8)])
    before = fixed_loss(model, batch)
    fs_before = {k: v.clone() for k, v in model.first_stage.state_dict().items()}
    t = trainer(tmp_path, 40)
    t.fit(model, DataLoader(data, batch_size=8, collate_fn=collate))
    after = fixed_loss(model, batch)
    assert after < 0.8 * before, (before, after)
    # only the U-Net is optimised; frozen parts unchanged and out of the checkpoint
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.unet.parameters()}
    assert t.optimizers[0].defaults["fused"]  # one fused AdamW kernel on CPU
    assert all(torch.equal(v, model.first_stage.state_dict()[k]) for k, v in fs_before.items())
    sd = model.state_dict()
    assert not any(k.startswith("text_encoder.") for k in sd) and any(k.startswith("ema.module.") for k in sd)
    assert all(not p.requires_grad for p in model.text_encoder.parameters())
    model.train()
    assert not model.text_encoder.training and not model.first_stage.training
    # linear warm-up reached the base lr; EMA lags the raw weights
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3)
    pairs = zip(model.ema_unet.parameters(), model.unet.parameters(), strict=True)
    diffs = [float((a - b).detach().abs().max()) for a, b in pairs]
    assert max(diffs) > 1e-4


def test_lr_decays_over_the_run_to_the_floor(tmp_path, text_encoder, ae_dir):
    data = Items(8)
    lrs = {}
    for schedule in ("cosine", "linear"):
        model = make_model(text_encoder, ae_dir, warmup_steps=2, lr_schedule=schedule, min_lr_ratio=0.1)
        t = trainer(tmp_path, 12)
        t.fit(model, DataLoader(data, batch_size=4, collate_fn=collate))
        lrs[schedule] = t.optimizers[0].param_groups[0]["lr"]
    assert lrs == {"cosine": pytest.approx(3e-4), "linear": pytest.approx(3e-4)}  # lr 3e-3 × min_lr_ratio at the end
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        make_model(text_encoder, ae_dir, lr_schedule="exponential")


def test_condition_dropout_rate(text_encoder, ae_dir):
    g = torch.Generator().manual_seed(0)
    ctx, mask = torch.randn(20000, 3, 2), torch.ones(20000, 3, dtype=torch.bool)
    null, null_mask = torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool)
    out, out_mask, dropped = drop_condition(ctx, mask, null, null_mask, 0.1, generator=g)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.all(out[dropped] == 0) and torch.all(out_mask[dropped].sum(1) == 2)
    assert torch.equal(out[~dropped], ctx[~dropped])
    # through the module: dropped rows carry the empty-prompt embedding
    model = make_model(text_encoder, ae_dir, cond_drop_prob=0.3)
    null_ctx, null_m = model.encode_text([""])
    cond = model.condition(["a photo of a sneaker"] * 4000, drop_prob=0.3)
    is_null = cond["context_mask"].sum(1) == null_m.sum()
    assert abs(is_null.float().mean().item() - 0.3) < 0.03
    torch.testing.assert_close(cond["context"][is_null][0, : null_ctx.shape[1]], null_ctx[0])
    assert model.condition(["a coat"] * 100, drop_prob=0.0)["context_mask"].sum(1).unique().numel() == 1


def test_latent_cache_matches_on_the_fly(tmp_path, text_encoder, ae_dir):
    model = make_model(text_encoder, ae_dir)
    data = Items(6)
    cache = model.cache_latents(data, batch_size=4)
    images = torch.stack([data[i]["image"] for i in range(6)])
    post = model.first_stage.encode(images)
    torch.testing.assert_close(cache.mean, post.mean)
    torch.testing.assert_close(cache.std, post.std)
    assert cache[1]["caption"] == data[1]["caption"] and cache[0]["image"].shape == (2, 4, 8, 8)
    raw = collate([data[i] for i in range(6)])
    cached = collate([cache[i] for i in range(6)])
    for seed in range(3):  # same seed → same z, t, noise → the same loss
        a = model._loss(model.unet, raw, 0.0, torch.Generator().manual_seed(seed))[0]
        b = model._loss(model.unet, cached, 0.0, torch.Generator().manual_seed(seed))[0]
        torch.testing.assert_close(a, b)
    loaded = LatentCache.load(cache.save(tmp_path / "lat.safetensors"))
    assert torch.equal(loaded.mean, cache.mean) and loaded.captions == cache.captions


def test_latent_cache_installed_at_fit_start(tmp_path, text_encoder, ae_dir):
    from ldm.data.datamodule import DataModule

    model = make_model(text_encoder, ae_dir, latent_cache=True,
                       latent_cache_path=str(tmp_path / "c.safetensors"))
    dm = DataModule(train=Items(8), batch_size=4)
    trainer(tmp_path, 2).fit(model, datamodule=dm)
    assert isinstance(dm.datasets["train"], LatentCache) and (tmp_path / "c.safetensors").is_file()
    assert model.latent_size.tolist() == [8, 8]


def test_errors(tmp_path, text_encoder, ae_dir):
    with pytest.raises(FileNotFoundError, match="no_such_autoencoder"):
        make_model(text_encoder, tmp_path / "no_such_autoencoder")
    with pytest.raises(ValueError, match=r"4 channels.*in_channels=3"):
        make_model(text_encoder, ae_dir, unet=tiny_unet(in_channels=3, out_channels=3))
    with pytest.raises(ValueError, match=r"out_channels=4.*learned_range.*needs 8"):
        make_model(text_encoder, ae_dir, variance_type="learned_range")
    with pytest.raises(ValueError, match=r"384-d context.*context_dim=32"):
        make_model(text_encoder, ae_dir, unet=tiny_unet(context_dim=32))


class ImageLogger(Logger):
    name, version = "images", 0
    calls: list = []
    metric_steps: dict = {}

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, *a, **k):
        pass

    def log_metrics(self, metrics, step=None):
        for key in metrics:
            ImageLogger.metric_steps.setdefault(key, []).append(step)

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append((key, images, step, kwargs))


class TensorBoardLike(ImageLogger):
    """Has `experiment.add_image` (as TensorBoard's SummaryWriter) and no log_image."""

    log_image = None
    added: list = []

    class _Writer:
        def add_image(self, tag, img, step):
            TensorBoardLike.added.append((tag, tuple(img.shape), float(img.min()), float(img.max()), step))

        def add_text(self, tag, text, step):
            TensorBoardLike.added.append((tag, text, step))

    @property
    def experiment(self):
        return self._Writer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_encoder, ae_dir):
    """A model after a few steps (EMA ≠ raw), with a validation grid written at the end."""
    from ldm.nn.text_encoder import FrozenTextEncoder  # noqa: F401  (the shared encoder is passed in)

    tmp = tmp_path_factory.mktemp("run")
    model = make_model(text_encoder, ae_dir, val_prompts=["a bag", "a coat"], val_images_per_prompt=3,
                       sample_every_n_steps=1, val_steps=3, val_guidance=2.0)
    ImageLogger.calls, ImageLogger.metric_steps, TensorBoardLike.added = [], {}, []
    data = Items(8)
    t = trainer(tmp, 6, logger=[ImageLogger(), TensorBoardLike()], limit_val_batches=1, val_check_interval=6,
                check_val_every_n_epoch=None)
    loader = DataLoader(data, batch_size=4, collate_fn=collate)
    t.fit(model, loader, loader)
    return model, t, tmp


def test_validation_grid_and_logger(trained):
    model, t, tmp = trained
    pngs = sorted((tmp / "images").glob("samples_step*.png"))
    assert [p.name for p in pngs] == ["samples_step0000006.png"]
    from PIL import Image

    img = Image.open(pngs[0])
    assert "a bag" in img.text["prompts"] and img.size[0] > img.size[1]  # 2 rows (prompts) × 3 columns
    # the grid of the validation run after 6 steps goes to the loggers at that run's metrics step (Lightning's: 5)
    assert set(ImageLogger.metric_steps["val/loss"]) == {5}  # (both test loggers record it)
    key, images, step, kw = ImageLogger.calls[-1]
    assert key == "val/samples" and step == 5 and kw["caption"] == ["a bag", "a coat"] and len(images) == 2
    tag, shape, lo, hi, step = TensorBoardLike.added[0]
    assert tag == "val/samples" and shape[0] == 1 and 0 <= lo <= hi <= 1 and step == 5
    assert TensorBoardLike.added[1][1] == "a bag\n\na coat"
    assert "val/loss" in t.callback_metrics


def test_sample_seeded_and_uses_ema(trained):
    model, _, _ = trained
    a = model.sample(["a bag", "a coat"], steps=4, guidance=3.0, seed=0)
    b = model.sample(["a bag", "a coat"], steps=4, guidance=3.0, seed=0)
    c = model.sample(["a bag", "a coat"], steps=4, guidance=3.0, seed=1)
    assert a.shape == (2, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    raw = model.sample(["a bag", "a coat"], steps=4, guidance=3.0, seed=0, use_ema=False)
    assert not torch.allclose(a, raw)
    with model.ema.swap():  # the raw network holding the EMA weights samples exactly what use_ema=True did
        swapped = model.sample(["a bag", "a coat"], steps=4, guidance=3.0, seed=0, use_ema=False)
    torch.testing.assert_close(swapped, a)
    neg = model.sample(["a bag"], negative_prompt="a coat", steps=4, guidance=3.0, seed=0)
    assert not torch.allclose(neg, a[:1])
    for sampler in ("ddpm", "euler_a", "dpmpp_2m"):
        x = model.sample(["a bag"], sampler=sampler, steps=3, seed=0)
        assert x.shape == (1, 1, 16, 16) and torch.isfinite(x).all()


def test_checkpoint_and_export_roundtrip(tmp_path, trained):
    model, t, _ = trained
    ref = model.sample(["a bag"], steps=3, seed=0)
    t.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert not any(k.startswith("text_encoder.") for k in ckpt["state_dict"])
    extra = {} if model.hparams.unet else {"unet": tiny_unet()}  # a U-Net without a config: passed in
    loaded = LatentDiffusion.load(tmp_path / "m.ckpt", text_encoder=model.text_encoder, **extra)
    assert loaded.latent_size.tolist() == [8, 8] and loaded.scale_factor == model.scale_factor
    torch.testing.assert_close(loaded.sample(["a bag"], steps=3, seed=0), ref)
    exported = LatentDiffusion.load(model.export(tmp_path / "export"), text_encoder=model.text_encoder,
                                    **extra)
    assert exported.ema is None
    torch.testing.assert_close(exported.sample(["a bag"], steps=3, seed=0), ref)


def test_unconditional_model(tmp_path, ae_dir):
    model = make_model(None, ae_dir, unet=tiny_unet(context_dim=None), ema_decay=None)
    batch = collate([Items(4)[i] for i in range(4)])
    loss, _ = model._loss(model.unet, batch, model.hparams.cond_drop_prob)
    assert torch.isfinite(loss) and model.condition(["x"]) == {}
    x = model.sample(["", ""], steps=2, guidance=5.0, height=8, width=8)
    assert x.shape == (2, 1, 16, 16)


CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("name", ["minilm", "clip_vit_l14", "openclip_h14", "t5_base"])
def test_text_encoder_configs_instantiate_without_weights(name):
    cfg = OmegaConf.load(CONF / "model" / "text_encoder" / f"{name}.yaml")
    te = instantiate(cfg, lazy=True)  # minilm loads eagerly by default; the others are lazy already
    assert isinstance(te, FrozenTextEncoder) and not te.loaded
    assert cfg.lazy == (name != "minilm")


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedule_configs(name):
    from ldm.diffusion.schedule import NoiseSchedule, make_betas

    sched = instantiate(OmegaConf.load(CONF / "model" / "schedule" / f"{name}.yaml"))
    assert isinstance(sched, NoiseSchedule) and sched.name == name and sched.num_timesteps == 1000
    torch.testing.assert_close(sched.betas, make_betas(name, 1000))


needs_unet_configs = pytest.mark.skipif(not (CONF / "model" / "unet" / "fmnist.yaml").is_file(),
                                        reason="conf/model/unet (U-Net helper) not committed yet")


def compose_model(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides).model


@needs_unet_configs
def test_ldm_config_builds_and_trains(text_encoder, ae_dir):
    cfg = compose_model(["model=ldm", f"model.first_stage={ae_dir}", "model.text_encoder.lazy=true"])
    model = instantiate(cfg, _convert_="all")  # as train.py does
    assert isinstance(model, LatentDiffusion) and model.hparams.unet["_target_"] == "ldm.nn.unet.UNetModel"
    assert model.scale_factor == 0.5 and model.schedule.name == "scaled_linear"
    model.text_encoder = text_encoder  # the shared, already loaded MiniLM
    loss, _ = model._loss(model.unet, collate([Items(2)[i] for i in range(2)]), 0.1)
    assert torch.isfinite(loss)


@needs_unet_configs
@pytest.mark.parametrize("name,params,prediction", [("sd_v1", 859.5e6, "eps"), ("sd_v2", 865.9e6, "v")])
def test_sd_configs_instantiate_without_weights(name, params, prediction):
    cfg = compose_model([f"model={name}"])
    with torch.device("meta"):  # the architecture only: no memory, no download (the text encoder is lazy)
        model = instantiate(cfg, _convert_="all")
    assert sum(p.numel() for p in model.unet.parameters()) == pytest.approx(params, rel=1e-3)
    assert not model.text_encoder.loaded and model.scale_factor == 0.18215
    assert model.hparams.prediction_type == prediction and model.latent_channels == 4


def test_resume_onto_another_autoencoder_is_refused_naming_the_difference():
    from ldm.models.ldm_parts import check_same_first_stage, first_stage_config
    from ldm.nn.autoencoder import AutoencoderKLNet

    dd = {"in_channels": 1, "out_ch": 1, "resolution": 32, "ch": 8, "ch_mult": [1, 1], "num_res_blocks": 1,
          "z_channels": 4, "double_z": True, "norm_groups": 4}
    trained, now = AutoencoderKLNet(dd, 4), AutoencoderKLNet({**dd, "ch": 16}, 4)
    ckpt = {"first_stage_config": first_stage_config(trained, 0.9),
            "hyper_parameters": {"first_stage": "/runs/ae/export"}}
    check_same_first_stage(ckpt, AutoencoderKLNet(dd, 4))  # same architecture, other scale factor: fine
    with pytest.raises(ValueError, match=r"ddconfig\.ch: 8 vs 16.*model\.first_stage=/runs/ae/export"):
        check_same_first_stage(ckpt, now)


def test_images_with_channels_the_autoencoder_does_not_take_are_refused(text_encoder, ae_dir):
    from ldm.models.ldm_parts import image_channels

    model = make_model(text_encoder, ae_dir)
    assert image_channels(model.first_stage) == DDCONFIG["in_channels"] and image_channels(nn.Identity()) is None
    rgb = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"the images have 3 channel\(s\) but the autoencoder .* takes 1"):
        model.get_latents({"image": rgb})
    assert model.encode_images(torch.zeros(2, 1, 16, 16)).shape[1] == 4
