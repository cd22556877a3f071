"""`bitnet158 convert`: ternarize a full-precision checkpoint (or a Hugging Face LLaMA-family
directory) into a b1.58 one. Option defaults are ConvertConfig's; the work is
`train.convert_run.run_convert`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import checkpoint
from ..config import ConvertConfig
from ..errors import ConfigError
from ..interop.hf_llama import is_hf_directory, load_hf_llama
from ..train.convert_run import run_convert
from .common import set_threads

NAME = "convert"
HELP = "turn a full-precision checkpoint into a b1.58 one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="an fp checkpoint (e.g. runs/demo/fp) or a Hugging Face LLaMA, Mistral "
                   "or Qwen2 directory")
    p.add_argument("out")
    p.add_argument("--method", default=ConvertConfig.method,
                   help="comma-separated: rtn, adaround, lambda, quant-noise, qat, distill")
    p.add_argument("--data", nargs="+", metavar="PATH", help="fine-tuning text (default: the embedded corpus)")
    p.add_argument("--max-bytes", type=int, default=ConvertConfig.max_bytes,
                   help="cap the default corpus's training text")
    p.add_argument("--steps", type=int, default=ConvertConfig.steps)
    p.add_argument("--lr", type=float, default=ConvertConfig.lr)
    p.add_argument("--batch-size", type=int, default=ConvertConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=ConvertConfig.seq_len)
    p.add_argument("--seed", type=int, default=ConvertConfig.seed)
    p.add_argument("--threads", type=int)
    p.add_argument("--force", action="store_true")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    config = ConvertConfig.from_dict(vars(args))  # every ConvertConfig field the flags set; the rest default
    if is_hf_directory(args.source):  # a Hugging Face LLaMA-family directory (refuses other architectures)
        src, tokenizer = load_hf_llama(args.source)
    else:
        src, tokenizer = checkpoint.load(args.source)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    result = run_convert(src, tokenizer, config, args.data, name=args.source)
    checkpoint.save(result.model, out, tokenizer, overwrite=args.force)
    print(f"converted with {config.method}: held-out perplexity {result.perplexity:.2f} "
          f"(FP source {result.source_perplexity:.2f}); saved {out}")
    return 0
