"""How generation reaches a model: the `Runner` protocol, the adapter for torch models
(`runner_for`), and the runner's choice of KV-cache dtype (`set_kv_dtype`).

Generation, chat and the batching engine speak only to a Runner, so a torch `Transformer` (through
`torch_runner.TorchRunner`) and the torch-free runtime's `NativeModel` run the same way. Nothing
here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .config import ModelConfig, check_kv_dtype


@runtime_checkable
class Runner(Protocol):
    """What generation needs from a model. A cache holds one sequence (`new_cache`: `max_len`,
    `offset`, `reset()`) or many (`new_slot_cache`: slots for the batching engine, `free(slot)`,
    `bind_rows(segments, out_rows)` as `cache.SlotKVCache` has them). Logits come back as float32
    numpy arrays; each forward advances the cache it ran over. New caches store keys and values
    as `kv_dtype` says ("fp32" or "fp16", see `set_kv_dtype`)."""

    config: ModelConfig
    kv_dtype: str

    def new_cache(self, max_len: int | None = None) -> Any: ...

    def logits(self, tokens: Sequence[int], cache: Any, *, all_logits: bool = True) -> np.ndarray:
        """[len(tokens), vocab], or [1, vocab] for the last token when not all_logits."""

    def new_slot_cache(self, slots: int, max_len: int) -> Any: ...

    def rows_logits(self, tokens: Sequence[int], binding: Any) -> np.ndarray:
        """A mixed step: the tokens of `binding`'s segments side by side → [len(out_rows), vocab]."""

    def worker(self) -> AbstractContextManager:
        """Made in the thread that starts a worker, entered in the worker thread (the engine's):
        what the model needs there (torch: the starter's thread count, autograd off)."""


def runner_for(model: Any) -> Runner:
    """`model` as a Runner: itself, or (a torch module) its TorchRunner, made once per model."""
    runner = getattr(model, "__dict__", {}).get("_runner")
    if runner is not None:
        return runner
    if isinstance(model, Runner):
        return model
    from .torch_runner import TorchRunner  # here, not at the top: the torch-free runtime never gets here
    runner = model.__dict__["_runner"] = TorchRunner(model)
    return runner


def set_kv_dtype(model: Any, kv_dtype: str) -> None:
    """Make the KV caches made for `model` from now on store fp16 or fp32 ("fp16" halves their
    memory and the bytes attention reads at long contexts; attention still computes in fp32).
    Caches already made keep their dtype."""
    runner_for(model).kv_dtype = check_kv_dtype(kv_dtype)
