"""Byte-level BPE: exact round trips for any unicode, save/load, streaming without broken characters."""

import json
import random

import pytest

from bitnet158.errors import CheckpointError, ConfigError
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.data import default_corpus

SAMPLES = [
    "",
    "def add(a, b):\n    return a + b  # sum\n\tif x != y: pass\r\n",
    "naïve café — “quotes” … Ünïcödé",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇺🇸🇯🇵",
    "combining e\u0301 and zero-width\u200bspace, RTL עברית العربية",
    "control \x00\x01\x7f and the literal <|endoftext|> marker",
    "   leading and trailing spaces   ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝕏 and a lone surrogate-free astral 🜁",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    corpus = default_corpus(max_bytes=200_000)
    return Tokenizer.train((d.text for d in corpus.train), vocab_size=600)


def _random_unicode(rng: random.Random, n: int) -> str:
    chars = []
    for _ in range(n):
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0x3000),
                         rng.randrange(0x4E00, 0x9FFF), rng.randrange(0x1F300, 0x1FAFF)])
        chars.append(chr(cp))
    return "".join(chars)


def test_vocab_and_eos(tok):
    assert tok.vocab_size == 600
    assert tok.eos_id == tok.backend.token_to_id("<|endoftext|>")
    assert tok.encode("<|endoftext|>") == [tok.eos_id]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    texts = [_random_unicode(rng, rng.randrange(1, 60)) for _ in range(200)]
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text


def test_merges_were_learned(tok):
    # A trained BPE compresses code well below one token per byte.
    text = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_vocab_too_small_is_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    # a folder works too, and saving again replaces the file atomically
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode("x = 1") == tok.encode("x = 1")


def test_load_missing_or_corrupt(tok, tmp_path):
    with pytest.raises(CheckpointError, match="not found") as exc:
        Tokenizer.load(tmp_path / "nope.json")
    assert "nope.json" in str(exc.value)
    bad = tmp_path / "tokenizer.json"
    bad.write_text(tok.to_str()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="not a valid tokenizer") as exc:
        Tokenizer.load(bad)
    assert "\n" not in str(exc.value) and str(bad) in str(exc.value)
    bad.write_text(json.dumps({"hello": 1}))  # valid JSON, not a tokenizer
    with pytest.raises(CheckpointError):
        Tokenizer.load(bad)


def _stream(tok, ids):
    detok = tok.streaming_detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    return pieces


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_matches_decode(tok, text):
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)  # never a half character


def test_streaming_really_splits_characters(tok):
    # The test above can only fail if some token ends mid-character; make sure that happens.
    text = SAMPLES[4] + SAMPLES[3]
    ids = tok.encode(text)
    partial = [i for i in ids if not _valid_utf8(tok.token_bytes(i))]
    assert partial, "expected tokens that hold part of a multi-byte character"
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text and "" in pieces  # some steps emitted nothing (held back)


def test_streaming_random_and_reset(tok):
    rng = random.Random(1)
    detok = tok.streaming_detokenizer()
    for _ in range(50):
        text = _random_unicode(rng, 40)
        detok.reset()
        out = "".join(detok.add(i) for i in tok.encode(text)) + detok.finalize()
        assert out == text


def test_streaming_incomplete_tail_is_replacement_char(tok):
    ids = tok.encode("😀")
    prefix = ids[:-1] if len(ids) > 1 else None
    if prefix is None:
        pytest.skip("emoji is a single token in this vocabulary")
    assert "".join(_stream(tok, prefix)) == tok.decode(prefix)


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
