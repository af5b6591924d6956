"""`python -m ldm.convert <in> <out> --to diffusers|sd|ldm` (the same as `ldm convert ...`)."""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
