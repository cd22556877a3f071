"""`bitnet158 import-hf DIR OUT`: a Hugging Face BitNet directory → our checkpoint, streamed."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..checkpoint import ModelDir
from ..errors import ConfigError
from ..jsonio import read_json_object
from ..interop.hf_import import NoTokenizerWarning, hf_layout, import_hf
from ..packed_layers import PackConfig
from .common import directory_megabytes, peak_resident_megabytes

NAME = "import-hf"
HELP = "turn a Hugging Face BitNet directory into a bitnet158 checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="BitNetForCausalLM (packed or bf16 masters) or 1bitLLM BitnetForCausalLM")
    p.add_argument("out")
    p.add_argument("--pack", metavar="FORMAT", help="write a packed directory in this format (i2, base3, lut2, "
                   "auto): the default, i2, for float masters; a packed repo keeps its codes in i2 with its "
                   "float head unless --pack or --head is given")
    p.add_argument("--head", help="packed head: int8 (default with --pack), q4, fp16 or fp32")
    p.add_argument("--latent", action="store_true", help="a training-form checkpoint instead (float masters as "
                   "they are; packed codes as latent weights that re-quantize to the same codes and scales)")
    p.add_argument("--keep-dtype", action="store_true", help="with --latent: keep fp16/bf16 masters in their "
                   "dtype on disk instead of widening to fp32 (half the size; loading widens them)")
    p.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json, tokenizer.model or a directory "
                   "holding one, used instead of DIRECTORY's")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    pack = None
    if args.keep_dtype and not args.latent:
        raise ConfigError("--keep-dtype applies to the training form; add --latent")
    if not args.latent:
        packed_repo = hf_layout(read_json_object(f"{args.directory}/config.json"),
                                f"{args.directory}/config.json").packed
        if args.pack or args.head or not packed_repo:
            pack = PackConfig(format=args.pack or PackConfig.format, head=args.head or PackConfig.head).validate()
    elif args.pack or args.head:
        raise ConfigError("--latent writes the training form; it takes no --pack or --head")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoTokenizerWarning)
        out = import_hf(args.directory, args.out, latent=args.latent, pack=pack, keep_dtype=args.keep_dtype,
                        tokenizer=args.tokenizer, overwrite=args.force, progress=True)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    md = ModelDir(out)
    kind = f"a packed ({md.packing.describe()}) checkpoint with a {md.packing.head} head" if md.packing \
        else "a training-form checkpoint"
    tokenizer = md.tokenizer()
    note = f", tokenizer ends on {', '.join(tokenizer.end_tokens)}" if tokenizer is not None else ", no tokenizer"
    print(f"imported {args.directory} into {out}: {kind}, {directory_megabytes(out):.2f} MB{note}; peak memory "
          f"{peak_resident_megabytes():,.0f} MB")
    return 0
