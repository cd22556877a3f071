"""Per-token log-probabilities as OpenAI reports them: the chosen token's log_softmax over the raw
logits (before penalties, temperature or filters) and the k most likely alternatives, each token's
text decoded alone. Used by generation (`SequenceDecoder`) and the server's responses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sampling import log_softmax
from .tokenizer import Tokenizer

MAX_LOGPROBS = 20  # alternatives per token; OpenAI's own limit, and what a response can afford


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw next-token distribution: log_softmax of the
    logits before any penalty, temperature or filter (what OpenAI reports, and what scoring a
    multiple-choice answer needs). `top`: the k most likely tokens as (id, text, logprob), most
    likely first; it may include the chosen token. Texts are each token decoded alone."""
    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """One token's text decoded alone; a piece of a multi-byte character becomes U+FFFD."""
    return tokenizer.token_bytes(token).decode("utf-8", "replace")


def top_tokens(logprobs: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries' indices of each row [N, vocab], largest first (ties: lower id first)."""
    k = min(k, logprobs.shape[-1])
    part = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]  # the k largest, unordered: O(vocab)
    order = np.lexsort((part, -np.take_along_axis(logprobs, part, axis=-1)), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def token_logprobs(tokenizer: Tokenizer, logits: Any, chosen: Sequence[int], k: int) -> list[TokenLogprob]:
    """logits [N, vocab] (raw), chosen N ids → their TokenLogprob with k alternatives each."""
    logprobs = log_softmax(logits)
    ids = np.asarray(list(chosen), dtype=np.int64)
    picked = logprobs[np.arange(len(ids)), ids].tolist()
    if k > 0:
        indices = top_tokens(logprobs, k)
        values = np.take_along_axis(logprobs, indices, axis=-1)
        tops = [[(i, token_text(tokenizer, i), v) for i, v in zip(row_i, row_v)]
                for row_i, row_v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(t, token_text(tokenizer, t), lp, top)
            for t, lp, top in zip(ids.tolist(), picked, tops)]
