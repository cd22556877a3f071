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

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import checkpoint
from ..errors import ConfigError
from ..fileio import atomic_output_path
from ..layers import BitLinear
from ..packed_layers import Int8Embedding, PackedBitLinear, head_table
from ..safetensors_io import row_ranges
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
    if cfg.rope_scaling != "none":
        raise ConfigError(f"{cfg.rope_scaling} RoPE scaling cannot be exported: llama.cpp's bitnet graph has "
                          "plain RoPE only")
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
                overwrite: bool = False, scale_tensors: bool = False, embedding: str = "f16",
                progress: bool = False) -> ExportReport:
    """Write a GGUF that llama.cpp's `bitnet` graph runs. `ckpt_or_model`: a checkpoint directory
    (model, training run or packed: streamed, one layer in memory at a time) or a Transformer
    (training form or packed). `type`: tq2_0, tq1_0, i2_s (bitnet.cpp only) or f16. `embedding`:
    f16 (default) or f32 token_embd."""
    gtype = type.lower() if isinstance(type, str) else type
    if embedding not in ("f16", "f32"):
        raise ConfigError(f"embedding must be f16 or f32, got {embedding!r}")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise ConfigError(f"{out_path} already exists (pass overwrite=True / --force to replace it)")
    if out_path.is_dir():
        raise ConfigError(f"{out_path} is a directory; give a .gguf file path")
    if isinstance(ckpt_or_model, (str, os.PathLike)):
        source: _ModelReader | _DirReader = _DirReader(checkpoint.ModelDir(ckpt_or_model))
        tokenizer = tokenizer or source.md.tokenizer()
    else:
        source = _ModelReader(ckpt_or_model)
    cfg = source.config
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

    # Every tensor's name, shape, type and size go into the header first; then each is made,
    # written and dropped in turn.
    plan: list[_GGUFTensor] = []
    emb_dtype = np.float16 if embedding == "f16" else np.float32
    hidden = cfg.hidden_size
    plan.append(_GGUFTensor.array("token_embd.weight", (cfg.vocab_size, hidden), emb_dtype,
                                  lambda: source.embedding(emb_dtype)))
    plan.append(_GGUFTensor.array("output_norm.weight", (hidden,), np.float32,
                                  lambda: source.tensor("norm.weight").float().numpy()))
    worst = [0.0]
    for i in range(cfg.num_layers):
        for ours, stem in NORMS.items():
            width = ffn_out if stem == "ffn_sub_norm" else hidden
            plan.append(_GGUFTensor.array(f"blk.{i}.{stem}.weight", (width,), np.float32,
                                          lambda n=f"layers.{i}.{ours}.weight", s=stem: _norm(source, n, s, ffn, ffn_out)))
        for ours, stem in LINEARS.items():
            name, path = f"blk.{i}.{stem}.weight", f"layers.{i}.{ours}"
            rows, cols = _padded_shape(source.module_shape(path), stem, ffn, ffn_out)
            if not ternary:
                plan.append(_GGUFTensor.array(name, (rows, cols), np.float16,
                                              lambda p=path: _float_linear(source.module(p))))
                continue
            linear = _OneLinear(source, path, stem, ffn, ffn_out, gtype, scale_tensors, worst)
            if gtype == "i2_s":  # gguf-py has no I2_S: the logical shape, the raw bytes as int8
                plan.append(_GGUFTensor(name, (rows, cols), np.dtype(np.int8), rows * cols // 4 + 32, I2_S,
                                        lambda one=linear: one.data().view(np.int8)))
            else:
                qtype = gguf.GGMLQuantizationType(GGML_TYPE[gtype])
                byte_shape = gguf.quants.quant_shape_to_byte_shape((rows, cols), qtype)
                plan.append(_GGUFTensor(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], qtype,
                                        lambda one=linear: one.data()))
            if scale_tensors and gtype != "i2_s":
                plan.append(_GGUFTensor.array(f"blk.{i}.{stem}.scale", (1,), np.float32,
                                              lambda one=linear: np.array([one.scale], dtype=np.float32)))
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, raw_dtype=t.raw_dtype)
    with atomic_output_path(out_path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, unit="tensor", desc="writing", disable=None if progress else True, leave=False):
            data = np.ascontiguousarray(t.produce())
            if data.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: made {data.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(data)
            del data
        writer.close()
    return ExportReport(out_path, gtype, len(plan), out_path.stat().st_size, worst[0],
                        ffn_out if ffn_out != ffn else None, tokenizer is not None)


@dataclass(frozen=True)
class _GGUFTensor:
    """One tensor of the file: its header entry (as gguf-py's add_tensor_info takes it) and how
    to make its data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    raw_dtype: object
    produce: Callable[[], np.ndarray]

    @classmethod
    def array(cls, name: str, shape: tuple[int, ...], dtype, produce: Callable[[], np.ndarray]) -> "_GGUFTensor":
        dtype = np.dtype(dtype)
        return cls(name, shape, dtype, math.prod(shape) * dtype.itemsize, None,
                   lambda: produce().astype(dtype, copy=False))  # no second copy of the embedding


class _OneLinear:
    """A linear layer's GGUF bytes, made when written; the scale it used stays for the optional
    scale tensor written after it."""

    def __init__(self, source, path: str, stem: str, ffn: int, ffn_out: int, gtype: str, unit: bool,
                 worst: list[float]):
        self.source, self.path, self.stem, self.ffn, self.ffn_out = source, path, stem, ffn, ffn_out
        self.gtype, self.unit, self.worst = gtype, unit, worst
        self.scale = 1.0

    def data(self) -> np.ndarray:
        codes, scale, _ = _linear_weights(self.source.module(self.path))
        self.scale = scale
        codes = _pad_ffn(codes, self.stem, self.ffn, self.ffn_out)
        if not (self.unit and self.gtype != "i2_s"):
            stored = float(np.float32(scale).astype(np.float16)) if self.gtype != "i2_s" else scale
            self.worst[0] = max(self.worst[0], abs(stored - scale) / scale)
        return _quantize_ternary(codes, scale, self.gtype, unit=self.unit)


def _float_linear(module) -> np.ndarray:
    codes, scale, fp = _linear_weights(module)
    return fp if fp is not None else codes.astype(np.float32) * np.float32(scale)


def _norm(source, name: str, stem: str, ffn: int, ffn_out: int) -> np.ndarray:
    w = source.tensor(name).float().numpy()
    if stem == "ffn_sub_norm" and ffn_out != ffn:
        # zero channels added: RMS over ffn_out channels = RMS over ffn · sqrt(ffn/ffn_out),
        # so normalized values grow by sqrt(ffn_out/ffn) and the gain shrinks by the same
        # factor (exact but for eps, which acts as eps · ffn_out/ffn)
        w = np.concatenate([w * np.float32(math.sqrt(ffn / ffn_out)), np.zeros(ffn_out - ffn, np.float32)])
    return w


def _padded_shape(shape: tuple[int, int], stem: str, ffn: int, ffn_out: int) -> tuple[int, int]:
    rows, cols = shape
    if stem in ("ffn_gate", "ffn_up"):
        return rows + ffn_out - ffn, cols
    if stem == "ffn_down":
        return rows, cols + ffn_out - ffn
    return rows, cols


class _ModelReader:
    """A model in memory, read by module path."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def module(self, path: str):
        return self.model.get_submodule(path)

    def module_shape(self, path: str) -> tuple[int, int]:
        m = self.model.get_submodule(path)
        return m.out_features, m.in_features

    def tensor(self, name: str) -> torch.Tensor:
        path, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(path), attr).detach()

    def embedding(self, dtype) -> np.ndarray:
        return _embedding(self.model).astype(dtype)


class _DirReader:
    """A model directory read one module at a time: each is its meta-device skeleton with just
    its own tensors loaded, so memory stays near one layer."""

    def __init__(self, md):
        self.md, self.config = md, md.config
        self.skeleton = md.skeleton()

    def module(self, path: str):
        meta = self.skeleton.get_submodule(path)
        module = copy.deepcopy(meta)
        module.load_state_dict({k: self.md.tensor(f"{path}.{k}") for k in meta.state_dict()}, assign=True)
        return module

    def module_shape(self, path: str) -> tuple[int, int]:
        m = self.skeleton.get_submodule(path)
        return m.out_features, m.in_features

    def tensor(self, name: str) -> torch.Tensor:
        return self.md.tensor(name)

    def embedding(self, dtype) -> np.ndarray:
        """The embedding rows (a quantized table's as its lookups give them), a block at a time."""
        rows, dim = self.config.vocab_size, self.config.hidden_size
        out = np.empty((rows, dim), dtype)
        emb = self.skeleton.embed_tokens
        for a, b in row_ranges(rows, dim * 4):
            if isinstance(emb, Int8Embedding):
                table = head_table(self.md.packing.head, b - a, dim)
                table.load_state_dict({k: self.md.rows(f"embed_tokens.table.{k}", a, b) for k in table.state_dict()})
                out[a:b] = table.embed(torch.arange(b - a)).numpy()
            else:
                out[a:b] = self.md.rows("embed_tokens.weight", a, b).float().numpy()
        return out


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
