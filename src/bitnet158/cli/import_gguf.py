"""`bitnet158 import-gguf FILE OUT`: a bitnet GGUF (TQ1_0/TQ2_0/I2_S/F16/BF16) → our packed directory."""

from __future__ import annotations

import argparse

from ..interop.gguf_import import import_gguf
from .common import default_of, peak_resident_megabytes

NAME = "import-gguf"
HELP = "read a TQ1_0/TQ2_0/I2_S/F16/BF16 bitnet GGUF into a packed directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("out", help="the packed bitnet158 directory to write")
    p.add_argument("--format", default=default_of(import_gguf, "format"), help="packed layout: i2 (default) or base3")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    r = import_gguf(args.file, args.out, format=args.format, overwrite=args.force, progress=True)
    note = f"; {len(r.ternarized)} float tensors absmean-ternarized (not exact)" if r.ternarized else ""
    print(f"imported {args.file} ({', '.join(r.types)}) into packed {args.format} directory {r.out}{note}; "
          f"peak memory {peak_resident_megabytes():,.0f} MB")
    return 0
