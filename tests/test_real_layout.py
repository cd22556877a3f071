"""The first thing users try: import a Hugging Face BitNet directory laid out like
microsoft/bitnet-b1.58-2B-4T (LLaMA 3 special tokens, bos/eos and a chat template in
tokenizer_config.json, a list of end ids in generation_config.json), look at it, talk to it, and
take it back to transformers; and the same through a GGUF with a gpt2-type tokenizer.

Every step goes through the public CLI or API; the special tokens and the template must survive
each one, and generation must stop at <|eot_id|> as at <|end_of_text|>.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import bitnet158 as bn  # noqa: E402
from bitnet158.cli import main  # noqa: E402
from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.generate import stream_generate  # noqa: E402
from bitnet158.interop.gguf_export import export_gguf  # noqa: E402
from bitnet158.sampling import SamplingConfig  # noqa: E402

from hf_fixtures import BOS, CHAT_TEMPLATE, EOT, EOT_TEXT, make_2b4t_like_hf_dir  # noqa: E402

GREEDY = SamplingConfig(temperature=0.0)


class Forced(nn.Module):
    """The model with one token's logit raised above every other: greedy decoding picks it."""

    def __init__(self, model: nn.Module, token: int):
        super().__init__()
        self.model, self.token, self.config = model, token, model.config

    def forward(self, tokens, cache=None, last_only=False):
        logits = self.model(tokens, cache, last_only=last_only).clone()
        logits[..., self.token] = logits.abs().max() + 1e3
        return logits


def _check_tokenizer(tok, ids: dict[str, int]) -> None:
    assert tok.bos_token == BOS and tok.bos_id == ids[BOS] and tok.add_bos
    assert set(tok.end_tokens) == {EOT, EOT_TEXT} and set(tok.end_ids) == {ids[EOT], ids[EOT_TEXT]}
    assert tok.chat_template == CHAT_TEMPLATE


def _check_stops(model, tok) -> None:
    for end in (EOT, EOT_TEXT):  # either end token finishes the answer, and is not printed
        out = list(stream_generate(Forced(model, tok.backend.token_to_id(end)), tok, "Hello", 8, GREEDY))
        assert len(out) == 1 and out[-1].finish_reason == "stop" and out[-1].text == ""
    plain = tok.encode("a")[0]
    out = list(stream_generate(Forced(model, plain), tok, "Hello", 8, GREEDY))
    assert out[-1].finish_reason == "length" and out[-1].generated_tokens == 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_2b4t_like_hf_dir(tmp_path_factory.mktemp("hf") / "bitnet-2b4t-like")


@pytest.fixture(scope="module")
def ids(hf_dir):
    tokens = json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]
    return {t["content"]: t["id"] for t in tokens}


def test_import_info_generate_load(hf_dir, ids, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["import-hf", str(hf_dir), str(out)]) == 0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert EOT in info and EOT_TEXT in info and "chat template" in info
    assert main(["generate", str(out), "--prompt", "The with statement", "--max-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The with statement")
    model, tok = bn.load(out)
    _check_tokenizer(tok, ids)
    assert tok.encode_prompt("Hi")[0] == ids[BOS]
    _check_stops(model, tok)


def test_load_hf_save_hf_round_trip_through_transformers(hf_dir, ids, tmp_path):
    model, tok = bn.load_hf(hf_dir)
    _check_tokenizer(tok, ids)
    back = tmp_path / "back"
    bn.save_hf(model, back, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    assert hf_tok.bos_token == BOS and hf_tok.eos_token == EOT
    assert hf_tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(BOS + "<|start_header_id|>user")
    text = "The with statement"
    assert hf_tok(text)["input_ids"] == tok.encode_prompt(text)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert set(hf_model.generation_config.eos_token_id) == {ids[EOT], ids[EOT_TEXT]}
    assert hf_model.generation_config.bos_token_id == ids[BOS]
    prompt = torch.tensor([tok.encode_prompt(text)])
    with torch.no_grad():
        ours, theirs = model(prompt), hf_model(prompt).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-3)
    again, tok2 = bn.load_hf(back)  # and our reader takes its own output back
    _check_tokenizer(tok2, ids)


def test_gguf_with_a_gpt2_type_tokenizer_imports_and_generates(hf_dir, ids, tmp_path, capsys):
    _, tok = bn.load_hf(hf_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128)  # SwiGLU, tied: llama.cpp's bitnet graph
    torch.manual_seed(0)
    gguf_file = tmp_path / "model.gguf"
    export_gguf(bn.Transformer(cfg), gguf_file, "i2_s", tokenizer=tok)
    out = tmp_path / "from-gguf"
    assert main(["import-gguf", str(gguf_file), str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The with statement", "--max-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The with statement")
    model, back = bn.load(out)
    _check_tokenizer(back, ids)
    text = "naïve café, 中文 😀 and tabs\tok"
    assert back.encode_prompt(text) == tok.encode_prompt(text)
    _check_stops(model, back)
