"""Packing a trained model for the CPU runtime, in place: BitLinear layers become PackedBitLinear
(ternary codes packed 2 or 1.6 bits a weight, one fp32 scale), the output head becomes int8 per
row (or stays float, rounded to its storage precision).

    model, tok = bitnet158.load("runs/demo/b158")
    bitnet158.pack_(model, PackConfig(format="i2"))      # in place; returns the model
    bitnet158.save_packed(model, "runs/demo/b158-i2", tok)

The result is exactly what `Transformer(config, packing=PackConfig(...))` builds, with the trained
values in it; the layers themselves live in packed_layers.py. The head is int8 by default — at the
2B4T shapes an fp16 head would outweigh every ternary weight.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ModelConfig
from .errors import ConfigError
from .formats import get_format
from .layers import BitLinear, RMSNorm, swap_modules
from .model import Transformer
from .packed_layers import (AUTO, Q4_GROUP, TABLE_HEADS, Int8Embedding, Int8Head, Int8Table, PackConfig,
                            PackedBitLinear, Q4Table, head_table_from_weight,
                            float_head_dtype, shape_key)
from .tuning import choose_formats


def linear_shapes(model: nn.Module) -> set[tuple[int, int]]:
    """The distinct (out, in) shapes of the model's BitLinear / PackedBitLinear layers."""
    return {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, (BitLinear, PackedBitLinear))}


def resolve_auto(config: PackConfig, shapes: set[tuple[int, int]]) -> PackConfig:
    """For format ``auto``: time the formats on every (N, K) shape not yet chosen (bitnet158.tuning)
    and return the config with the choice recorded; other configs come back unchanged."""
    if config.format != AUTO:
        return config
    missing = {s for s in shapes if shape_key(*s) not in config.shapes}
    return replace(config, shapes={**config.shapes, **choose_formats(missing)})


@torch.no_grad()
def pack_(model: nn.Module, config: PackConfig | None = None) -> nn.Module:
    """Swap every BitLinear of `model` (in place) for a PackedBitLinear and, for our Transformer,
    the head and embedding for the configured head storage. Returns the model."""
    config = (config or PackConfig()).validate()
    if not any(isinstance(m, BitLinear) for m in model.modules()):
        raise ConfigError("the model has no BitLinear layers to pack")
    config = resolve_auto(config, linear_shapes(model))
    swap_modules(model, lambda _, m: isinstance(m, BitLinear),
                 lambda m: PackedBitLinear.from_bitlinear(m, config.format_for(m.out_features, m.in_features)))
    if isinstance(model, Transformer):
        _pack_head(model, config.head)
        model.packing = config
    return model


def _pack_head(model: Transformer, head: str) -> None:
    tied = model.lm_head is None
    if head in TABLE_HEADS:
        if tied:
            table = head_table_from_weight(head, model.embed_tokens.weight)
            model.embed_tokens = Int8Embedding(table)
            model.lm_head = Int8Head(table, shared=True)
        else:
            model.lm_head = Int8Head(head_table_from_weight(head, model.lm_head.weight))
    else:  # keep a float head; its dtype is what the file stores (fp16 is rounded here too)
        dtype = float_head_dtype(head)
        src = model.embed_tokens if tied else model.lm_head
        src.weight.data = src.weight.data.to(dtype).to(torch.float32)


def packed_linear_bytes(model: nn.Module) -> int:
    return sum(m.packed.numel() for m in model.modules() if isinstance(m, PackedBitLinear))


@torch.no_grad()
def random_packed(config: ModelConfig, pack_config: PackConfig | None = None, seed: int = 0,
                  progress: bool = False) -> Transformer:
    """A packed Transformer with random ternary codes (uniform over {-1, 0, 1}), unit norms and
    a random head, built without ever allocating full-precision linear weights: for speed and
    memory measurements at real shapes (e.g. the 2B4T preset) with no training."""
    pack_config = (pack_config or PackConfig()).validate()
    if config.mode == "fp":
        raise ConfigError("random_packed needs a b158 or b1 config")
    if pack_config.format == AUTO:  # the shapes to time come from a training-form skeleton
        with torch.device("meta"):
            pack_config = resolve_auto(pack_config, linear_shapes(Transformer(config)))
    with torch.device("meta"):
        model = Transformer(config, pack_config)
    rng = np.random.default_rng(seed)
    values = np.array([-1, 1] if config.mode == "b1" else [-1, 0, 1], dtype=np.int8)
    layers = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    for m in tqdm(layers, desc="random packed weights", disable=not progress, leave=False):
        codes = rng.choice(values, size=(m.out_features, m.in_features))
        m.packed = torch.from_numpy(get_format(m.format).pack(codes))
        m.weight_scale = torch.full((1,), 0.02)
        m.bias = None if m.bias is None else torch.zeros(m.out_features)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight = nn.Parameter(torch.ones(module.weight.shape[0]))
    vocab, hidden = config.vocab_size, config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    if pack_config.head in TABLE_HEADS:
        tables = {id(t): t for t in (m for m in model.modules() if isinstance(m, (Int8Table, Q4Table)))}
        for table in tables.values():
            if isinstance(table, Q4Table):
                table.qweight = torch.randint(0, 256, (vocab, hidden // 2), dtype=torch.uint8, generator=gen)
                table.group_scale = torch.full((vocab, hidden // Q4_GROUP), 0.02 / 7, dtype=torch.float16)
            else:
                table.qweight = torch.randint(-127, 128, (vocab, hidden), dtype=torch.int8, generator=gen)
                table.row_scale = torch.full((vocab,), 0.02 / 127)
        if not config.tie_embeddings:
            model.embed_tokens = nn.Embedding(vocab, hidden)
    else:
        dtype = float_head_dtype(pack_config.head)
        model.embed_tokens = nn.Embedding(vocab, hidden, _weight=(torch.randn(vocab, hidden, generator=gen) * 0.02)
                                          .to(dtype).float())
        if not config.tie_embeddings:
            model.lm_head = nn.Linear(hidden, vocab, bias=False)
    model.init_buffers()
    return model
