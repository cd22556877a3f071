"""A torch `Transformer` as generation's `Runner`: token lists in, float32 numpy logits out.

Generation, chat and the batching engine speak only `runner.Runner`, so they run the same on a
torch model and on the torch-free runtime (`bitnet158.runtime`). This adapter is where torch
meets them: it makes the torch caches, runs the forward with autograd off, and hands back the
logits as numpy (a view, no copy, for fp32 on the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .cache import KVCache, SlotKVCache, kv_torch_dtype
from .config import ModelConfig


def _numpy(logits: torch.Tensor) -> np.ndarray:
    return logits.detach().float().cpu().numpy()


class TorchRunner:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config: ModelConfig = model.config
        self.kv_dtype = "fp32"  # what new caches store (config.KV_DTYPES); runner.set_kv_dtype sets it

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size=1, max_len=max_len, dtype=kv_torch_dtype(self.kv_dtype),
                       device=self._device())

    def new_slot_cache(self, slots: int, max_len: int) -> SlotKVCache:
        return SlotKVCache(self.config, slots, max_len, dtype=kv_torch_dtype(self.kv_dtype), device=self._device())

    @torch.no_grad()
    def logits(self, tokens: Sequence[int], cache: Any, *, all_logits: bool = True) -> np.ndarray:
        if self.model.training:
            self.model.eval()
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device())
        return _numpy(self.model(ids, cache, last_only=not all_logits)[0])

    @torch.no_grad()
    def rows_logits(self, tokens: Sequence[int], binding: Any) -> np.ndarray:
        if self.model.training:
            self.model.eval()
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device())
        return _numpy(self.model(ids, binding)[0])

    def worker(self) -> contextlib.AbstractContextManager:
        threads = torch.get_num_threads()  # the starter's setting (use_kernel_threads: 1)

        @contextlib.contextmanager
        def in_worker() -> Iterator[None]:
            torch.set_num_threads(threads)  # OpenMP settings are per thread
            with torch.no_grad():  # so is grad mode
                yield

        return in_worker()
