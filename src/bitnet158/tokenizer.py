"""Byte-level BPE tokenizer: train on a corpus, save/load tokenizer.json, stream-decode.

Why byte-level BPE: every string — emoji, CJK, source code, stray control characters — maps to
tokens and back *exactly*, with no unknown token, because the base alphabet is the 256 bytes
(GPT-2's ByteLevel scheme maps each byte to a printable character). The cost is that one
character may span several tokens, which is why streaming output needs `StreamingDetokenizer`.

The file format is the `tokenizers` library's tokenizer.json, so a checkpoint's tokenizer opens
in any HF tool, and HF byte-level tokenizers (GPT-2, LLaMA 3, BitNet 2B4T) load here.

Besides tokenizer.json a tokenizer carries what the vocabulary alone does not say: its
beginning-of-text token, every token that ends generation (eos first, then e.g. LLaMA 3's
<|eot_id|>), whether a prompt starts with bos, and the chat template. `section()` is that, as
stored in a checkpoint's config.json; `from_section` / `load(path, section)` read it back.

>>> tok = Tokenizer.train(["def f(x):\\n    return x\\n"] * 20, vocab_size=300)
>>> tok.decode(tok.encode("naïve ☕ 代码"))
'naïve ☕ 代码'
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import CheckpointError, ConfigError, first_line
from .fileio import atomic_write_bytes
from .tokenizer_checks import check_document, check_ids, no_panics

DEFAULT_EOS = "<|endoftext|>"
SECTION_KEYS = ("eos_token", "bos_token", "end_tokens", "add_bos", "chat_template")
# 256 byte symbols + the special tokens; below this BPE cannot even represent the alphabet.
MIN_VOCAB = 256 + 1


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table, the alphabet of ByteLevel BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to U+0100.. so no
    token string contains whitespace or control characters.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
METASPACE = "\u2581"  # SentencePiece's visible space (converted tokenizer.model vocabularies)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece
# Run through a freshly parsed tokenizer, so a component that panics only when used (a charsmap
# that parses but indexes out of bounds) fails at load rather than on a user's first prompt.
_PROBE = "Hello, World! 123 naïve café\t\n  中文 😀 <|x|> \u0301\x00"


TRAIN_PIECE_CHARS = 1024
_LAST_WORD_END = re.compile(r"(?s).*\S(?=\s)")  # greedy: up to the last non-space before a space


def bounded_pieces(texts: Iterable[str], limit: int = TRAIN_PIECE_CHARS) -> Iterator[str]:
    """`texts` cut into pieces of at most `limit` characters for BPE training, each cut placed
    where a run of whitespace begins, so every word and whitespace run the pre-tokenizer sees is
    the same as in the whole text. Only a run of more than `limit` characters without whitespace
    (a minified line, a base64 blob) is cut inside: the trainer's cost grows with the square of a
    word's length, and one 200,000-character word took 18 s to train on."""
    for text in texts:
        start = 0
        while len(text) - start > limit:
            m = _LAST_WORD_END.match(text, start, start + limit)
            end = m.end() if m and m.end() > start else start + limit
            yield text[start:end]
            start = end
        yield text[start:]


class Tokenizer:
    """A thin, typed wrapper over `tokenizers.Tokenizer` plus its special-token roles.

    Decoding keeps special tokens by default, so `decode(encode(s)) == s` for *every* string,
    even one that happens to contain the literal text "<|endoftext|>". `encode` never adds
    tokens; `encode_prompt` adds bos when the tokenizer's model expects it (`add_bos`).
    """

    def __init__(self, backend: _HFTokenizer, eos_token: str = DEFAULT_EOS, *, bos_token: str | None = None,
                 end_tokens: Sequence[str] | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        self.backend = backend
        self.eos_token = eos_token
        self.eos_id: int = self._id_of(eos_token, "end-of-text")
        self.bos_token = bos_token
        self.bos_id: int | None = None if bos_token is None else self._id_of(bos_token, "beginning-of-text")
        # eos first, no duplicates: end_tokens[0] is what a single-eos format (GGUF eos, HF eos_token) gets
        self._end_tokens = tuple(dict.fromkeys([eos_token, *(end_tokens or ())]))
        self._end_ids = tuple(self._id_of(t, "end") for t in self._end_tokens)
        if add_bos and bos_token is None:
            raise CheckpointError("tokenizer: add_bos is set but there is no beginning-of-text token")
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self._id_bytes: list[bytes] | None = None  # built lazily for streaming decode

    # ----- roles: bos, end tokens, chat template ------------------------------------------
    def _id_of(self, token: str, role: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"tokenizer has no {role} token {token!r}")
        return token_id

    @property
    def end_tokens(self) -> list[str]:
        """Every token that ends generation, eos first (a copy: the roles are fixed at construction)."""
        return list(self._end_tokens)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Ids of `end_tokens`, in the same order; generation stops at any of them."""
        return self._end_ids

    def section(self) -> dict[str, Any]:
        """The special-token roles and chat template, JSON-safe: config.json's "tokenizer" section."""
        return {"eos_token": self.eos_token, "bos_token": self.bos_token, "end_tokens": self.end_tokens,
                "add_bos": self.add_bos, "chat_template": self.chat_template}

    @classmethod
    def from_section(cls, backend: _HFTokenizer, section: dict[str, Any] | None) -> "Tokenizer":
        """`backend` with the roles of a config.json "tokenizer" section. A format-1 section
        ({"eos_token": ...} alone) or None (older still: DEFAULT_EOS) gives no bos, eos as the only
        end token, no bos added, no template. Unknown keys are ignored (a newer writer's additions)."""
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise CheckpointError(f"tokenizer section must be a JSON object, got {_short(section)}")
        eos = section.get("eos_token", DEFAULT_EOS)
        if not isinstance(eos, str):
            raise CheckpointError(f"tokenizer section: eos_token must be a string, got {_short(eos)}")
        for key in ("bos_token", "chat_template"):
            if not isinstance(section.get(key), (str, type(None))):
                raise CheckpointError(f"tokenizer section: {key} must be a string or null, "
                                      f"got {_short(section[key])}")
        ends = section.get("end_tokens")
        if ends is not None and (not isinstance(ends, list) or not all(isinstance(t, str) for t in ends)):
            raise CheckpointError(f"tokenizer section: end_tokens must be a list of strings, "
                                  f"got {_short(ends)}")
        add_bos = section.get("add_bos", False)
        if not isinstance(add_bos, bool):
            raise CheckpointError(f"tokenizer section: add_bos must be true or false, got {_short(add_bos)}")
        return cls(backend, eos, bos_token=section.get("bos_token"), end_tokens=ends, add_bos=add_bos,
                   chat_template=section.get("chat_template"))

    def replace(self, **changes: Any) -> "Tokenizer":
        """A copy sharing the vocabulary with some section fields changed (e.g. chat_template)."""
        unknown = set(changes) - set(SECTION_KEYS)
        if unknown:
            raise TypeError(f"replace() got unknown fields {sorted(unknown)}")
        return self.from_section(self.backend, {**self.section(), **changes})

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = (DEFAULT_EOS,), min_frequency: int = 2) -> "Tokenizer":
        """Learn byte-level BPE merges from `texts` (the *training* documents only — never the
        held-out ones, or held-out perplexity would flatter the model).

        The initial alphabet is all 256 byte symbols, so bytes never seen in training (emoji in a
        code-only corpus) still encode. The first special token is the EOS token.
        """
        if not special_tokens:
            raise ConfigError("tokenizer: need at least one special token (the end-of-text token)")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise ConfigError(f"tokenizer: vocab_size must be at least {256 + len(special_tokens)} "
                              f"(256 bytes + special tokens), got {vocab_size!r}")
        backend = _HFTokenizer(models.BPE())
        # add_prefix_space=False: no text is invented, which is what makes round trips exact.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(bounded_pieces(texts), trainer)
        # GPT-2 convention: the one end-of-text token also opens a document, but is never prepended
        return cls(backend, eos_token=special_tokens[0], bos_token=special_tokens[0])

    @classmethod
    def from_str(cls, text: str, eos_token: str = DEFAULT_EOS, *,
                 section: dict[str, Any] | None = None) -> "Tokenizer":
        """Parse tokenizer.json contents (as stored next to checkpoint weights); `section` wins
        over `eos_token` when given."""
        section = section if section is not None else {"eos_token": eos_token}
        try:
            backend = parse_backend(text)
        except CheckpointError as exc:
            raise CheckpointError(f"not a valid tokenizer.json ({exc})") from None
        return cls.from_section(backend, section)

    def to_str(self) -> str:
        return self.backend.to_str()

    # ----- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically: temp file in the same folder, fsync, os.replace.

        A crash mid-write leaves the old file (or none), never a truncated one. `path` may be a
        folder, in which case the file is `path/tokenizer.json`.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_str().encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, section: dict[str, Any] | None = None, *,
             eos_token: str | None = None) -> "Tokenizer":
        """Read a tokenizer.json (or a folder holding one) with the roles of `section` (see
        `from_section`; `eos_token` alone is the old spelling of {"eos_token": ...}). Any problem
        is a one-line CheckpointError naming the file."""
        path = tokenizer_file(path)
        backend = read_backend(path)
        if section is None and eos_token is not None:
            section = {"eos_token": eos_token}
        try:
            return cls.from_section(backend, section)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    # ----- encode / decode ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the embedding table needs this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        with no_panics("encoding"):
            return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """`encode`, with bos in front when the model expects it (LLaMA 3 style) and the text does
        not already start with it (a chat template may have written it)."""
        ids = self.encode(text)
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust side uses all cores); same ids as `encode`."""
        with no_panics("encoding"):
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        with no_panics("decoding"):
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one id stands for (special tokens: their UTF-8 text). Ids past the
        vocabulary (a model whose embedding is padded beyond its tokenizer) stand for nothing."""
        if self._id_bytes is None:
            self._id_bytes = self._build_id_bytes()
        return self._id_bytes[token_id] if 0 <= token_id < len(self._id_bytes) else b""

    def _build_id_bytes(self) -> list[bytes]:
        special = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
        doc = json.loads(self.backend.to_str())
        byte_fallback = bool((doc.get("model") or {}).get("byte_fallback"))
        metaspace = METASPACE in json.dumps(doc.get("decoder"), ensure_ascii=False)  # SentencePiece-style: "▁" is a space
        table = [b""] * self.vocab_size
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            if i in special:
                table[i] = special[i].encode("utf-8")
            elif byte_fallback and (byte := _BYTE_PIECE.fullmatch(token)):
                table[i] = bytes([int(byte.group(1), 16)])
            elif metaspace:
                table[i] = token.replace(METASPACE, " ").encode("utf-8")
            elif all(c in _UNICODE_TO_BYTE for c in token):
                table[i] = bytes(_UNICODE_TO_BYTE[c] for c in token)
            else:  # neither byte-level nor SentencePiece-style: the library's own decoding
                table[i] = self.backend.decode([i], skip_special_tokens=False).encode("utf-8")
        return table

    def streaming_detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, eos_id={self.eos_id}, "
                f"bos={self.bos_token!r}, end_tokens={self.end_tokens!r}, add_bos={self.add_bos}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


def tokenizer_file(path: str | os.PathLike) -> Path:
    """`path` itself, or `path/tokenizer.json` when it is a folder."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def read_backend(path: str | os.PathLike) -> _HFTokenizer:
    """The `tokenizers` object of a tokenizer.json (or a folder holding one), without roles; a
    one-line CheckpointError naming the file if it is missing, unreadable or refused by
    `check_document`."""
    path = tokenizer_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({first_line(exc)})") from None
    try:
        return parse_backend(text)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from None


def parse_backend(text: str) -> _HFTokenizer:
    """tokenizer.json contents → `tokenizers` object: JSON first (a clearer message than the Rust
    parser's for truncated files), then `check_document`, then the library, whose panics become
    CheckpointError, with a probe encode and then the id check. Messages carry no file name."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: brackets nested thousands deep
        raise CheckpointError(first_line(exc)) from None
    check_document(doc)
    with no_panics("reading the file"):
        try:
            backend = _HFTokenizer.from_str(text)
            backend.decode(backend.encode(_PROBE).ids)
        except Exception as exc:  # noqa: BLE001 — the library reports a bad file as a plain Exception
            raise CheckpointError(first_line(exc)) from None
    check_ids(backend)
    return backend


def _short(value: Any) -> str:
    """A bad value for a one-line message, cut so a huge one cannot flood it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class StreamingDetokenizer:
    """Turn ids into text one at a time, emitting only complete characters.

    A byte-level token may end in the middle of a multi-byte UTF-8 character (an emoji is 4
    bytes, often 2–3 tokens). Decoding each token alone would print U+FFFD garbage; instead the
    token's bytes go through an incremental UTF-8 decoder, which holds back an unfinished
    sequence until the next token completes it. Cost is O(bytes of the token), not O(text).

    >>> tok = Tokenizer.train(["abc"] * 10, vocab_size=260)
    >>> d = tok.streaming_detokenizer()
    >>> "".join(d.add(i) for i in tok.encode("é☕")) + d.finalize()
    'é☕'
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one id; return the newly completed text (possibly "")."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def finalize(self) -> str:
        """Flush at the end of generation; an unfinished character becomes U+FFFD, as in `decode`."""
        return self._decoder.decode(b"", final=True)
