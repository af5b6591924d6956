"""The embedded demo, end to end on a CPU: Fashion-MNIST + MiniLM captions → autoencoder → latent diffusion →
a grid with one row per class prompt → domain FID and prompt adherence of 1,000 samples, measured by a classifier
(trained beside the autoencoder the first time), against the real-vs-real baseline.

Run by `make demo`; every stage is a plain `train.py` / `sample.py` command a user could type, printed as it runs.
Outputs land in outputs/demo/ (override with DEMO_DIR). Timings and figures go to outputs/demo/summary.json.
"""

from __future__ import annotations

import csv
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
# One sampler setting for the grid and the evaluation: DPM-Solver++ 2M, classifier-free guidance GUIDANCE plus
# autoguidance GUIDE_SCALE by the run's own half-way checkpoint (GUIDE_STEP of fmnist_ldm's 2100; it keeps a checkpoint
# every 1050 steps): the best FID with adherence ≥ 90 % in the fidelity study's sweeps (docs/fidelity.md).
STEPS, GUIDANCE, GUIDE_SCALE, GUIDE_STEP = 10, 1.6, 1.25, 1050
# Both stages train their experiments exactly as configured: experiment=fmnist_autoencoder_f2 (1500 steps), then
# experiment=fmnist_ldm on its export. The time split between them is the fidelity study's (docs/fidelity.md).
CLASSIFIER = ROOT / "outputs" / "classifier" / "fmnist_classifier.safetensors"
# The targets: domain FID ≤ 3 × the real-vs-real baseline at the same n, adherence ≥ 90 %.
FID_RATIO_TARGET, ADHERENCE_TARGET = 3.0, 0.90


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _show(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def run(stage: str, args: list[str], timings: dict, cpu: dict, side: tuple[str, list[str]] | None = None) -> None:
    """Run one stage; record its wall time and its CPU time (user + sys: comparable on a busy machine). `side` =
    (name, args): a one-thread job run beside it (each gets one thread: these small models use a second thread
    poorly, so two one-thread jobs finish sooner than the same two jobs one after the other)."""
    env = None
    if side is not None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print(f"\n=== {side[0]} (beside {stage}, one thread each)\n$ {_show(side[1])}", flush=True)
        side_proc = subprocess.Popen(side[1], cwd=ROOT, env=env)
    print(f"\n=== {stage}\n$ {_show(args)}", flush=True)
    t0, c0 = time.time(), _children_cpu()
    rc = subprocess.run(args, cwd=ROOT, env=env).returncode
    if side is not None and side_proc.wait():
        raise subprocess.CalledProcessError(side_proc.returncode, side[1])
    if rc:
        raise subprocess.CalledProcessError(rc, args)
    name = stage if side is None else f"{stage} + {side[0]}"
    timings[name], cpu[name] = round(time.time() - t0, 1), round(_children_cpu() - c0, 1)
    print(f"=== {name}: {timings[name]:.0f} s wall, {cpu[name]:.0f} s CPU", flush=True)


def set_aside_previous_run() -> None:
    """A second `make demo` trains afresh: the previous run's outputs move to previous/<time>/ (nothing is
    deleted), so that training writes a clean last.ckpt and the grid and evaluation measure the new model."""
    names = ["autoencoder", "ldm", "samples", "eval", "summary.json"]
    old = [OUT / n for n in names if (OUT / n).exists()]
    if not old:
        return
    dest = OUT / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for path in old:
        path.rename(dest / path.name)
    print(f"previous demo outputs moved to {dest}", flush=True)


def read_eval(path: Path) -> dict:
    """The figures of eval.py's table: the real baseline, the autoencoder floor and the samples' row."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    real, floor, sampled = rows[0], rows[1], rows[-1]
    fid, base = float(sampled["fid"]), float(real["fid"])
    return {"fid": fid, "baseline_fid": base, "fid_ratio": round(fid / base, 2),
            "adherence": float(sampled["adherence"]), "real_adherence": float(real["adherence"]),
            "autoencoder_fid": float(floor["fid"]), "autoencoder_psnr_db": float(floor["psnr_db"]),
            "n": int(sampled["n"])}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    set_aside_previous_run()
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t_start = time.time()
    ae_dir, ldm_dir, samples_dir, eval_dir = OUT / "autoencoder", OUT / "ldm", OUT / "samples", OUT / "eval"
    prompts = OUT / "class_prompts.txt"
    prompts.write_text("".join(caption_for(c) + "\n" for c in range(len(CLASS_NAMES))))  # "a photo of a …"

    # The classifier is the judge of adherence and the FID feature extractor: trained once, then reused.
    side = None if CLASSIFIER.is_file() else ("classifier", [PY, "-m", "ldm.metrics.classifier", f"--out={CLASSIFIER}"])
    run("autoencoder", [PY, "train.py", "experiment=fmnist_autoencoder_f2", f"hydra.run.dir={ae_dir}"], timings, cpu,
        side=side)
    run("latent diffusion", [PY, "train.py", "experiment=fmnist_ldm", f"hydra.run.dir={ldm_dir}",
                             f"model.first_stage={ae_dir / 'export'}"], timings, cpu)
    ckpt = ldm_dir / "checkpoints" / "last.ckpt"
    guide = ldm_dir / "checkpoints" / f"step{GUIDE_STEP:07d}.ckpt"
    if not guide.is_file():
        raise FileNotFoundError(f"{guide} (the autoguidance checkpoint) is missing: experiment=fmnist_ldm keeps one "
                                f"every {GUIDE_STEP} steps")
    sampling = [f"steps={STEPS}", f"guidance={GUIDANCE}", f"guide={guide}", f"guide_scale={GUIDE_SCALE}"]
    run("sample grid", [PY, "sample.py", f"ckpt={ckpt}", f"prompts_file={prompts}", "n=8", "sampler=dpmpp_2m",
                        *sampling, "seed=0", f"out={samples_dir}", "progress=false"], timings, cpu)
    run("evaluation", [PY, "eval.py", f"ckpt={ckpt}", "n=100", "samplers=[dpmpp_2m]", f"steps=[{STEPS}]",
                       f"guidance=[{GUIDANCE}]", f"guide={guide}", f"guide_scale={GUIDE_SCALE}", "autoencoder=ckpt",
                       f"metrics.classifier={CLASSIFIER}", f"out={eval_dir}"], timings, cpu)

    figures = read_eval(eval_dir / "eval.csv")
    summary = {
        "timings_s": timings,
        "cpu_s": cpu,
        "total_s": round(time.time() - t_start, 1),
        **figures,
        "meets_targets": figures["fid_ratio"] <= FID_RATIO_TARGET and figures["adherence"] >= ADHERENCE_TARGET,
        "settings": {"sampler": "dpmpp_2m", "steps": STEPS, "guidance": GUIDANCE, "guide": str(guide),
                     "guide_scale": GUIDE_SCALE, "per_class": 100},
        "grid": str(samples_dir / "grid.png"),
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== demo summary")
    for stage, sec in timings.items():
        print(f"  {stage:<28} {sec:7.0f} s wall {cpu[stage]:7.0f} s CPU")
    print(f"  {'total':<28} {summary['total_s']:7.0f} s")
    print(f"  domain FID of {figures['n']} samples (DPM-Solver++ 2M, {STEPS} steps, guidance {GUIDANCE}, "
          f"autoguidance {GUIDE_SCALE} by step {GUIDE_STEP}): "
          f"{figures['fid']:.3f} = {figures['fid_ratio']:.2f} × the real-vs-real baseline "
          f"{figures['baseline_fid']:.3f} (target ≤ {FID_RATIO_TARGET:g} ×); the autoencoder alone: "
          f"{figures['autoencoder_fid']:.3f}")
    print(f"  samples labelled as their prompted class: {figures['adherence']:.1%} (target ≥ {ADHERENCE_TARGET:.0%}; "
          f"real images: {figures['real_adherence']:.1%})")
    print(f"  both targets met: {'yes' if summary['meets_targets'] else 'NO'}")
    print(f"  grid (one row per class prompt): {summary['grid']}")


if __name__ == "__main__":
    main()
