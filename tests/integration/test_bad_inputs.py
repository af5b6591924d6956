"""Bad input through the user commands: each case gets a nonzero exit and a message naming the problem, and a
checkpoint carrying pickled code is refused by train.py (resume and init-from) and sample.py without running it.

The command lines run through `_run_many.py`: train.py / sample.py executed as `__main__` with the given argv, one
process per script, so a dozen quick failures pay the import cost once. The full list of bad-input cases and the
test for each: docs/bad_input.md. Image-folder cases: tests/data/test_image_folder.py;
prompts: tests/test_pipeline.py; checkpoint files in-process: tests/test_checkpoint.py; NaN/Inf:
tests/models/test_guards.py; signals and crashes while saving: test_signals.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .conftest import QUICK, ROOT, TINY_AE, data_overrides

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs a shell command that creates a marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_many(script: str, cases: list[list[str]], timeout: float = 300) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_run_many.py")), str(ROOT / script)],
                          input=json.dumps(cases), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(results: list[dict], expected: list[tuple[str, ...]]) -> None:
    for r, messages in zip(results, expected, strict=True):
        assert r["rc"] != 0, f"{r['args']} exited 0:\n{r['output'][-3000:]}"
        for m in messages:
            assert m in r["output"], f"{r['args']}: {m!r} not in:\n{r['output'][-3000:]}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Crafted and broken checkpoints, and the marker the pickled payload would create."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.latent_diffusion import LatentDiffusion
    from ldm.nn.autoencoder import AutoencoderKLNet, save_pretrained

    d = tmp_path_factory.mktemp("bad")
    f = {"marker": d / "PAYLOAD_RAN"}
    torch.manual_seed(0)
    ddconfig = {"in_channels": 1, "out_ch": 1, "resolution": 16, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
                "attn_resolutions": [], "mid_attn": False, "dropout": 0.0, "z_channels": 4, "double_z": True,
                "norm_groups": 4}
    ae_dir = f["ae_dir"] = save_pretrained(AutoencoderKLNet(ddconfig, 4), d / "ae", scale_factor=0.5)

    def ldm(channels: int) -> LatentDiffusion:
        unet = {"in_channels": 4, "out_channels": 4, "model_channels": channels, "channel_mult": [1],
                "num_res_blocks": 1, "attention_resolutions": [], "num_head_channels": 8, "norm_num_groups": 8}
        return LatentDiffusion(unet=unet, first_stage=str(ae_dir), text_encoder=None,
                               schedule={"name": "linear", "num_timesteps": 100})

    small, wide = ldm(16), ldm(24)
    small.latent_size.fill_(8)
    hp = dict(small.hparams)
    # A LatentDiffusion checkpoint as train.py writes one, plus an object whose unpickling runs code.
    f["evil"] = d / "evil.ckpt"
    torch.save({"state_dict": small.state_dict(), "hyper_parameters": hp, "global_step": 3,
                "callbacks": {"x": Payload(f["marker"])}}, f["evil"])
    good = d / "good.ckpt"
    torch.save({"state_dict": small.state_dict(), "hyper_parameters": hp}, good)
    f["truncated"] = d / "truncated.ckpt"
    f["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # The wrong architecture: a wider U-Net's weights under the small one's config (.ckpt and exported folder).
    f["wrong_arch_ckpt"] = d / "wrong_arch.ckpt"
    torch.save({"state_dict": wide.state_dict(), "hyper_parameters": hp}, f["wrong_arch_ckpt"])
    f["wrong_arch_export"] = small.export(d / "export")
    save_file({k: v.contiguous() for k, v in wide.unet.state_dict().items()},  # safetensors wants contiguous
              str(f["wrong_arch_export"] / "unet.safetensors"))
    # An autoencoder checkpoint where a LatentDiffusion one is expected (and vice versa for init-from).
    ae = AutoencoderKL({**ddconfig, "resolution": 32, "ch_mult": [1, 1, 1]}, embed_dim=4)
    f["autoencoder"] = d / "autoencoder.ckpt"
    torch.save({"state_dict": ae.state_dict(), "hyper_parameters": dict(ae.hparams)}, f["autoencoder"])
    f["image"] = d / "picture.ckpt"
    f["image"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    # An exported folder whose U-Net weights were cut off half-way (a copy that did not finish).
    f["truncated_export"] = small.export(d / "export_truncated")
    unet_file = f["truncated_export"] / "unet.safetensors"
    unet_file.write_bytes(unet_file.read_bytes()[: unet_file.stat().st_size // 2])
    return f


def test_train_py_bad_inputs(files, fmnist_root, tmp_path):
    def args(i: int, *extra: str) -> list[str]:
        return ["experiment=fmnist_autoencoder", f"hydra.run.dir={tmp_path / str(i)}", "trainer.max_steps=1",
                *TINY_AE, *QUICK, *data_overrides(fmnist_root), *extra]

    cases = [
        (["model.nonexistent=1"], ("Could not override 'model.nonexistent'", "Key 'nonexistent' is not in struct")),
        (["trainer.max_steps=abc"], ("trainer.max_steps='abc': expected int",)),
        (["model.lr=fast", "data.batch_size=1.5"], ("model.lr='fast': expected float",
                                                    "data.batch_size=1.5: expected int")),
        (["data.train.root=/nonexistent/fmnist"], ("/nonexistent/fmnist does not exist",
                                                   "apt-get install dataset-fashion-mnist", "data.train.root=")),
        (["ckpt_path=/nonexistent/last.ckpt"], ("ckpt_path='/nonexistent/last.ckpt' does not exist",)),
        ([f"ckpt_path={files['evil']}"], ("refused to load", "trust_checkpoint=true")),
        ([f"init_from.path={files['evil']}"], ("refused to load", "trust_checkpoint=true")),
        ([f"init_from.path={files['truncated']}"], ("truncated or corrupt",)),
        ([f"init_from.path={files['image']}"], ("is not a checkpoint",)),
        (["init_from.path=/nonexistent/other.ckpt"], ("/nonexistent/other.ckpt does not exist",)),
        ([f"init_from.path={files['wrong_arch_ckpt']}", "init_from.strict=true"],
         ("does not match the model architecture", "missing", "unexpected")),
    ]
    results = run_many("train.py", [args(i, *a) for i, (a, _) in enumerate(cases)])
    check(results, [m for _, m in cases])
    assert not files["marker"].exists(), "the pickled payload ran"


def test_train_py_latent_diffusion_parts_that_do_not_fit(files, fmnist_root, tmp_path):
    def args(i: int, *extra: str) -> list[str]:
        return ["experiment=fmnist_ldm", f"hydra.run.dir={tmp_path / str(i)}", "trainer.max_steps=1", *QUICK,
                *data_overrides(fmnist_root), *extra]

    ae = f"model.first_stage={files['ae_dir']}"
    cases = [
        (["model.first_stage=/nonexistent/export"], ("model.first_stage:", "/nonexistent/export")),
        ([ae, "model.unet.in_channels=3"], ("the first stage's latents have 4 channels but the U-Net has "
                                            "in_channels=3: set model.unet.in_channels=4",)),
        ([ae, "model.unet.in_channels=4", "model.unet.out_channels=4",
          "model.unet.context_dim=32"], ("384-d context but the U-Net has context_dim=32",
                                             "set model.unet.context_dim=384")),
    ]
    results = run_many("train.py", [args(i, *a) for i, (a, _) in enumerate(cases)])
    check(results, [m for _, m in cases])


def test_sample_py_bad_checkpoints(files, tmp_path):
    cases = [
        (files["evil"], ("refused to load", "trust_checkpoint=true")),
        (files["truncated"], ("truncated or corrupt",)),
        (files["image"], ("is not a checkpoint",)),
        (tmp_path / "missing.ckpt", ("does not exist",)),
        (files["wrong_arch_ckpt"], ("does not match the model architecture", "mismatched",
                                    "checkpoint (24, 4, 3, 3) vs model (16, 4, 3, 3)")),
        (files["wrong_arch_export"], ("does not match the model architecture", "mismatched",
                                      "checkpoint (24, 4, 3, 3) vs model (16, 4, 3, 3)")),
        (files["autoencoder"], ("autoencoder checkpoint", "LatentDiffusion")),
        (tmp_path / "empty.ckpt", ("empty or truncated (0 bytes)",)),
        (files["truncated_export"], ("unet.safetensors: unreadable safetensors file",)),
    ]
    (tmp_path / "empty.ckpt").write_bytes(b"")
    argv = [[f"ckpt={c}", "prompt=a bag", f"out={tmp_path / 'out'}", "device=cpu", "steps=2"] for c, _ in cases]
    argv.append([f"ckpt={files['wrong_arch_ckpt']}", f"out={tmp_path / 'out'}"])  # neither prompt nor prompts_file
    results = run_many("sample.py", argv)
    check(results, [m for _, m in cases] + [('give prompt="..." or prompts_file=<file>',)])
    assert not files["marker"].exists(), "the pickled payload ran"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_train_py_init_from_loads_weights_with_rename_and_ignore(fmnist_root, tmp_path):
    """The good path of init_from through train.py: a run's checkpoint into a fresh run, whole, without the
    decoder, and with the encoder renamed away."""
    import re

    base = ["experiment=fmnist_autoencoder", "trainer.max_steps=1", *TINY_AE, *QUICK, *data_overrides(fmnist_root)]
    source = tmp_path / "source" / "checkpoints" / "last.ckpt"
    cases = [[f"init_from.path={source}", *extra]
             for extra in ([], ["init_from.ignore=[net.decoder.]"], ["++init_from.rename={net.encoder.:old.}"])]
    runs = [[f"hydra.run.dir={tmp_path / 'source'}", *base]]
    runs += [[f"hydra.run.dir={tmp_path / str(i)}", *base, *c] for i, c in enumerate(cases)]
    results = run_many("train.py", runs)
    assert all(r["rc"] == 0 for r in results), [r["output"][-3000:] for r in results if r["rc"]]
    counts = []
    for r in results[1:]:
        found = re.search(r"weights loaded; (\d+) missing, (\d+) unexpected, (\d+) mismatched keys", r["output"])
        assert found, r["output"][-3000:]
        counts.append(tuple(int(g) for g in found.groups()))
    whole, no_decoder, renamed = counts
    assert "glibc malloc: freed memory kept for reuse" in results[0]["output"]  # tune_malloc=true by default
    assert whole == (0, 0, 0)
    assert no_decoder[0] > 0 and no_decoder[1:] == (0, 0)  # the decoder starts fresh, nothing else is off
    assert renamed[0] == renamed[1] > 0 and renamed[2] == 0  # encoder keys: unknown under the new name, missing
