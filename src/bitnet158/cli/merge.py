"""`bitnet158 merge CKPT ADAPTER OUT`: fold a LoRA adapter into new latent weights (re-ternarized on
load: lossy), printing the held-out loss on the chat data before and after."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .. import checkpoint
from ..checkpoint.adapter import load_adapter
from ..errors import CheckpointError, ConfigError
from ..train.data.chat import prepare_chat_data, read_conversations
from ..train.data.instructions import default_instructions
from ..train.merge import merge_lora
from ..train.sft import sft, sft_train_config
from ..train.trainer import evaluate
from .common import default_of, set_threads

NAME = "merge"
HELP = "fold a LoRA adapter into a training-form checkpoint (re-ternarized; prints held-out loss before/after)"
_TC = sft_train_config()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the training-form model the adapter was trained on")
    p.add_argument("adapter", help="adapter directory (PEFT layout) or a finetune run")
    p.add_argument("out", help="the merged model directory")
    p.add_argument("--data", nargs="+", metavar="JSONL", help="chat data for the held-out loss "
                   "(default: the embedded instruction set, as finetune)")
    p.add_argument("--heldout", type=float, default=default_of(sft, "heldout"))
    p.add_argument("--seq-len", type=int, default=_TC.seq_len)
    p.add_argument("--seed", type=int, default=_TC.seed, help="the finetune run's seed (the same held-out split)")
    p.add_argument("--threads", type=int)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if Path(args.out).exists() and not args.force:
        raise ConfigError(f"{args.out} already exists; pass --force to replace it")
    model, tokenizer = checkpoint.load(args.checkpoint)
    if model.packing is not None:
        raise ConfigError(f"{args.checkpoint}: a packed checkpoint has no latent weights to merge into; "
                          "use --adapter with generate or chat")
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json beside the weights")
    load_adapter(model, args.adapter)
    groups = None
    if args.data:
        conversations = [c for path in args.data for c in read_conversations(path)]
    else:
        conversations, groups = default_instructions()
    data = prepare_chat_data(conversations, tokenizer, min(args.seq_len, model.config.max_seq_len),
                             heldout=args.heldout, seed=args.seed, groups=groups)
    eval_set = (data.heldout_inputs, data.heldout_targets) if data.heldout_inputs.shape[0] else None
    before = evaluate(model, *eval_set) if eval_set is not None else math.nan
    merge_lora(model)
    after = evaluate(model, *eval_set) if eval_set is not None else math.nan
    checkpoint.save(model.eval(), args.out, tokenizer, overwrite=args.force)
    print(f"held-out loss on assistant tokens: {before:.4f} unmerged → {after:.4f} merged (re-ternarized)")
    print(f"merged model: {args.out}")
    return 0
