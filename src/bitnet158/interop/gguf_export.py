"""GGUF out: ternary models that upstream llama.cpp's `bitnet` graph runs (and bitnet.cpp's I2_S).

    report = export_gguf("runs/demo/b158", "b158-tq2_0.gguf", type="tq2_0")

Export writes arch "bitnet" with the names its loader asks for (token_embd, output_norm, and per
block attn_norm, attn_q/k/v, attn_sub_norm, attn_output, ffn_norm, ffn_gate/up, ffn_sub_norm,
ffn_down) and the tokenizer's GPT-2-style byte-level BPE keys (interop.gguf_tokenizer: special
tokens, end-of-turn, chat template). That graph hard-codes a SiLU-gated FFN, SubLN norms and a
tied output head (FORMATS §8), so relu², untied, "inner"-norm and biased models are refused instead
of being exported to a graph that would run them wrongly. RoPE: the graph's NEOX rotation is HF's
rotate_half, ours, so q/k need no permutation.

Scales. Our layers hold one fp32 scale per tensor. TQ1_0 / TQ2_0 hold an fp16 absmax per 256
weights; for a per-tensor ternary tensor every block's absmax is that scale, so the export is
exact up to fp16 rounding of the scale (relative error ≤ 2⁻¹¹; `ExportReport.max_scale_rel_error`
measures it). `scale_tensors=True` instead writes blocks of unit codes (d = 1, exact in fp16) and
the fp32 scale as the optional `blk.N.<name>.scale` tensor the bitnet graph multiplies by: exact,
but only readers that honour those tensors get the magnitudes right. I2_S keeps the fp32 scale.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .. import checkpoint
from ..errors import ConfigError
from ..fileio import atomic_output_path
from ..layers import BitLinear
from ..packed_layers import Int8Embedding, PackedBitLinear
from .gguf_common import (ARCH, FILE_TYPE, GGML_TYPE, GGUF_TYPES, I2S_BLOCK, LINEARS, NORMS, PAD_KEY, QK_K,
                          pack_i2s)
from .gguf_header import I2_S
from .gguf_tokenizer import add_gguf_tokenizer

@dataclass
class ExportReport:
    path: Path
    type: str
    tensors: int
    bytes: int
    max_scale_rel_error: float   # max over linear tensors of |fp16(s) − s| / s (0 when exact)
    ffn_padded_to: int | None    # the FFN width written, when it had to be padded to 256
    tokenizer: bool


def _check_exportable(cfg, gtype: str) -> None:
    if gtype not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {gtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    if cfg.activation != "swiglu":
        raise ConfigError(f"a {cfg.activation} model cannot be exported: llama.cpp's bitnet graph hard-codes a "
                          "SiLU-gated FFN and would run it wrongly (no upstream arch has the sub-norms with relu²)")
    if not cfg.tie_embeddings:
        raise ConfigError("an untied model cannot be exported: llama.cpp's bitnet graph always reads the output "
                          "from token_embd (tied embeddings)")
    if cfg.norm_placement != "subln" or not cfg.sub_norm:
        raise ConfigError("only SubLN models (block norms plus attn/ffn sub-norms) map to llama.cpp's bitnet graph")
    if cfg.qkv_bias:
        raise ConfigError("llama.cpp's bitnet graph has no q/k/v biases; this model has them")
    if cfg.mode == "fp" and gtype != "f16":
        raise ConfigError(f"an fp (full-precision) model has no ternary weights for {gtype}; use --type f16")
    if gtype in ("tq1_0", "tq2_0") and cfg.hidden_size % QK_K:
        raise ConfigError(f"{gtype} needs hidden_size to be a multiple of {QK_K}, got {cfg.hidden_size}")


def _linear_weights(module) -> tuple[np.ndarray | None, float | None, np.ndarray | None]:
    """(int8 codes [out, in], scale) of a BitLinear / PackedBitLinear, or (None, None, fp weight)."""
    if isinstance(module, PackedBitLinear):
        return module.codes().numpy().astype(np.int8), float(module.weight_scale), None
    if isinstance(module, BitLinear):
        if module.mode == "fp":
            return None, None, module.weight.detach().float().numpy()
        codes, scale = module.quantized_weight()
        return codes.numpy().astype(np.int8), float(scale), None
    raise ConfigError(f"unexpected layer type {type(module).__name__} in the model")


def _embedding(model) -> np.ndarray:
    emb = model.embed_tokens
    if isinstance(emb, Int8Embedding):  # a quantized head: its rows as the embedding lookups give them
        return emb.table.embed(torch.arange(emb.table.qweight.shape[0])).numpy()
    return emb.weight.detach().float().numpy()


def _quantize_ternary(codes: np.ndarray, scale: float, gtype: str, unit: bool) -> np.ndarray:
    """Byte rows [out, in/256·size] (TQ) or the flat I2_S bytes of codes · scale."""
    if gtype == "i2_s":
        return pack_i2s(codes, scale)
    qtype = gguf.GGMLQuantizationType.TQ2_0 if gtype == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    # gguf-py takes d = absmax per 256-block: exactly `scale` (or 1 with unit codes), stored in fp16
    values = codes.astype(np.float32) * np.float32(1.0 if unit else scale)
    return gguf.quants.quantize(values, qtype)


def export_gguf(ckpt_or_model, out_path: str | os.PathLike, type: str = "tq2_0", *, tokenizer=None,
                overwrite: bool = False, scale_tensors: bool = False, embedding: str = "f16") -> ExportReport:
    """Write a GGUF that llama.cpp's `bitnet` graph runs. `ckpt_or_model`: a checkpoint directory
    (model, training run or packed) or a Transformer (training form or packed). `type`: tq2_0,
    tq1_0, i2_s (bitnet.cpp only) or f16. `embedding`: f16 (default) or f32 token_embd."""
    gtype = type.lower() if isinstance(type, str) else type
    if embedding not in ("f16", "f32"):
        raise ConfigError(f"embedding must be f16 or f32, got {embedding!r}")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise ConfigError(f"{out_path} already exists (pass overwrite=True / --force to replace it)")
    if out_path.is_dir():
        raise ConfigError(f"{out_path} is a directory; give a .gguf file path")
    if isinstance(ckpt_or_model, (str, os.PathLike)):
        model, loaded_tok = checkpoint.load(ckpt_or_model)
        tokenizer = tokenizer or loaded_tok
    else:
        model = ckpt_or_model
    cfg = model.config
    _check_exportable(cfg, gtype)
    ternary = gtype in ("tq1_0", "tq2_0", "i2_s")
    ffn = cfg.intermediate_size
    ffn_out = -(-ffn // QK_K) * QK_K if gtype in ("tq1_0", "tq2_0") else ffn
    if gtype == "i2_s":
        for dims in ((cfg.hidden_size, cfg.hidden_size), (ffn, cfg.hidden_size)):
            if dims[0] * dims[1] % I2S_BLOCK:
                raise ConfigError(f"i2_s needs every weight's size to be a multiple of {I2S_BLOCK}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_name(out_path.stem)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(ffn_out)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(FILE_TYPE[gtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if ffn_out != ffn:
        writer.add_uint32(PAD_KEY, ffn)
    if tokenizer is not None:
        add_gguf_tokenizer(writer, tokenizer, cfg.vocab_size)
    else:  # llama.cpp accepts a model without a vocabulary; callers then pass token ids
        writer.add_tokenizer_model("no_vocab")

    emb_dtype = np.float16 if embedding == "f16" else np.float32
    writer.add_tensor("token_embd.weight", _embedding(model).astype(emb_dtype))
    writer.add_tensor("output_norm.weight", model.norm.weight.detach().float().numpy())
    worst = 0.0
    for i, block in enumerate(model.layers):
        for ours, stem in NORMS.items():
            w = block.get_submodule(ours).weight.detach().float().numpy()
            if stem == "ffn_sub_norm" and ffn_out != ffn:
                # zero channels added: RMS over ffn_out channels = RMS over ffn · sqrt(ffn/ffn_out),
                # so normalized values grow by sqrt(ffn_out/ffn) and the gain shrinks by the same
                # factor (exact but for eps, which acts as eps · ffn_out/ffn)
                w = np.concatenate([w * np.float32(math.sqrt(ffn / ffn_out)), np.zeros(ffn_out - ffn, np.float32)])
            writer.add_tensor(f"blk.{i}.{stem}.weight", w.astype(np.float32))
        for ours, stem in LINEARS.items():
            codes, scale, fp = _linear_weights(block.get_submodule(ours))
            name = f"blk.{i}.{stem}.weight"
            if ternary:
                codes = _pad_ffn(codes, stem, ffn, ffn_out)
                data = _quantize_ternary(codes, scale, gtype, unit=scale_tensors)
                if gtype == "i2_s":  # gguf-py has no I2_S: give it the logical shape and raw bytes
                    writer.add_tensor(name, data.view(np.int8), raw_shape=codes.shape, raw_dtype=I2_S)
                else:
                    writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(GGML_TYPE[gtype]))
                if scale_tensors and gtype != "i2_s":
                    writer.add_tensor(f"blk.{i}.{stem}.scale", np.array([scale], dtype=np.float32))
                else:
                    stored = float(np.float32(scale).astype(np.float16)) if gtype != "i2_s" else scale
                    worst = max(worst, abs(stored - scale) / scale)
            else:
                w = fp if fp is not None else codes.astype(np.float32) * np.float32(scale)
                writer.add_tensor(name, w.astype(np.float16))
    n_tensors = sum(len(t) for t in writer.tensors)
    with atomic_output_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return ExportReport(out_path, gtype, n_tensors, out_path.stat().st_size, worst,
                        ffn_out if ffn_out != ffn else None, tokenizer is not None)


def _pad_ffn(codes: np.ndarray, stem: str, ffn: int, ffn_out: int) -> np.ndarray:
    """TQ rows must be whole 256-blocks: pad the FFN width with zero weights (gate/up gain zero
    output rows, down gains zero input columns), which changes no output."""
    if ffn_out == ffn:
        return codes
    if stem in ("ffn_gate", "ffn_up"):
        return np.concatenate([codes, np.zeros((ffn_out - ffn, codes.shape[1]), np.int8)], axis=0)
    if stem == "ffn_down":
        return np.concatenate([codes, np.zeros((codes.shape[0], ffn_out - ffn), np.int8)], axis=1)
    return codes
