"""Slots for continuous batching: the segments of a mixed step (which slots advance by how many
tokens) and how many positions each slot holds.

`cache.SlotKVCache` (torch) and `runtime.NativeSlotCache` (numpy) bind the same kind of step, so
they check it here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError


def check_segments(segments: Sequence[tuple[int, int]], slots: int) -> None:
    """(slot, n) pairs: distinct slots in [0, slots), at least one token each."""
    chosen = [s for s, _ in segments]
    if not segments or len(set(chosen)) != len(chosen) or any(n < 1 for _, n in segments):
        raise ConfigError(f"a mixed step needs distinct slots with at least one token each, got {list(segments)}")
    if any(not 0 <= s < slots for s in chosen):
        raise ConfigError(f"slots must lie in [0, {slots}), got {chosen}")


def check_room(segments: Sequence[tuple[int, int]], lengths: Sequence[int], max_len: int) -> None:
    """Every slot has room for its next n tokens."""
    if any(lengths[s] + n > max_len for s, n in segments):
        raise ConfigError(f"a sequence would exceed the KV cache length {max_len}")


class SlotLengths(ABC):
    """How many positions each slot's sequence holds; the slot caches' shared bookkeeping. A cache
    names its per-layer key and value tables ([slot, kv head, position, head dim], numpy or torch)
    in `kv_tables`."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ConfigError(f"a slot cache needs at least one slot, got {slots}")
        self.lengths = [0] * slots

    @abstractmethod
    def kv_tables(self) -> list[Any]:
        """Every per-layer table indexed [slot, kv head, position, ...] (keys, values, q8 scales)."""

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` positions: a prefix its next sequence shares (the keys and
        values past it are overwritten as that sequence goes on)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ConfigError(f"slot {slot} holds {self.lengths[slot]} positions; cannot keep {length}")
        self.lengths[slot] = length

    def copy_prefix(self, source: int, slot: int, length: int) -> None:
        """Give `slot` the first `length` positions of `source`'s sequence (a prefix their prompts
        share): the same keys and values, copied, so the two sequences go on apart."""
        if source == slot:
            raise ConfigError(f"slot {slot} cannot copy from itself; truncate keeps its own prefix")
        if not 0 <= length <= self.lengths[source]:
            raise ConfigError(f"slot {source} holds {self.lengths[source]} positions; cannot copy {length}")
        for table in self.kv_tables():
            table[slot, :, :length] = table[source, :, :length]
        self.lengths[slot] = length
