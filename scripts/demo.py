"""The embedded demo, end to end on a CPU: Fashion-MNIST + MiniLM captions → autoencoder → latent diffusion →
a grid with one row per class prompt → prompt adherence measured by a classifier.

Run by `make demo`; every stage is a plain `train.py` / `sample.py` command a user could type, printed as it runs.
Outputs land in outputs/demo/ (override with DEMO_DIR). Timings and figures go to outputs/demo/summary.json.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ldm.data.fashion_mnist import CLASS_NAMES, caption_for

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("DEMO_DIR", ROOT / "outputs" / "demo"))
PY = sys.executable
# One guidance scale for the grid and the adherence measurement (fmnist_ldm's val_guidance is the same).
GUIDANCE = 6
# The demo's autoencoder is a shorter run of experiment=fmnist_autoencoder (≈25 dB PSNR, plenty for the LDM):
# ≈1 of the demo's ≈13 minutes on 2 cores. The LDM stage trains experiment=fmnist_ldm exactly as configured.
AE_OVERRIDES = ["trainer.max_steps=500", "trainer.val_check_interval=250",
                "callbacks.model_checkpoint.every_n_train_steps=500"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(stage: str, args: list[str], timings: dict, cpu: dict) -> None:
    """Run one stage; record its wall time and its CPU time (user + sys: comparable on a busy machine)."""
    print(f"\n=== {stage}\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    t0, c0 = time.time(), _children_cpu()
    subprocess.run(args, cwd=ROOT, check=True)
    timings[stage], cpu[stage] = round(time.time() - t0, 1), round(_children_cpu() - c0, 1)
    print(f"=== {stage}: {timings[stage]:.0f} s wall, {cpu[stage]:.0f} s CPU", flush=True)


def set_aside_previous_run() -> None:
    """A second `make demo` trains afresh: the previous run's outputs move to previous/<time>/ (nothing is
    deleted), so that training writes a clean last.ckpt and the grid and adherence measure the new model."""
    names = ["autoencoder", "ldm", "samples", "adherence.json", "summary.json"]
    old = [OUT / n for n in names if (OUT / n).exists()]
    if not old:
        return
    dest = OUT / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for path in old:
        path.rename(dest / path.name)
    print(f"previous demo outputs moved to {dest}", flush=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    set_aside_previous_run()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t_start = time.time()
    ae_dir, ldm_dir, samples_dir = OUT / "autoencoder", OUT / "ldm", OUT / "samples"
    prompts = OUT / "class_prompts.txt"
    prompts.write_text("".join(caption_for(c) + "\n" for c in range(len(CLASS_NAMES))))  # "a photo of a …"

    run("autoencoder", [PY, "train.py", "experiment=fmnist_autoencoder", f"hydra.run.dir={ae_dir}",
                        *AE_OVERRIDES], timings, cpu)
    classifier = ROOT / "outputs" / "classifier" / "fmnist_classifier.safetensors"  # fmnist_ldm's sample_quality
    if not classifier.is_file():  # the judge of prompt adherence and FID features; trained once, then reused
        run("classifier", [PY, "-m", "ldm.metrics.classifier", f"--out={classifier}"], timings, cpu)
    run("latent diffusion", [PY, "train.py", "experiment=fmnist_ldm", f"hydra.run.dir={ldm_dir}",
                             f"model.first_stage={ae_dir / 'export'}"], timings, cpu)
    ckpt = ldm_dir / "checkpoints" / "last.ckpt"
    run("sample grid", [PY, "sample.py", f"ckpt={ckpt}", f"prompts_file={prompts}", "n=8", "sampler=dpmpp_2m",
                        "steps=20", f"guidance={GUIDANCE}", "seed=0", f"out={samples_dir}", "progress=false"],
        timings, cpu)
    run("prompt adherence", [PY, "benchmarks/prompt_adherence.py", f"--ckpt={ckpt}", "--per-class=100",
                             f"--guidance={GUIDANCE}", f"--out={OUT / 'adherence.json'}"], timings, cpu)

    adherence = json.loads((OUT / "adherence.json").read_text())
    summary = {
        "timings_s": timings,
        "cpu_s": cpu,
        "total_s": round(time.time() - t_start, 1),
        "sample_accuracy": adherence["sample_accuracy"],
        "classifier_test_accuracy": adherence["classifier_test_accuracy"],
        "grid": str(samples_dir / "grid.png"),
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== demo summary")
    for stage, sec in timings.items():
        print(f"  {stage:<18} {sec:7.0f} s wall {cpu[stage]:7.0f} s CPU")
    print(f"  {'total':<18} {summary['total_s']:7.0f} s")
    print(f"  classifier accuracy on the real test split: {summary['classifier_test_accuracy']:.1%}")
    print(f"  samples labelled as their prompted class:  {summary['sample_accuracy']:.1%} (100 per class)")
    print(f"  grid (one row per class prompt): {summary['grid']}")


if __name__ == "__main__":
    main()
