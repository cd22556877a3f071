"""Preallocated key/value caches, and attention over them.

`KVCache` holds a batch of sequences that advance together (one shared offset): the model writes
each layer's new keys and values at [offset, offset + T) and attends over [0, offset + T); after the
whole forward it calls `advance(T)`. `SlotKVCache` holds independent sequences in slots, each with
its own length, for continuous batching: `bind(slots)` names which slot each row of the next
forward belongs to — one sequence's prefill, or one new token for each of several sequences at
their own positions; `bind_rows(segments)` lays several sequences' next tokens side by side in one
row (new tokens of decoding sequences beside prompt chunks). Preallocation keeps decode free of reallocation and makes the memory it takes
known up front.

The caches own attention (`attend`) because only they know where each row's keys live; every path
calls `scaled_dot_product_attention` with the same shapes for the same sequence, so a sequence
decoded alone or beside others computes the same floats. A cache may store fp16 (`kv_torch_dtype`,
`runner.set_kv_dtype`): keys and values are rounded as they are stored, and attention widens
them back to the query's dtype, as the native step does. A q8 cache (int8 tables) stores each
position of each KV head as int8 codes and one fp32 scale, quantized like the activations
(`quant.absmax_int8_per_token`), and attention reads code × scale: the native step's bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import ModelConfig, check_kv_dtype
from .errors import ConfigError
from .quant import absmax_int8_per_token
from .slots import SlotLengths, check_room, check_segments

TORCH_KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "q8": torch.int8}


def kv_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KV cache dtype name (config.KV_DTYPES)."""
    return TORCH_KV_DTYPES[check_kv_dtype(name)]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """q [B, H, T, hd] at positions [past, past + T) over k, v [B, Hkv, past + T, hd]."""
    if k.dtype != q.dtype:  # an fp16 cache: attention computes in the query's precision
        k, v = k.to(q.dtype), v.to(q.dtype)
    gqa = k.shape[1] != q.shape[1]
    T = q.shape[2]
    if past == 0 or T == 1:
        # T == 1 attends to everything cached; past == 0 is a plain causal prefix.
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    # a chunk appended to a non-empty cache: query i sees keys [0, past + i]
    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _tables(config: ModelConfig, rows: int, max_len: int, dtype: torch.dtype,
            device: torch.device | str) -> list[torch.Tensor]:
    shape = (rows, config.num_kv_heads, max_len, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]


def _scale_tables(config: ModelConfig, rows: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str) -> list[torch.Tensor] | None:
    """A q8 cache's row scales [rows, kv heads, positions] per layer; None for a float cache."""
    if dtype != torch.int8:
        return None
    return [torch.zeros((rows, config.num_kv_heads, max_len), device=device) for _ in range(config.num_layers)]


def _store(table: torch.Tensor, scales: torch.Tensor | None, index: tuple, x: torch.Tensor) -> None:
    """x [..., hd] into table[index] (index: over rows, heads, positions); q8 quantizes each row."""
    if scales is None:
        table[index] = x
        return
    codes, scale = absmax_int8_per_token(x)
    table[index] = codes
    scales[index] = scale.squeeze(-1)


def _load(table: torch.Tensor, scales: torch.Tensor | None, index: tuple) -> torch.Tensor:
    """table[index]: as stored, or (q8) code × the row's scale in fp32."""
    if scales is None:
        return table[index]
    return table[index].float() * scales[index].unsqueeze(-1)


_ALL = slice(None)


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int = 1, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len or config.max_seq_len
        self.keys = _tables(config, batch_size, self.max_len, dtype, device)
        self.values = _tables(config, batch_size, self.max_len, dtype, device)
        self.key_scales = _scale_tables(config, batch_size, self.max_len, dtype, device)
        self.value_scales = _scale_tables(config, batch_size, self.max_len, dtype, device)
        self.offset = 0

    def positions(self, T: int) -> int:
        """Where the next T positions start (the same for every row)."""
        return self.offset

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, hd] at the current offset; return all keys and values so far."""
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise ConfigError(f"sequence of {end} tokens exceeds the KV cache length {self.max_len}")
        ks, vs = _layer_scales(self, layer)
        _store(self.keys[layer], ks, (_ALL, _ALL, slice(self.offset, end)), k)
        _store(self.values[layer], vs, (_ALL, _ALL, slice(self.offset, end)), v)
        upto = (_ALL, _ALL, slice(0, end))
        return _load(self.keys[layer], ks, upto), _load(self.values[layer], vs, upto)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k, v and attend q over everything cached."""
        past = self.offset
        keys, values = self.update(layer, k, v)
        return _attend(q, keys, values, past)

    def advance(self, n: int) -> None:
        self.offset += n

    def reset(self) -> None:
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _all_tables(self))


def _layer_scales(cache: "KVCache | SlotKVCache", layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if cache.key_scales is None:
        return None, None
    return cache.key_scales[layer], cache.value_scales[layer]


def _all_tables(cache: "KVCache | SlotKVCache") -> list[torch.Tensor]:
    return cache.keys + cache.values + (cache.key_scales or []) + (cache.value_scales or [])


class SlotKVCache(SlotLengths):
    """`slots` independent sequences of up to `max_len` positions each (continuous batching)."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(slots)
        self.max_len = max_len or config.max_seq_len
        self.keys = _tables(config, slots, self.max_len, dtype, device)
        self.values = _tables(config, slots, self.max_len, dtype, device)
        self.key_scales = _scale_tables(config, slots, self.max_len, dtype, device)
        self.value_scales = _scale_tables(config, slots, self.max_len, dtype, device)

    def kv_tables(self) -> list[torch.Tensor]:
        return _all_tables(self)

    def bind(self, slots: Sequence[int]) -> "SlotBatch":
        """The cache as the next forward sees it: row b belongs to slot `slots[b]`."""
        return SlotBatch(self, list(slots))

    def bind_rows(self, segments: Sequence[tuple[int, int]], out_rows: Sequence[int] | None = None) -> "SlotRows":
        """The cache as a forward over one row of tokens made of segments (slot, n): the next n
        tokens of each slot's sequence, side by side (a mixed step: new tokens of decoding
        sequences beside prompt chunks). `out_rows`: the positions in that row whose logits the
        forward returns (all when None)."""
        return SlotRows(self, [(int(s), int(n)) for s, n in segments], out_rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _all_tables(self))


class SlotBatch:
    """One forward's view of a SlotKVCache: a single sequence (any T, e.g. a prefill), or one new
    token (T = 1) for each of several sequences at their own positions."""

    def __init__(self, cache: SlotKVCache, slots: list[int]):
        if not slots or len(set(slots)) != len(slots):
            raise ConfigError(f"a batch needs distinct slots, got {slots}")
        self.cache, self.slots = cache, slots

    def positions(self, T: int) -> int | torch.Tensor:
        """One sequence: where it continues (an int, as KVCache says); several: [B, 1] positions."""
        lengths = [self.cache.lengths[s] for s in self.slots]
        if any(n + T > self.cache.max_len for n in lengths):
            raise ConfigError(f"a sequence would exceed the KV cache length {self.cache.max_len}")
        if len(self.slots) == 1:
            return lengths[0]
        if T != 1:
            raise ConfigError("several sequences advance one token at a time")
        return torch.tensor(lengths, dtype=torch.long).unsqueeze(1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values, lengths = self.cache.keys[layer], self.cache.values[layer], self.cache.lengths
        ks, vs = _layer_scales(self.cache, layer)
        T = q.shape[2]
        outs = []
        for b, s in enumerate(self.slots):
            past = lengths[s]
            _store(keys, ks, (s, _ALL, slice(past, past + T)), k[b])
            _store(values, vs, (s, _ALL, slice(past, past + T)), v[b])
            # the same shapes and call as a lone sequence in a KVCache: the same floats
            upto = (slice(s, s + 1), _ALL, slice(0, past + T))
            outs.append(_attend(q[b:b + 1], _load(keys, ks, upto), _load(values, vs, upto), past))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def advance(self, n: int) -> None:
        for s in self.slots:
            self.cache.lengths[s] += n


class SlotRows:
    """One forward's view of a SlotKVCache for tokens [1, R]: consecutive segments, each the next
    n tokens of one slot's sequence at that sequence's own positions. Attention runs per segment
    with the same shapes and call as that sequence alone in a KVCache (a chunk appended to its
    cached prefix), so each sequence computes what it would alone."""

    def __init__(self, cache: SlotKVCache, segments: list[tuple[int, int]], out_rows: Sequence[int] | None):
        check_segments(segments, cache.slots)
        self.cache, self.segments = cache, segments
        self.rows = sum(n for _, n in segments)
        self.out_rows = None if out_rows is None else list(out_rows)

    def row_slots(self) -> list[int]:
        return [s for s, n in self.segments for _ in range(n)]

    def row_positions(self) -> list[int]:
        return [self.cache.lengths[s] + i for s, n in self.segments for i in range(n)]

    def positions(self, T: int) -> torch.Tensor:
        """[1, R] positions, each row at its own sequence's next position."""
        if T != self.rows:
            raise ConfigError(f"the step binds {self.rows} tokens, the forward has {T}")
        check_room(self.segments, self.cache.lengths, self.cache.max_len)
        return torch.tensor([self.row_positions()], dtype=torch.long)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values, lengths = self.cache.keys[layer], self.cache.values[layer], self.cache.lengths
        ks, vs = _layer_scales(self.cache, layer)
        outs, row = [], 0
        for s, n in self.segments:
            past = lengths[s]
            _store(keys, ks, (s, _ALL, slice(past, past + n)), k[0, :, row:row + n])
            _store(values, vs, (s, _ALL, slice(past, past + n)), v[0, :, row:row + n])
            upto = (slice(s, s + 1), _ALL, slice(0, past + n))
            outs.append(_attend(q[:, :, row:row + n], _load(keys, ks, upto), _load(values, vs, upto), past))
            row += n
        return torch.cat(outs, dim=2)

    def advance(self, n: int) -> None:
        for s, count in self.segments:
            self.cache.lengths[s] += count
