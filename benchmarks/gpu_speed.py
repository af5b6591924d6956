"""GPU speed suite: the SD-v1 U-Net (860 M parameters, 64×64×4 latents, 77×768 context) training and sampling
steps under each speed setting, with images/s, peak memory and MFU, and diffusers' UNet2DConditionModel of the
identical architecture (ldm.convert's config mapping) under the best setting, measured in the same run.

    python benchmarks/gpu_speed.py --device cuda                 # SD-v1 U-Net, batch 8
    python benchmarks/gpu_speed.py --device cuda --batch 16 --out outputs/bench/gpu_speed.json
    python benchmarks/gpu_speed.py --smoke                       # tiny U-Net on the CPU (the tests run this)

Settings, cumulative from the first row (each row adds one thing):
  fp32 (NCHW, AdamW for-each) → bf16 autocast → channels_last → fused AdamW → SDPA backend forced to flash /
  efficient / math (one row each, on top of fused) → torch.compile (on the fastest of them; --no-compile skips it).
A training step is forward + MSE + backward + AdamW step; a sampling step is one forward under no_grad.
MFU = model FLOPs of a training step (counted once by torch.utils.flop_counter: convolutions, matmuls and
attention, forward and backward) / step time / the device's dense bf16 peak (a table by device name, or
--peak-tflops). A setting the device cannot run (e.g. flash attention on some GPUs) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.nn.unet import UNetModel  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; first match of the name wins
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
                    ("RTX 4090", 165.2), ("A6000", 154.8)]
SD_V1_CONFIG = ROOT / "conf" / "model" / "unet" / "sd_v1.yaml"  # the U-Net `model=sd_v1` trains
TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_heads=-1, num_head_channels=16, context_dim=64, image_size=8,
            norm_num_groups=8)
SDPA = ("flash", "efficient", "math")


def sd_v1_config() -> dict:
    from omegaconf import OmegaConf

    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(SD_V1_CONFIG)).items() if k != "_target_"}


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if device.type != "cuda":
        return None, "no bf16 peak known for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak, name
    return None, f"{name}: not in the peak table (pass --peak-tflops)"


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "math": SDPBackend.MATH}[backend])


def build(kind: str, cfg: dict, channels_last: bool, device: torch.device) -> tuple[torch.nn.Module, callable]:
    if kind == "ours":
        net = UNetModel(**cfg, channels_last=channels_last).to(device)
        return net, lambda x, t, c: net(x, t, context=c)
    from diffusers import UNet2DConditionModel

    from ldm.convert.configs import unet_config_to_diffusers

    d = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    net = UNet2DConditionModel(**d).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, lambda x, t, c: net(x, t, encoder_hidden_states=c, return_dict=False)[0]


def inputs(cfg: dict, batch: int, ctx_len: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    s = cfg["image_size"]
    x = torch.randn(batch, cfg["in_channels"], s, s, generator=g)
    x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    c = torch.randn(batch, ctx_len, cfg["context_dim"], generator=g).to(device)
    return x, t, c, torch.randn_like(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Release the last setting's model, optimizer state and cached blocks before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_train_flops(cfg: dict, batch: int, ctx_len: int, device: torch.device) -> float:
    """FLOPs of one forward + backward of our U-Net (fp32 math: the count does not depend on the dtype)."""
    from torch.utils.flop_counter import FlopCounterMode

    net, fn = build("ours", cfg, True, device)
    x, t, c, target = inputs(cfg, batch, ctx_len, device, True)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(fn(x, t, c), target).backward()
    del net
    return float(counter.get_total_flops())


def measure(kind: str, setting: dict, cfg: dict, a, device: torch.device) -> dict:
    """images/s of training and sampling steps and the peak memory of training, for one setting."""
    net, fn = build(kind, cfg, setting["channels_last"], device)
    if setting["compile"]:
        fn = torch.compile(fn)
    x, t, c, target = inputs(cfg, a.batch, a.ctx_len, device, setting["channels_last"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=setting["fused"] or None,
                            foreach=None if setting["fused"] else True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting["bf16"])

    def train():
        with amp, sdpa_context(setting["sdpa"]):
            loss = F.mse_loss(fn(x, t, c).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample():
        with amp, sdpa_context(setting["sdpa"]):
            fn(x, t, c)

    out = {}
    for name, step in (("sample", sample), ("train", train)):
        net.train(name == "train")
        for _ in range(a.warmup):
            step()
        sync(device)
        if device.type == "cuda" and name == "train":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            sync(device)
            times.append((time.perf_counter() - t0) / a.steps)
        out[f"{name}_s"] = statistics.median(times)
        out[f"{name}_images_per_s"] = a.batch / out[f"{name}_s"]
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out


def settings(a) -> list[tuple[str, dict]]:
    base = {"bf16": False, "channels_last": False, "fused": False, "sdpa": None, "compile": False}
    rows = [("fp32", dict(base))]
    for label, key in (("+ bf16 autocast", "bf16"), ("+ channels_last", "channels_last"), ("+ fused AdamW", "fused")):
        rows.append((label, {**rows[-1][1], key: True}))
    fused = rows[-1][1]
    rows += [(f"+ SDPA {b}", {**fused, "sdpa": b}) for b in SDPA if b in a.sdpa]
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=77)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sdpa", default="flash,efficient,math", help="SDPA backends to force, one row each")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (TFLOP/s)")
    p.add_argument("--smoke", action="store_true", help="tiny U-Net, batch 2, one step, on the CPU")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    a.sdpa = [s for s in a.sdpa.split(",") if s]
    cfg = sd_v1_config()
    if a.smoke:
        cfg, a.device, a.batch, a.ctx_len, a.steps, a.reps, a.warmup = TINY, "cpu", 2, 8, 1, 1, 1
        a.no_compile, a.sdpa = True, [s for s in a.sdpa if s != "efficient"]  # efficient: CUDA only
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible (run --device cpu or --smoke)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak, peak_src = peak_tflops(device, a.peak_tflops)
    flops = count_train_flops(cfg, a.batch, a.ctx_len, device)
    print(f"U-Net {sum(p.numel() for p in UNetModel(**cfg).parameters()) / 1e6:.1f} M parameters, batch {a.batch}, "
          f"latent {cfg['image_size']}², context {a.ctx_len}×{cfg['context_dim']}; training step "
          f"{flops / 1e9:.4g} GFLOP; bf16 peak {peak or 'unknown'} TFLOP/s ({peak_src})", flush=True)
    rows = []

    def add(label: str, kind: str, setting: dict) -> dict | None:
        try:
            r = measure(kind, setting, cfg, a, device)
            free(device)
        except (RuntimeError, ImportError) as e:  # e.g. "No available kernel" for a forced SDPA backend
            free(device)
            print(f"{label} ({kind}): unavailable here: {str(e).splitlines()[0][:160]}", flush=True)
            rows.append({"setting": label, "model": kind, "error": str(e).splitlines()[0][:300]})
            return None
        r = {"setting": label, "model": kind, **r, "mfu": flops / r["train_s"] / (peak * 1e12) if peak else None}
        rows.append(r)
        mem = f", peak {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
        mfu = f", MFU {100 * r['mfu']:.1f} %" if r["mfu"] is not None else ""
        print(f"{label} ({kind}): train {r['train_images_per_s']:.2f} img/s{mem}{mfu}; "
              f"sample {r['sample_images_per_s']:.2f} img/s", flush=True)
        return r

    measured = [(add(label, "ours", setting), setting) for label, setting in settings(a)]
    ok = [(r, s) for r, s in measured if r is not None]
    if not ok:
        raise SystemExit("no setting ran on this device (see the errors above)")
    best_row, best = max(ok, key=lambda rs: rs[0]["train_images_per_s"])
    if not a.no_compile:
        add(f"{best_row['setting']} + torch.compile", "ours", {**best, "compile": True})
    ratio = None
    if not a.no_diffusers:
        theirs = add(best_row["setting"], "diffusers", best)
        if theirs is not None:
            ratio = {k: best_row[f"{k}_s"] / theirs[f"{k}_s"] for k in ("train", "sample")}
            print(f"ours / diffusers step time at '{best_row['setting']}': train {ratio['train']:.3f}, "
                  f"sample {ratio['sample']:.3f}", flush=True)
    print("\n| setting | model | train img/s | sample img/s | peak GiB | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | {r['model']} | unavailable | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "–"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "–"
        print(f"| {r['setting']} | {r['model']} | {r['train_images_per_s']:.2f} | {r['sample_images_per_s']:.2f} | "
              f"{mem} | {mfu} |")
    summary = {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
               "torch": torch.__version__, "batch": a.batch, "train_tflop_per_step": flops / 1e12,
               "peak_bf16_tflops": peak, "rows": rows, "ours_over_diffusers": ratio, "smoke": a.smoke}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
