"""`bitnet158 import-hf DIR OUT`: a Hugging Face BitNet directory → our checkpoint, streamed."""

from __future__ import annotations

import argparse

from ..checkpoint import ModelDir
from ..interop.hf_import import import_hf
from .common import directory_megabytes

NAME = "import-hf"
HELP = "turn a Hugging Face BitNet directory into a bitnet158 checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="BitNetForCausalLM (packed or bf16 masters) or 1bitLLM BitnetForCausalLM")
    p.add_argument("out")
    p.add_argument("--latent", action="store_true", help="a training-form checkpoint even from packed codes "
                   "(latent weights that re-quantize to the same codes and scales)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    out = import_hf(args.directory, args.out, latent=args.latent, overwrite=args.force)
    md = ModelDir(out)
    kind = f"a packed ({md.packing.describe()}) checkpoint" if md.packing else "a training-form checkpoint"
    tokenizer = md.tokenizer()
    note = f", tokenizer ends on {', '.join(tokenizer.end_tokens)}" if tokenizer is not None else ", no tokenizer"
    print(f"imported {args.directory} into {out}: {kind}, {directory_megabytes(out):.2f} MB{note}")
    return 0
