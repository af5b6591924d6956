"""The embedded demo, end to end on a CPU: Fashion-MNIST + MiniLM captions → autoencoder → latent diffusion →
a grid with one row per class prompt → prompt adherence measured by a classifier.

Run by `make demo`; every stage is a plain `train.py` / `sample.py` command a user could type, printed as it runs.
Outputs land in outputs/demo/ (override with DEMO_DIR). Timings and figures go to outputs/demo/summary.json.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("DEMO_DIR", ROOT / "outputs" / "demo"))
PY = sys.executable
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def run(stage: str, args: list[str], timings: dict) -> None:
    print(f"\n=== {stage}\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    t0 = time.time()
    subprocess.run(args, cwd=ROOT, check=True)
    timings[stage] = round(time.time() - t0, 1)
    print(f"=== {stage}: {timings[stage]:.0f} s", flush=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.time()
    ae_dir, ldm_dir, samples_dir = OUT / "autoencoder", OUT / "ldm", OUT / "samples"
    prompts = OUT / "class_prompts.txt"
    prompts.write_text("".join(f"a photo of a {c}\n" for c in CLASSES))

    run("autoencoder", [PY, "train.py", "experiment=fmnist_autoencoder", f"hydra.run.dir={ae_dir}"], timings)
    run("latent diffusion", [PY, "train.py", "experiment=fmnist_ldm", f"hydra.run.dir={ldm_dir}",
                             f"model.first_stage={ae_dir / 'export'}"], timings)
    ckpt = ldm_dir / "checkpoints" / "last.ckpt"
    run("sample grid", [PY, "sample.py", f"ckpt={ckpt}", f"prompts_file={prompts}", "n=8", "sampler=dpmpp_2m",
                        "steps=20", "guidance=4", "seed=0", f"out={samples_dir}", "progress=false"], timings)
    run("prompt adherence", [PY, "benchmarks/prompt_adherence.py", f"--ckpt={ckpt}", "--per-class=100",
                             f"--out={OUT / 'adherence.json'}"], timings)

    adherence = json.loads((OUT / "adherence.json").read_text())
    summary = {
        "timings_s": timings,
        "total_s": round(time.time() - t_start, 1),
        "sample_accuracy": adherence["sample_accuracy"],
        "classifier_test_accuracy": adherence["classifier_test_accuracy"],
        "grid": str(samples_dir / "grid.png"),
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== demo summary")
    for stage, sec in timings.items():
        print(f"  {stage:<18} {sec:7.0f} s")
    print(f"  {'total':<18} {summary['total_s']:7.0f} s")
    print(f"  classifier accuracy on the real test split: {summary['classifier_test_accuracy']:.1%}")
    print(f"  samples labelled as their prompted class:  {summary['sample_accuracy']:.1%} (100 per class)")
    print(f"  grid (one row per class prompt): {summary['grid']}")


if __name__ == "__main__":
    main()
