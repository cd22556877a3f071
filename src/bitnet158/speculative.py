"""Drafters for speculative decoding: cheap guesses of the next few tokens, which the model then
checks in one forward (`generate.stream_request(..., drafter=...)`).

A memory-bound decode step costs about the same for one position as for several: the weights are
read once either way. So when a drafter guesses k tokens right, one forward yields k + 1 tokens.
Both drafters here are deterministic (a draft is one token per position, not a distribution), so
the check is exact: greedy decoding gives the same tokens with or without a drafter, and sampling
keeps its distribution (`sampling.sample_with_draft`).

- `PromptLookup`: the last n tokens (n from `max_ngram` down to `min_ngram`) are looked up in
  everything before them, and what followed their most recent earlier occurrence is the draft.
  Free, and right surprisingly often where output repeats its input: code edits, quoting,
  summaries, structured text (prompt-lookup decoding).
- `DraftModel`: a smaller model with the same tokenizer drafts greedily over its own KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .errors import ConfigError
from .generate import PromptCache
from .runner import runner_for

class PromptLookup:
    """Prompt-lookup (n-gram) drafting over the sequence so far (prompt and generated tokens)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram <= 16:
            raise ConfigError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram}) <= 16")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        ids = np.asarray(tokens, dtype=np.int64)
        end = len(ids)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            # every earlier window of n tokens (the tail itself starts at end - n: excluded)
            windows = sliding_window_view(ids[:end - 1], n)
            hits = np.flatnonzero((windows == ids[end - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the most recent occurrence: the likeliest continuation
                return ids[start:start + k].tolist()
        return []


class DraftModel:
    """Greedy drafts from a smaller model that shares the target's tokenizer (its own KV cache
    keeps the common prefix between calls, so each proposal costs k small forwards)."""

    def __init__(self, model: Any, target_vocab: int | None = None):
        """`model`: a torch Transformer or a torch-free runtime model (any `runner.Runner`)."""
        self.model = model
        vocab = runner_for(model).config.vocab_size
        if target_vocab is not None and vocab != target_vocab:
            raise ConfigError(f"the draft model's vocabulary ({vocab}) differs from the model's ({target_vocab}); "
                              f"a draft model must share the tokenizer")
        self.cache = PromptCache(model)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        k = min(k, self.cache.max_len - len(tokens), self.cache.config.max_seq_len - len(tokens))
        if k < 1:
            return []
        logits = self.cache.prefill(self.model, tokens)[-1]
        draft: list[int] = []
        while True:
            draft.append(int(logits.argmax()))
            if len(draft) == k:
                return draft
            logits = self.cache.feed(self.model, draft[-1])
