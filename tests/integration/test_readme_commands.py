"""Every `python train.py` / `python sample.py` / `python -m ldm.*` command of the README runs, in README order, as a
user would type it from a fresh checkout: in an empty folder standing for the repository root (so `logs/...` and
`outputs/demo/...` resolve there), with tiny models and generated data swapped in by overriding keys, never by
editing the command. A later command reads what an earlier one wrote (`logs/fmnist_autoencoder_f2/latest/export`).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import QUICK, ROOT, TINY_AE, TINY_AE_F2, TINY_UNET, make_fmnist
from .test_image_folder_train import make_folder

pytestmark = pytest.mark.slow

# Commands that cannot run on a CPU machine without a cluster, with the test that covers them instead.
NOT_RUN = {
    "hydra/launcher=submitit_slurm": "submits to SLURM; tests/integration/test_slurm.py checks the launcher config",
    "--device": "benchmarks/gpu_speed.py --device cuda needs a GPU; tests/benchmarks/test_smoke.py runs its CPU smoke "
                "mode (every setting, FLOP count, MFU, the diffusers ratio)",
    "benchmarks/ldm_f_tradeoff.py": "an hour of training; tests/benchmarks/test_ldm_f_tradeoff_smoke runs the same "
                                    "script in --smoke mode on generated data and checks its table and plots",
    "benchmarks/fidelity_study.py": "hours of training; tests/benchmarks/test_smoke.py::test_fidelity_study_smoke runs "
                                    "the same script in --smoke mode on generated data and checks its table and plot",
}
# Options appended to the README's benchmark lines: tiny runs on the generated data (the figures need the real runs).
BENCHMARK_SMOKE = {
    "benchmarks/unet_speed.py": lambda d: ["--quick", "--only", "fmnist"],
    "benchmarks/autoencoder_quality.py": lambda d: ["--minutes", "0", "--max-steps", "2", "--eval-images", "16",
                                                    "--batch-size", "8", "--data-root", str(d["fmnist"]),
                                                    "--val-size", "32"],
    "benchmarks/prompt_adherence.py": lambda d: ["--per-class", "1", "--steps", "2", "--data-root", str(d["fmnist"])],
    "benchmarks/editing_quality.py": lambda d: ["--n", "2", "--steps", "2", "--data-root", str(d["fmnist"])],
}
PROMPTS = "\n".join(f"a photo of a {c}" for c in ("t-shirt", "trouser", "bag")) + "\n"


def readme_commands(text: str) -> list[list[str]]:
    """The python commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if len(argv) == 1 and re.fullmatch(r"[A-Z_]+=\S+", argv[0]):  # a shell variable for the next lines
                name, value = argv[0].split("=", 1)
                variables[name] = value
                continue
            argv = [re.sub(r"\$([A-Z_]+)", lambda m: variables.get(m.group(1), m.group(0)), a) for a in argv]
            if argv[:2] in (["python", "train.py"], ["python", "sample.py"], ["python", "eval.py"]) \
                    or argv[:2] == ["python", "-m"] or argv[1:2] and argv[1].startswith("benchmarks/"):
                commands.append(argv)
            elif argv[:2] == ["ldm", "convert"]:  # the console script, run as its module
                commands.append(["python", "-m", "ldm.cli", *argv[1:]])
    return commands


def key(token: str) -> str:
    return token.split("=", 1)[0].lstrip("+")


def with_overrides(args: list[str], forced: dict[str, str]) -> list[str]:
    """`args` with each forced key's value replaced (or appended when the command does not set it)."""
    out = [a if key(a) not in forced else f"{key(a)}={forced[key(a)]}" for a in args]
    return out + [f"{k}={v}" for k, v in forced.items() if k not in {key(a) for a in args}]


def train_overrides(args: list[str], i: int, data: dict[str, Path]) -> dict[str, str]:
    values = dict(a.split("=", 1) for a in args if "=" in a)
    experiment = values.get("experiment", "")
    tiny = {"fmnist_autoencoder": TINY_AE, "fmnist_autoencoder_f2": TINY_AE_F2}.get(experiment, TINY_UNET)
    forced = dict(a.split("=", 1) for a in [*tiny, *QUICK])
    image_folder = values.get("data") == "image_folder"
    forced.update({"data.train.root": str(data["images" if image_folder else "fmnist"]), "data.batch_size": "8",
                   "trainer.max_steps": "2", "trainer.val_check_interval": "2", "trainer.limit_val_batches": "1"})
    forced.update({"data.train.val_fraction": "0.2"} if image_folder else {"data.train.val_size": "32"})
    if experiment.startswith("sd_"):  # the user's SD file: a tiny one, on 16×16 images
        forced = dict(a.split("=", 1) for a in QUICK)
        forced.update({"model.path": str(data["sd_file"]), "model.tokenizer": str(data["tokenizer"]),
                       "data.train.root": str(data["images"]), "data.train.image_size": "16", "data.batch_size": "2",
                       "data.train.val_fraction": "0.2", "model.val_prompts": "null", "trainer.max_steps": "2",
                       "trainer.val_check_interval": "2", "trainer.limit_val_batches": "1",
                       "trainer.accelerator": "cpu"})
    if experiment in ("fmnist_ldm", "fmnist_ldm_long"):
        forced.update({"model.sample_every_n_steps": "2", "model.val_steps": "2", "model.val_images_per_prompt": "1",
                       "model.val_prompts": "[a photo of a bag]"})
    if "hydra.run.dir" not in values:  # one folder per command (the default is named to the second)
        forced["hydra.run.dir"] = f"logs/{values.get('task_name', experiment)}/runs/readme{i:02d}"
    if values.get("trainer", "cpu") not in ("cpu", "ddp_sim", "default"):
        forced.update({"trainer.accelerator": "cpu", "trainer.devices": "2" if "trainer.devices" in values else "1"})
    return forced


def prepared(argv: list[str], i: int, data: dict[str, Path]) -> tuple[str, list[str]]:
    """(script, args) to run for README command `argv`: its own arguments with the tiny keys forced."""
    script, args = argv[1], argv[2:]
    if script == "train.py":
        return str(ROOT / script), with_overrides(args, train_overrides(args, i, data))
    if script == "sample.py":
        forced = {"steps": "2", "n": "1", "out": f"outputs/readme{i:02d}"}
        ckpt = dict(a.split("=", 1) for a in args if "=" in a)["ckpt"]
        if ckpt.startswith("/weights/"):  # the user's SD weights: tiny ones of the same kind, 16×16 images
            forced.update({"ckpt": str(data["sd_file" if Path(ckpt).suffix else "sd_folder"]),
                           "height": "16", "width": "16"})
            if "sd.tokenizer" in {key(a) for a in args}:
                forced["sd.tokenizer"] = str(data["tokenizer"])
        if "device" in {key(a) for a in args}:
            forced["device"] = "cpu"  # the command's bf16 precision is kept (autocast on CPU)
        if "guide" in {key(a) for a in args}:  # the 2-step stand-in run has no half-way checkpoint: its own guide
            forced["guide"] = forced.get("ckpt", ckpt)
        return str(ROOT / script), with_overrides(args, forced)
    if script.startswith("benchmarks/"):  # argparse: the last occurrence of an option wins
        return str(ROOT / script), [*args, *BENCHMARK_SMOKE[script](data)]
    if script == "eval.py":  # a few tiny images per cell, the generated data as the real set
        forced = {"n": "1", "steps": "[2]", "samplers": "[ddim]", "real.root": str(data["fmnist"]), "real.n": "32",
                  "baseline_n": "32", "metrics.kid_subset_size": "8", "batch_size": "16"}
        values = dict(a.split("=", 1) for a in args if "=" in a)
        if "guide" in values:  # as for sample.py: the stand-in run guides itself
            forced["guide"] = values["ckpt"]
        return str(ROOT / script), with_overrides(args, forced)
    if args[0] == "ldm.metrics.classifier":  # argparse: the last occurrence of an option wins
        return f"-m {args[0]}", [*args[1:], "--data-root", str(data["fmnist"]), "--epochs", "1",
                                    "--val-size", "32"]
    if args[0] == "ldm.metrics.nll":  # argparse: a few test images and timesteps of the generated data
        return f"-m {args[0]}", [*args[1:], "--data-root", str(data["fmnist"]), "--n", "4", "--timesteps", "3",
                                    "--full-check", "1", "--batch-size", "12"]
    if args[0] == "ldm.cli":  # argparse options, paths made by earlier commands
        return f"-m {args[0]}", args[1:]
    forced = {k: v for k, v in train_overrides(args, i, data).items() if k.startswith("data.")}
    return f"-m {args[0]}", with_overrides(args[1:], forced)  # python -m ldm.<module>: the data keys only


def tiny_sd_weights(folder: Path) -> dict[str, Path]:
    """Stand-ins for a user's SD weights: an original-layout v1 file, a v2 diffusers folder, a CLIP tokenizer."""
    import transformers

    from tests.convert.test_from_original import original_file
    from tests.convert.tiny import diffusers_parts, pipeline, write_tokenizer

    tokenizer = write_tokenizer(folder / "tokenizer")
    original_file("v1", folder / "sd_v1.ckpt")
    pipeline(diffusers_parts("v2"), transformers.CLIPTokenizer.from_pretrained(tokenizer)).save_pretrained(
        folder / "sd_v2_diffusers")
    return {"tokenizer": tokenizer, "sd_file": folder / "sd_v1.ckpt", "sd_folder": folder / "sd_v2_diffusers"}


def distributed(args: list[str]) -> bool:
    return any(a in args for a in ("trainer=ddp", "trainer=ddp_sim", "trainer=multinode"))


def test_every_readme_command_runs(tmp_path):
    commands = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert sum(c[1] == "train.py" for c in commands) >= 8 and sum(c[1] == "sample.py" for c in commands) >= 6
    data = {"fmnist": make_fmnist(tmp_path / "data" / "fmnist"), "images": make_folder(tmp_path / "data" / "images"),
            **tiny_sd_weights(tmp_path / "weights")}
    repo = tmp_path / "repo"  # stands for the user's checkout
    (repo / "outputs" / "demo").mkdir(parents=True)
    # what `make demo` leaves: the README's own LDM runs stand in for the demo's (a link to the newest)
    (repo / "outputs" / "demo" / "ldm").symlink_to(Path("..", "..", "logs", "fmnist_ldm", "latest"))
    (repo / "outputs" / "demo" / "class_prompts.txt").write_text(PROMPTS)
    (repo / "outputs" / "demo" / "samples").mkdir()  # the demo's first sample, an input of the editing commands
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(
        repo / "outputs" / "demo" / "samples" / "00000_a-photo-of-a-t-shirt.png")
    (repo / "docs").symlink_to(ROOT / "docs")  # example masks and images the README points at
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    runnable = [(argv, *prepared(argv, i, data)) for i, argv in enumerate(commands)
                if not any(pattern in argv for pattern in NOT_RUN)]
    # Consecutive single-process commands run in one process (_run_many.py: imports paid once), in README order;
    # DDP commands in their own process, since Lightning's launcher starts the other ranks from sys.argv.
    batches: list[list[tuple]] = []
    for item in runnable:
        if distributed(item[2]) or not batches or distributed(batches[-1][0][2]):
            batches.append([])
        batches[-1].append(item)
    results = []
    for batch in batches:
        if distributed(batch[0][2]):
            _, script, args = batch[0]
            proc = subprocess.run([sys.executable, script, *args], cwd=repo, env=env, capture_output=True, text=True,
                                  timeout=300)
            results.append((batch[0], {"rc": proc.returncode, "output": proc.stdout + proc.stderr}))
            continue
        cases = [{"script": script, "args": args} for _, script, args in batch]
        out = tmp_path / f"batch{len(results)}.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_run_many.py"))], cwd=repo,
                              env={**env, "RUN_MANY_OUT": str(out)}, input=json.dumps(cases), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
        results += zip(batch, json.loads(out.read_text()), strict=True)
    for (argv, script, args), result in results:
        assert result["rc"] == 0, f"README command {shlex.join(argv)} failed, run as\n{script} {shlex.join(args)}:\n" \
                                  f"{result['output'][-6000:]}"
        if script.endswith("sample.py"):
            out = repo / dict(a.split("=", 1) for a in args)["out"]
            assert (out / "grid.png").is_file() and json.loads((out / "metadata.json").read_text())
        if "ckpt_path=last" in args:
            assert "Resuming from" in result["output"]
    assert len(results) == len(commands) - sum(any(p in c for p in NOT_RUN) for c in commands)
