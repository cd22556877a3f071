"""The streamed conversions write the same bytes as the in-memory ones they replace.

`pack` (checkpoint/packing.py) against `pack_` + `save_packed` on the loaded model, and
`import-hf --pack` of float masters against `load_hf` + `pack_` + `save_packed`: model.safetensors,
config.json and tokenizer.json compared byte for byte, with row blocks made small so the head
table and the embedding are built from several blocks. Plus the import-hf options around them:
the training form kept in fp16, the missing-tokenizer warning, --tokenizer.
"""

from __future__ import annotations

import filecmp
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bitnet158
from bitnet158 import checkpoint, safetensors_io
from bitnet158.cli import main
from bitnet158.config import ModelConfig
from bitnet158.interop.hf_import import NoTokenizerWarning, import_hf, load_hf
from bitnet158.model import Transformer
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig
from bitnet158.tokenizer import Tokenizer

FILES = ("model.safetensors", "config.json", "tokenizer.json")


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    monkeypatch.setattr(safetensors_io, "ROW_BLOCK_BYTES", 1000)  # ~4 rows a block: many blocks


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["the quick brown fox jumps over the lazy dog\n"] * 30, vocab_size=300)


def _same_files(a, b) -> None:
    for name in FILES:
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


def _trained_like(config: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():  # norms away from 1 so a mix-up of tensors shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


CONFIGS = {
    "tied-relu2": ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=96, max_seq_len=64),
    "untied-swiglu": ModelConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=80,
                                 max_seq_len=64, activation="swiglu", tie_embeddings=False),
    "b1": ModelConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64,
                      max_seq_len=64, mode="b1"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fmt,head", [("i2", "int8"), ("base3", "q4"), ("lut2", "fp16"), ("i2", "fp32")])
def test_streamed_pack_writes_the_in_memory_bytes(tmp_path, tokenizer, name, fmt, head):
    src = checkpoint.save(_trained_like(CONFIGS[name], seed=1), tmp_path / "ckpt", tokenizer)
    model, tok = bitnet158.load(src)
    pack_(model, PackConfig(format=fmt, head=head))
    memory = checkpoint.save_packed(model, tmp_path / "memory", tok)
    streamed = checkpoint.pack_dir(src, tmp_path / "streamed", PackConfig(format=fmt, head=head))
    _same_files(memory, streamed)


def test_pack_cli_streams_and_reports_memory(tmp_path, tokenizer, capsys):
    src = checkpoint.save(_trained_like(CONFIGS["tied-relu2"], seed=2), tmp_path / "ckpt", tokenizer)
    assert main(["pack", str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "packed 61,440 linear weights" in out and "peak memory" in out  # 2 × (12,288 attention + 18,432 ffn)
    model, _ = bitnet158.load(tmp_path / "out")
    assert model.packing.format == "i2"


def _onebitllm_dir(path, config: ModelConfig, seed: int, dtype=torch.float16):
    """A 1bitLLM-layout directory (BitnetForCausalLM, LLaMA names, fp16 masters) of `config`'s shapes."""
    model = _trained_like(config, seed)
    renames = {".attn_sub_norm.": ".inner_attn_ln.", ".ffn_sub_norm.": ".ffn_layernorm."}
    sd = {}
    for name, t in model.state_dict().items():
        for a, b in renames.items():
            name = name.replace(a, b)
        sd[name if name.startswith("lm_head") else "model." + name] = t.to(dtype).contiguous()
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["BitnetForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2}))
    return path


SWIGLU_UNTIED = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                            max_seq_len=64, activation="swiglu", tie_embeddings=False, rope_theta=10000.0)


@pytest.mark.parametrize("fmt,head", [("i2", "int8"), ("base3", "fp16")])
def test_import_hf_pack_of_masters_writes_the_in_memory_bytes(tmp_path, tokenizer, fmt, head):
    hf = _onebitllm_dir(tmp_path / "hf", SWIGLU_UNTIED, seed=3)
    tokenizer.save(hf / "tokenizer.json")
    model, tok = load_hf(hf)  # the training form, whole in memory
    pack_(model, PackConfig(format=fmt, head=head))
    memory = checkpoint.save_packed(model, tmp_path / "memory", tok)
    streamed = import_hf(hf, tmp_path / "streamed", pack=PackConfig(format=fmt, head=head))
    _same_files(memory, streamed)


def test_import_hf_cli_packs_masters_by_default_and_keeps_dtype_on_request(tmp_path, tokenizer, capsys):
    hf = _onebitllm_dir(tmp_path / "hf", SWIGLU_UNTIED, seed=4, dtype=torch.bfloat16)
    tokenizer.save(hf / "tokenizer.json")
    assert main(["import-hf", str(hf), str(tmp_path / "packed")]) == 0
    assert "packed (i2) checkpoint with a int8 head" in capsys.readouterr().out
    assert main(["import-hf", str(hf), str(tmp_path / "wide"), "--latent"]) == 0
    assert main(["import-hf", str(hf), str(tmp_path / "narrow"), "--latent", "--keep-dtype"]) == 0
    with safe_open(str(tmp_path / "narrow" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("layers.0.mlp.down_proj.weight").dtype == torch.bfloat16
    narrow_bytes = (tmp_path / "narrow" / "model.safetensors").stat().st_size
    assert narrow_bytes < 0.55 * (tmp_path / "wide" / "model.safetensors").stat().st_size
    wide, _ = bitnet158.load(tmp_path / "wide")
    narrow, _ = bitnet158.load(tmp_path / "narrow")  # widened on load: bf16 → fp32 is exact
    for (name, a), (_, b) in zip(wide.state_dict().items(), narrow.state_dict().items()):
        assert b.dtype == torch.float32 and torch.equal(a, b), name


def test_import_without_a_tokenizer_warns_and_tokenizer_option_adds_one(tmp_path, tokenizer, capsys):
    hf = _onebitllm_dir(tmp_path / "hf", SWIGLU_UNTIED, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import_hf(hf, tmp_path / "bare", pack="i2")
    assert any(issubclass(w.category, NoTokenizerWarning) and "--tokenizer PATH" in str(w.message) for w in caught)
    assert main(["import-hf", str(hf), str(tmp_path / "cli-bare")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "has no tokenizer" in err
    tokenizer.save(tmp_path / "elsewhere.json")
    assert main(["import-hf", str(hf), str(tmp_path / "with"), "--tokenizer", str(tmp_path / "elsewhere.json")]) == 0
    _, tok = bitnet158.load(tmp_path / "with")
    assert tok is not None and tok.encode("the lazy dog") == tokenizer.encode("the lazy dog")


def test_import_hf_option_mistakes_are_one_line(tmp_path, capsys):
    hf = _onebitllm_dir(tmp_path / "hf", SWIGLU_UNTIED, seed=6)
    for argv, fragment in ((["--keep-dtype"], "add --latent"), (["--latent", "--pack", "i2"], "no --pack"),
                           (["--tokenizer", str(tmp_path / "nope")], "no such tokenizer")):
        assert main(["import-hf", str(hf), str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bitnet158: error: ") and fragment in err and "\n" not in err
    assert not (tmp_path / "out").exists()


GGUF_CONFIG = ModelConfig(vocab_size=300, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=320,
                          activation="swiglu", max_seq_len=64)


@pytest.mark.parametrize("head", ["int8", "q4", None])
def test_streamed_gguf_export_and_import_write_the_in_memory_bytes(tmp_path, tokenizer, head):
    """export-gguf from a directory (one layer at a time) against export from the loaded model,
    and import-gguf (streamed) against load_gguf + save_packed; FFN 320 pads to 512 and back."""
    from bitnet158.interop.gguf_export import export_gguf
    from bitnet158.interop.gguf_import import import_gguf, load_gguf

    src = checkpoint.save(_trained_like(GGUF_CONFIG, seed=8), tmp_path / "ckpt", tokenizer)
    if head is not None:
        src = checkpoint.pack_dir(src, tmp_path / "packed", PackConfig(format="base3", head=head))
    model, tok = bitnet158.load(src)
    for gtype in ("tq2_0", "i2_s"):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "b").mkdir(exist_ok=True)
        streamed = export_gguf(src, tmp_path / "a" / f"{gtype}.gguf", gtype)
        memory = export_gguf(model, tmp_path / "b" / f"{gtype}.gguf", gtype, tokenizer=tok)
        assert filecmp.cmp(streamed.path, memory.path, shallow=False), gtype
        assert streamed.max_scale_rel_error == memory.max_scale_rel_error
        back, back_tok = load_gguf(streamed.path)
        in_memory = checkpoint.save_packed(back, tmp_path / f"memory-{gtype}", back_tok)
        report = import_gguf(streamed.path, tmp_path / f"streamed-{gtype}")
        _same_files(in_memory, report.out)


def test_gguf_clis_report_peak_memory(tmp_path, tokenizer, capsys):
    src = checkpoint.save(_trained_like(GGUF_CONFIG, seed=9), tmp_path / "ckpt", tokenizer)
    assert main(["export-gguf", str(src), str(tmp_path / "m.gguf")]) == 0
    assert main(["import-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("peak memory" in line for line in out)
