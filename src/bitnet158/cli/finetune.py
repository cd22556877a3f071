"""`bitnet158 finetune CKPT --data chat.jsonl --out RUN [--method lora|full]`: chat fine-tuning, loss
on the assistant's tokens; LoRA runs write PEFT adapters that `generate`/`chat --adapter` apply."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .. import checkpoint
from ..chat_template import read_template_file
from ..config import TrainConfig
from ..errors import ConfigError
from ..lora import PROJECTIONS, LoRAConfig
from ..train.data.chat import describe, read_conversations
from ..train.data.instructions import default_instructions
from ..train.sft import DEFAULT_LR, METHODS, perplexity, sft, sft_train_config
from .common import DEFAULT_RUNS, default_of, set_threads

NAME = "finetune"
HELP = "fine-tune a model on chat data (full, or LoRA on the frozen ternary base)"
_TC = sft_train_config()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model directory (a training run: its latest step; packed: LoRA only)")
    p.add_argument("--data", nargs="+", metavar="JSONL",
                   help='chat rows: {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"} '
                        "(default: the embedded instruction set: questions on Python's documentation topics)")
    p.add_argument("--out", help=f"run directory (default {DEFAULT_RUNS}/finetune-METHOD)")
    p.add_argument("--method", choices=METHODS, default=default_of(sft, "method"))
    p.add_argument("--rank", type=int, default=LoRAConfig.r, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha (the scale is alpha/rank; default 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=LoRAConfig.dropout)
    p.add_argument("--targets", default=",".join(LoRAConfig.targets),
                   help="comma-separated modules to adapt, PEFT's names: the projections "
                        f"({','.join(PROJECTIONS)}), embed_tokens and lm_head (the embedding and output "
                        "head: one update of the table when tied); default all")
    p.add_argument("--heldout", type=float, default=default_of(sft, "heldout"),
                   help="share of conversations held out for the evaluation loss")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja template (default: the tokenizer's, else plain)")
    p.add_argument("--steps", type=int, default=_TC.steps)
    p.add_argument("--batch-size", type=int, default=_TC.batch_size)
    p.add_argument("--seq-len", type=int, default=_TC.seq_len)
    p.add_argument("--grad-accum", type=int, default=_TC.grad_accum)
    p.add_argument("--lr", type=float, help=f"peak LR (default {DEFAULT_LR['lora']} for lora, "
                   f"{DEFAULT_LR['full']} for full)")
    p.add_argument("--warmup", type=int, default=_TC.warmup)
    p.add_argument("--weight-decay", type=float, default=_TC.weight_decay)
    p.add_argument("--schedule", default=_TC.schedule, help="constant (default), two-stage or cosine")
    p.add_argument("--eval-every", type=int, default=_TC.eval_every)
    p.add_argument("--save-every", type=int, default=_TC.save_every)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--device", default=TrainConfig.device, help="cpu or cuda")
    p.add_argument("--threads", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest step")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    out = Path(args.out or f"{DEFAULT_RUNS}/finetune-{args.method}")
    if not args.resume and out.exists() and any(out.iterdir()):
        if not args.force:
            raise ConfigError(f"{out} already exists; pass --resume to continue it or --force to replace it")
        shutil.rmtree(out)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    lora = LoRAConfig(r=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=targets).validate()
    template = read_template_file(args.chat_template) if args.chat_template else None
    tc = sft_train_config(**{k: getattr(args, k) for k in (
        "steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup", "weight_decay", "schedule",
        "eval_every", "save_every", "seed", "device")})
    groups = None
    if args.data:
        conversations = [c for path in args.data for c in read_conversations(path)]
    else:
        conversations, groups = default_instructions()
    model, tokenizer = checkpoint.load(args.checkpoint)
    result = sft(model, tokenizer, conversations, tc, method=args.method, lora=lora, heldout=args.heldout,
                 chat_template=template, run_dir=out, resume=args.resume, progress=not args.quiet,
                 base_model=str(Path(args.checkpoint).resolve()), groups=groups)
    if not args.quiet:
        print(describe(result.data))
    before, after = result.heldout_loss_before, result.heldout_loss_after
    if after is not None:
        start = f"{before:.4f} → " if before is not None else ""
        print(f"held-out loss on assistant tokens {start}{after:.4f} (perplexity {perplexity(after):.2f})")
    if args.method == "lora":
        print(f"adapter: {out} (apply it with: generate/chat {args.checkpoint} --adapter {out})")
    else:
        print(f"model: {out} (its latest step)")
    return 0
