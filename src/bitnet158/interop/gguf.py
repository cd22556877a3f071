"""GGUF in and out: ternary models that upstream llama.cpp's `bitnet` graph runs, and TQ1_0 /
TQ2_0 / I2_S / F16 / BF16 files of the bitnet archs read back into our packed format.

    report = export_gguf("runs/demo/b158", "b158-tq2_0.gguf", type="tq2_0")
    model = import_gguf("b158-tq2_0.gguf")            # a packed Transformer (i2 codes, fp16 head)

Export writes arch "bitnet" with the names its loader asks for (token_embd, output_norm, and per
block attn_norm, attn_q/k/v, attn_sub_norm, attn_output, ffn_norm, ffn_gate/up, ffn_sub_norm,
ffn_down) and the GPT-2-style byte-level BPE keys (tokenizer.ggml.model "gpt2", pre "gpt-2").
That graph hard-codes a SiLU-gated FFN, SubLN norms and a tied output head (FORMATS §8), so relu²,
untied, "inner"-norm and biased models are refused instead of being exported to a graph that
would run them wrongly. RoPE: the graph's NEOX rotation is HF's rotate_half, ours, so q/k need no
permutation.

Scales. Our layers hold one fp32 scale per tensor. TQ1_0 / TQ2_0 hold an fp16 absmax per 256
weights; for a per-tensor ternary tensor every block's absmax is that scale, so the export is
exact up to fp16 rounding of the scale (relative error ≤ 2⁻¹¹; `ExportReport.max_scale_rel_error`
measures it). `scale_tensors=True` instead writes blocks of unit codes (d = 1, exact in fp16) and
the fp32 scale as the optional `blk.N.<name>.scale` tensor the bitnet graph multiplies by: exact,
but only readers that honour those tensors get the magnitudes right. I2_S keeps the fp32 scale.

Import is strict: a TQ tensor whose non-zero blocks carry different scales is not one ternary
tensor with one scale, and is refused with a line naming it. F16/BF16/F32 linear weights are
taken exactly when they hold only {-s, 0, +s}; otherwise they are absmean-ternarized (a fresh
round-to-nearest conversion, counted in `model.gguf_import["ternarized"]`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BitNetError, CheckpointError, ConfigError, FormatError
from . import gguf_header as gh
from .gguf_header import F16, F32, I2_S, TQ1_0, TQ2_0, GGUFHeader, read_header, type_name

GGUF_TYPES = ("tq2_0", "tq1_0", "i2_s", "f16")
ARCH = "bitnet"
SWIGLU_ARCHS = ("bitnet", "bitnet-b1.58")  # upstream, and bitnet.cpp's 1bitLLM-style arch
RELU2_ARCHS = ("bitnet-25",)               # bitnet.cpp's 2B4T arch (relu² FFN); import only
QK_K = 256
I2S_BLOCK = 128
MAX_CONTEXT = 1 << 18  # a forged context_length must not size the RoPE tables
# llama_ftype values (llama.h): MOSTLY_F16, MOSTLY_TQ1_0, MOSTLY_TQ2_0, and the fork's MOSTLY_I2_S
_FILE_TYPE = {"f16": 1, "tq1_0": 36, "tq2_0": 37, "i2_s": 40}
_GGML_TYPE = {"f16": F16, "tq1_0": TQ1_0, "tq2_0": TQ2_0, "i2_s": I2_S}
PAD_KEY = "bitnet158.feed_forward_length"  # the unpadded FFN width, when export padded it

# our module path (per block) → GGUF tensor stem
_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
_NORMS = {"input_layernorm": "attn_norm", "self_attn.attn_sub_norm": "attn_sub_norm",
          "post_attention_layernorm": "ffn_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class ExportReport:
    path: Path
    type: str
    tensors: int
    bytes: int
    max_scale_rel_error: float   # max over linear tensors of |fp16(s) − s| / s (0 when exact)
    ffn_padded_to: int | None    # the FFN width written, when it had to be padded to 256
    tokenizer: bool


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

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
    from ..layers import BitLinear
    from ..pack import PackedBitLinear

    if isinstance(module, PackedBitLinear):
        return module.codes().numpy().astype(np.int8), float(module.weight_scale), None
    if isinstance(module, BitLinear):
        if module.mode == "fp":
            return None, None, module.weight.detach().float().numpy()
        codes, scale = module.quantized_weight()
        return codes.numpy().astype(np.int8), float(scale), None
    raise ConfigError(f"unexpected layer type {type(module).__name__} in the model")


def _embedding(model) -> np.ndarray:
    from ..pack import Int8Embedding

    emb = model.embed_tokens
    if isinstance(emb, Int8Embedding):  # an int8 head: dequantize rows (codes · row scale)
        return (emb.table.qweight.float() * emb.table.row_scale[:, None]).numpy()
    return emb.weight.detach().float().numpy()


def _quantize_ternary(codes: np.ndarray, scale: float, gtype: str, unit: bool) -> np.ndarray:
    """Byte rows [out, in/256·size] (TQ) or the flat I2_S bytes of codes · scale."""
    import gguf

    if gtype == "i2_s":
        return _pack_i2s(codes, scale)
    qtype = gguf.GGMLQuantizationType.TQ2_0 if gtype == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    # gguf-py takes d = absmax per 256-block: exactly `scale` (or 1 with unit codes), stored in fp16
    values = codes.astype(np.float32) * np.float32(1.0 if unit else scale)
    return gguf.quants.quantize(values, qtype)


def _pack_i2s(codes: np.ndarray, scale: float) -> np.ndarray:
    """bitnet.cpp I2_S, the x86 ACT_PARALLEL layout its Python converter writes (FORMATS §4.3):
    the flattened tensor in 128-value blocks of 32 bytes, byte k holding values k, k+32, k+64, k+96
    in bits 7-6, 5-4, 3-2, 1-0, code = value + 1; then 32 bytes whose first 4 are the fp32 scale."""
    u = (codes.reshape(-1, 4, 32).astype(np.uint8) + 1)          # [block, group, k]
    packed = (u[:, 0] << 6) | (u[:, 1] << 4) | (u[:, 2] << 2) | u[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def _unpack_i2s(data: np.ndarray, n: int, name: str) -> tuple[np.ndarray, float]:
    body = data[:n // 4].reshape(-1, 32)
    u = np.stack([(body >> 6) & 3, (body >> 4) & 3, (body >> 2) & 3, body & 3], axis=1)  # [block, group, k]
    if (u == 3).any():
        raise FormatError(f"tensor {name}: I2_S holds the invalid 2-bit code 3")
    scale = float(data[n // 4:n // 4 + 4].copy().view(np.float32)[0])
    return (u.astype(np.int8) - 1).reshape(-1), scale


def _tokenizer_kv(writer, tokenizer, vocab_size: int) -> None:
    """GPT-2-style byte-level BPE keys. Our pre-tokenizer is ByteLevel with the GPT-2 regex and
    no prefix space, which is llama.cpp's pre-tokenizer "gpt-2"."""
    import gguf

    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    added = set(backend.get_added_tokens_decoder())
    tokens = [f"<|unused_{i}|>" for i in range(vocab_size)]  # rows past the tokenizer: padding
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            tokens[i] = token
            types[i] = (gguf.TokenType.CONTROL if i in special else
                        gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = json.loads(backend.to_str())["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # both tokenizers.json styles
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eos_id)  # GPT-2 convention: <|endoftext|> is both
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(False)            # we never prepend BOS
    writer.add_add_eos_token(False)


def export_gguf(ckpt_or_model, out_path: str | os.PathLike, type: str = "tq2_0", *, tokenizer=None,
                overwrite: bool = False, scale_tensors: bool = False, embedding: str = "f16") -> ExportReport:
    """Write a GGUF that llama.cpp's `bitnet` graph runs. `ckpt_or_model`: a checkpoint directory
    (model, training run or packed) or a Transformer (training form or packed). `type`: tq2_0,
    tq1_0, i2_s (bitnet.cpp only) or f16. `embedding`: f16 (default) or f32 token_embd."""
    import gguf

    from .. import checkpoint
    from ..fileio import atomic_output_path

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
    writer.add_file_type(_FILE_TYPE[gtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if ffn_out != ffn:
        writer.add_uint32(PAD_KEY, ffn)
    if tokenizer is not None:
        _tokenizer_kv(writer, tokenizer, cfg.vocab_size)
    else:  # llama.cpp accepts a model without a vocabulary; callers then pass token ids
        writer.add_tokenizer_model("no_vocab")

    emb_dtype = np.float16 if embedding == "f16" else np.float32
    writer.add_tensor("token_embd.weight", _embedding(model).astype(emb_dtype))
    writer.add_tensor("output_norm.weight", model.norm.weight.detach().float().numpy())
    worst = 0.0
    for i, block in enumerate(model.layers):
        for ours, stem in _NORMS.items():
            w = block.get_submodule(ours).weight.detach().float().numpy()
            if stem == "ffn_sub_norm" and ffn_out != ffn:
                # zero channels added: RMS over ffn_out channels = RMS over ffn · sqrt(ffn/ffn_out),
                # so normalized values grow by sqrt(ffn_out/ffn) and the gain shrinks by the same
                # factor (exact but for eps, which acts as eps · ffn_out/ffn)
                w = np.concatenate([w * np.float32(math.sqrt(ffn / ffn_out)), np.zeros(ffn_out - ffn, np.float32)])
            writer.add_tensor(f"blk.{i}.{stem}.weight", w.astype(np.float32))
        for ours, stem in _LINEARS.items():
            codes, scale, fp = _linear_weights(block.get_submodule(ours))
            name = f"blk.{i}.{stem}.weight"
            if ternary:
                codes = _pad_ffn(codes, stem, ffn, ffn_out)
                data = _quantize_ternary(codes, scale, gtype, unit=scale_tensors)
                if gtype == "i2_s":  # gguf-py has no I2_S: give it the logical shape and raw bytes
                    writer.add_tensor(name, data.view(np.int8), raw_shape=codes.shape, raw_dtype=I2_S)
                else:
                    writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(_GGML_TYPE[gtype]))
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


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------

def _reader_tensors(header: GGUFHeader) -> dict[str, np.ndarray]:
    """Every tensor's raw bytes as a flat uint8 array, through gguf-py's GGUFReader (files with
    bitnet.cpp's I2_S, which gguf-py does not know, are sliced from the checked byte ranges)."""
    path = header.path
    if any(t.ggml_type == I2_S for t in header.tensors.values()):
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        return {n: raw[t.offset:t.offset + t.nbytes] for n, t in header.tensors.items()}
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        out = {}
        for t in reader.tensors:
            out[t.name] = np.asarray(t.data).reshape(-1).view(np.uint8)
    except BitNetError:
        raise
    except Exception as e:  # the header already passed our checks; anything left is gguf-py's own
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FormatError(f"{path}: gguf-py could not read the file ({type(e).__name__}: {line[:200]})") from None
    if set(out) != set(header.tensors):
        raise FormatError(f"{path}: gguf-py and the header disagree on the tensor list")
    for name, entry in header.tensors.items():
        if out[name].size != entry.nbytes:
            raise FormatError(f"{path}: tensor {name} has {out[name].size} bytes, its type and shape say {entry.nbytes}")
    return out


def _kv_int(header: GGUFHeader, key: str, default: int | None = None, limit: int = 1 << 40) -> int:
    value = header.kv.get(key, default)
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 < int(value) <= limit
    if not ok:
        raise FormatError(f"{header.path}: metadata {key} is {str(value)[:40]}; expected a positive integer"
                          + (f" up to {limit}" if limit < 1 << 40 else ""))
    return int(value)


def _kv_float(header: GGUFHeader, key: str, default: float) -> float:
    value = header.kv.get(key, default)
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(float(value)) and float(value) > 0):
        raise FormatError(f"{header.path}: metadata {key} is {str(value)[:40]}; expected a positive number")
    return float(value)


def _config_from_header(header: GGUFHeader):
    from ..config import ModelConfig

    path, kv = header.path, header.kv
    arch = kv.get("general.architecture")
    if arch not in SWIGLU_ARCHS + RELU2_ARCHS:
        raise FormatError(f"{path}: architecture {arch!r} is not a bitnet arch "
                          f"({', '.join(SWIGLU_ARCHS + RELU2_ARCHS)})")
    emb = header.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise FormatError(f"{path}: tensor token_embd.weight is missing or not a matrix")
    vocab, hidden = emb.shape
    layers = _kv_int(header, f"{arch}.block_count")
    if layers * 11 > len(header.tensors):  # 11 tensors per block: bounds the model before it is built
        raise FormatError(f"{path}: {arch}.block_count {layers} needs more tensors than the file's {len(header.tensors)}")
    heads = _kv_int(header, f"{arch}.attention.head_count", limit=hidden)
    kv_heads = _kv_int(header, f"{arch}.attention.head_count_kv", heads, limit=heads)
    ffn = _kv_int(header, f"{arch}.feed_forward_length", limit=1 << 24)
    if _kv_int(header, f"{arch}.embedding_length", hidden) != hidden:
        raise FormatError(f"{path}: {arch}.embedding_length disagrees with token_embd's width {hidden}")
    rope_dims = header.kv.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and _kv_int(header, f"{arch}.rope.dimension_count") != hidden // heads:
        raise FormatError(f"{path}: partial RoPE ({rope_dims} of {hidden // heads} dims) is not supported")
    try:
        cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          num_kv_heads=kv_heads, intermediate_size=ffn,
                          max_seq_len=_kv_int(header, f"{arch}.context_length", 2048, limit=MAX_CONTEXT),
                          rope_theta=_kv_float(header, f"{arch}.rope.freq_base", 10000.0),
                          norm_eps=_kv_float(header, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
                          activation="relu2" if arch in RELU2_ARCHS else "swiglu",
                          tie_embeddings="output.weight" not in header.tensors).validate()
    except ConfigError as e:
        raise FormatError(f"{path}: the metadata describes an impossible model ({e})") from None
    return cfg


def _ternary(header: GGUFHeader, name: str, data: np.ndarray, shape: tuple[int, int],
             scale_tensor: float | None) -> tuple[np.ndarray, float, bool]:
    """(int8 codes [out, in], scale, exact) of one linear tensor."""
    import gguf

    entry = header.tensors[name]
    where = f"{header.path}: tensor {name}"
    if entry.shape != shape:
        raise FormatError(f"{where} has shape {list(entry.shape)}, the metadata implies {list(shape)}")
    n = shape[0] * shape[1]
    exact = True
    if entry.ggml_type in (TQ1_0, TQ2_0):
        qtype = gguf.GGMLQuantizationType(entry.ggml_type)
        size = gh._BLOCKS[entry.ggml_type][1]
        blocks = data.reshape(-1, size)
        d = blocks[:, size - 2:].copy().view(np.float16).reshape(-1).astype(np.float32)
        unit = blocks.copy()
        unit[:, size - 2:] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)  # decode codes, not values
        codes = gguf.quants.dequantize(unit, qtype).reshape(-1, QK_K)
        if (codes > 1).any():
            raise FormatError(f"{where} holds the invalid 2-bit code 3")
        used = d[(codes != 0).any(axis=1)]
        if used.size and not (np.isfinite(used).all() and (used > 0).all()):
            raise FormatError(f"{where} has a non-positive or non-finite block scale")
        if used.size and (used != used[0]).any():
            raise FormatError(f"{where} has different scales per 256-block ({used.min():.6g} to {used.max():.6g}); "
                              "our format holds one scale per tensor, so it cannot be imported exactly")
        scale = float(used[0]) if used.size else 1.0
        codes = codes.astype(np.int8).reshape(shape)
    elif entry.ggml_type == I2_S:
        codes, scale = _unpack_i2s(data, n, name)
        codes = codes.reshape(shape)
    elif entry.ggml_type in (F32, F16, gh.BF16):
        values = gguf.quants.dequantize(np.ascontiguousarray(data).reshape(shape[0], -1),
                                        gguf.GGMLQuantizationType(entry.ggml_type)).reshape(shape)
        if not np.isfinite(values).all():
            raise FormatError(f"{where} holds NaN or infinite values")
        mags = np.unique(np.abs(values[values != 0]))
        if mags.size <= 1:  # already ternary × s: take it as is (absmean would rescale it)
            scale = float(mags[0]) if mags.size else 1.0
            codes = np.sign(values).astype(np.int8)
        else:
            from ..quant import absmean_ternary
            c, s = absmean_ternary(torch.from_numpy(np.ascontiguousarray(values)))
            codes, scale, exact = c.numpy(), float(s), False
    else:
        raise FormatError(f"{where} has type {type_name(entry.ggml_type)}; linear weights must be TQ1_0, TQ2_0, "
                          "I2_S, F16, BF16 or F32")
    if scale_tensor is not None:
        scale *= scale_tensor
    if not (math.isfinite(scale) and scale > 0):
        raise FormatError(f"{where} has scale {scale}; scales must be positive and finite")
    return codes, scale, exact


def _float_tensor(header: GGUFHeader, raw: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    import gguf

    entry = header.tensors.get(name)
    data = raw.get(name)
    if entry is None or data is None:
        raise FormatError(f"{header.path}: tensor {name} is missing")
    if entry.shape != shape:
        raise FormatError(f"{header.path}: tensor {name} has shape {list(entry.shape)}, expected {list(shape)}")
    try:
        qtype = gguf.GGMLQuantizationType(entry.ggml_type)
        values = gguf.quants.dequantize(np.ascontiguousarray(data).reshape(shape[0] if len(shape) > 1 else 1, -1),
                                        qtype)
    except (ValueError, NotImplementedError):
        raise FormatError(f"{header.path}: tensor {name} has type {type_name(entry.ggml_type)}, which cannot be "
                          "read as floats") from None
    values = np.array(values, dtype=np.float32).reshape(shape)  # a writable copy, not a view of the map
    if not np.isfinite(values).all():
        raise FormatError(f"{header.path}: tensor {name} holds NaN or infinite values")
    return values


def _tokenizer_from_header(header: GGUFHeader):
    """Our Tokenizer from GPT-2-style tokenizer.ggml.* keys, or None when the file has another
    kind of vocabulary (SentencePiece) or none."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer

    kv = header.kv
    if kv.get("tokenizer.ggml.model") != "gpt2":
        return None
    tokens, merges = kv.get("tokenizer.ggml.tokens"), kv.get("tokenizer.ggml.merges", [])
    types = kv.get("tokenizer.ggml.token_type")
    eos = kv.get("tokenizer.ggml.eos_token_id")
    if not isinstance(tokens, list) or not isinstance(merges, list) or not isinstance(eos, (int, np.integer)) \
            or isinstance(eos, bool) or not 0 <= int(eos) < len(tokens):
        raise FormatError(f"{header.path}: incomplete GPT-2 tokenizer metadata (tokens, merges, eos_token_id)")
    try:
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
        if kv.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3"):
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:  # gpt-2 and its relatives: ByteLevel's built-in GPT-2 regex
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if types is not None and len(types) == len(tokens):
            specials = [tokens[i] for i in np.flatnonzero(np.asarray(types) == 3)]
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return Tokenizer(backend, eos_token=tokens[int(eos)])
    except BitNetError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for bad merges
        raise FormatError(f"{header.path}: the tokenizer metadata does not make a BPE tokenizer "
                          f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def load_gguf(path: str | os.PathLike, *, format: str = "i2"):
    """(packed Transformer, Tokenizer or None) from a GGUF of the bitnet archs. Linear weights
    become our packed `format` with one fp32 scale each; the embedding keeps its precision (an
    fp16 head for F16/TQ files, fp32 otherwise)."""
    from ..formats import get_format
    from ..model import Transformer
    from ..pack import PackConfig, PackedBitLinear, build_packed_skeleton

    header = read_header(path)
    cfg = _config_from_header(header)
    raw = _reader_tensors(header)
    emb_type = header.tensors["token_embd.weight"].ggml_type
    pack_config = PackConfig(format=format, head="fp16" if emb_type == F16 else "fp32").validate()
    fmt = get_format(format)
    ffn_file = cfg.intermediate_size
    unpadded = header.kv.get(PAD_KEY)
    ffn = int(unpadded) if isinstance(unpadded, (int, np.integer)) and 0 < unpadded < ffn_file else ffn_file
    cfg.intermediate_size = ffn
    with torch.device("meta"):
        model = Transformer(cfg)
    build_packed_skeleton(model, pack_config)

    state: dict[str, torch.Tensor] = {}
    hidden = cfg.hidden_size
    state["embed_tokens.weight"] = torch.from_numpy(_float_tensor(header, raw, "token_embd.weight",
                                                                  (cfg.vocab_size, hidden)))
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = torch.from_numpy(_float_tensor(header, raw, "output.weight",
                                                                 (cfg.vocab_size, hidden)))
    state["norm.weight"] = torch.from_numpy(_float_tensor(header, raw, "output_norm.weight",
                                                          (hidden,)))
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_dim, hidden), "attn_v": (kv_dim, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn_file, hidden), "ffn_up": (ffn_file, hidden),
              "ffn_down": (hidden, ffn_file)}
    norm_dims = {"attn_norm": hidden, "attn_sub_norm": hidden, "ffn_norm": hidden, "ffn_sub_norm": ffn_file}
    consumed = {"token_embd.weight", "output_norm.weight", "output.weight"}
    ternarized = []
    for i in range(cfg.num_layers):
        for ours, stem in _NORMS.items():
            name = f"blk.{i}.{stem}.weight"
            w = _float_tensor(header, raw, name, (norm_dims[stem],))
            if stem == "ffn_sub_norm" and ffn != ffn_file:  # undo the export's padding compensation
                w = w[:ffn] * np.float32(math.sqrt(ffn_file / ffn))
            state[f"layers.{i}.{ours}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
            consumed.add(name)
        for ours, stem in _LINEARS.items():
            name, scale_name = f"blk.{i}.{stem}.weight", f"blk.{i}.{stem}.scale"
            if name not in raw:
                raise FormatError(f"{header.path}: tensor {name} is missing")
            scale_tensor = None
            if scale_name in raw:
                scale_tensor = float(_float_tensor(header, raw, scale_name, (1,))[0])
                consumed.add(scale_name)
            codes, scale, exact = _ternary(header, name, raw[name], shapes[stem], scale_tensor)
            if not exact:
                ternarized.append(name)
            codes = _unpad(codes, stem, ffn, header, name)
            prefix = f"layers.{i}.{ours}"
            module = model.get_submodule(prefix)
            assert isinstance(module, PackedBitLinear)
            state[f"{prefix}.packed"] = torch.from_numpy(fmt.pack(codes))
            state[f"{prefix}.weight_scale"] = torch.tensor([scale], dtype=torch.float32)
            consumed.add(name)
    unknown = sorted(set(header.tensors) - consumed)
    if unknown:
        raise FormatError(f"{header.path}: unexpected tensor {unknown[0]} (not part of the bitnet graph)")
    if pack_config.head == "fp16":
        state["embed_tokens.weight"] = state["embed_tokens.weight"].half().float()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # a name or shape this importer did not anticipate: say so in one line
        raise FormatError(f"{header.path}: tensors do not fit the model ({str(e).splitlines()[0][:200]})") from None
    model.init_buffers()
    model.gguf_import = {"path": str(header.path), "types": sorted({type_name(t.ggml_type)
                                                                    for t in header.tensors.values()}),
                         "ternarized": ternarized}
    return model, _tokenizer_from_header(header)


def _unpad(codes: np.ndarray, stem: str, ffn: int, header: GGUFHeader, name: str) -> np.ndarray:
    if codes.shape[0] > ffn and stem in ("ffn_gate", "ffn_up"):
        extra, codes = codes[ffn:], codes[:ffn]
    elif stem == "ffn_down" and codes.shape[1] > ffn:
        extra, codes = codes[:, ffn:], codes[:, :ffn]
    else:
        return codes
    if extra.any():
        raise FormatError(f"{header.path}: tensor {name}: the padded FFN channels ({PAD_KEY}) are not zero")
    return np.ascontiguousarray(codes)


def import_gguf(path: str | os.PathLike, *, format: str = "i2"):
    """The packed Transformer of a GGUF file (see `load_gguf`, which also returns its tokenizer)."""
    return load_gguf(path, format=format)[0]


def import_gguf_to_dir(path: str | os.PathLike, out: str | os.PathLike, *, format: str = "i2",
                       overwrite: bool = False) -> tuple[Path, Any]:
    """GGUF → a packed bitnet158 directory (via save_packed); returns (directory, model)."""
    from ..checkpoint import save_packed

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    model, tokenizer = load_gguf(path, format=format)
    return save_packed(model, out, tokenizer, overwrite=overwrite), model


__all__ = ["GGUF_TYPES", "ExportReport", "export_gguf", "import_gguf", "load_gguf", "import_gguf_to_dir"]
