"""Packing as a write plan: the packed directory's tensors, each made from a training-form source
only when its turn comes, so `pack`, `import-hf --pack` and `import-gguf` hold about one weight at
a time instead of the whole model.

    plan = packed_plan(config, PackConfig(format="i2"), WeightSource(md.tensor, md.rows))
    write_model_dir(out, config, plan.packing, plan.entries, tokenizer)

Every tensor is made by the code `pack_` runs on a whole model — `PackedBitLinear.from_bitlinear`
on that one layer, the head tables' row quantizers on blocks of rows (their statistics are per
row, so blocks give the same bytes) — so a streamed pack is byte-identical to an in-memory one
(tests/test_streamed_conversions.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .formats import get_format
from .layers import BitLinear
from .model import Transformer
from .pack import linear_shapes, resolve_auto
from .packed_layers import TABLE_HEADS, PackConfig, PackedBitLinear, head_table, head_table_from_weight
from .safetensors_io import PlannedTensor, RowBlocks, row_ranges

HEAD_NAMES = ("embed_tokens.weight", "lm_head.weight")  # the float head / embedding of a model
SMALL = 64  # values; a tensor this small waits as Python numbers (see _Once)
TABLE_PREFIXES = {"embed_tokens.table.": "embed_tokens.weight", "lm_head._table_owned.": "lm_head.weight"}


@dataclass(frozen=True)
class WeightSource:
    """Where the training-form tensors come from, by our state-dict names.

    tensor(name)            one float tensor, whole and validated
    rows(name, start, stop) a block of rows of a 2-D float tensor (None: sliced from `tensor`)
    ternary(layer)          (int8 codes, scale) of a linear layer when the source holds codes
                            already (a packed HF repo, a GGUF file); None: quantize its latent
                            weight as BitLinear does
    """

    tensor: Callable[[str], torch.Tensor]
    rows: Callable[[str, int, int], torch.Tensor] | None = None
    ternary: Callable[[str], tuple[torch.Tensor, float]] | None = None

    def row_blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows) blocks of about 64 MB of fp32 covering a 2-D tensor; a source
        without `rows` reads the tensor once and slices it."""
        whole = None if self.rows is not None else self.tensor(name)
        for a, b in row_ranges(shape[0], int(torch.Size(shape[1:]).numel()) * 4):
            yield a, b, (self.rows(name, a, b) if whole is None else whole[a:b])


@dataclass(frozen=True)
class PackedPlan:
    packing: PackConfig  # with `auto` resolved to the chosen formats
    entries: list[PlannedTensor]  # state-dict order of the packed model


class _Once:
    """Tensors made together (a layer's codes and scale, a table's codes and scales), computed on
    first request and dropped one by one as they are taken.

    The file's 64-byte-aligned order writes every layer's packed bytes before any of the 4-byte
    scales, so each scale waits while ~200 large tensors come and go. Waiting as a tiny torch
    tensor, it would sit in the malloc heap between them and keep the heap from shrinking (the
    2B4T import peaked 1.3 GB higher that way); it waits as Python numbers instead."""

    def __init__(self, make: Callable[[], dict[str, torch.Tensor]]):
        self._make, self._made = make, None

    def take(self, name: str) -> torch.Tensor:
        if self._made is None:
            self._made = {n: (t.tolist(), t.dtype, tuple(t.shape)) if t.numel() <= SMALL else t
                          for n, t in self._make().items()}
        made = self._made.pop(name)
        if isinstance(made, tuple):  # exact: Python floats hold fp32/fp16 values and ints as they are
            values, dtype, shape = made
            return torch.tensor(values, dtype=dtype).reshape(shape)
        return made


def packed_plan(config: ModelConfig, packing: PackConfig, source: WeightSource) -> PackedPlan:
    """The write plan of `config` packed with `packing`, each tensor made from `source` when
    written. Raises ConfigError for an fp model (nothing ternary to pack)."""
    if config.mode == "fp":
        raise ConfigError("a full-precision (fp) model cannot be packed; only b158 and b1 models pack")
    packing = packing.validate()
    with torch.device("meta"):
        train = Transformer(config)
        packing = resolve_auto(packing, linear_shapes(train))
        target = Transformer(config, packing)
    linears = {name: m for name, m in train.named_modules() if isinstance(m, BitLinear)}
    layer_of = {f"{prefix}.{key}": prefix for prefix, m in target.named_modules()
                if isinstance(m, PackedBitLinear) for key in m.state_dict()}
    memos: dict[str, _Once] = {}

    def once(key: str, make: Callable[[], dict[str, torch.Tensor]]) -> _Once:
        if key not in memos:
            memos[key] = _Once(make)
        return memos[key]

    float_head = packing.head not in TABLE_HEADS
    entries = []
    for name, t in target.state_dict().items():
        dtype, shape = t.dtype, tuple(t.shape)
        if name in layer_of:
            prefix = layer_of[name]
            fmt = packing.format_for(linears[prefix].out_features, linears[prefix].in_features)
            memo = once(prefix, lambda p=prefix, f=fmt: _pack_layer(p, linears[p], f, source))
            produce = lambda memo=memo, n=name: memo.take(n)  # noqa: E731
        elif (table := next((p for p in TABLE_PREFIXES if name.startswith(p)), None)) is not None:
            memo = once(table, lambda p=table: _pack_table(p, packing.head, config, source))
            produce = lambda memo=memo, n=name: memo.take(n)  # noqa: E731
        elif name in HEAD_NAMES:
            if float_head and packing.head == "fp16":
                dtype = torch.float16  # a float head is stored at its precision
            produce = lambda n=name, s=shape, d=dtype: RowBlocks(r.to(d) for _, _, r in source.row_blocks(n, s))  # noqa: E731
        else:
            produce = lambda n=name: source.tensor(n).float()  # noqa: E731
        entries.append(PlannedTensor(name, dtype, shape, produce))
    return PackedPlan(packing, entries)


def plan_state(entries: list[PlannedTensor]) -> dict[str, torch.Tensor]:
    """A plan made whole, as a state dict for `load_state_dict(assign=True)` (the in-memory loaders:
    load_hf, load_gguf); an fp16 head is widened to the fp32 the model computes in."""
    state = {}
    for e in entries:
        made = e.produce()
        t = torch.cat(list(made)) if isinstance(made, RowBlocks) else made
        state[e.name] = t.float() if t.dtype == torch.float16 and e.name in HEAD_NAMES else t
    return state


def _pack_layer(prefix: str, meta: BitLinear, fmt: str, source: WeightSource) -> dict[str, torch.Tensor]:
    """One linear layer packed, its tensors under their full names."""
    if source.ternary is not None:
        codes, scale = source.ternary(prefix)
        state = {f"{prefix}.packed": torch.from_numpy(get_format(fmt).pack(codes.numpy())),
                 f"{prefix}.weight_scale": torch.tensor([scale], dtype=torch.float32)}
        for key in meta.state_dict():  # the layer's other tensors (bias, inner norm), if any
            if key != "weight":
                state[f"{prefix}.{key}"] = source.tensor(f"{prefix}.{key}").float()
        return state
    layer = copy.deepcopy(meta)  # on the meta device: no memory until its own tensors arrive
    layer.load_state_dict({key: source.tensor(f"{prefix}.{key}").float() for key in meta.state_dict()},
                          assign=True)
    packed = PackedBitLinear.from_bitlinear(layer, fmt)
    return {f"{prefix}.{key}": t for key, t in packed.state_dict().items()}


def _pack_table(prefix: str, head: str, config: ModelConfig, source: WeightSource) -> dict[str, torch.Tensor]:
    """A quantized head table made block by block from the float weight it replaces."""
    rows, dim = config.vocab_size, config.hidden_size
    table: nn.Module = head_table(head, rows, dim)  # preallocated; filled a block of rows at a time
    for a, b, block in source.row_blocks(TABLE_PREFIXES[prefix], (rows, dim)):
        for key, value in head_table_from_weight(head, block.float()).state_dict().items():
            getattr(table, key)[a:b] = value
    return {f"{prefix}{key}": value for key, value in table.state_dict().items()}
