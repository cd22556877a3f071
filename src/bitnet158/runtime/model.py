"""A packed model run by the compiled forward step alone: no torch, numpy arrays in and out.

`NativeModel` is a `runner.Runner`, so `stream_generate`, `chat` and the batching engine run it
exactly as they run a torch `Transformer`: the step is the same C++ (`csrc/forward_step.cpp`) the
torch path calls for packed models, over the same bytes, with the same RoPE tables and RMSNorm
lane width, so greedy output matches the torch path token for token. A float head (fp16/fp32)
is the one matmul left outside the step, done here in numpy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import native
from ..config import ModelConfig, check_kv_dtype
from ..errors import ConfigError
from ..pack_config import TABLE_HEADS, PackConfig
from ..rope import rope_arrays
from ..slots import SlotLengths, check_room, check_segments
from .weights import PackedDir, TensorFile

# The native RMSNorm sums a row in lanes of this many floats. With torch present the step uses the
# width that reproduces torch's rounding on this machine (found by a check against torch); torch
# 2.13 sums in 8-float lanes on every CPU measured (AVX2 and AVX-512 alike), so without torch the
# runtime takes 8 and rounds as the torch path does.
NORM_WIDTH = 8


def _table(t: TensorFile, prefix: str, key: str, head: str, rows: int, dim: int) -> dict[str, np.ndarray]:
    """An int8 or q4 table (head or tied embedding) as the step's spec names it."""
    if head == "q4":
        return {key + "_q4": t.take(prefix + "qweight", (rows, dim // 2), ("U8",)),
                key + "_q4_scale": t.take(prefix + "group_scale", (rows, dim // 32), ("F16",)).view(np.uint16)}
    return {key + "_q": t.take(prefix + "qweight", (rows, dim), ("I8",)),
            key + "_row_scale": t.take(prefix + "row_scale", (rows,))}


def _spec(d: PackedDir) -> tuple[dict[str, Any], np.ndarray | None]:
    """The step's spec from the directory's tensors, and the float head's weight [vocab, hidden]
    when the head is not a quantized table (then the step returns final-normed rows)."""
    cfg, packing, t = d.config, d.packing, d.tensors
    H, V, A, KV, F = (cfg.hidden_size, cfg.vocab_size, cfg.num_heads * cfg.head_dim,
                      cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size)
    subln, inner = cfg.norm_placement == "subln", cfg.norm_placement == "inner"
    float_dtypes = ("F32", "F16") if packing.head == "fp16" else ("F32",)

    def norm(name: str, dim: int, present: bool) -> np.ndarray | None:
        return t.take(name, (dim,)) if present else None

    def linear(prefix: str, n: int, k: int, bias: bool = False) -> dict[str, Any]:
        fmt = packing.format_for(n, k)
        return {"fmt": fmt, "N": n, "K": k, "packed": t.packed(prefix + ".packed", fmt, n, k),
                "scale": t.take(prefix + ".weight_scale", (1,)),
                "bias": t.take(prefix + ".bias", (n,)) if bias else None,
                "norm": t.take(prefix + ".norm.weight", (k,)) if inner else None}

    cos, sin = rope_arrays(cfg)
    spec: dict[str, Any] = {
        "hidden": H, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "inter": F, "vocab": V, "max_pos": cfg.max_seq_len, "relu2": cfg.activation == "relu2",
        "eps": float(cfg.norm_eps), "norm_width": NORM_WIDTH, "final_norm": t.take("norm.weight", (H,)),
        "rope_cos": cos, "rope_sin": sin,
    }
    table = packing.head in TABLE_HEADS
    head_weight = None
    if table and cfg.tie_embeddings:  # one table serves both ends
        embed = _table(t, "embed_tokens.table.", "embed", packing.head, V, H)
        spec.update(embed)
        spec.update({"head" + key[len("embed"):]: array for key, array in embed.items()})
    else:
        spec["embed_f32"] = np.ascontiguousarray(t.take("embed_tokens.weight", (V, H), float_dtypes), np.float32)
    if table and not cfg.tie_embeddings:
        spec.update(_table(t, "lm_head._table_owned.", "head", packing.head, V, H))
    elif not table:
        head_weight = (spec["embed_f32"] if cfg.tie_embeddings
                       else np.ascontiguousarray(t.take("lm_head.weight", (V, H), float_dtypes), np.float32))
    blocks = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        blocks.append({
            "input_norm": norm(p + "input_layernorm.weight", H, subln),
            "post_attn_norm": norm(p + "post_attention_layernorm.weight", H, subln),
            "attn_sub_norm": norm(p + "self_attn.attn_sub_norm.weight", A, subln and cfg.sub_norm),
            "ffn_sub_norm": norm(p + "mlp.ffn_sub_norm.weight", F, subln and cfg.sub_norm),
            "q": linear(p + "self_attn.q_proj", A, H, cfg.qkv_bias),
            "k": linear(p + "self_attn.k_proj", KV, H, cfg.qkv_bias),
            "v": linear(p + "self_attn.v_proj", KV, H, cfg.qkv_bias),
            "o": linear(p + "self_attn.o_proj", H, A),
            "gate": linear(p + "mlp.gate_proj", F, H), "up": linear(p + "mlp.up_proj", F, H),
            "down": linear(p + "mlp.down_proj", H, F),
        })
    spec["blocks"] = blocks
    t.finish()
    return spec, head_weight


NUMPY_KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "q8": np.int8}


class NativeCache:
    """One sequence's keys and values (numpy: float32, float16, or int8 codes with a float32 scale
    per row) and how many positions it holds."""

    def __init__(self, config: ModelConfig, max_len: int | None, slots: int = 1, kv_dtype: str = "fp32"):
        self.max_len = max_len or config.max_seq_len
        shape = (slots, config.num_kv_heads, self.max_len, config.head_dim)
        dtype = NUMPY_KV_DTYPES[check_kv_dtype(kv_dtype)]
        self.keys = [np.zeros(shape, dtype) for _ in range(config.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(config.num_layers)]
        self.key_scales = self.value_scales = None
        if kv_dtype == "q8":
            self.key_scales = [np.zeros(shape[:3], np.float32) for _ in range(config.num_layers)]
            self.value_scales = [np.zeros(shape[:3], np.float32) for _ in range(config.num_layers)]
        self.view = native.extension().StepCache(self.keys, self.values, self.key_scales, self.value_scales)
        self.offset = 0

    def reset(self) -> None:
        self.offset = 0

    def tables(self) -> list[np.ndarray]:
        return self.keys + self.values + (self.key_scales or []) + (self.value_scales or [])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tables())


class NativeSlotCache(SlotLengths):
    """`slots` independent sequences (continuous batching), as `cache.SlotKVCache` keeps them."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, kv_dtype: str = "fp32"):
        super().__init__(slots)
        self.store = NativeCache(config, max_len, slots, kv_dtype)
        self.max_len = self.store.max_len

    def kv_tables(self) -> list[np.ndarray]:
        return self.store.tables()

    def bind_rows(self, segments: Sequence[tuple[int, int]], out_rows: Sequence[int] | None = None) -> "NativeRows":
        return NativeRows(self, [(int(s), int(n)) for s, n in segments], out_rows)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes


class NativeRows:
    """One mixed step over a NativeSlotCache: segments (slot, n) side by side."""

    def __init__(self, cache: NativeSlotCache, segments: list[tuple[int, int]], out_rows: Sequence[int] | None):
        check_segments(segments, cache.slots)
        check_room(segments, cache.lengths, cache.max_len)
        self.cache, self.segments = cache, segments
        self.rows = sum(n for _, n in segments)
        self.out_rows = list(range(self.rows)) if out_rows is None else list(out_rows)


class NativeModel:
    """A packed directory's model on the compiled step (see the module docstring)."""

    def __init__(self, packed: PackedDir):
        if native.extension() is None:
            raise ConfigError(f"the torch-free runtime needs the compiled extension ({native.extension_error()}); "
                              f"reinstall with a working C++ compiler, or install torch to use the torch path")
        self.config: ModelConfig = packed.config
        self.packing: PackConfig = packed.packing
        self.path = packed.path
        spec, self._head = _spec(packed)
        self._step = native.extension().StepModel(spec)
        self.kv_dtype = "fp32"  # what new caches store (config.KV_DTYPES); runner.set_kv_dtype sets it

    def __repr__(self) -> str:
        return f"NativeModel({str(self.path)!r}, {self.packing.describe()}, head {self.packing.head})"

    # --- runner.Runner ----------------------------------------------------------------------
    def new_cache(self, max_len: int | None = None) -> NativeCache:
        return NativeCache(self.config, max_len, kv_dtype=self.kv_dtype)

    def new_slot_cache(self, slots: int, max_len: int) -> NativeSlotCache:
        return NativeSlotCache(self.config, slots, max_len, self.kv_dtype)

    def logits(self, tokens: Sequence[int], cache: NativeCache, *, all_logits: bool = True) -> np.ndarray:
        T = len(tokens)
        if cache.offset + T > cache.max_len:
            raise ConfigError(f"sequence of {cache.offset + T} tokens exceeds the KV cache length {cache.max_len}")
        pos = np.arange(cache.offset, cache.offset + T, dtype=np.int32)
        rows = np.arange(T, dtype=np.int32) if all_logits else np.array([T - 1], dtype=np.int32)
        out = self._forward(cache.view, tokens, np.zeros(T, np.int32), pos, rows)
        cache.offset += T
        return out

    def rows_logits(self, tokens: Sequence[int], binding: NativeRows) -> np.ndarray:
        cache = binding.cache
        slots = np.array([s for s, n in binding.segments for _ in range(n)], dtype=np.int32)
        pos = np.array([cache.lengths[s] + i for s, n in binding.segments for i in range(n)], dtype=np.int32)
        out = self._forward(cache.store.view, tokens, slots, pos, np.asarray(binding.out_rows, dtype=np.int32))
        for s, n in binding.segments:
            cache.lengths[s] += n
        return out

    def worker(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the extension's pool serves any thread

    def _forward(self, view: Any, tokens: Sequence[int], slots: np.ndarray, pos: np.ndarray,
                 rows: np.ndarray) -> np.ndarray:
        path = native.current_path()
        if path == native.TORCH_PATH:
            raise ConfigError("BITNET158_KERNEL=torch asks for the torch path, which the torch-free runtime does not have")
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.size and not ((ids >= 0) & (ids < self.config.vocab_size)).all():
            raise ConfigError(f"token ids must lie in [0, {self.config.vocab_size})")
        out = self._step.forward(view, ids, slots, pos, rows, path)
        if self._head is not None:  # a float head: the step returned final-normed rows
            out = out @ self._head.T
        return out
