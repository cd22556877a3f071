"""Hugging Face LLaMA-family directories (full precision) → our Transformer in fp mode.

    model, tokenizer = load_hf_llama("path/to/SmolLM2-135M")     # then train.ternarize.ternarize

Supported: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` — the decoders that are
exactly our block without the BitNet sub-norms: pre-norm RMSNorm, RoPE in the rotate_half layout
(default RoPE only), GQA, a SiLU-gated FFN, tied or separate output head. The import sets
`sub_norm=False`, so the FP model computes what transformers computes (checked against its logits
in tests/test_hf_llama.py); `ternarize` inserts the sub-norms.

Decisions:
- Qwen2's q/k/v biases are kept (`ModelConfig.qkv_bias`): BitLinear and the packed runtime add a
  full-precision bias after the ternary product, so a bias costs nothing in the kernels. LLaMA's
  `attention_bias` (which also biases o_proj) and `mlp_bias` are refused: rare, and not worth a
  second bias option.
- Sliding-window attention (Mistral, Qwen2 with use_sliding_window) equals full causal attention
  on sequences no longer than the window, so the context is capped at the window and the import
  stays exact.
- The context (`max_seq_len`, which sizes RoPE tables and KV caches) is the model's, capped at
  `DEFAULT_MAX_SEQ_LEN` unless asked otherwise: 128k-position tables are wasted on a CPU.
- Weights are read tensor by tensor from model.safetensors or shards listed in
  model.safetensors.index.json (the readers of `interop/hf.py`); pickle files are refused, never
  opened. Every tensor is checked (name, shape, float, finite) and every tensor must be consumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import BitNetError, CheckpointError
from ..model import Transformer
from .hf_common import TensorSource, float_tensor, hf_name, read_json, rope_theta
from .hf_tokenizer import read_hf_tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DEFAULT_MAX_SEQ_LEN = 4096


def is_hf_directory(path: str | os.PathLike) -> bool:
    """True when `path` is a directory whose config.json is a Hugging Face one (it names an
    architecture or model type and is not one of our own checkpoints)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") != "bitnet158" and (
        "architectures" in doc or "model_type" in doc)


def _architecture(doc: dict[str, Any], source: Path | str) -> str:
    archs = doc.get("architectures") or []
    if not archs and doc.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[doc["model_type"]]
    arch = str(archs[0]) if archs else str(doc.get("model_type", "unknown"))
    if arch not in SUPPORTED_ARCHITECTURES:
        hint = " (already BitNet: load it with bitnet158.interop.load_hf)" if arch == "BitNetForCausalLM" else ""
        raise CheckpointError(f"{source}: architecture {arch} cannot be converted{hint}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _sliding_window(doc: dict[str, Any], arch: str) -> int | None:
    window = doc.get("sliding_window")
    if not window:
        return None
    if arch == "Qwen2ForCausalLM":  # Qwen2 stores a window but uses it only when told to
        types = doc.get("layer_types") or []
        if not doc.get("use_sliding_window") and "sliding_attention" not in types:
            return None
    return int(window)


def hf_llama_config(doc: dict[str, Any], source: Path | str = "config.json",
                    max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig (mode fp, no sub-norms) from a LLaMA-family config.json document."""
    arch = _architecture(doc, source)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in doc:
            raise CheckpointError(f"{source}: {key} is missing")
    if doc.get("quantization_config"):
        method = doc["quantization_config"].get("quant_method", "?")
        raise CheckpointError(f"{source}: already quantized ({method}); convert starts from full-precision weights")
    act = doc.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; supported: silu (SwiGLU)")
    if arch == "LlamaForCausalLM" and doc.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias (biases on q/k/v/o_proj) is not supported; "
                              f"only Qwen2's q/k/v biases are")
    if doc.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias is not supported")
    heads, hidden = doc["num_attention_heads"], doc["hidden_size"]
    head_dim = doc.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != hidden:
        raise CheckpointError(f"{source}: head_dim {head_dim} × {heads} heads != hidden_size {hidden} "
                              f"(not supported: our head_dim is hidden_size / heads)")
    context = int(doc.get("max_position_embeddings", 2048))
    window = _sliding_window(doc, arch)
    if window is not None:
        context = min(context, window)  # full attention within the window is sliding-window attention
    if max_seq_len is not None:
        if window is not None and max_seq_len > window:
            raise CheckpointError(f"{source}: max_seq_len {max_seq_len} exceeds the sliding window {window} "
                                  f"(beyond it our full attention would differ)")
        context = max_seq_len
    else:
        context = min(context, DEFAULT_MAX_SEQ_LEN)
    try:
        return ModelConfig(
            vocab_size=doc["vocab_size"], hidden_size=hidden, num_layers=doc["num_hidden_layers"],
            num_heads=heads, num_kv_heads=doc.get("num_key_value_heads") or heads,
            intermediate_size=doc["intermediate_size"], max_seq_len=context,
            rope_theta=rope_theta(doc, source, 10000.0), norm_eps=float(doc.get("rms_norm_eps", 1e-6)),
            activation="swiglu", mode="fp", norm_placement="subln", sub_norm=False,
            qkv_bias=arch == "Qwen2ForCausalLM", tie_embeddings=bool(doc.get("tie_word_embeddings", False)),
        ).validate()
    except BitNetError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_hf_llama(directory: str | os.PathLike, *, max_seq_len: int | None = None):
    """(Transformer in fp mode, Tokenizer or None) from a Hugging Face LLaMA-family directory.

    Weights are read one tensor at a time into fp32 and assigned into a model built on the meta
    device, so each weight is allocated once. The tokenizer is tokenizer.json if present.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    source = directory / "config.json"
    doc = read_json(source)
    config = hf_llama_config(doc, source, max_seq_len)
    src = TensorSource(directory)
    with torch.device("meta"):
        model = Transformer(config)
    tensors: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for name, t in model.state_dict().items():  # our names are HF's minus the "model." prefix
        hf = hf_name(name)
        tensors[name] = float_tensor(src, hf, t.shape)
        consumed.add(hf)
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # a tied head may be saved too
    extra = sorted(n for n in src.names() - consumed - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensor {extra[0]} (config.json has no such weight)")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.init_buffers()
    tokenizer = read_hf_tokenizer(directory, doc)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer.json has {tokenizer.vocab_size} tokens, more than the "
                              f"model's vocab_size {config.vocab_size}")
    return model.eval(), tokenizer
