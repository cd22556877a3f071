"""`bitnet158 info CKPT`: what a checkpoint holds — config, parameter counts, bits, tokenizer.

It reads the headers only (config.json, the tokenizer, the skeleton's shapes): instant and a few
MB of memory at any model size. `load` and the conversions validate the tensors themselves."""

from __future__ import annotations

import argparse

from ..checkpoint import ModelDir
from ..config import kv_cache_bytes
from ..pack import packed_linear_bytes
from .common import directory_megabytes

NAME = "info"
HELP = "what a checkpoint holds: config, parameter counts, bits, tokenizer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")


def run(args: argparse.Namespace) -> int:
    md = ModelDir(args.checkpoint)
    md.check_headers()
    model, tokenizer = md.skeleton(), md.tokenizer()  # meta device: shapes, no weights
    cfg, stats = model.config, model.stats()
    print(f"checkpoint      {md.path}  ({directory_megabytes(md.path):.1f} MB on disk)")
    if model.packing is not None:
        packed = packed_linear_bytes(model)
        print(f"packed          format {model.packing.describe()}, head {model.packing.head}; linear weights "
              f"{packed / 1e6:.2f} MB ({8 * packed / stats['linear_parameters']:.2f} bits each)")
    print(f"mode            {cfg.mode}  (linear weights: {stats['linear_weight_bits']:.2f} bits each)")
    print(f"architecture    {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads} kv, ffn {cfg.intermediate_size} {cfg.activation}, norms {cfg.norm_placement}, "
          f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings, context {cfg.max_seq_len}")
    print(f"parameters      {stats['parameters']:,} total; {stats['linear_parameters']:,} in BitLinear "
          f"layers ({stats['linear_weight_megabytes']:.2f} MB at {stats['linear_weight_bits']:.2f} bits); "
          f"{stats['embedding_parameters']:,} embedding")
    position, context = kv_cache_bytes(cfg, 1, 1, "fp32"), kv_cache_bytes(cfg, 1, cfg.max_seq_len, "fp32")
    print(f"KV cache        {position / 1e3:.1f} KB a position in fp32 ({context / 1e6:,.0f} MB for the full context "
          f"of one sequence), half that with --kv-cache fp16")
    if tokenizer is None:
        print("tokenizer       none")
    else:
        bos = f"bos {tokenizer.bos_token}" + (" (added to prompts)" if tokenizer.add_bos else "") \
            if tokenizer.bos_token else "no bos"
        template = "chat template" if tokenizer.chat_template else "no chat template"
        print(f"tokenizer       {tokenizer.vocab_size} tokens (byte-level BPE); {bos}; ends on "
              f"{', '.join(tokenizer.end_tokens)}; {template}")
    return 0
