"""A preallocated per-layer key/value cache with one shared offset.

The model writes each layer's new keys and values at [offset, offset + T) and attends over
[0, offset + T); after the whole forward it calls `advance(T)`. Preallocation keeps decode free of
reallocation and makes the memory it takes known up front.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ConfigError


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int = 1, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len or config.max_seq_len
        shape = (batch_size, config.num_kv_heads, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.offset = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, hd] at the current offset; return all keys and values so far."""
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise ConfigError(f"sequence of {end} tokens exceeds the KV cache length {self.max_len}")
        self.keys[layer][:, :, self.offset:end] = k
        self.values[layer][:, :, self.offset:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.offset += n

    def reset(self) -> None:
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
