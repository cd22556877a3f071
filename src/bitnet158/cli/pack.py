"""`bitnet158 pack CKPT OUT`: pack a b1.58/b1 checkpoint for the fast CPU runtime, streamed tensor by
tensor (checkpoint/packing.py)."""

from __future__ import annotations

import argparse
import sys

from .. import checkpoint
from ..pack import packed_linear_bytes
from ..packed_layers import AUTO, PackConfig
from .common import directory_megabytes, peak_resident_megabytes

NAME = "pack"
HELP = "pack a b1.58/b1 checkpoint for the fast CPU runtime"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--format", default=PackConfig.format, help="i2 (2 bits/weight), base3 (1.6 bits/weight), "
                   "lut2 (2 bits, for the multiplication-free kernel) or auto (each weight shape in the fastest, "
                   "timed on this machine)")
    p.add_argument("--head", default=PackConfig.head, help="output head (and tied embedding): int8 per row (default), q4 (4-bit, an fp16 scale per 32 values: 56 %% of int8's bytes), fp16 or fp32")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    config = PackConfig(format=args.format, head=args.head).validate()
    if config.format == AUTO:
        print("timing every packed format on each weight shape (format auto) ...", file=sys.stderr)
    out = checkpoint.pack_dir(args.checkpoint, args.out, config, overwrite=args.force, progress=True)
    packed = checkpoint.ModelDir(out)
    skeleton = packed.skeleton()  # meta device: the counts come from the shapes
    linear_params = skeleton.stats()["linear_parameters"]
    nbytes = packed_linear_bytes(skeleton)
    print(f"packed {linear_params:,} linear weights into {nbytes / 1e6:.2f} MB ({8 * nbytes / linear_params:.2f} "
          f"bits each, {packed.packing.describe()}; fp16 would be {2 * linear_params / 1e6:.2f} MB), head "
          f"{packed.packing.head}; {out} is {directory_megabytes(out):.2f} MB; peak memory "
          f"{peak_resident_megabytes():,.0f} MB")
    return 0
