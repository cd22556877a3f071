"""From `--data` (or the embedded default corpus) to a trained tokenizer and token streams."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from ..tokenizer import Tokenizer
from .data import Corpus, TokenStreams, default_corpus, load_corpus, tokenize_corpus


@dataclass
class PreparedData:
    corpus: Corpus
    tokenizer: Tokenizer
    tokens: TokenStreams
    seconds: float


def prepare_data(data: Sequence[str] | None, vocab_size: int, max_bytes: int | None = None,
                 tokenizer: Tokenizer | None = None, log=print) -> PreparedData:
    """Load the corpus, train a byte-level BPE tokenizer on its training split (unless one is
    given, e.g. when resuming), and encode both splits."""
    t0 = time.perf_counter()
    corpus = load_corpus(list(data)) if data else default_corpus(max_bytes=max_bytes)
    log(corpus.summary())
    if tokenizer is None:
        tokenizer = Tokenizer.train((d.text for d in corpus.train), vocab_size=vocab_size)
    streams = tokenize_corpus(corpus, tokenizer)
    log(f"tokenizer: {tokenizer.vocab_size} tokens; train {streams.train.numel():,} tokens, "
        f"held-out {streams.heldout.numel():,} tokens ({time.perf_counter() - t0:.1f}s)")
    return PreparedData(corpus, tokenizer, streams, time.perf_counter() - t0)
