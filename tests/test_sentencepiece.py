"""A SentencePiece tokenizer.model (LLaMA-2 / 1bitLLM repos) imports as a tokenizer whose ids are
SentencePiece's own, and the imported model generates from it."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest

from bitnet158 import load
from bitnet158.cli import main
from bitnet158.errors import CheckpointError
from bitnet158.interop.spm_tokenizer import sentencepiece_backend
from bitnet158.train.data.corpus import default_corpus

from test_streamed_conversions import SWIGLU_UNTIED, _onebitllm_dir

spm = pytest.importorskip("sentencepiece")

PROMPTS = ["Hello world", "  two  spaces and\ttabs", "naïve ☕ 代码 🎉", "def f(x):\n    return x * 2\n",
           "The quick brown fox 12345"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A LLaMA-style SentencePiece BPE model (byte fallback, identity normalization, dummy prefix)
    trained on the embedded corpus in about a second."""
    lines = [line for doc in default_corpus().train[:200] for line in doc.text.splitlines() if line.strip()]
    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:20000]), model_writer=blob, vocab_size=500,
                                   model_type="bpe", character_coverage=0.995, byte_fallback=True, normalization_rule_name="identity",
                                   add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1,
                                   eos_id=2, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(blob.getvalue())
    return path, lines


def test_converted_ids_equal_sentencepiece_ids(sp_model):
    path, lines = sp_model
    sp = spm.SentencePieceProcessor(model_file=str(path))
    backend = sentencepiece_backend(path)
    for text in PROMPTS + lines[::97][:150]:
        ids = sp.encode(text)
        assert backend.encode(text, add_special_tokens=False).ids == ids, text
        assert backend.decode(ids) == sp.decode(ids), text


def test_onebitllm_directory_with_tokenizer_model_generates(tmp_path, sp_model, capsys):
    path, _ = sp_model
    hf = _onebitllm_dir(tmp_path / "hf", dataclasses.replace(SWIGLU_UNTIED, vocab_size=512), seed=7)
    (hf / "tokenizer.model").write_bytes(path.read_bytes())
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                          "add_bos_token": True}))
    assert main(["import-hf", str(hf), str(tmp_path / "out")]) == 0
    assert "tokenizer ends on </s>" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    _, tok = load(tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for text in PROMPTS:
        assert tok.encode_prompt(text) == [sp.bos_id()] + sp.encode(text)
        # streamed output: the bytes of each id, joined, are SentencePiece's text (the dummy
        # prefix's space aside), multi-byte characters split over byte pieces included
        streamer = tok.streaming_detokenizer()
        text_out = "".join(streamer.add(i) for i in sp.encode(text)) + streamer.finalize()
        assert text_out == " " + sp.decode(sp.encode(text))
    assert main(["generate", str(tmp_path / "out"), "--prompt", "Hello world", "--max-tokens", "8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_unigram_and_garbage_models_are_refused_in_one_line(tmp_path, sp_model):
    _, lines = sp_model
    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:5000]), model_writer=blob, vocab_size=200,
                                   model_type="unigram", minloglevel=2)
    (tmp_path / "uni.model").write_bytes(blob.getvalue())
    with pytest.raises(CheckpointError, match="unigram model; only BPE"):
        sentencepiece_backend(tmp_path / "uni.model")
    (tmp_path / "junk.model").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        sentencepiece_backend(tmp_path / "junk.model")
