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

import os
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import BitNetError, CheckpointError, short_repr, shown
from ..jsonio import get_bool, get_dict, get_float, get_int, get_list, get_str, read_json_object
from ..model import Transformer
from .hf_common import TensorSource, float_tensor, hf_name, hf_shape, rope_settings
from .hf_tokenizer import read_hf_tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DEFAULT_MAX_SEQ_LEN = 4096


def is_hf_directory(path: str | os.PathLike) -> bool:
    """True when `path` is a directory whose config.json is a Hugging Face one (it names an
    architecture or model type and is not one of our own checkpoints)."""
    file = Path(path) / "config.json"
    try:
        if not file.is_file():
            return False
        doc = read_json_object(file)
    except (OSError, ValueError, BitNetError):  # unreadable: not recognisably Hugging Face's
        return False
    return doc.get("format") != "bitnet158" and ("architectures" in doc or "model_type" in doc)


def _architecture(doc: dict[str, Any], source: Path | str) -> str:
    archs = get_list(doc, "architectures", source, default=[], items=str)
    model_type = get_str(doc, "model_type", source, default="unknown")
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    arch = archs[0] if archs else model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        hint = " (already BitNet: load it with bitnet158.interop.load_hf)" if arch == "BitNetForCausalLM" else ""
        raise CheckpointError(f"{source}: architecture {shown(arch)} cannot be converted{hint}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _sliding_window(doc: dict[str, Any], arch: str, source: Path | str) -> int | None:
    window = get_int(doc, "sliding_window", source, default=0, lo=0)
    if not window:
        return None
    if arch == "Qwen2ForCausalLM":  # Qwen2 stores a window but uses it only when told to
        types = get_list(doc, "layer_types", source, default=[])
        if not doc.get("use_sliding_window") and "sliding_attention" not in types:
            return None
    return window


def hf_llama_config(doc: dict[str, Any], source: Path | str = "config.json",
                    max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig (mode fp, no sub-norms) from a LLaMA-family config.json document; every
    field is type-checked and bounded, each error naming its key."""
    arch = _architecture(doc, source)
    quant = get_dict(doc, "quantization_config", source, default={})
    if quant:
        raise CheckpointError(f"{source}: already quantized ({short_repr(quant.get('quant_method', '?'))}); "
                              f"convert starts from full-precision weights")
    act = get_str(doc, "hidden_act", source, default="silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {short_repr(act)} is not supported; supported: silu (SwiGLU)")
    if arch == "LlamaForCausalLM" and doc.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias (biases on q/k/v/o_proj) is not supported; "
                              f"only Qwen2's q/k/v biases are")
    if doc.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias is not supported")
    shape = hf_shape(doc, source)
    # no upper bound here: the context is capped below (or replaced by max_seq_len)
    context = get_int(doc, "max_position_embeddings", source, default=2048, lo=1)
    window = _sliding_window(doc, arch, source)
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
            **shape, max_seq_len=context, **rope_settings(doc, source, 10000.0),
            norm_eps=get_float(doc, "rms_norm_eps", source, default=1e-6, positive=True),
            activation="swiglu", mode="fp", norm_placement="subln", sub_norm=False,
            qkv_bias=arch == "Qwen2ForCausalLM",
            tie_embeddings=get_bool(doc, "tie_word_embeddings", source, default=False),
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
    doc = read_json_object(source)
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
        raise CheckpointError(f"{directory}: unexpected tensor {shown(extra[0])} (config.json has no such weight)")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.init_buffers()
    tokenizer = read_hf_tokenizer(directory, doc)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer.json has {tokenizer.vocab_size} tokens, more than the "
                              f"model's vocab_size {config.vocab_size}")
    return model.eval(), tokenizer
