"""What the Hugging Face importers and exporters share: reading a directory's JSON files and
safetensors weights (one file or shards; pickle refused), our names ⇄ HF's, and HF's packed
ternary layout (uint8 [ceil(out/4), in], FORMATS §2.3) both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import MAX_SHAPE, ROPE_THETA_MAX
from ..errors import CheckpointError, first_line, short_repr, shown
from ..jsonio import get_dict, get_float, get_int, read_json_object
from ..safetensors_io import SafetensorsReader, all_finite

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# 1bitLLM's names for the two SubLN norms; everything else is named as in HF BitNet / LLaMA
ONEBITLLM_NAMES = {"attn_sub_norm": "inner_attn_ln", "ffn_sub_norm": "ffn_layernorm"}



def rope_settings(doc: dict[str, Any], source: Path | str, default: float) -> dict[str, Any]:
    """Our RoPE fields (rope_theta, and rope_scaling with its parameters) from an HF config.json:
    transformers 5 writes rope_parameters, earlier versions rope_theta + rope_scaling. `default` is
    the architecture's own base. Default and Llama 3.1's "llama3" scaling are read; other kinds
    (linear, dynamic, yarn, longrope) are refused in one line."""
    params = get_dict(doc, "rope_parameters", source, default={})
    scaling = get_dict(doc, "rope_scaling", source, default={})
    out: dict[str, Any] = {}
    for key, table in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = table.get("rope_type", table.get("type", "default"))
        if kind == "llama3":
            where = f"{source}: {key}"
            out = {"rope_scaling": "llama3", "rope_factor": get_float(table, "factor", where, positive=True),
                   "rope_low_freq_factor": get_float(table, "low_freq_factor", where, positive=True),
                   "rope_high_freq_factor": get_float(table, "high_freq_factor", where, positive=True),
                   "rope_original_context": get_int(table, "original_max_position_embeddings", where, lo=1)}
        elif kind != "default":
            raise CheckpointError(f"{source}: {key}: rope_type {short_repr(kind)} is not supported "
                                  f"(default and llama3 RoPE are)")
    if doc.get("rope_theta") is not None:
        out["rope_theta"] = get_float(doc, "rope_theta", source, hi=ROPE_THETA_MAX, positive=True)
    else:
        out["rope_theta"] = get_float(params, "rope_theta", f"{source}: rope_parameters", default=default,
                                      hi=ROPE_THETA_MAX, positive=True)
    return out


def rope_document(config) -> dict[str, Any]:
    """config.json's RoPE keys for our ModelConfig, in both spellings (transformers 5 reads
    rope_parameters, older releases rope_theta + rope_scaling)."""
    params: dict[str, Any] = {"rope_type": "default"}
    if config.rope_scaling == "llama3":
        params = {"rope_type": "llama3", "factor": config.rope_factor, "low_freq_factor": config.rope_low_freq_factor,
                  "high_freq_factor": config.rope_high_freq_factor,
                  "original_max_position_embeddings": config.rope_original_context}
    doc: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_parameters": {**params, "rope_theta": config.rope_theta}}
    if config.rope_scaling != "none":
        doc["rope_scaling"] = params
    return doc


# config.json's shape fields → ours; each an integer ≥ 1 under our bound, named by HF's key
_SHAPE_KEYS = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
               ("num_attention_heads", "num_heads"), ("intermediate_size", "intermediate_size"))


def hf_shape(doc: dict[str, Any], source: Path | str) -> dict[str, int]:
    """Our shape fields from an HF config.json, each type-checked and bounded by HF's key name."""
    shape = {ours: get_int(doc, key, source, lo=1, hi=MAX_SHAPE[ours]) for key, ours in _SHAPE_KEYS}
    # 0 or null: as many kv heads as heads (what transformers does)
    kv = get_int(doc, "num_key_value_heads", source, default=0, lo=0, hi=MAX_SHAPE["num_kv_heads"])
    shape["num_kv_heads"] = kv or shape["num_heads"]
    head_dim = get_int(doc, "head_dim", source, default=None, lo=1)
    if head_dim is not None and head_dim * shape["num_heads"] != shape["hidden_size"]:
        raise CheckpointError(f"{source}: head_dim {head_dim} × {shape['num_heads']} heads != "
                              f"hidden_size {shape['hidden_size']} (not supported: our head_dim is "
                              f"hidden_size / heads)")
    return shape


def _shard_name(index: Path, name: str, file: Any) -> str:
    """A shard of the index: a plain file name beside it (never a path that leaves the directory)."""
    if not isinstance(file, str) or not file.isprintable() or Path(file).name != file or file in ("", ".", ".."):
        raise CheckpointError(f"{index}: weight_map entry {short_repr(name)} names {short_repr(file)}; "
                              f"expected a shard file name in the same directory")
    return file


class TensorSource:
    """Name → tensor over one safetensors file or an index of shards, opened lazily, read one
    tensor at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map (expected an object of tensor name → shard file), "
                                      f"got {short_repr(weight_map)}")
            self.files = {name: directory / _shard_name(index, name, file) for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                try:
                    present = file.exists()
                except OSError as e:  # a name too long for the filesystem
                    raise CheckpointError(f"{index}: shard {short_repr(file.name)} cannot be read "
                                          f"({e.strerror or first_line(e)})") from None
                if not present:
                    raise CheckpointError(f"{index}: shard {file.name} is missing")
        elif (directory / SINGLE_FILE).exists():
            single = directory / SINGLE_FILE
            self.files = {name: single for name in self._open(single).keys()}
        else:
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(f"{directory}: only pickle weights ({pickles[0]}); pickle is refused "
                                      f"for safety, convert to safetensors first")
            raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._handles: dict[Path, Any] = {}

    def _open(self, file: Path):
        try:
            return SafetensorsReader(file)
        except (OSError, ValueError) as e:
            first = first_line(e)
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({first})") from None

    def names(self) -> set[str]:
        return set(self.files)

    def _handle(self, name: str) -> tuple[Path, SafetensorsReader]:
        if name not in self.files:
            raise CheckpointError(f"{self.directory}: tensor {shown(name)} is missing")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return file, self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        file, handle = self._handle(name)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            first = first_line(e)
            raise CheckpointError(f"{file}: cannot read tensor {name} ({first})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        file, handle = self._handle(name)
        if name not in handle.keys():
            raise CheckpointError(f"{file}: tensor {shown(name)} is missing (the index names it)")
        return handle.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._handle(name)[1].dtype(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        file, handle = self._handle(name)
        try:
            return handle.get_rows(name, start, stop)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({first_line(e)})") from None


def hf_name(ours: str, names: str = "bitnet") -> str:
    """Our module names are HF's without the `model.` prefix of the decoder stack (1bitLLM renames
    the two sub-norms)."""
    if names == "1bitllm":
        for a, b in ONEBITLLM_NAMES.items():
            ours = ours.replace(f".{a}.", f".{b}.")
    return ours if ours.startswith("lm_head") else "model." + ours


def float_tensor(src: TensorSource, name: str, shape: torch.Size, widen: bool = True,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A float tensor of the source (or rows [start, stop) of it), checked against the shape
    config.json implies and for finite values; widened to fp32 unless `widen` is False."""
    if tuple(src.shape(name)) != tuple(shape):
        raise CheckpointError(f"{src.directory}: tensor {name} has shape {list(src.shape(name))}, "
                              f"config.json implies {list(shape)}")
    if not src.dtype(name).is_floating_point:
        raise CheckpointError(f"{src.directory}: tensor {name} has dtype {src.dtype(name)}, expected a float "
                              f"dtype (config.json says the weights are not packed)")
    t = src.get(name) if rows is None else src.rows(name, *rows)
    if not all_finite(t):
        raise CheckpointError(f"{src.directory}: tensor {name} holds NaN or infinite values")
    return t.float() if widen else t


def unpack_hf_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """HF packed uint8 [ceil(out/4), in] → int8 codes [out, in] in {-1, 0, 1}.

    Rows [i·R, (i+1)·R) are bits 2i+1:2i of the R = ceil(out/4) packed rows, minus 1. A 2-bit
    field of 3 is invalid: ValueError naming its row.

    >>> unpack_hf_ternary(torch.tensor([[0b10100001], [0b00011000]], dtype=torch.uint8), 8).flatten().tolist()
    [0, -1, -1, 1, 1, 0, 1, -1]
    """
    fields = torch.cat([(packed >> (2 * i)) & 3 for i in range(4)], dim=0)[:out_features]
    bad = (fields == 3).nonzero()
    if len(bad):
        raise ValueError(f"row {int(bad[0, 0])} column {int(bad[0, 1])} holds the unused 2-bit code 3")
    return fields.to(torch.int8) - 1


def pack_hf_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] in {-1, 0, 1} → HF packed uint8 [ceil(out/4), in] (the inverse of
    `unpack_hf_ternary`); rows past `out` are padded with code 1, a zero weight.

    >>> codes = torch.tensor([0, -1, -1, 1, 1, 0, 1, -1], dtype=torch.int8).reshape(8, 1)
    >>> [bin(b) for b in pack_hf_ternary(codes).flatten().tolist()]
    ['0b10100001', '0b11000']
    """
    out_features, in_features = codes.shape
    rows = (out_features + 3) // 4
    fields = torch.ones((4 * rows, in_features), dtype=torch.uint8)
    fields[:out_features] = (codes + 1).to(torch.uint8)
    fields = fields.view(4, rows, in_features)  # block i holds rows [i·R, (i+1)·R)
    return fields[0] | (fields[1] << 2) | (fields[2] << 4) | (fields[3] << 6)


def latent_from_ternary(codes: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Latent fp32 weights whose absmean quantization gives back (codes, scale).

    W = codes·s/f with f the share of non-zero codes: mean|W| = s, and W/s = ±1/f rounds and clips
    back to ±1 (zeros stay 0). Plain codes·s would re-quantize to scale s·f.
    """
    nonzero = int(codes.count_nonzero())
    if nonzero == 0:
        return torch.zeros(codes.shape, dtype=torch.float32)
    share = nonzero / codes.numel()
    return codes.float() * (float(scale) / share)


class OnePacked:
    """Reads and unpacks one packed projection once, for the two tensors made from it (codes and
    scale); the codes are dropped as soon as they are taken."""

    def __init__(self, read: Callable[[], tuple[torch.Tensor, float]]):
        self._read, self._codes, self._scale = read, None, None

    def _load(self) -> None:
        if self._scale is None:
            self._codes, self._scale = self._read()

    def take_codes(self) -> torch.Tensor:
        self._load()
        codes, self._codes = self._codes, None
        return codes

    def scale(self) -> float:
        self._load()
        return self._scale
