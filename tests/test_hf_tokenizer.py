"""HF tokenizer files ⇄ our Tokenizer: the 2B4T layout's roles (bos, eos + end-of-turn from
generation_config.json's list, add_bos, chat template) are read, written, and read back by
transformers' own AutoTokenizer to the same tokens and template."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet helpers are torch.compile'd

import pytest  # noqa: E402

transformers = pytest.importorskip("transformers")
from hf_fixtures import BOS, CHAT_TEMPLATE, EOT, EOT_TEXT, make_2b4t_like_hf_dir  # noqa: E402

from bitnet158.errors import CheckpointError  # noqa: E402
from bitnet158.interop.hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer  # noqa: E402
from bitnet158.tokenizer import DEFAULT_EOS, Tokenizer  # noqa: E402

TEXTS = ["Hello world, the quick brown fox!", "def forward(self, x):\n    return x\n", "naïve 中文 😀",
         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "  spaces\t\r\n12345"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_2b4t_like_hf_dir(tmp_path_factory.mktemp("hf") / "2b4t")


def _ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.backend.token_to_id(t) for t in (BOS, EOT_TEXT, EOT)}


def _variant(tmp_path, **kw):
    return make_2b4t_like_hf_dir(tmp_path / "variant", **kw)


def test_reads_the_2b4t_layout(hf_dir):
    tok = read_hf_tokenizer(hf_dir)
    ids = _ids(tok)
    assert tok.eos_token == EOT and tok.bos_token == BOS and tok.add_bos
    assert tok.end_tokens == [EOT, EOT_TEXT] and tok.end_ids == (ids[EOT], ids[EOT_TEXT])
    assert tok.bos_id == ids[BOS] == tok.vocab_size - 5  # special tokens follow the learned vocabulary
    assert tok.chat_template == CHAT_TEMPLATE
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)  # what transformers makes of it
    for text in TEXTS:
        assert tok.encode_prompt(text) == reference(text)["input_ids"]
        assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text)) == text


def test_variants_of_the_layout(tmp_path):
    d = _variant(tmp_path, add_bos_token=None, chat_template_file=True, generation_config=False)
    tok = read_hf_tokenizer(d)  # add_bos from the post-processor, template from the .jinja file,
    assert tok.add_bos and tok.chat_template == CHAT_TEMPLATE  # ends from config.json's single id
    assert tok.end_tokens == [EOT, EOT_TEXT] and tok.bos_token == BOS
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(add_bos_token=False, chat_template=[{"name": "tool_use", "template": "T"},
                                                  {"name": "default", "template": "D"}])
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "chat_template.jinja").unlink()
    tok = read_hf_tokenizer(d)
    assert not tok.add_bos and tok.chat_template == "D" and tok.encode_prompt("hi") == tok.encode("hi")
    tc.update(bos_token=None, eos_token={"content": EOT_TEXT, "special": True}, chat_template=None)
    del tc["add_bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(eos_token_id=7, bos_token_id=[8])  # ordinary BPE pieces: transformers' defaults, skipped
    tok = read_hf_tokenizer(d, cfg)
    assert tok.end_tokens == [EOT_TEXT] and tok.bos_token == BOS and tok.add_bos  # no generation_config
    assert tok.bos_id == _ids(tok)[BOS]  # nor any bos id: the post-processor's first token is bos
    assert tok.chat_template is None
    (d / "tokenizer.json").unlink()
    assert read_hf_tokenizer(d) is None


def test_write_then_transformers_reads_the_same(hf_dir, tmp_path):
    tok = read_hf_tokenizer(hf_dir)
    ids = _ids(tok)
    out = tmp_path / "out"
    got = write_hf_tokenizer(tok, out, model_max_length=256)
    assert got == {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOT], ids[EOT_TEXT]]}
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (theirs.bos_token, theirs.eos_token, theirs.model_max_length) == (BOS, EOT, 256)
    assert theirs.chat_template == CHAT_TEMPLATE
    for text in TEXTS:
        assert theirs(text)["input_ids"] == original(text)["input_ids"] == tok.encode_prompt(text)
    rendered = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == original.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(BOS + "<|start_header_id|>system")
    assert rendered.endswith("assistant<|end_header_id|>\n\n")
    # with the returned ids in generation_config.json, our reader gets every role back
    (out / "generation_config.json").write_text(json.dumps(got))
    assert read_hf_tokenizer(out, {}).section() == tok.section()
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [ids[EOT], ids[EOT_TEXT]] and gen.bos_token_id == ids[BOS]


def test_our_trained_tokenizer_keeps_the_gpt2_convention(tmp_path):
    tok = Tokenizer.train(["def f(x):\n    return x\n", "hello world"] * 20, vocab_size=300)
    got = write_hf_tokenizer(tok, tmp_path, model_max_length=64)
    assert got == {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}  # one end token: an int
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == (DEFAULT_EOS, DEFAULT_EOS, False)
    assert "chat_template" not in tc and tc["clean_up_tokenization_spaces"] is False
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs("return x")["input_ids"] == tok.encode("return x")  # no bos prepended
    assert theirs.eos_token == theirs.bos_token == "<|endoftext|>" and theirs.chat_template is None
    assert read_hf_tokenizer(tmp_path).section() == tok.section()
    old = Tokenizer.from_section(tok.backend, {"eos_token": "<|endoftext|>"})  # format 1: no bos
    assert write_hf_tokenizer(old, tmp_path / "old", 64) == got
    assert json.loads((tmp_path / "old" / "tokenizer_config.json").read_text())["bos_token"] == DEFAULT_EOS
    template = "{{ messages[0]['content'] }}"
    write_hf_tokenizer(tok.replace(chat_template=template), tmp_path / "t", 64)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "t").chat_template == template


@pytest.mark.parametrize("file, change, needle", [
    ("tokenizer_config.json", "{not json", "not a readable JSON file"),
    ("tokenizer_config.json", {"bos_token": 5}, "bos_token must be a string"),
    ("tokenizer_config.json", {"add_bos_token": "yes"}, "add_bos_token must be true or false"),
    ("tokenizer_config.json", {"chat_template": 5}, "chat_template must be a string"),
    ("tokenizer_config.json", {"chat_template": [{"name": "default"}]}, "chat_template entries"),
    ("generation_config.json", {"eos_token_id": "2"}, "eos_token_id must be an integer"),
    ("generation_config.json", {"eos_token_id": [1, True]}, "eos_token_id must be an integer"),
    ("generation_config.json", [1, 2], "expected a JSON object"),
    ("config.json", {"bos_token_id": 1.5}, "bos_token_id must be an integer"),
    ("tokenizer.json", "{", "not a valid tokenizer.json"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, file, change, needle):
    d = _variant(tmp_path)
    path = d / file
    if isinstance(change, dict):
        doc = json.loads(path.read_text())
        doc.update(change)
        path.write_text(json.dumps(doc))
    else:
        path.write_text(change if isinstance(change, str) else json.dumps(change))
    with pytest.raises(CheckpointError) as exc:
        read_hf_tokenizer(d)
    msg = str(exc.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_a_token_missing_from_the_vocabulary_is_named(tmp_path):
    d = _variant(tmp_path)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["eos_token"] = "<|im_end|>"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(CheckpointError, match=r"no end-of-text token '<\|im_end\|>'") as exc:
        read_hf_tokenizer(d)
    assert str(d) in str(exc.value)


def test_fixture_weights_run_in_transformers(hf_dir):
    """The fixture is a real BitNetForCausalLM directory, not just the shape of one."""
    import torch

    model = transformers.BitNetForCausalLM.from_pretrained(hf_dir).eval()
    tok = read_hf_tokenizer(hf_dir)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode_prompt("Hello world")])).logits
    assert logits.shape == (1, 1 + len(tok.encode("Hello world")), tok.vocab_size)
    assert torch.isfinite(logits).all() and logits.float().std() > 0
