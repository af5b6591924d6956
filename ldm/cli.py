"""The `ldm` console command. `ldm convert <in> <out> --to diffusers|sd|ldm` converts between weight formats."""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    from ldm.convert import FORMATS, MODEL_TYPES

    parser = argparse.ArgumentParser(prog="ldm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert between SD single files, diffusers folders and ldm exports",
                       description="Input: an SD .ckpt/.safetensors, a diffusers folder, or an ldm export / .ckpt "
                                   "(detected). Output: --to sd (a .safetensors or .ckpt file), diffusers (a folder "
                                   "StableDiffusionPipeline loads) or ldm (our export folder).")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=FORMATS)
    c.add_argument("--model-type", choices=sorted(MODEL_TYPES), help="override detection")
    c.add_argument("--prediction-type", choices=("eps", "v", "x0"), help="override detection")
    c.add_argument("--ema", action="store_true", help="SD files: use the EMA weights (model_ema.*)")
    c.add_argument("--tokenizer", help="hub name or folder of the CLIP tokenizer (SD files carry none)")
    c.add_argument("--tokenizer-subfolder")
    c.add_argument("--num-heads", type=int, help="text encoder attention heads (default: width / 64)")
    c.add_argument("--trust", action="store_true", help="allow pickled checkpoints (only files you trust)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ldm.convert import convert

    out = convert(args.src, args.dst, args.to, model_type=args.model_type, prediction_type=args.prediction_type,
                  use_ema=args.ema, tokenizer=args.tokenizer, tokenizer_subfolder=args.tokenizer_subfolder,
                  num_heads=args.num_heads, trust=args.trust)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
