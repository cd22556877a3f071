"""`bitnet158 export-hf CKPT OUT`: our checkpoint → a Hugging Face BitNetForCausalLM directory."""

from __future__ import annotations

import argparse

from ..chat_template import read_template_file
from ..interop.hf_export import save_hf
from .common import directory_megabytes

NAME = "export-hf"
HELP = "write a checkpoint as a Hugging Face BitNetForCausalLM directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--bf16", action="store_true", help="latent master weights (quantization_mode online) "
                   "instead of packed ternary codes; also the way to export an fp model")
    p.add_argument("--dtype", help="float tensors' storage: float32 (default for packed), bfloat16 "
                   "(default with --bf16) or float16")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to write into "
                   "tokenizer_config.json (default: the checkpoint's own, if any)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    layout = "bf16" if args.bf16 else "packed"
    template = read_template_file(args.chat_template) if args.chat_template else None
    out = save_hf(args.checkpoint, args.out, layout=layout, dtype=args.dtype, chat_template=template,
                  overwrite=args.force)
    print(f"wrote {out}: Hugging Face BitNetForCausalLM, "
          f"{'latent masters (online quantization)' if args.bf16 else 'packed ternary (autobitlinear, offline)'}, "
          f"{directory_megabytes(out):.2f} MB")
    return 0
