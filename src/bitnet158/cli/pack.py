"""`bitnet158 pack CKPT OUT`: pack a b1.58/b1 checkpoint for the fast CPU runtime."""

from __future__ import annotations

import argparse
import sys

from .. import checkpoint
from ..errors import ConfigError
from ..layers import BitLinear
from ..pack import pack_, packed_linear_bytes
from ..packed_layers import AUTO, PackConfig
from .common import directory_megabytes

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
    model, tokenizer = checkpoint.load(args.checkpoint)
    if model.packing is not None:
        raise ConfigError(f"{args.checkpoint} is already packed ({model.packing.describe()})")
    if model.config.mode == "fp":
        raise ConfigError(f"{args.checkpoint} is a full-precision (fp) model; only b158 and b1 models pack")
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    if config.format == AUTO:
        print("timing every packed format on each weight shape (format auto) ...", file=sys.stderr)
    pack_(model, config)
    config = model.packing
    out = checkpoint.save_packed(model, args.out, tokenizer, overwrite=args.force)
    packed = packed_linear_bytes(model)
    print(f"packed {linear_params:,} linear weights into {packed / 1e6:.2f} MB ({8 * packed / linear_params:.2f} "
          f"bits each, {config.describe()}; fp16 would be {2 * linear_params / 1e6:.2f} MB), head {config.head}; "
          f"{out} is {directory_megabytes(out):.2f} MB")
    return 0
