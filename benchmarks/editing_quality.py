"""Editing quality on the Fashion-MNIST test split, one sub-command per capability; prints one JSON line and writes
a figure (rows of input / condition / outputs, nearest-upscaled ×3) to --out.

    python benchmarks/editing_quality.py inpaint  --ckpt <fmnist_ldm export> [--inpaint-ckpt <fmnist_inpaint export>]
    python benchmarks/editing_quality.py invert   --ckpt <fmnist_ldm export>
    python benchmarks/editing_quality.py img2img  --ckpt <fmnist_ldm export>
    python benchmarks/editing_quality.py semantic --ckpt <fmnist_semantic export>
    python benchmarks/editing_quality.py upscale  --ckpt <fmnist_upscale export>

inpaint: a centred 16×16 box hidden in each of N test images, re-painted under the image's caption; known-region
error (max |output − input| over kept pixels, with and without the pixel paste) and PSNR of the hidden region
against the ground truth. invert: DDIM inversion round trip (latent RMSE, PSNR against the input and against the
autoencoder's own reconstruction). img2img: mean |output − input| per strength. semantic: mean IoU of the
re-segmented samples against the maps they were asked for, beside the IoU against other images' maps (chance).
upscale: 16×16 inputs degraded from test images (blur + bicubic + noise, seeded), upscaled ×2; PSNR / SSIM of the
model and of bicubic upsampling against the 32×32 originals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm.data.fashion_mnist import FashionMNIST, caption_for
from ldm.data.segmentation import mean_iou, one_hot_map, segment
from ldm.editing_pipeline import EditingPipeline, psnr
from ldm.images import save_grid, upscale_nearest

DATA: dict = {}  # FashionMNIST keyword arguments (--data-root)


def test_items(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    ds = FashionMNIST(split="test", image_size=32, **DATA)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    items = [ds[i] for i in idx]
    return torch.stack([it["image"] for it in items]), [caption_for(it["label"]) for it in items]


def figure(rows: list[torch.Tensor], path: Path) -> None:
    """rows: tensors (n, 1, H, W) of equal n, written one row each."""
    grid = torch.cat(rows)
    save_grid(upscale_nearest(grid, 3), path, nrow=len(rows[0]))


def inpaint(args, pipe: EditingPipeline) -> dict:
    images, captions = test_items(args.n)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    keep = (mask == 0).expand(1, 1, 32, 32)
    report, rows = {"repaint": args.repaint}, [images[:8], torch.where(mask > 0, torch.zeros_like(images[:8]),
                                                                        images[:8])]
    pipes = {"blend": pipe}
    if args.inpaint_ckpt:
        pipes["inpainting_model"] = EditingPipeline.from_checkpoint(args.inpaint_ckpt, device="cpu")
    for name, p in pipes.items():
        outs, raw_err, err, hole, raw_mean = [], 0.0, 0.0, [], 0.0
        for image, caption in zip(images, captions, strict=True):
            r = p.inpaint(image[None], mask, caption, n=1, steps=args.steps, guidance=args.guidance,
                          sampler="ddim", seed=0, progress=False, repaint=args.repaint if name == "blend" else 1)
            s = r["settings"]
            err = max(err, s["known_region_max_abs_error"])
            raw_err = max(raw_err, s["known_region_max_abs_error_unpasted"])
            raw_mean += s["known_region_mean_abs_error_unpasted"] / len(images)
            hole.append(psnr(r["images"][0][~keep[0]], image[~keep[0]]))
            outs.append(r["images"])
        rows.append(torch.cat(outs)[:8])
        report[name] = {"known_region_max_abs_error": err, "known_region_max_abs_error_unpasted": raw_err,
                        "known_region_mean_abs_error_unpasted": raw_mean, "hole_psnr_db_mean": sum(hole) / len(hole)}
    ae = p.model.decode_latents(p.model.encode_images(images)).clamp(-1, 1)
    report["autoencoder_known_region_mean_abs_error"] = float((ae - images).abs()[keep.expand_as(images)].mean())
    figure(rows, Path(args.out) / "inpaint.png")
    return report


def invert(args, pipe: EditingPipeline) -> dict:
    images, captions = test_items(args.n)
    keys = ("latent_rmse", "latent_rms", "psnr_reconstruction_vs_input_db", "psnr_autoencoder_vs_input_db",
            "psnr_reconstruction_vs_autoencoder_db")
    sums, rows = dict.fromkeys(keys, 0.0), []
    edit = {"a photo of a t-shirt": "a photo of a shirt", "a photo of a sneaker": "a photo of an ankle boot"}
    for image, caption in zip(images, captions, strict=True):
        target = edit.get(caption, "a photo of a bag" if caption != "a photo of a bag" else "a photo of a coat")
        r = pipe.invert(image[None], caption, [target], steps=args.steps, edit_guidance=args.guidance,
                        progress=False)
        for k in keys:
            sums[k] += r["settings"]["metrics"][k] / len(images)
        rows.append(r["images"])
    figure([torch.stack([r[j] for r in rows[:8]]) for j in range(4)], Path(args.out) / "invert.png")
    return sums


def img2img(args, pipe: EditingPipeline) -> dict:
    images, captions = test_items(args.n)
    report, rows = {}, [images[:8]]
    for strength in (0.0, 0.3, 0.6, 0.9):
        outs = [pipe.img2img(im[None], "a photo of a bag", strength=strength, steps=args.steps,
                             guidance=args.guidance, seed=0, progress=False)["images"] for im in images]
        out = torch.cat(outs)
        report[f"strength_{strength}_mean_abs_change"] = float((out - images).abs().mean())
        rows.append(out[:8])
    figure(rows, Path(args.out) / "img2img.png")
    return report


def semantic(args, pipe: EditingPipeline) -> dict:
    images, captions = test_items(args.n)
    maps = segment(images)
    out = pipe.text_to_image(captions, n=1, steps=args.steps, guidance=args.guidance, seed=0, sampler="ddim",
                             progress=False, concat=one_hot_map(maps))["images"]
    got = segment(out)
    miou, per_class = mean_iou(got, maps)
    chance, _ = mean_iou(got, maps.roll(1, 0))
    rows = [images[:8], (maps[:8, None].float() - 1), out[:8], (got[:8, None].float() - 1)]
    figure(rows, Path(args.out) / "semantic.png")
    return {"mean_iou": miou, "iou_per_class": per_class, "mean_iou_vs_other_maps": chance,
            "mean_iou_test_images_vs_own_maps": 1.0}


def upscale(args, pipe: EditingPipeline) -> dict:
    from ldm.data.superres import FashionMNISTSuperRes, bicubic

    ds = FashionMNISTSuperRes(split="test", image_size=32, **DATA)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.n].tolist()
    items = [ds[i] for i in idx]
    keys = ("psnr_db", "ssim", "bicubic_psnr_db", "bicubic_ssim")
    sums, outs = dict.fromkeys(keys, 0.0), []
    for it in items:
        r = pipe.upscale(it["lowres"], caption_for(it["label"]), noise_level=args.noise_level, reference=it["image"],
                         steps=args.steps, guidance=args.guidance, seed=0, progress=False)
        for k in keys:
            sums[k] += r["settings"][k] / len(items)
        outs.append(r["images"])
    hr = torch.stack([it["image"] for it in items[:8]])
    low = torch.stack([it["lowres"] for it in items[:8]])
    figure([hr, bicubic(low, (32, 32)), torch.cat(outs)[:8], upscale_nearest(low, 2)], Path(args.out) / "upscale.png")
    return {"noise_level": args.noise_level, **sums}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["inpaint", "invert", "img2img", "semantic", "upscale"])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--inpaint-ckpt", default=None)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--noise-level", type=int, default=20)
    p.add_argument("--repaint", type=int, default=1, help="inpaint: RePaint resampling of the blending run")
    p.add_argument("--out", default="outputs/editing_quality")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    args = p.parse_args()
    if args.data_root:
        DATA["root"] = args.data_root
    torch.set_grad_enabled(False)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = EditingPipeline.from_checkpoint(args.ckpt, device="cpu")
    modes = {"inpaint": inpaint, "invert": invert, "img2img": img2img, "semantic": semantic, "upscale": upscale}
    report = modes[args.what](args, pipe)
    print(json.dumps({"what": args.what, "n": args.n, "steps": args.steps, "guidance": args.guidance,
                      "seconds": round(time.time() - t0, 1), **report}))


if __name__ == "__main__":
    main()
