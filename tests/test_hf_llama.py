"""Hugging Face LLaMA-family import (`bitnet158.interop.hf_llama`) and `bitnet158 convert` from it.

Tiny random LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM models are built and saved
with transformers itself; our FP import must give transformers' logits on the same tokens. Then a
directory with a tokenizer.json converts to b1.58 through the CLI and the result generates.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # eager is much faster for tiny models

import pytest
import torch

transformers = pytest.importorskip("transformers")
from bitnet158 import checkpoint  # noqa: E402
from bitnet158.cli import main  # noqa: E402
from bitnet158.errors import CheckpointError  # noqa: E402
from bitnet158.interop.hf_llama import hf_llama_config, is_hf_directory, load_hf_llama  # noqa: E402
from bitnet158.tokenizer import Tokenizer  # noqa: E402
from bitnet158.train import calibration, hooks, ternarize  # noqa: E402

VOCAB = 300
TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
TOL = 1e-4  # fp32 on both sides; only float summation order differs
TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
        "for i in range(10):\n    print(i * i)\n", "class Point:\n    x: int\n    y: int\n"]
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def _random_model(kind: str = "llama", tie: bool = False, seed: int = 0, **extra):
    config_cls, model_cls = ARCHS[kind]
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # gains away from 1 and non-zero biases, so a missed one would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.normal_(0.0, 1.0)
    return model


def _save(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    return directory


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True)])
def test_fp_import_matches_transformers(tmp_path, kind, tie):
    hf = _random_model(kind, tie)
    directory = _save(hf, tmp_path / kind)
    assert is_hf_directory(directory)
    ours, tokenizer = load_hf_llama(directory)
    assert tokenizer is None  # no tokenizer.json in this directory
    cfg = ours.config
    assert (cfg.mode, cfg.sub_norm, cfg.tie_embeddings, cfg.qkv_bias) == ("fp", False, tie, kind == "qwen2")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta, cfg.norm_eps) == (4, 2, 5000.0, 1e-6)
    with torch.no_grad():
        got = ours(TOKENS)
    want = _logits(hf)
    err = float((got - want).abs().max())
    assert err < TOL, f"max |Δlogit| {err:.2e} (logits up to {float(want.abs().max()):.1f})"


def test_sharded_import_and_sliding_window_cap(tmp_path):
    hf = _random_model("mistral", sliding_window=64)
    directory = _save(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("*.safetensors"))) > 1
    ours, _ = load_hf_llama(directory)
    assert ours.config.max_seq_len == 64  # full attention equals the window only within it
    with torch.no_grad():
        assert float((ours(TOKENS) - _logits(hf)).abs().max()) < TOL


def test_pickle_only_directory_is_refused_unopened(tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    hf = _random_model()
    hf.config.save_pretrained(directory)
    # not a real pickle at all: opening it would fail differently, so the message proves it was not
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="pickle is refused"):
        load_hf_llama(directory)


@pytest.mark.parametrize("change,fragment", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     "architecture GPT2LMHeadModel cannot be converted; supported: LlamaForCausalLM, MistralForCausalLM, "
     "Qwen2ForCausalLM"),
    ({"architectures": ["BitNetForCausalLM"]}, "already BitNet"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "factor"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"quantization_config": {"quant_method": "gptq"}}, "already quantized"),
])
def test_unsupported_configs_are_one_line_errors(change, fragment):
    doc = _random_model().config.to_dict()
    doc["architectures"] = ["LlamaForCausalLM"]
    doc.update(change)
    with pytest.raises(CheckpointError) as info:
        hf_llama_config(doc)
    assert fragment in str(info.value) and "\n" not in str(info.value)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def test_llama32_style_model_with_llama3_rope_matches_transformers(tmp_path):
    """Tied embeddings and Llama 3.1's frequency-dependent RoPE rescaling (an original context of 16
    puts the 8 frequencies of head_dim 16 in all three bands: kept, blended, stretched)."""
    config_cls, model_cls = ARCHS["llama"]
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=0,
                     rope_parameters=LLAMA3_ROPE)
    torch.manual_seed(5)
    hf = model_cls(cfg).eval()
    directory = _save(hf, tmp_path / "llama32")
    ours, _ = load_hf_llama(directory)
    c = ours.config
    assert (c.rope_scaling, c.rope_factor, c.rope_original_context, c.tie_embeddings) == ("llama3", 32.0, 16, True)
    with torch.no_grad():
        got = ours(TOKENS)
        plain = load_hf_llama(directory)[0]
    err = float((got - _logits(hf)).abs().max())
    print(f"llama3 RoPE: max |logit diff| vs transformers {err:.2e}")
    assert err < TOL
    # the scaling matters here: the same weights with plain RoPE give other logits
    import dataclasses

    from bitnet158.model import rope_tables

    cos, _ = rope_tables(dataclasses.replace(c, rope_scaling="none"))
    assert not torch.allclose(cos, plain.rope_cos)


def test_conversion_inserts_sub_norms_at_the_inputs_rms(tmp_path):
    ours, _ = load_hf_llama(_save(_random_model(), tmp_path / "m"))
    stream = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(3))
    model = ternarize.rtn(ours, stream, calib_batches=1, batch_size=2, seq_len=32)
    assert model.config.mode == "b158" and model.config.sub_norm
    calib = calibration.calibration_batches(stream, 1, 2, 32)
    for i in range(2):
        attn_in = calibration.capture_inputs(ours, f"layers.{i}.self_attn.o_proj", calib)
        gain = model.layers[i].self_attn.attn_sub_norm.weight
        assert torch.allclose(gain, attn_in.pow(2).mean(-1).sqrt().mean().expand_as(gain), rtol=1e-4)
        assert model.layers[i].mlp.ffn_sub_norm.weight.shape == (128,)
    # with λ = 0 (no quantization) the inserted norms keep each projection near its FP output
    hooks.set_lambda(model, 0.0)
    with torch.no_grad():
        ref = ours(TOKENS)
        drift = (model(TOKENS) - ref).pow(2).mean() / ref.pow(2).mean()
    assert drift < 0.1, float(drift)
    bare = ternarize.rtn(ours)  # no calibration tokens: the gains start at 1
    assert all(bool((m.weight == 1).all()) for n, m in bare.named_modules() if n.endswith("sub_norm"))


# --- end to end through the CLI --------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir_with_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tok = Tokenizer.train(TEXT * 50, vocab_size=VOCAB, special_tokens=("</s>", "<s>"))
    assert tok.vocab_size <= VOCAB
    model = _random_model("llama")
    model.config.eos_token_id = tok.eos_id
    _save(model, directory)
    tok.save(directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return directory


def test_cli_converts_hf_llama_and_the_result_generates(tmp_path, hf_dir_with_tokenizer, capsys):
    data = tmp_path / "text.txt"
    data.write_text("".join(TEXT * 200), encoding="utf-8")
    out = tmp_path / "converted"
    assert main(["convert", str(hf_dir_with_tokenizer), str(out), "--method", "rtn,qat", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "32", "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "converted with rtn,qat" in printed and "held-out perplexity" in printed
    model, tokenizer = checkpoint.load(out)
    assert model.config.mode == "b158" and model.config.sub_norm and tokenizer.eos_token == "</s>"
    assert main(["generate", str(out), "--prompt", "def add", "--max-tokens", "8", "--seed", "0"]) == 0
    generated = capsys.readouterr().out
    assert generated.startswith("def add") and len(generated.strip()) > len("def add")


def test_cli_non_llama_source_is_one_line_exit_2(tmp_path, capsys):
    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                       "model_type": "gpt2"}))
    assert main(["convert", str(directory), str(tmp_path / "out"), "--method", "rtn"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitnet158: error: ") and "\n" not in err and "Traceback" not in err
    assert "GPT2LMHeadModel cannot be converted; supported: LlamaForCausalLM" in err
