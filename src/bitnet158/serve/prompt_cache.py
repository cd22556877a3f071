"""Prompt caching across requests, over the engine's KV-cache slots.

A chat client sends the whole conversation every turn. When a request ends, its slot keeps the keys
and values of every token it fed (prompt and answer), and remembers those tokens; a new request
takes the free slot whose tokens share the longest prefix with its prompt and prefills only the
rest. A request that matches nothing takes the slot freed longest ago, so the most recent
conversations keep their caches longest.

Requests side by side share too (the same system prompt for many users): before each prefill
chunk the engine asks `best_lender` whether a busy slot holds more of the prompt than the request
has, and copies those positions (a memcpy, against a forward over them), and a request waits
while an earlier one is still prefilling a long prefix they share (`WAIT_FOR_SHARED`), instead of
prefilling the same tokens beside it.

Reuse leaves at least the prompt's last token to prefill (its logits choose the first new token).
On the native step a position's keys do not depend on how its tokens were batched, so a reused
prefix gives the same tokens as prefilling it again; the torch path agrees within float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

WAIT_FOR_SHARED = 16  # prompt tokens an earlier request's prefill must promise before a later one waits


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if differ.size else n


def reusable(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many of the prompt's first positions can come from a cache holding `held`: the shared
    prefix, but never the prompt's last token (its logits are needed)."""
    return min(common_prefix(held, prompt), len(prompt) - 1)


def best_lender(prompt: Sequence[int], have: int, lenders: Mapping[int, Sequence[int]]) -> tuple[int, int] | None:
    """(slot, positions) of the lender (slot → the tokens whose keys it holds) that covers the most
    of `prompt`, when that is more than the `have` positions the request already holds; else None."""
    best = None
    for slot, tokens in lenders.items():
        shared = reusable(tokens, prompt)
        if shared > have:
            best, have = (slot, shared), shared
    return best


class SlotPrefixes:
    """Which slots are free, oldest freed first, and the tokens each free slot's cache holds."""

    def __init__(self, slots: int, enabled: bool = True):
        self.enabled = enabled
        self._free = list(range(slots))
        self._held: list[tuple[int, ...]] = [()] * slots

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, prompt: Sequence[int], reuse: bool = True) -> tuple[int, int]:
        """A free slot for `prompt`, and how many of the prompt's first positions that slot already
        holds (0 when `reuse` is off: a request that needs every prompt position's logits)."""
        if not self._free:
            raise RuntimeError("no free slot")  # the engine only admits into free slots
        best, keep = 0, 0
        if self.enabled and reuse:
            for i, slot in enumerate(self._free):
                shared = reusable(self._held[slot], prompt)
                if shared > keep:
                    best, keep = i, shared
        slot = self._free.pop(best)
        self._held[slot] = ()
        return slot, keep

    def release(self, slot: int, tokens: Sequence[int]) -> None:
        """The slot is free; its cache holds the keys of `tokens` (empty when unknown, e.g. after a
        failed forward)."""
        self._held[slot] = tuple(tokens) if self.enabled else ()
        self._free.append(slot)
