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


# --- special-token roles: bos, end tokens, add_bos, chat template (config.json's section) ------

ROLES = ("<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>")
TEMPLATE = "{% for m in messages %}{{ bos_token + m['content'] + '<|eot_id|>' }}{% endfor %}"


@pytest.fixture(scope="module")
def llama_like() -> Tokenizer:
    """Trained with three special tokens (ids 0, 1, 2), roles as LLaMA 3 assigns them."""
    trained = Tokenizer.train(["def f(x):\n    return x\n", "hello world"] * 20, vocab_size=300,
                              special_tokens=ROLES)
    return Tokenizer.from_section(trained.backend, {
        "eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>",
        "end_tokens": ["<|end_of_text|>", "<|eot_id|>"], "add_bos": True, "chat_template": TEMPLATE})


def test_trained_tokenizer_section_is_gpt2_convention(tok):
    assert tok.section() == {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                             "end_tokens": ["<|endoftext|>"], "add_bos": False, "chat_template": None}
    assert tok.bos_id == tok.eos_id and tok.end_ids == (tok.eos_id,)
    assert tok.encode_prompt("x = 1") == tok.encode("x = 1")  # nothing prepended
    assert tok.encode_prompt("") == []


def test_roles_and_encode_prompt(llama_like):
    tok = llama_like
    assert (tok.eos_id, tok.bos_id, tok.end_ids) == (0, 1, (0, 2))
    assert tok.end_tokens == ["<|end_of_text|>", "<|eot_id|>"] and tok.add_bos
    body = tok.encode("hello world")
    assert tok.encode_prompt("hello world") == [1] + body
    assert tok.encode_prompt("<|begin_of_text|>hello world") == [1] + body  # never twice
    assert tok.encode_prompt("") == [1]
    assert tok.encode("<|eot_id|>x<|begin_of_text|>") == [2, tok.encode("x")[0], 1]


def test_section_round_trips_through_json(llama_like, tmp_path):
    section = json.loads(json.dumps(llama_like.section()))
    assert section == {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>",
                       "end_tokens": ["<|end_of_text|>", "<|eot_id|>"], "add_bos": True,
                       "chat_template": TEMPLATE}
    path = llama_like.save(tmp_path)
    loaded = Tokenizer.load(path, section)
    assert loaded.section() == section and loaded.end_ids == (0, 2) and loaded.bos_id == 1
    assert Tokenizer.from_str(llama_like.to_str(), section=section).section() == section


def test_end_tokens_are_normalized_and_replace_copies(llama_like):
    ends = ["<|eot_id|>", "<|end_of_text|>", "<|eot_id|>"]  # eos not first, a duplicate
    tok = Tokenizer.from_section(llama_like.backend, {"eos_token": "<|end_of_text|>", "end_tokens": ends})
    assert tok.end_tokens == ["<|end_of_text|>", "<|eot_id|>"] and tok.end_ids == (0, 2)
    tok.end_tokens.append("x")  # a copy: the roles cannot drift from end_ids
    assert tok.end_tokens == ["<|end_of_text|>", "<|eot_id|>"]
    other = llama_like.replace(chat_template=None, add_bos=False)
    assert other.chat_template is None and not other.add_bos and other.end_ids == (0, 2)
    assert llama_like.chat_template == TEMPLATE and llama_like.add_bos  # untouched
    with pytest.raises(TypeError):
        llama_like.replace(colour="blue")


def test_old_sections_still_load(tok, tmp_path):
    path = tok.save(tmp_path)
    for section in (None, {"eos_token": "<|endoftext|>"}, {}):
        old = Tokenizer.load(path, section)
        assert (old.eos_token, old.bos_token, old.end_ids, old.add_bos, old.chat_template) == \
            ("<|endoftext|>", None, (tok.eos_id,), False, None)
        assert old.encode_prompt("x = 1") == tok.encode("x = 1")
    assert Tokenizer.load(path, eos_token="<|endoftext|>").eos_id == tok.eos_id  # the old keyword
    assert Tokenizer(tok.backend, eos_token="<|endoftext|>").end_ids == (tok.eos_id,)


@pytest.mark.parametrize("section, needle", [
    ([1, 2], "must be a JSON object"),
    ({"eos_token": 5}, "eos_token must be a string"),
    ({"bos_token": ["<|endoftext|>"]}, "bos_token must be a string or null"),
    ({"chat_template": {"default": "x"}}, "chat_template must be a string or null"),
    ({"end_tokens": "<|endoftext|>"}, "end_tokens must be a list of strings"),
    ({"end_tokens": [7]}, "end_tokens must be a list of strings"),
    ({"add_bos": "yes"}, "add_bos must be true or false"),
    ({"eos_token": "<|nope|>"}, "no end-of-text token '<|nope|>'"),
    ({"bos_token": "<|nope|>"}, "no beginning-of-text token '<|nope|>'"),
    ({"end_tokens": ["<|endoftext|>", "<|nope|>"]}, "no end token '<|nope|>'"),
    ({"add_bos": True}, "add_bos is set but there is no beginning-of-text token"),
])
def test_bad_sections_are_one_line_errors(tok, tmp_path, section, needle):
    path = tok.save(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        Tokenizer.load(path, section)
    msg = str(exc.value)
    assert needle in msg and str(path) in msg and "\n" not in msg
