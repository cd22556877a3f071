"""GGUF tokenizer keys ⇄ our Tokenizer (byte-level BPE: tokenizer.ggml.model "gpt2").

    tokenizer.ggml.tokens / token_type / merges   the vocabulary; CONTROL tokens are special
    tokenizer.ggml.pre                            "gpt-2" (ByteLevel with GPT-2's regex: ours) or
                                                  "llama-bpe" (LLaMA 3's Split regex + ByteLevel
                                                  without regex: the 2B4T tokenizer)
    tokenizer.ggml.bos_token_id / add_bos_token   bos, and whether a prompt starts with it
    tokenizer.ggml.eos / eot / eom_token_id       the end tokens, in our order (eos first)
    tokenizer.chat_template                       the chat template

llama.cpp ends generation at eos, eot, eom and at any token whose text is one of a few known end
markers (LLAMA_CPP_END_TEXTS); the reader does the same, so an imported file stops where llama.cpp
would. So three end tokens fit, plus any number of those markers; a tokenizer with more is refused
rather than exported with some silently dropped. A pre-tokenizer llama.cpp has no name for is
refused too: it would split text differently there than here.
"""

from __future__ import annotations

import json
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..errors import BitNetError, ConfigError, FormatError, first_line, shown
from ..tokenizer import Tokenizer
from ..tokenizer_checks import check_ids
from .gguf_header import GGUFHeader

# LLaMA 3's pre-tokenizer regex (tokenizer.json's Split pattern; llama.cpp's "llama-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_NAMES = ("llama-bpe", "llama3", "llama-v3")
# token texts llama.cpp (llama-vocab.cpp) treats as end-of-generation whatever the metadata says
LLAMA_CPP_END_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                                 "<|eom_id|>", "<EOT>", "_<EOT>"})
_CONTROL, _USER_DEFINED = 3, 4  # llama_token_type values (gguf.TokenType)


def _pre_tokenizer_name(doc: dict[str, Any]) -> str:
    """llama.cpp's name for a tokenizer.json's normalizer + pre-tokenizer, or ConfigError."""
    pre = doc.get("pre_tokenizer")
    if doc.get("normalizer") is None and isinstance(pre, dict):
        if (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", True)
                and pre.get("use_regex", True)):
            return "gpt-2"
        parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
        if isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, dict) for p in parts):
            split, byte_level = parts
            if (split.get("type") == "Split" and split.get("pattern") == {"Regex": LLAMA3_SPLIT}
                    and split.get("behavior") == "Isolated" and not split.get("invert")
                    and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space", True)
                    and byte_level.get("use_regex") is False):
                return "llama-bpe"
    shown = json.dumps({"normalizer": doc.get("normalizer"), "pre_tokenizer": pre})
    raise ConfigError("GGUF export: llama.cpp has no pre-tokenizer that splits text like this tokenizer's "
                      f"({shown[:160]}); only GPT-2's ByteLevel and LLaMA 3's are supported")


def add_gguf_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Write `tokenizer` as GGUF byte-level BPE keys into a gguf.GGUFWriter. Rows of a model
    vocabulary past the tokenizer's (padding) become unused tokens; ConfigError if the tokenizer
    cannot be expressed (not BPE, an unnamed pre-tokenizer, more end tokens than fit, a special
    token past `vocab_size`)."""
    backend = tokenizer.backend
    doc = json.loads(backend.to_str())
    if (doc.get("model") or {}).get("type") != "BPE":
        raise ConfigError("GGUF export: the tokenizer is not a BPE tokenizer")
    pre = _pre_tokenizer_name(doc)
    extras = tokenizer.end_tokens[1:]
    if len(extras) > 2:  # the two slots go to tokens llama.cpp would not recognize by their text
        extras = sorted(extras, key=lambda t: t in LLAMA_CPP_END_TEXTS)
    extra_ends = [backend.token_to_id(t) for t in extras[:2]]
    lost = [t for t in extras[2:] if t not in LLAMA_CPP_END_TEXTS]
    if lost:
        raise ConfigError(f"GGUF export: GGUF holds three end tokens (eos, eot, eom) plus llama.cpp's known "
                          f"end markers; this tokenizer also ends at {', '.join(lost)}")
    roles = [tokenizer.eos_id, *extra_ends] + ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])
    if max(roles) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer's special token {backend.id_to_token(max(roles))!r} "
                          f"(id {max(roles)}) is past the model's {vocab_size} vocabulary rows")
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    special = {i for i, t in added.items() if t.special}
    tokens = [f"<|unused_{i}|>" for i in range(vocab_size)]  # rows past the tokenizer: padding
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            tokens[i] = token
            types[i] = (gguf.TokenType.CONTROL if i in special else
                        gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = doc["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # both tokenizer.json styles
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # no bos of its own (an old checkpoint's tokenizer): GPT-2's convention, eos opens a document too
    writer.add_bos_token_id(tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    if extra_ends:
        writer.add_eot_token_id(extra_ends[0])
    if len(extra_ends) > 1:
        writer.add_eom_token_id(extra_ends[1])
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def _short(value: Any) -> str:
    """A forged value for a one-line message: numpy wraps long reprs over lines."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _token_id(header: GGUFHeader, key: str, n: int) -> int | None:
    value = header.kv.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < n:
        raise FormatError(f"{header.path}: {key} is {_short(value)}, not a token id below {n}")
    return int(value)


def tokenizer_from_gguf(header: GGUFHeader) -> Tokenizer | None:
    """Our Tokenizer from a parsed GGUF header's GPT-2-style tokenizer.ggml.* keys (see the module
    docstring), or None when the file has another kind of vocabulary (SentencePiece) or none.
    A key with a wrong type or an id outside the vocabulary is a one-line FormatError."""
    kv = header.kv
    model = kv.get("tokenizer.ggml.model")
    if not isinstance(model, str) or model != "gpt2":  # a forged array must not reach `!=`
        return None
    tokens, merges = kv.get("tokenizer.ggml.tokens"), kv.get("tokenizer.ggml.merges", [])
    types = kv.get("tokenizer.ggml.token_type")
    if not (isinstance(tokens, list) and isinstance(merges, list)
            and kv.get("tokenizer.ggml.eos_token_id") is not None):
        raise FormatError(f"{header.path}: incomplete GPT-2 tokenizer metadata "
                          "(tokens, merges, eos_token_id)")
    n = len(tokens)
    eos = _token_id(header, "tokenizer.ggml.eos_token_id", n)
    bos = _token_id(header, "tokenizer.ggml.bos_token_id", n)
    ends = [i for i in (_token_id(header, f"tokenizer.ggml.{k}_token_id", n) for k in ("eot", "eom"))
            if i is not None]
    ends += [i for i, t in enumerate(tokens) if t in LLAMA_CPP_END_TEXTS]  # as llama.cpp stops there too
    add_bos = kv.get("tokenizer.ggml.add_bos_token", False)
    template = kv.get("tokenizer.chat_template")
    if not isinstance(add_bos, bool):
        raise FormatError(f"{header.path}: tokenizer.ggml.add_bos_token is {_short(add_bos)}, not a bool")
    if template is not None and not isinstance(template, str):
        raise FormatError(f"{header.path}: tokenizer.chat_template is not a string")
    if add_bos and bos is None:
        raise FormatError(f"{header.path}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != n:  # a token listed twice keeps one id: the vocabulary's ids would have a gap
        twice = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise FormatError(f"{header.path}: tokenizer.ggml.tokens lists the token {shown(twice)} twice")
    pre = kv.get("tokenizer.ggml.pre")
    llama3 = isinstance(pre, str) and pre in LLAMA3_PRE_NAMES
    try:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        # llama.cpp's llama-bpe looks whole words up before merging, as LLaMA 3's tokenizer.json does
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=llama3))
        if llama3:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:  # gpt-2 and its relatives: ByteLevel's built-in GPT-2 regex
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if types is not None and len(types) == n:
            kinds = np.asarray(types)
            backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                        for i in np.flatnonzero(kinds == _CONTROL)])
            backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                                for i in np.flatnonzero(kinds == _USER_DEFINED)])
        b = tokens[bos] if bos is not None else ""
        # so the saved tokenizer.json adds bos in HF tools as well, as LLaMA 3's does (the template
        # syntax "token:type" cannot spell a token holding ':' or spaces; those go without)
        if add_bos and ":" not in b and not any(c.isspace() for c in b):
            backend.post_processor = processors.TemplateProcessing(
                single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, bos)])
        check_ids(backend)  # added tokens may still collide with the vocabulary's
        return Tokenizer(backend, eos_token=tokens[eos], bos_token=None if bos is None else tokens[bos],
                         end_tokens=[tokens[i] for i in ends], add_bos=add_bos, chat_template=template)
    except BitNetError as e:
        raise FormatError(f"{header.path}: {e}") from None
    except Exception as e:  # tokenizers raises plain Exceptions for bad merges
        raise FormatError(f"{header.path}: the tokenizer metadata does not make a BPE tokenizer "
                          f"({first_line(e)})") from None


__all__ = ["LLAMA3_SPLIT", "LLAMA_CPP_END_TEXTS", "add_gguf_tokenizer", "tokenizer_from_gguf"]
