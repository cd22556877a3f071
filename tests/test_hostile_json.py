"""Every JSON reader survives hostile input: each failure a fuzz run found is a one-line
BitNetError naming the file (and the field), never a traceback, a hang or a huge allocation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from bitnet158 import checkpoint
from bitnet158.checkpoint import ModelDir
from bitnet158.cli import main
from bitnet158.config import ModelConfig, preset
from bitnet158.errors import BitNetError, ConfigError, DataError
from bitnet158.interop.hf_import import load_hf
from bitnet158.interop.hf_llama import is_hf_directory, load_hf_llama
from bitnet158.interop.hf_tokenizer import read_hf_tokenizer
from bitnet158.model import Transformer
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.data.files import load_corpus
from common import one_line

DEEP = "[" * 100_000  # far past the recursion limit of a recursive parser
HUGE_INT = "1" + "0" * 5000  # past Python's 4300-digit int-from-string limit
TEXT = ["the quick brown fox jumps over the lazy dog"] * 20


def cli_one_line(capsys, path: Path, *fragments: str) -> None:
    """`bitnet158 info PATH` exits 2 with one `bitnet158: error:` line on stderr."""
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitnet158: error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def our_config_dir(tmp_path: Path, raw: str | None = None, **model) -> Path:
    """A model directory holding only config.json: enough for every check that precedes weights."""
    d = tmp_path / "ckpt"
    d.mkdir()
    if raw is None:
        doc = {"format": "bitnet158", "format_version": 2, "kind": "model",
               "model": {**preset("tiny").to_dict(), **model}}
        raw = json.dumps(doc)
    (d / "config.json").write_text(raw, encoding="utf-8")
    return d


# --- the file itself: nesting, huge integers, directories, bytes, names ------------------------

@pytest.mark.parametrize("raw, needle", [
    (DEEP, "nested"),
    ('{"format": "bitnet158", "model": {"num_layers": ' + HUGE_INT + "}}", "digits"),
    ('{"format": "bitnet158", "model": {"rope_theta": NaN}}', "NaN"),
])
def test_hostile_config_json_is_one_line(tmp_path, capsys, raw, needle):
    d = our_config_dir(tmp_path, raw)
    with pytest.raises(BitNetError) as e:
        ModelDir(d)
    one_line(e.value, "config.json", needle)
    cli_one_line(capsys, d, "config.json")


def test_config_json_as_a_directory(tmp_path, capsys):
    d = tmp_path / "ckpt"
    (d / "config.json").mkdir(parents=True)
    with pytest.raises(BitNetError) as e:
        ModelDir(d)
    one_line(e.value, "config.json", "directory")
    cli_one_line(capsys, d, "config.json")


def test_config_json_not_utf8(tmp_path):
    d = our_config_dir(tmp_path)
    (d / "config.json").write_bytes(b'{"format": "bitnet158\xff"}')
    with pytest.raises(BitNetError) as e:
        ModelDir(d)
    one_line(e.value, "config.json", "UTF-8")


def test_a_300_character_name(tmp_path, capsys):
    path = tmp_path / ("x" * 300)
    with pytest.raises(BitNetError) as e:
        ModelDir(path)
    one_line(e.value, "xxxx")
    cli_one_line(capsys, path, "xxxx")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=300, hidden_size=64, num_layers=1, intermediate_size=96, max_seq_len=32)
    return checkpoint.save(Transformer(cfg), tmp_path_factory.mktemp("m") / "model")


def _run_dir(tmp_path: Path, saved_model: Path, latest: bytes | None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-000002").symlink_to(saved_model, target_is_directory=True)
    if latest is not None:
        (run / "latest").write_bytes(latest)
    return run


@pytest.mark.parametrize("latest", [b"\xff\xfe", b"y" * 300, b"step-1\0", b"../elsewhere", b"s" * 100_000])
def test_a_hostile_latest_falls_back_to_the_newest_step(tmp_path, saved_model, latest):
    run = _run_dir(tmp_path, saved_model, latest)
    (tmp_path / "elsewhere").symlink_to(saved_model, target_is_directory=True)
    assert checkpoint.resolve(run) == run / "step-000002"


def test_latest_as_a_directory(tmp_path, saved_model):
    run = _run_dir(tmp_path, saved_model, None)
    (run / "latest").mkdir()
    assert checkpoint.resolve(run) == run / "step-000002"


@pytest.mark.parametrize("raw, needle", [
    (DEEP, "nested"), ('{"step": ' + HUGE_INT + "}", "digits"), ('{"step": "x"}', "step"),
    ('{"step": 1, "history": 5}', "history"), (None, "directory"),
])
def test_hostile_trainer_json(tmp_path, raw, needle):
    file = tmp_path / "trainer.json"
    file.mkdir() if raw is None else file.write_text(raw)
    model = Transformer(preset("tiny", vocab_size=300, hidden_size=64, num_layers=1, intermediate_size=96))
    with pytest.raises(BitNetError) as e:
        checkpoint.load_training_state(tmp_path, model, torch.optim.AdamW(model.parameters()))
    one_line(e.value, "trainer.json", needle)


# --- ModelConfig: values that parse but must not reach an allocation ---------------------------

def test_norm_eps_1e400_is_infinite(tmp_path, capsys):
    d = our_config_dir(tmp_path, json.dumps({"format": "bitnet158", "model": preset("tiny").to_dict()})
                       .replace('"norm_eps": 1e-05', '"norm_eps": 1e400'))
    with pytest.raises(BitNetError) as e:
        ModelDir(d)
    one_line(e.value, "config.json", "norm_eps")
    cli_one_line(capsys, d, "norm_eps")


def test_a_million_layers_fail_at_once(tmp_path, capsys):
    d = our_config_dir(tmp_path, num_layers=10**6)
    t0 = time.perf_counter()
    with pytest.raises(BitNetError) as e:
        ModelDir(d)
    assert time.perf_counter() - t0 < 1.0
    one_line(e.value, "config.json", "num_layers")
    cli_one_line(capsys, d, "num_layers")


def test_a_million_layers_never_reach_the_skeleton():
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e, torch.device("meta"):
        Transformer(ModelConfig(num_layers=10**6))
    assert time.perf_counter() - t0 < 1.0
    one_line(e.value, "num_layers")


def test_a_billion_positions_fail_before_rope_tables(tmp_path, capsys, monkeypatch):
    import bitnet158.model as model_module
    monkeypatch.setattr(model_module, "rope_tables", lambda *a, **k: pytest.fail("RoPE tables were built"))
    d = our_config_dir(tmp_path, max_seq_len=10**9)
    with pytest.raises(BitNetError) as e:
        ModelDir(d)
    one_line(e.value, "config.json", "max_seq_len")
    cli_one_line(capsys, d, "max_seq_len")
    with pytest.raises(ConfigError):
        Transformer(ModelConfig(max_seq_len=10**9))


@pytest.mark.parametrize("field, value", [
    ("rope_theta", "x"), ("rope_theta", float("inf")), ("norm_eps", 1.0), ("norm_eps", True),
    ("num_layers", True), ("num_heads", 4.0), ("hidden_size", 2**17), ("vocab_size", 2**23),
    ("intermediate_size", 2**19), ("num_heads", 2048), ("rope_theta", 10**400),
])
def test_model_config_bounds_and_types(field, value):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{field: value}).validate()
    one_line(e.value, field)


def test_real_shapes_stay_valid():
    for name in ("tiny", "small", "700m", "1.3b", "3b", "2b4t"):
        preset(name)
    ModelConfig(vocab_size=262_144, hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                intermediate_size=53248, max_seq_len=1_010_000, rope_theta=1e7, norm_eps=1e-6).validate()


# --- Hugging Face configs of the wrong types ----------------------------------------------------

HF_BITNET = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": 300, "hidden_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "relu2", "rope_theta": 500000.0,
             "tie_word_embeddings": True}
HF_LLAMA = {**HF_BITNET, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}


def hf_dir(tmp_path: Path, base: dict, **changes) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    # "1e400" is valid JSON that parses as inf (json.dumps would write the non-JSON Infinity)
    (d / "config.json").write_text(json.dumps({**base, **changes}).replace('"<1e400>"', "1e400"))
    return d


@pytest.mark.parametrize("changes, needle", [
    ({"rope_scaling": -1}, "rope_scaling"), ({"rope_parameters": "x"}, "rope_parameters"),
    ({"quantization_config": "x"}, "quantization_config"), ({"rms_norm_eps": ""}, "rms_norm_eps"),
    ({"hidden_act": []}, "hidden_act"), ({"architectures": 5}, "architectures"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"), ({"head_dim": "16"}, "head_dim"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"), ({"rope_theta": "x"}, "rope_theta"),
    ({"max_position_embeddings": 10**9}, "max_position_embeddings"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers"), ({"rms_norm_eps": "<1e400>"}, "rms_norm_eps"),
    ({"num_key_value_heads": 2.5}, "num_key_value_heads"),
    ({"quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": 5}}, "modules_to_not_convert"),
])
def test_hf_bitnet_config_of_the_wrong_types(tmp_path, changes, needle):
    with pytest.raises(BitNetError) as e:
        load_hf(hf_dir(tmp_path, HF_BITNET, **changes))
    one_line(e.value, "config.json", needle)


@pytest.mark.parametrize("changes, needle", [
    ({"quantization_config": "x"}, "quantization_config"), ({"model_type": []}, "model_type"),
    ({"architectures": {"a": 1}}, "architectures"), ({"rope_scaling": -1}, "rope_scaling"),
    ({"sliding_window": "x"}, "sliding_window"), ({"rms_norm_eps": ""}, "rms_norm_eps"),
    ({"max_position_embeddings": "x"}, "max_position_embeddings"), ({"hidden_act": {}}, "hidden_act"),
])
def test_hf_llama_config_of_the_wrong_types(tmp_path, changes, needle):
    with pytest.raises(BitNetError) as e:
        load_hf_llama(hf_dir(tmp_path, HF_LLAMA, **changes))
    one_line(e.value, "config.json", needle)


@pytest.mark.parametrize("raw", [DEEP, '{"a": ' + HUGE_INT + "}", None])
def test_hf_config_unreadable(tmp_path, raw):
    d = tmp_path / "hf"
    d.mkdir()
    file = d / "config.json"
    file.mkdir() if raw is None else file.write_text(raw)
    assert not is_hf_directory(d)
    with pytest.raises(BitNetError) as e:
        load_hf(d)
    one_line(e.value, "config.json")


@pytest.mark.parametrize("weight_map, needle", [
    ({"model.embed_tokens.weight": None}, "model.embed_tokens.weight"),
    ({"model.embed_tokens.weight": 5}, "model.embed_tokens.weight"),
    ({"model.embed_tokens.weight": "../escape.safetensors"}, "escape"),
    (None, "weight_map"), ([], "weight_map"),
])
def test_hf_index_with_bad_shards(tmp_path, weight_map, needle):
    d = hf_dir(tmp_path, HF_BITNET)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(BitNetError) as e:
        load_hf(d)
    one_line(e.value, "model.safetensors.index.json", needle)


def test_hf_tokenizer_config_not_utf8_or_nested(tmp_path):
    tok = Tokenizer.train(TEXT, vocab_size=300)
    d = tmp_path / "hf"
    d.mkdir()
    tok.backend.save(str(d / "tokenizer.json"))
    for raw in (b"\xff\xfe{}", DEEP.encode()):
        (d / "tokenizer_config.json").write_bytes(raw)
        with pytest.raises(BitNetError) as e:
            read_hf_tokenizer(d)
        one_line(e.value, "tokenizer_config.json")


# --- JSONL data ---------------------------------------------------------------------------------

def test_jsonl_lone_surrogate_is_one_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "\\ud800 alone"}\n')
    with pytest.raises(DataError) as e:
        load_corpus([f])
    one_line(e.value, "data.jsonl:2", "surrogate")


@pytest.mark.parametrize("raw, needle", [(DEEP, "nested"), ('{"text": ' + HUGE_INT + "}", "digits")])
def test_jsonl_hostile_lines(tmp_path, raw, needle):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "fine"}\n' + raw + "\n")
    with pytest.raises(DataError) as e:
        load_corpus([f])
    one_line(e.value, "data.jsonl:2", needle)


def test_jsonl_line_with_u2028_is_accepted(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "one\u2028two"}\n{"text": "three"}\n', encoding="utf-8")
    corpus = load_corpus([f])
    joined = "".join(d.text for d in corpus.train + corpus.heldout)  # the held-out tail may cut a row
    assert "one\u2028two" in joined and "three" in joined, joined


# --- the safetensors header is JSON too; names from files stay on one line -----------------------

@pytest.mark.parametrize("header", [DEEP.encode(), b'{"a": ' + HUGE_INT.encode() + b"}"])
def test_hostile_safetensors_header(tmp_path, header):
    d = hf_dir(tmp_path, HF_BITNET)
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(BitNetError) as e:
        load_hf(d)
    one_line(e.value, "model.safetensors", "not JSON")


def test_a_newline_in_a_name_from_the_file_stays_escaped(tmp_path):
    with pytest.raises(BitNetError) as e:
        load_hf(hf_dir(tmp_path, HF_BITNET, architectures=["Evil\nModel\u2028x"]))
    one_line(e.value, "config.json", "Evil\\nModel")


def test_accessors_name_file_key_and_value():
    from bitnet158.jsonio import get_bool, get_dict, get_float, get_int, get_list, get_str
    doc = {"n": True, "f": 10**400, "s": 5, "b": 1, "d": [], "l": [1, "x"], "z": None}
    for call, needle in [(lambda: get_int(doc, "n", "c.json"), "n must be an integer, got True"),
                         (lambda: get_float(doc, "f", "c.json"), "digits"),
                         (lambda: get_str(doc, "s", "c.json"), "s must be a string, got 5"),
                         (lambda: get_bool(doc, "b", "c.json"), "b must be true or false, got 1"),
                         (lambda: get_dict(doc, "d", "c.json"), "d must be a JSON object, got []"),
                         (lambda: get_list(doc, "l", "c.json", items=int), "entry 'x'"),
                         (lambda: get_int(doc, "z", "c.json"), "z is missing")]:
        with pytest.raises(BitNetError) as e:
            call()
        one_line(e.value, "c.json", needle)
    assert get_int(doc, "z", "c.json", default=7) == 7 and get_float({"x": 2}, "x", "c.json") == 2.0
