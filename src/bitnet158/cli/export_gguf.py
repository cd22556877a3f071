"""`bitnet158 export-gguf CKPT OUT.gguf`: a GGUF that llama.cpp's bitnet graph runs."""

from __future__ import annotations

import argparse

from ..interop.gguf_export import GGUF_TYPES, export_gguf
from .common import default_of, peak_resident_megabytes

NAME = "export-gguf"
HELP = "write a GGUF that llama.cpp runs (arch bitnet; tq2_0, tq1_0, i2_s, f16)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default=default_of(export_gguf, "type"),
                   help=f"one of {', '.join(GGUF_TYPES)} (i2_s is bitnet.cpp's)")
    p.add_argument("--scale-tensors", action="store_true",
                   help="TQ types: unit block scales plus an exact fp32 per-tensor .scale tensor")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    r = export_gguf(args.checkpoint, args.out, args.type, overwrite=args.force, scale_tensors=args.scale_tensors,
                    progress=True)
    notes = [f"FFN padded to {r.ffn_padded_to} with zero weights"] if r.ffn_padded_to else []
    if r.type in ("tq1_0", "tq2_0") and not args.scale_tensors:
        notes.append(f"fp16 block scales: max relative scale error {r.max_scale_rel_error:.2e}")
    if not r.tokenizer:
        notes.append("no tokenizer (no_vocab)")
    notes.append(f"peak memory {peak_resident_megabytes():,.0f} MB")
    print(f"wrote {r.path} ({r.type}, {r.tensors} tensors, {r.bytes / 1e6:.2f} MB)" + "".join(f"; {n}" for n in notes))
    return 0
