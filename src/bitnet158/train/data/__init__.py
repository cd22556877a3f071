"""Text in, batches out: the embedded default corpus, user files, token streams, batches.

The pipeline is one direction:

    default_corpus() / load_corpus(paths) ─► Corpus(train, heldout documents)
        ─► tokenize_corpus(corpus, tokenizer) ─► TokenStreams (flat 1-D int32, EOS after each doc)
        ─► batch_for_step(train, step, ...)  /  eval_windows(heldout, ...)

corpus.py holds the documents, the fixed name-hash split rule and the embedded default corpus;
files.py reads user files (--data); streams.py turns documents into token streams and batches.
This package's names are the pipeline's API; the modules are where each idea lives.
"""

from .corpus import Corpus, Document, default_corpus, is_heldout
from .files import SUPPORTED_SUFFIXES, load_corpus
from .streams import (TokenStreams, batch_for_step, encode_documents, eval_windows, tokenize_corpus,
                      unigram_perplexity)

__all__ = ["Corpus", "Document", "SUPPORTED_SUFFIXES", "TokenStreams", "batch_for_step", "default_corpus",
           "encode_documents", "eval_windows", "is_heldout", "load_corpus", "tokenize_corpus",
           "unigram_perplexity"]
