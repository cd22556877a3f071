"""Checks that make a hostile tokenizer.json a one-line CheckpointError instead of a crash.

The `tokenizers` library trusts its input. Fuzzing found a corrupt Precompiled charsmap that
panics (pyo3's PanicException, a BaseException that `except Exception` lets through), chains of
ByteLevel pre-tokenizers that double the text per link until the process aborts, and ids with
gaps that break every id → bytes table only while generating. So a document is checked in
Python before the library parses it (`check_document`), the library's panics are caught
(`no_panics`), and the parsed ids must run 0..n-1 (`check_ids`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, first_line

# Bounds on a tokenizer.json, checked before the Rust parser sees it (see `check_document`).
MAX_VOCAB = 1 << 21      # ids; the largest real vocabularies (Gemma's) hold about 262k
MAX_SEQUENCE = 8         # parts of one Sequence component; real files use at most 3 or 4
MAX_DEPTH = 4            # Sequences inside Sequences
MAX_COMPONENTS = 16      # components of one section, nested ones included
MAX_GROWTH = 64          # how many times the normalizer + pre-tokenizer may multiply the text's bytes
MAX_PADDING = 1 << 20    # a padding length; encode pads every prompt to it
_MODELS = ("BPE", "WordPiece", "Unigram", "WordLevel")
_SECTIONS = {  # section → (its Sequence's list key, the component types `tokenizers` documents)
    "normalizer": ("normalizers", {"BertNormalizer", "ByteLevel", "Lowercase", "NFC", "NFD", "NFKC", "NFKD",
                                   "Nmt", "Precompiled", "Prepend", "Replace", "Sequence", "Strip",
                                   "StripAccents"}),
    "pre_tokenizer": ("pretokenizers", {"BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Digits",
                                        "FixedLength", "Metaspace", "Punctuation", "Sequence", "Split",
                                        "UnicodeScripts", "Whitespace", "WhitespaceSplit"}),
    "post_processor": ("processors", {"BertProcessing", "ByteLevel", "RobertaProcessing", "Sequence",
                                      "TemplateProcessing"}),
    "decoder": ("decoders", {"BPEDecoder", "ByteFallback", "ByteLevel", "CTC", "Fuse", "Metaspace",
                             "Replace", "Sequence", "Strip", "WordPiece"}),
}
# Everything but these is the library's failure: pyo3 turns a Rust panic into PanicException,
# which derives from BaseException so that `except Exception` does not swallow it.
_NOT_PANICS = (KeyboardInterrupt, SystemExit, GeneratorExit)


@contextmanager
def no_panics(doing: str) -> Iterator[None]:
    """Turn a panic of the `tokenizers` library into a one-line CheckpointError. Ordinary
    exceptions pass through: a TypeError from a bad argument is a bug, not the file's fault."""
    try:
        yield
    except (Exception, *_NOT_PANICS):
        raise
    except BaseException as exc:  # noqa: BLE001 — what is left is pyo3's PanicException: a Rust panic
        raise CheckpointError(f"the tokenizers library panicked while {doing}: {first_line(exc)}") from None


def check_ids(backend: _HFTokenizer) -> None:
    """Ids must be exactly 0..n-1: every id → bytes table (streaming decode, logprobs) has n rows,
    and the embedding needs n of them, so a gap or a shared id would fail only mid-generation."""
    vocab = backend.get_vocab(with_added_tokens=True)
    ids = set(vocab.values())
    if len(ids) != len(vocab):
        raise CheckpointError(f"{len(vocab) - len(ids)} tokens share an id with another token")
    size = backend.get_vocab_size(with_added_tokens=True)
    # n distinct ids from 0 to n-1 are exactly 0..n-1; never build range(size): an id of 2**31
    # makes size 2**31 (a 70 GB set)
    if len(ids) != size or (ids and (min(ids) != 0 or max(ids) != size - 1)):
        missing = next((i for i, j in enumerate(sorted(ids)) if i != j), None)
        where = f"id {missing} is missing" if missing is not None else f"the ids run to {max(ids)}"
        raise CheckpointError(f"token ids must run 0..{size - 1} without gaps, but {where}")


def check_document(doc: Any) -> None:
    """Refuse, in one line, a tokenizer.json the `tokenizers` library must not be handed: a
    model or component type we do not know, a vocabulary past MAX_VOCAB, Sequences too long or
    too deep, or components that would multiply a prompt's size past MAX_GROWTH (each ByteLevel
    pre-tokenizer re-encodes the previous one's output, up to doubling it: fifty of them ask
    for 2**50 times the memory)."""
    if not isinstance(doc, dict):
        raise CheckpointError("the top level is not a JSON object")
    model = doc.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if not isinstance(kind, str) or kind not in _MODELS:  # a list or object is unhashable
        raise CheckpointError(f"model type {_short(kind)} is not one of {', '.join(_MODELS)}")
    vocab, added = model.get("vocab"), doc.get("added_tokens") or []
    if not isinstance(vocab, (dict, list)) or not isinstance(added, list):
        raise CheckpointError("model.vocab and added_tokens must be a JSON object or list")
    merges = model.get("merges") or []
    if len(vocab) + len(added) > MAX_VOCAB or not isinstance(merges, list) or len(merges) > MAX_VOCAB:
        raise CheckpointError(f"the vocabulary or its merges hold more than {MAX_VOCAB} entries")
    growth = {name: _component(name, doc.get(name), 0, [0]) for name in _SECTIONS}
    if growth["normalizer"] * growth["pre_tokenizer"] > MAX_GROWTH or growth["decoder"] > MAX_GROWTH:
        raise CheckpointError(f"the normalizer and pre_tokenizer (or the decoder) may grow text more than "
                              f"{MAX_GROWTH} times (e.g. chained ByteLevel or Replace components)")
    padding = doc.get("padding")
    if padding is not None:
        strategy = padding.get("strategy") if isinstance(padding, dict) else None
        sizes = [strategy.get("Fixed") if isinstance(strategy, dict) else 0, padding.get("pad_to_multiple_of")
                 if isinstance(padding, dict) else 0]
        if any(n is not None and (not isinstance(n, int) or not 0 <= n <= MAX_PADDING) for n in sizes):
            raise CheckpointError(f"padding: lengths must be integers in [0, {MAX_PADDING}]")


def _component(section: str, node: Any, depth: int, count: list[int]) -> float:
    """Check one component (and its parts); return how many times it may multiply text bytes."""
    if node is None and depth == 0:
        return 1.0
    list_key, types = _SECTIONS[section]
    kind = node.get("type") if isinstance(node, dict) else None
    if not isinstance(kind, str) or kind not in types:  # a list or object is unhashable
        raise CheckpointError(f"{section} type {_short(kind)} is not supported")
    count[0] += 1
    if count[0] > MAX_COMPONENTS:
        raise CheckpointError(f"{section} has more than {MAX_COMPONENTS} components")
    if kind == "Sequence":
        parts = node.get(list_key)
        if not isinstance(parts, list) or len(parts) > MAX_SEQUENCE or depth + 1 >= MAX_DEPTH:
            raise CheckpointError(f"{section}: a Sequence holds a list of at most {MAX_SEQUENCE} parts, "
                                  f"nested at most {MAX_DEPTH} deep")
        growth = 1.0
        for part in parts:
            growth *= _component(section, part, depth + 1, count)
        return growth
    if kind == "ByteLevel" and section in ("normalizer", "pre_tokenizer"):
        return 2.0  # a byte ≥ 0x80 becomes a character of two UTF-8 bytes
    if kind == "Metaspace" and section == "pre_tokenizer":
        return 3.0  # a space becomes "▁", three UTF-8 bytes
    if kind == "Replace":
        pattern, content = node.get("pattern"), node.get("content")
        if not isinstance(pattern, dict) or not isinstance(content, str):
            raise CheckpointError(f"{section}: Replace needs a pattern object and a content string")
        plain = pattern.get("String")
        # a plain string of p bytes becomes c bytes; a regex may match the empty string anywhere
        if isinstance(plain, str) and plain:
            return max(1.0, len(content.encode()) / len(plain.encode()))
        return 1.0 + len(content.encode())
    return 1.0


def _short(value: Any) -> str:
    """A bad value for a one-line message, cut so a huge one cannot flood it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
