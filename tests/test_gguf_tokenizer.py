"""GGUF tokenizer keys ⇄ our Tokenizer: written with gguf-py's GGUFWriter, parsed by our bounds-checked
header reader, and read back to the same ids, special-token roles and chat template."""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")
from hf_fixtures import (BOS, CHAT_TEMPLATE, EOT, EOT_TEXT, make_2b4t_like_hf_dir,  # noqa: E402
                         write_converter_style_gguf)
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, pre_tokenizers  # noqa: E402

from bitnet158.errors import ConfigError, FormatError  # noqa: E402
from bitnet158.interop.gguf_header import read_header  # noqa: E402
from bitnet158.interop.gguf_tokenizer import add_gguf_tokenizer, tokenizer_from_gguf  # noqa: E402
from bitnet158.interop.hf_tokenizer import read_hf_tokenizer  # noqa: E402
from bitnet158.tokenizer import Tokenizer  # noqa: E402

SAMPLES = ["Hello world, the quick brown fox!", "def forward(self, x):\n    return x\n\n\n",
           "naïve café 中文 😀👍🏽 \x00\x7f", "  leading spaces and 12345678 digits\t\r\n",
           f"{BOS}<|start_header_id|>user<|end_header_id|>\n\nHi there{EOT}{EOT_TEXT}",
           "it's we'll they've I'M", ""]


def _write(path, tokenizer: Tokenizer | None, vocab_size: int | None = None, extra=None):
    writer = gguf.GGUFWriter(str(path), "bitnet")
    if tokenizer is not None:
        add_gguf_tokenizer(writer, tokenizer, vocab_size or tokenizer.vocab_size)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_header(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_2b4t_like_hf_dir(tmp_path_factory.mktemp("hf") / "2b4t")


@pytest.fixture(scope="module")
def llama_tok(hf_dir) -> Tokenizer:
    return read_hf_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def own_tok() -> Tokenizer:
    return Tokenizer.train(["def f(x):\n    return x + 1\n", "hello world, the quick brown fox"] * 20,
                           vocab_size=290)


def _same(a: Tokenizer, b: Tokenizer) -> None:
    assert b.section() == a.section()
    assert (b.bos_id, b.eos_id, b.end_ids) == (a.bos_id, a.eos_id, a.end_ids)
    for text in SAMPLES:
        assert b.encode(text) == a.encode(text), text
        assert b.encode_prompt(text) == a.encode_prompt(text)
        assert b.decode(b.encode(text)) == text


@pytest.mark.parametrize("pad", [0, 3])
def test_llama3_like_round_trip(tmp_path, llama_tok, pad):
    header = _write(tmp_path / "t.gguf", llama_tok, llama_tok.vocab_size + pad)
    kv = header.kv
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    assert kv["tokenizer.ggml.eos_token_id"] == llama_tok.backend.token_to_id(EOT)
    assert kv["tokenizer.ggml.eot_token_id"] == llama_tok.backend.token_to_id(EOT_TEXT)
    assert kv["tokenizer.ggml.bos_token_id"] == llama_tok.backend.token_to_id(BOS)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.chat_template"] == CHAT_TEMPLATE
    back = tokenizer_from_gguf(header)
    _same(llama_tok, back)
    assert back.vocab_size == llama_tok.vocab_size + pad  # padding rows: unused tokens
    assert back.encode_prompt("Hi")[0] == back.bos_id


def test_our_tokenizer_round_trip(tmp_path, own_tok):
    header = _write(tmp_path / "t.gguf", own_tok)
    kv = header.kv
    assert kv["tokenizer.ggml.pre"] == "gpt-2" and kv["tokenizer.ggml.add_bos_token"] is False
    assert kv["tokenizer.ggml.bos_token_id"] == kv["tokenizer.ggml.eos_token_id"] == own_tok.eos_id
    assert "tokenizer.chat_template" not in kv and "tokenizer.ggml.eot_token_id" not in kv
    _same(own_tok, tokenizer_from_gguf(header))
    # an old checkpoint's tokenizer (no bos) gets eos as bos, the GPT-2 convention
    old = Tokenizer.from_section(own_tok.backend, {"eos_token": "<|endoftext|>"})
    assert _write(tmp_path / "old.gguf", old).kv["tokenizer.ggml.bos_token_id"] == own_tok.eos_id


def test_three_end_tokens_and_llama_cpp_end_markers(tmp_path):
    specials = ("<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|stop|>")
    trained = Tokenizer.train(["hello world"] * 20, vocab_size=270, special_tokens=specials)
    tok = trained.replace(end_tokens=["<|endoftext|>", "<|stop|>", "<|eot_id|>", "<|im_end|>"])
    kv = _write(tmp_path / "t.gguf", tok).kv
    assert (kv["tokenizer.ggml.eot_token_id"], kv["tokenizer.ggml.eom_token_id"]) == (4, 1)
    back = tokenizer_from_gguf(read_header(tmp_path / "t.gguf"))
    # llama.cpp also stops at <|eom_id|> by its text, so the reader does too
    assert back.end_tokens == ["<|endoftext|>", "<|stop|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>"]
    # <|stop|> needs a slot more than the two llama.cpp knows by name, whatever the order
    mixed = trained.replace(end_tokens=["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|stop|>"])
    assert _write(tmp_path / "m.gguf", mixed).kv["tokenizer.ggml.eot_token_id"] == 4
    assert "<|stop|>" in tokenizer_from_gguf(read_header(tmp_path / "m.gguf")).end_tokens
    lost = Tokenizer.train(["hello world"] * 20, vocab_size=270,
                           special_tokens=("<|endoftext|>", "<|a|>", "<|b|>", "<|c|>"))
    with pytest.raises(ConfigError, match=r"also ends at <\|c\|>"):
        _write(tmp_path / "y.gguf", lost.replace(end_tokens=["<|endoftext|>", "<|a|>", "<|b|>", "<|c|>"]))


def test_converter_style_file_reads_like_transformers(tmp_path, hf_dir):
    """A GGUF written the way llama.cpp's converter writes LLaMA 3 (gguf-py's SpecialVocab: bos,
    tokenizer_config's eos, add_bos from the post-processor, template; no eot key)."""
    header = read_header(write_converter_style_gguf(tmp_path / "c.gguf", hf_dir))
    tok = tokenizer_from_gguf(header)
    reference = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(hf_dir)
    for text in SAMPLES:
        assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
        if not text.startswith(BOS):  # transformers would add a second one
            assert tok.encode_prompt(text) == reference(text)["input_ids"], text
    assert (tok.bos_token, tok.eos_token, tok.add_bos, tok.chat_template) == (BOS, EOT, True, CHAT_TEMPLATE)
    assert tok.end_tokens == [EOT]  # <|end_of_text|> is no end marker to llama.cpp either


def test_other_vocabularies_and_bad_keys(tmp_path, own_tok):
    assert tokenizer_from_gguf(_write(tmp_path / "none.gguf", None)) is None  # no vocabulary
    spm = _write(tmp_path / "spm.gguf", None, extra=lambda w: w.add_tokenizer_model("llama"))
    assert tokenizer_from_gguf(spm) is None  # SentencePiece: not ours to read

    def keys(**over):
        def extra(w):
            w.add_tokenizer_model("gpt2")
            w.add_token_list(["a", "b", "ab"])
            w.add_token_merges(["a b"])
            if over.get("eos", True):
                w.add_eos_token_id(over.get("eos_id", 2))
            if "eot" in over:
                w.add_eot_token_id(over["eot"])
            if over.get("add_bos"):
                w.add_add_bos_token(True)
        return extra

    ok = tokenizer_from_gguf(_write(tmp_path / "ok.gguf", None, extra=keys()))
    assert ok.encode("ab") == [2] and ok.end_ids == (2,) and ok.bos_id is None
    for name, over, needle in [("noeos", {"eos": False}, "incomplete GPT-2 tokenizer metadata"),
                               ("eos", {"eos_id": 9}, "eos_token_id is 9, not a token id below 3"),
                               ("eot", {"eot": 3}, "eot_token_id is 3"),
                               ("bos", {"add_bos": True}, "add_bos_token is set but there is no bos")]:
        with pytest.raises(FormatError, match=needle) as exc:
            tokenizer_from_gguf(_write(tmp_path / f"{name}.gguf", None, extra=keys(**over)))
        assert str(tmp_path) in str(exc.value) and "\n" not in str(exc.value)


def test_unexpressible_tokenizers_are_refused(tmp_path, own_tok, llama_tok):
    backend = HFTokenizer.from_str(own_tok.to_str())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # llama.cpp has no such pre-tokenizer
    with pytest.raises(ConfigError, match="no pre-tokenizer"):
        _write(tmp_path / "w.gguf", Tokenizer(backend))
    wordlevel = HFTokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a"))
    with pytest.raises(ConfigError, match="not a BPE tokenizer"):
        _write(tmp_path / "x.gguf", Tokenizer(wordlevel))
    eot = llama_tok.backend.token_to_id(EOT)  # the last special token: rows past it are needed
    needle = rf"'<\|eot_id\|>' \(id {eot}\) is past the model's {eot} vocabulary"
    with pytest.raises(ConfigError, match=needle):
        _write(tmp_path / "small.gguf", llama_tok, vocab_size=eot)


@pytest.mark.parametrize("which", ["own_tok", "llama_tok"])
def test_any_value_of_any_key_gives_a_tokenizer_or_one_format_error(tmp_path, request, which):
    """Keys hold whatever a forged file says; the reader must never raise anything else."""
    import numpy as np

    header = _write(tmp_path / "t.gguf", request.getfixturevalue(which).replace(chat_template="T"))
    good = dict(header.kv)
    values = [None, 5, -1, 10**9, True, 1.5, "x", [], ["a b"], np.array([3, 3], dtype=np.int32), np.arange(500),
              np.array([], dtype=np.uint8)]
    for key in [k for k in good if k.startswith("tokenizer.")]:
        for value in values:
            header.kv = {k: v for k, v in good.items() if k != key}
            if value is not None:
                header.kv[key] = value
            try:
                tokenizer_from_gguf(header)
            except FormatError as e:
                assert "\n" not in str(e) and str(header.path) in str(e)
    header.kv = good
    assert tokenizer_from_gguf(header).chat_template == "T"
