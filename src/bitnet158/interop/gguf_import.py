"""GGUF in: TQ1_0 / TQ2_0 / I2_S / F16 / BF16 files of the bitnet archs read back into our packed
format, with the file's own tokenizer (special tokens, end-of-turn, chat template).

    model, tokenizer = load_gguf("b158-tq2_0.gguf")             # a packed Transformer (i2 codes)
    report = import_gguf("b158-tq2_0.gguf", "runs/from-gguf")    # our packed directory + what was read

Import is strict: a TQ tensor whose non-zero blocks carry different scales is not one ternary
tensor with one scale, and is refused with a line naming it. F16/BF16/F32 linear weights are
taken exactly when they hold only {-s, 0, +s}; otherwise they are absmean-ternarized (a fresh
round-to-nearest conversion, listed in `GGUFImport.ternarized`). The header, KV section and tensor
infos are bounds-checked (gguf_header) before gguf-py reads the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..checkpoint import write_model_dir
from ..config import ModelConfig
from ..errors import BitNetError, CheckpointError, ConfigError, FormatError, first_line, short_repr, shown
from ..model import Transformer
from ..pack_plan import WeightSource, packed_plan, plan_state
from ..packed_layers import PackConfig
from ..quant import absmean_ternary
from ..tokenizer import Tokenizer
from . import gguf_header as gh
from .gguf_common import LINEARS, MAX_CONTEXT, NORMS, PAD_KEY, QK_K, RELU2_ARCHS, SWIGLU_ARCHS, unpack_i2s
from .gguf_header import F16, F32, I2_S, TQ1_0, TQ2_0, GGUFHeader, read_header, type_name
from .gguf_tokenizer import tokenizer_from_gguf


@dataclass(frozen=True)
class GGUFImport:
    """What an import read: the file, its tensor types, the linear tensors that held floats and
    were ternarized here (empty when every weight came in exactly), and the directory written."""

    path: Path
    types: tuple[str, ...]
    ternarized: tuple[str, ...]
    out: Path | None = None


class _RawTensors:
    """Each tensor's raw bytes as a flat uint8 array, read from the file with plain reads when
    asked for (the header parser has checked every byte range against the file's size): a
    streamed import holds one tensor, and a memory map's touched pages would count as resident
    memory until the end."""

    def __init__(self, header: GGUFHeader):
        self.header = header

    def __contains__(self, name: str) -> bool:
        return name in self.header.tensors

    def get(self, name: str) -> np.ndarray | None:
        return self[name] if name in self else None

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self.header.tensors[name]
        return self._read(name, entry.offset, entry.nbytes)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """The bytes of rows [start, stop) of a matrix (every row of a GGUF tensor is whole blocks)."""
        entry = self.header.tensors[name]
        row_bytes = entry.nbytes // entry.shape[0]
        return self._read(name, entry.offset + start * row_bytes, (stop - start) * row_bytes)

    def _read(self, name: str, offset: int, nbytes: int) -> np.ndarray:
        buf = bytearray(nbytes)
        with open(self.header.path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise FormatError(f"{self.header.path}: tensor {name} runs past the end of the file")
        return np.frombuffer(buf, dtype=np.uint8)


def _kv_int(header: GGUFHeader, key: str, default: int | None = None, limit: int = 1 << 40) -> int:
    value = header.kv.get(key, default)
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 < int(value) <= limit
    if not ok:
        raise FormatError(f"{header.path}: metadata {key} is {short_repr(value)}; expected a positive integer"
                          + (f" up to {limit}" if limit < 1 << 40 else ""))
    return int(value)


def _kv_float(header: GGUFHeader, key: str, default: float) -> float:
    value = header.kv.get(key, default)
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(float(value)) and float(value) > 0):
        raise FormatError(f"{header.path}: metadata {key} is {short_repr(value)}; expected a positive number")
    return float(value)


def _config_from_header(header: GGUFHeader):
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
        codes, scale = unpack_i2s(data, n, name)
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


def _float_tensor(header: GGUFHeader, raw: _RawTensors, name: str, shape: tuple[int, ...],
                  rows: tuple[int, int] | None = None) -> np.ndarray:
    """A float tensor (or rows [start, stop) of a matrix) as fp32, checked for shape and finite values."""
    entry = header.tensors.get(name)
    if entry is None:
        raise FormatError(f"{header.path}: tensor {name} is missing")
    if entry.shape != shape:
        raise FormatError(f"{header.path}: tensor {name} has shape {list(entry.shape)}, expected {list(shape)}")
    if rows is not None:
        data, shape = raw.rows(name, *rows), (rows[1] - rows[0], *shape[1:])
    else:
        data = raw[name]
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


def load_gguf(path: str | os.PathLike, *, format: str = "i2") -> tuple[Transformer, Tokenizer | None]:
    """(packed Transformer, Tokenizer or None) from a GGUF of the bitnet archs. Linear weights
    become our packed `format` with one fp32 scale each; the embedding keeps its precision (an
    fp16 head for F16/TQ files, fp32 otherwise)."""
    model, tokenizer, _ = read_gguf(path, format=format)
    return model, tokenizer


def read_gguf(path: str | os.PathLike, *, format: str = "i2") -> tuple[Transformer, Tokenizer | None, GGUFImport]:
    """`load_gguf` with the report of what was read."""
    plan = _GGUFPlan(path, format)
    state = plan_state(plan.entries)
    with torch.device("meta"):
        model = Transformer(plan.config, plan.packing)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # a name or shape this importer did not anticipate: say so in one line
        raise FormatError(f"{plan.header.path}: tensors do not fit the model ({first_line(e)})") from None
    model.init_buffers()
    return model, plan.tokenizer, plan.report()


def import_gguf(path: str | os.PathLike, out: str | os.PathLike, *, format: str = "i2",
                overwrite: bool = False, progress: bool = False) -> GGUFImport:
    """GGUF → our packed directory `out` (written atomically, one tensor at a time: memory stays
    near the largest tensor), with the file's tokenizer; returns the report of what was read."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    plan = _GGUFPlan(path, format)
    write_model_dir(out, plan.config, plan.packing, plan.entries, plan.tokenizer, overwrite=overwrite,
                    progress=progress)
    return dataclasses.replace(plan.report(), out=out)


class _GGUFPlan:
    """The packed model a GGUF becomes, as a write plan: the header, metadata and tensor list are
    checked now; each tensor is read and converted when its turn comes."""

    def __init__(self, path: str | os.PathLike, format: str):
        self.header = header = read_header(path)
        cfg = _config_from_header(header)
        self.raw = _RawTensors(header)
        emb_type = header.tensors["token_embd.weight"].ggml_type
        self.ffn_file = cfg.intermediate_size
        unpadded = header.kv.get(PAD_KEY)
        self.ffn = ffn = (int(unpadded) if isinstance(unpadded, (int, np.integer)) and 0 < unpadded < self.ffn_file
                          else self.ffn_file)
        self.config = dataclasses.replace(cfg, intermediate_size=ffn)
        self.tokenizer = tokenizer_from_gguf(header)
        self.ternarized: list[str] = []
        self._names = self._gguf_names()
        unknown = sorted(set(header.tensors) - set(self._names.values())
                         - {f"blk.{i}.{stem}.scale" for i in range(cfg.num_layers) for stem in LINEARS.values()})
        if unknown:
            raise FormatError(f"{header.path}: unexpected tensor {shown(unknown[0])} (not part of the bitnet graph)")
        for name in self._names.values():
            if name not in header.tensors:
                raise FormatError(f"{header.path}: tensor {name} is missing")
        packing = PackConfig(format=format, head="fp16" if emb_type == F16 else "fp32").validate()
        plan = packed_plan(self.config, packing, WeightSource(tensor=self._float, rows=self._rows,
                                                              ternary=self._ternary))
        self.packing, self.entries = plan.packing, plan.entries

    def _gguf_names(self) -> dict[str, str]:
        """our tensor (or linear layer) name → the GGUF tensor it comes from."""
        names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
        if not self.config.tie_embeddings:
            names["lm_head.weight"] = "output.weight"
        for i in range(self.config.num_layers):
            names.update({f"layers.{i}.{ours}.weight": f"blk.{i}.{stem}.weight" for ours, stem in NORMS.items()})
            names.update({f"layers.{i}.{ours}": f"blk.{i}.{stem}.weight" for ours, stem in LINEARS.items()})
        return names

    def _shape(self, name: str) -> tuple[int, ...]:
        cfg, hidden = self.config, self.config.hidden_size
        if name in ("embed_tokens.weight", "lm_head.weight"):
            return (cfg.vocab_size, hidden)
        return (self.ffn_file,) if name.endswith("ffn_sub_norm.weight") else (hidden,)

    def _float(self, name: str) -> torch.Tensor:
        w = _float_tensor(self.header, self.raw, self._names[name], self._shape(name))
        if name.endswith("ffn_sub_norm.weight") and self.ffn != self.ffn_file:
            w = w[:self.ffn] * np.float32(math.sqrt(self.ffn_file / self.ffn))  # undo the export's padding compensation
        return torch.from_numpy(np.ascontiguousarray(w))

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(_float_tensor(self.header, self.raw, self._names[name], self._shape(name),
                                              rows=(start, stop)))

    def _ternary(self, layer: str) -> tuple[torch.Tensor, float]:
        name = self._names[layer]
        stem = name.split(".")[2]
        scale_name = name.removesuffix(".weight") + ".scale"
        scale_tensor = (float(_float_tensor(self.header, self.raw, scale_name, (1,))[0])
                        if scale_name in self.raw else None)
        hidden, kv_dim = self.config.hidden_size, self.config.num_kv_heads * self.config.head_dim
        shape = {"attn_q": (hidden, hidden), "attn_k": (kv_dim, hidden), "attn_v": (kv_dim, hidden),
                 "attn_output": (hidden, hidden), "ffn_gate": (self.ffn_file, hidden),
                 "ffn_up": (self.ffn_file, hidden), "ffn_down": (hidden, self.ffn_file)}[stem]
        codes, scale, exact = _ternary(self.header, name, self.raw[name], shape, scale_tensor)
        if not exact:
            self.ternarized.append(name)
        return torch.from_numpy(_unpad(codes, stem, self.ffn, self.header, name)), scale

    def report(self) -> GGUFImport:
        types = tuple(sorted({type_name(t.ggml_type) for t in self.header.tensors.values()}))
        return GGUFImport(Path(self.header.path), types, tuple(self.ternarized))


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


