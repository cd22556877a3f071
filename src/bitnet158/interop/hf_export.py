"""Our models → Hugging Face `BitNetForCausalLM` directories that `transformers` loads as they are.

    save_hf(model, "out/hf", tokenizer=tok)               # packed ternary (the 2B4T deployment layout)
    save_hf("runs/demo/b158", "out/hf-bf16", layout="bf16")  # latent masters, re-quantized online

Layouts (FORMATS §2.3–2.4):
- **packed** (default): `quantization_config = {quant_method: bitnet, linear_class: autobitlinear,
  quantization_mode: offline}`, as microsoft/bitnet-b1.58-2B-4T. Each projection is uint8
  `[ceil(out/4), in]` (byte r holds rows r, R+r, 2R+r, 3R+r, code = w + 1) and `weight_scale` [1]
  is our dequantization multiplier s = mean|W| unchanged, since autobitlinear multiplies the
  output by it. The integers are exactly the ones our packed runtime uses.
- **bf16**: latent master weights with `quantization_mode: online`, which transformers
  re-quantizes on every forward (absmean ternary, as our BitLinear). From a packed model the
  masters are codes·s/f (f the share of non-zero codes), which re-quantize to the same codes and
  scale (`latent_from_ternary`). An `fp` model (the full-precision twin) exports in this layout
  without `quantization_config`: a plain float BitNet.

What HF BitNet cannot express is refused in one line: binary (b1) weights, per-tensor activation
scales, and the FAQ's norm inside every BitLinear (HF BitNet has only block norms and sub-norms).

The source may be a model in memory or a checkpoint directory. A directory is never loaded as a
model: its tensors are read one by one (plain reads, no mmap), converted and streamed into the output
file (`safetensors_io`), so peak memory stays near the largest tensor. The output directory
appears in one rename.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import quant
from ..checkpoint import ModelDir
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_directory, atomic_write_json
from ..formats import get_format
from ..layers import BitLinear, RMSNorm
from ..model import Transformer
from ..packed_layers import Int8Embedding, Int8Head, PackedBitLinear, Q4Table, dequantize_rows_q4
from ..safetensors_io import PlannedTensor, write_sharded
from .hf_common import OnePacked, hf_name, latent_from_ternary, pack_hf_ternary, rope_document
from .hf_tokenizer import write_hf_tokenizer

LAYOUTS = ("packed", "bf16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = {"packed": "float32", "bf16": "bfloat16"}  # packed: our fp32 floats kept exactly
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_HF_ACT = {"relu2": "relu2", "swiglu": "silu"}


# --- where the tensors come from ------------------------------------------------------------

class _ModelSource:
    """A model in memory: its own modules and state dict (references, no copies)."""

    def __init__(self, model: Transformer):
        self.model, self.label = model, "model"
        self._state = model.state_dict()

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].detach().cpu()


class _CheckpointSource:
    """A checkpoint directory through its ModelDir: the meta skeleton for module types and shapes,
    each tensor read alone (no mmap) and validated when the plan asks for it."""

    def __init__(self, path: str | os.PathLike):
        self.dir = ModelDir(path)
        self.model = self.dir.skeleton()
        self.label = str(self.dir.path)

    def get(self, name: str) -> torch.Tensor:
        return self.dir.tensor(name)


# --- what HF BitNet can express -------------------------------------------------------------

def check_exportable(config: ModelConfig, layout: str) -> None:
    """One-line ConfigError for a model that HF BitNet cannot hold in `layout`."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown Hugging Face layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if config.mode == "b1":
        raise ConfigError("binary (b1) weights have no Hugging Face BitNet form (it is ternary only)")
    if config.mode == "fp" and layout == "packed":
        raise ConfigError("a full-precision (fp) model has no ternary codes to pack; export it with "
                          "layout 'bf16' (--bf16), a plain float BitNet checkpoint")
    if config.norm_placement != "subln":
        raise ConfigError(f"norm_placement {config.norm_placement!r} (an RMSNorm inside every BitLinear) has no "
                          f"Hugging Face BitNet form; only 'subln' exports")
    if not getattr(config, "sub_norm", True):
        raise ConfigError("a model without attn/ffn sub-norms (plain LLaMA) is not a Hugging Face BitNet model; "
                          "convert it to b1.58 first")
    if getattr(config, "qkv_bias", False):
        raise ConfigError("q/k/v biases have no Hugging Face BitNet form (BitNet has no biases)")
    if config.act_quant != "token":
        raise ConfigError(f"act_quant {config.act_quant!r} has no Hugging Face BitNet form (it quantizes "
                          f"activations per token)")
    if layout == "packed":  # transformers unpacks only when 4·rows == out_features exactly
        for name, size in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                           ("num_kv_heads × head_dim", config.num_kv_heads * config.head_dim)):
            if size % 4:
                raise ConfigError(f"{name} {size} is not a multiple of 4, which transformers' packed "
                                  f"BitNet loader needs; export with layout 'bf16' (--bf16)")


# --- the plan: HF tensor name → how to make it ----------------------------------------------

def _packed_codes(source, name: str, module: PackedBitLinear) -> tuple[torch.Tensor, float]:
    packed = source.get(name + ".packed")
    fmt = get_format(module.format)
    bad = fmt.first_invalid_byte(packed.numpy(), module.out_features, module.in_features)
    if bad is not None:
        raise CheckpointError(f"{source.label}: tensor {name}.packed: {bad}")
    scale = float(source.get(name + ".weight_scale").reshape(-1)[0])
    if not (scale > 0 and scale != float("inf")):
        raise CheckpointError(f"{source.label}: tensor {name}.weight_scale is {scale}; scales must be positive")
    codes = torch.from_numpy(fmt.unpack(packed.numpy(), module.out_features, module.in_features))
    return codes, scale


def _latent_codes(source, name: str) -> tuple[torch.Tensor, float]:
    codes, s = quant.absmean_ternary(source.get(name + ".weight"))
    return codes, float(s)


def _table(source, prefix: str, table_module) -> torch.Tensor:
    """A quantized head table back to floats, exactly as its embedding lookups compute it."""
    if isinstance(table_module, Q4Table):
        return dequantize_rows_q4(source.get(prefix + ".qweight"), source.get(prefix + ".group_scale"))
    table = source.get(prefix + ".qweight").float()
    return table.mul_(source.get(prefix + ".row_scale").float().unsqueeze(1))  # in place: one table-sized buffer


def _plan(source, layout: str, dtype: torch.dtype) -> list[PlannedTensor]:
    model, cfg = source.model, source.model.config
    entries: list[PlannedTensor] = []

    def add_float(hf_name: str, shape, make: Callable[[], torch.Tensor]) -> None:
        entries.append(PlannedTensor(hf_name, dtype, tuple(shape), lambda: make().to(dtype)))

    for name, module in model.named_modules():
        if name == "embed_tokens":
            make = ((lambda t=module.table: _table(source, "embed_tokens.table", t)) if isinstance(module, Int8Embedding)
                    else (lambda: source.get("embed_tokens.weight")))
            add_float("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), make)
        elif name == "lm_head" and not cfg.tie_embeddings:
            make = ((lambda t=module.table: _table(source, "lm_head._table_owned", t)) if isinstance(module, Int8Head)
                    else (lambda: source.get("lm_head.weight")))
            add_float("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), make)
        elif isinstance(module, RMSNorm):
            add_float(hf_name(name + ".weight"), module.weight.shape, lambda n=name: source.get(n + ".weight"))
        elif isinstance(module, (BitLinear, PackedBitLinear)):
            weight = hf_name(name + ".weight")
            shape = (module.out_features, module.in_features)
            if isinstance(module, BitLinear):
                if layout == "bf16":  # the masters as they are (fp twin: plain weights)
                    add_float(weight, shape, lambda n=name: source.get(n + ".weight"))
                    continue
                one = OnePacked(lambda n=name: _latent_codes(source, n))
            else:
                one = OnePacked(lambda n=name, m=module: _packed_codes(source, n, m))
                if layout == "bf16":
                    add_float(weight, shape, lambda one=one: latent_from_ternary(one.take_codes(), one.scale()))
                    continue
            entries.append(PlannedTensor(weight, torch.uint8, ((shape[0] + 3) // 4, shape[1]),
                                         lambda one=one: pack_hf_ternary(one.take_codes())))
            add_float(hf_name(name + ".weight_scale"), (1,), lambda one=one: torch.tensor([one.scale()]))
    return entries


# --- the small JSON files -------------------------------------------------------------------

def hf_config_document(config: ModelConfig, layout: str, dtype: str,
                       token_ids: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for transformers' BitNetForCausalLM (what `load_hf` reads back to `config`)."""
    doc: dict[str, Any] = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": _HF_ACT[config.activation],
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        **rope_document(config),
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        **(token_ids or {}),  # the tokenizer's bos and end ids (several end tokens: a list)
        "dtype": dtype, "torch_dtype": dtype,
    }
    if config.mode != "fp":
        doc["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                      "quantization_mode": "offline" if layout == "packed" else "online"}
    return doc


# --- entry point ----------------------------------------------------------------------------

def save_hf(model_or_ckpt: Transformer | str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer=None,
            layout: str = "packed", dtype: str | None = None, chat_template: str | None = None,
            overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a Hugging Face BitNetForCausalLM directory (see the module docstring for layouts).

    `model_or_ckpt` is a Transformer (training form or packed) or a checkpoint directory, whose
    tokenizer is used when `tokenizer` is None. `dtype` is the storage of the float tensors
    (embedding, norms, scales, masters): float32 by default for `packed` (our values exactly),
    bfloat16 for `bf16`. Writes config.json, generation_config.json, model.safetensors (or shards
    and an index beyond `max_shard_bytes`) and, with a tokenizer, tokenizer.json and
    tokenizer_config.json (`chat_template` goes there when given).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    if isinstance(model_or_ckpt, nn.Module):
        if not isinstance(model_or_ckpt, Transformer):
            raise ConfigError(f"save_hf takes a bitnet158 Transformer, got {type(model_or_ckpt).__name__}")
        source = _ModelSource(model_or_ckpt)
    else:
        source = _CheckpointSource(model_or_ckpt)
        if tokenizer is None:
            tokenizer = source.dir.tokenizer()
    config = source.model.config
    check_exportable(config, layout)
    dtype = dtype or DEFAULT_DTYPE[layout]
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    entries = _plan(source, layout, DTYPES[dtype])
    if tokenizer is not None and chat_template is not None:  # the caller's template replaces the saved one
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = chat_template
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_sharded(tmp, entries, max_shard_bytes, metadata={"format": "pt", "producer": "bitnet158"})
        token_ids = write_hf_tokenizer(tokenizer, tmp, config.max_seq_len) if tokenizer is not None else {}
        atomic_write_json(tmp / "config.json", hf_config_document(config, layout, dtype, token_ids))
        atomic_write_json(tmp / "generation_config.json", token_ids)
    return out
