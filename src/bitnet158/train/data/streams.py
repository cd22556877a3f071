"""Token streams and batches: documents → flat id streams → training batches / held-out windows.

**A step's batch depends only on (seed, step)**, never on how many batches were drawn before,
so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import DataError
from .corpus import Corpus, Document

if TYPE_CHECKING:  # the tokenizer is only needed for type hints here
    from ...tokenizer import Tokenizer

@dataclass
class TokenStreams:
    """Flat 1-D int32 id streams; int32 halves memory and every vocabulary here fits in it."""

    train: torch.Tensor
    heldout: torch.Tensor


def encode_documents(tokenizer: "Tokenizer", docs: Sequence[Document], chunk: int = 256) -> torch.Tensor:
    """Encode documents (in parallel, `chunk` at a time to bound memory) into one 1-D int32
    stream with the EOS id after each document, so the model learns where a document ends and
    never reads one document's end as the start of the next."""
    pieces: list[torch.Tensor] = []
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int32)
    for start in range(0, len(docs), chunk):
        batch = [d.text for d in docs[start:start + chunk]]
        for ids in tokenizer.encode_batch(batch):
            pieces.append(torch.tensor(ids, dtype=torch.int32))
            pieces.append(eos)
    if not pieces:
        return torch.empty(0, dtype=torch.int32)
    return torch.cat(pieces)


def tokenize_corpus(corpus: Corpus, tokenizer: "Tokenizer") -> TokenStreams:
    """Both sides of the corpus as flat token streams (the tokenizer was trained on train only)."""
    return TokenStreams(encode_documents(tokenizer, corpus.train),
                        encode_documents(tokenizer, corpus.heldout))


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit seed from (seed, step) alone; hashing avoids (seed, step) pairs colliding."""
    digest = hashlib.blake2b(f"bitnet158:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def batch_for_step(tokens: torch.Tensor, step: int, batch_size: int, seq_len: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows for one step: inputs and next-token targets, both [batch, seq_len] int64.

    A fresh generator seeded from (seed, step) draws the window starts, so the batch is a pure
    function of its arguments: resuming at step k reproduces the uninterrupted run exactly.
    """
    n = tokens.numel()
    if n <= seq_len:
        raise DataError(f"training text has {n} tokens; need more than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(_step_seed(seed, step))
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # [batch, seq_len + 1]
    windows = tokens[idx].long()
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, non-overlapping held-out windows spread evenly over the held-out stream.

    Evenly spread rather than the first `max_windows`, so a small evaluation still samples every
    part of the held-out set; fixed, so perplexities at different steps are comparable.
    """
    if max_windows < 1:
        raise ValueError(f"eval_windows: max_windows must be positive, got {max_windows}")
    available = (tokens.numel() - 1) // seq_len
    if available < 1:
        raise DataError(f"held-out text has {tokens.numel()} tokens; need more than seq_len={seq_len}")
    count = min(max_windows, available)
    chosen = torch.linspace(0, available - 1, count).round().long().unique()  # sorted, distinct
    idx = chosen[:, None] * seq_len + torch.arange(seq_len + 1)  # [count, seq_len + 1]
    windows = tokens[idx].long()
    return windows[:, :-1], windows[:, 1:]


def unigram_perplexity(train_tokens: torch.Tensor, eval_targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model (token frequencies of the training stream)
    on exactly `eval_targets`: the floor a language model must beat to have learned any context."""
    train = train_tokens.reshape(-1).long()
    targets = eval_targets.reshape(-1).long()
    if targets.numel() == 0:
        raise ValueError("unigram_perplexity: no evaluation targets")
    if (train.numel() and int(train.max()) >= vocab_size) or int(targets.max()) >= vocab_size:
        raise ValueError("unigram_perplexity: token id out of range for vocab_size")
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_prob = counts.log() - counts.sum().log()
    return float(torch.exp(-log_prob[targets].mean()))
