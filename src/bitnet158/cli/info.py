"""`bitnet158 info CKPT`: what a checkpoint holds — config, parameter counts, bits, tokenizer.

It reads the headers only (config.json, the tokenizer, the safetensors header): instant and a few
MB of memory at any model size. With torch installed every tensor's name, shape and dtype is
checked against the model the config describes (`ModelDir.check_headers`); without torch the
header is parsed and bounds-checked, and the runtime checks the tensors themselves when it loads
them. Counts come from the config's shapes (`config.parameter_counts`) either way."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, kv_cache_bytes, parameter_counts
from ..errors import CheckpointError, first_line
from ..pack_config import PackConfig
from ..runtime import torch_installed
from ..tokenizer import Tokenizer
from .common import directory_megabytes

NAME = "info"
HELP = "what a checkpoint holds: config, parameter counts, bits, tokenizer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")


@dataclass
class Facts:
    path: Path
    config: ModelConfig
    packing: PackConfig | None
    packed_bytes: int  # bytes of the packed linear weights (0 for the training form)
    tokenizer: Tokenizer | None


def _with_torch(path: str) -> Facts:
    from ..checkpoint import ModelDir
    from ..pack import packed_linear_bytes

    md = ModelDir(path)
    md.check_headers()
    model = md.skeleton()  # meta device: shapes, no weights
    packed = packed_linear_bytes(model) if model.packing is not None else 0
    return Facts(md.path, model.config, model.packing, packed, md.tokenizer())


def _from_headers(path: str) -> Facts:
    from ..checkpoint.layout import WEIGHTS, model_config, packing_config, read_config_document, read_tokenizer, resolve
    from ..safetensors_header import read_header

    directory = resolve(path)
    doc = read_config_document(directory)
    config, packing = model_config(directory, doc), packing_config(directory, doc)
    file = directory / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{file}: missing")
    try:
        header = read_header(file)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({first_line(e)})") from None
    packed = sum(e.end - e.begin for name, e in header.entries.items() if name.endswith(".packed"))
    return Facts(directory, config, packing, packed, read_tokenizer(directory, doc, config.vocab_size))


def run(args: argparse.Namespace) -> int:
    facts = _with_torch(args.checkpoint) if torch_installed() else _from_headers(args.checkpoint)
    cfg, stats, tokenizer = facts.config, parameter_counts(facts.config), facts.tokenizer
    print(f"checkpoint      {facts.path}  ({directory_megabytes(facts.path):.1f} MB on disk)")
    if facts.packing is not None:
        print(f"packed          format {facts.packing.describe()}, head {facts.packing.head}; linear weights "
              f"{facts.packed_bytes / 1e6:.2f} MB ({8 * facts.packed_bytes / stats['linear_parameters']:.2f} bits each)")
    print(f"mode            {cfg.mode}  (linear weights: {stats['linear_weight_bits']:.2f} bits each)")
    print(f"architecture    {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads} kv, ffn {cfg.intermediate_size} {cfg.activation}, norms {cfg.norm_placement}, "
          f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings, context {cfg.max_seq_len}")
    print(f"parameters      {stats['parameters']:,} total; {stats['linear_parameters']:,} in BitLinear "
          f"layers ({stats['linear_weight_megabytes']:.2f} MB at {stats['linear_weight_bits']:.2f} bits); "
          f"{stats['embedding_parameters']:,} embedding")
    position, context = kv_cache_bytes(cfg, 1, 1, "fp32"), kv_cache_bytes(cfg, 1, cfg.max_seq_len, "fp32")
    print(f"KV cache        {position / 1e3:.1f} KB a position in fp32 ({context / 1e6:,.0f} MB for the full context "
          f"of one sequence); --kv-cache fp16 {kv_cache_bytes(cfg, 1, 1, 'fp16') / 1e3:.1f} KB, "
          f"q8 {kv_cache_bytes(cfg, 1, 1, 'q8') / 1e3:.1f} KB")
    if tokenizer is None:
        print("tokenizer       none")
    else:
        bos = f"bos {tokenizer.bos_token}" + (" (added to prompts)" if tokenizer.add_bos else "") \
            if tokenizer.bos_token else "no bos"
        template = "chat template" if tokenizer.chat_template else "no chat template"
        print(f"tokenizer       {tokenizer.vocab_size} tokens (byte-level BPE); {bos}; ends on "
              f"{', '.join(tokenizer.end_tokens)}; {template}")
    return 0
