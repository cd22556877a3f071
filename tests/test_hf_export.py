"""Hugging Face export (`save_hf`, `bitnet158 export-hf`) and streamed import (`import_hf`,
`bitnet158 import-hf`), checked against transformers itself.

Our tiny models are exported, loaded with `transformers.AutoModelForCausalLM.from_pretrained` on
CPU, and their logits compared with ours on the same tokens; the export is read back with our
`load_hf` and must give the same ternary codes.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet helpers are torch.compile'd

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.integrations.bitnet import AutoBitLinear  # noqa: E402

from bitnet158 import checkpoint  # noqa: E402
from bitnet158.checkpoint import ModelDir  # noqa: E402
from bitnet158.cli import main  # noqa: E402
from bitnet158.config import ModelConfig  # noqa: E402
from bitnet158.errors import ConfigError  # noqa: E402
from bitnet158.interop.hf_common import pack_hf_ternary, unpack_hf_ternary  # noqa: E402
from bitnet158.interop.hf_import import load_hf  # noqa: E402
from bitnet158.interop.hf_export import save_hf  # noqa: E402
from bitnet158.safetensors_io import PlannedTensor, write_safetensors  # noqa: E402
from bitnet158.layers import BitLinear  # noqa: E402
from bitnet158.model import Transformer  # noqa: E402
from bitnet158.pack import pack_  # noqa: E402
from bitnet158.packed_layers import PackConfig, PackedBitLinear  # noqa: E402
from bitnet158.tokenizer import Tokenizer  # noqa: E402

TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
# fp32 on both sides, logits of O(50): only summation order differs in the packed layout. Measured
# max |diff| here: ~2e-5 (packed export), ~1e-5 (fp twin).
TOL = 1e-4
# Online (bf16-layout) quantization re-rounds activations inside transformers after its own
# attention kernel; one activation landing on the other side of a .5 rounding boundary moves the
# logits by ~1e-2 (measured 9.9e-3 for the relu2 model here), so this layout gets a looser bound.
ONLINE_TOL = 5e-2


def _model(act: str = "relu2", tie: bool = True, mode: str = "b158", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128, activation=act, tie_embeddings=tie, mode=mode, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # O(1) embeddings and gains away from 1, so a missed norm would show
        model.embed_tokens.weight.normal_()
        if model.lm_head is not None:
            model.lm_head.weight.normal_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _hf_logits(directory) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf(TOKENS).logits.float()


def _ours(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def _check(ours: torch.Tensor, ref: torch.Tensor, tol: float, label: str) -> float:
    diff = float((ours - ref).abs().max())
    print(f"{label}: max |logit diff| vs transformers = {diff:.3g} (logit scale {float(ref.abs().max()):.3g})")
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), label
    assert diff < tol, f"{label}: {diff}"
    return diff


def _codes(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PackedBitLinear):
            out[name] = (m.codes(), float(m.weight_scale))
        elif isinstance(m, BitLinear):
            codes, s = m.quantized_weight()
            out[name] = (codes, float(s))
    return out


def _same_codes(a, b) -> None:
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys() and ca
    for name in ca:
        assert torch.equal(ca[name][0], cb[name][0]), name
        assert abs(ca[name][1] / cb[name][1] - 1) < 1e-6, name


# --- the pieces ----------------------------------------------------------------------------------

def test_pack_hf_ternary_inverts_unpack_and_matches_transformers():
    from transformers.integrations.bitnet import pack_weights

    codes = torch.randint(-1, 2, (12, 7), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    assert torch.equal(pack_hf_ternary(codes), pack_weights(codes.clone()))
    odd = codes[:10]  # ceil layout: padding rows decode to zero weights and are dropped
    assert torch.equal(unpack_hf_ternary(pack_hf_ternary(odd), 10), odd)


def test_streamed_safetensors_file_reads_back(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.uint8),
               "c": torch.randn(4).to(torch.bfloat16), "d": torch.tensor([-3, 4], dtype=torch.int8)}
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", plan, metadata={"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t), n
    bad = [PlannedTensor("a", torch.float32, (2,), lambda: torch.zeros(3))]
    with pytest.raises(ValueError, match="planned"):
        write_safetensors(tmp_path / "y.safetensors", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no half file, no temp left


# --- export against transformers -----------------------------------------------------------------

def test_packed_export_of_training_form_matches_transformers_and_round_trips(tmp_path):
    model = _model()
    tok = Tokenizer.train(["def f(x):\n    return x\n"] * 20, vocab_size=300)
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    doc = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert doc["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                          "quantization_mode": "offline"}
    assert doc["hidden_act"] == "relu2" and doc["tie_word_embeddings"] is True
    assert doc["eos_token_id"] == tok.eos_id
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert w.dtype == torch.uint8 and list(w.shape) == [64 // 4, 128]
        assert "lm_head.weight" not in f.keys()
    _check(_ours(model), _hf_logits(tmp_path / "hf"), TOL, "packed export, relu2, tied")
    back, back_tok = load_hf(tmp_path / "hf")  # round trip: identical codes, same scales
    _same_codes(model, back)
    assert back_tok.encode("return x") == tok.encode("return x")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("return x", add_special_tokens=False)["input_ids"] == tok.encode("return x")
    assert hf_tok.eos_token_id == tok.eos_id


def test_llama3_rope_scaling_exports_and_imports_with_transformers(tmp_path):
    """A ternary model with Llama 3.1 RoPE scaling (what converting a Llama 3.2 model gives):
    transformers' BitNet reads the scaling back and computes our logits; import-hf keeps it."""
    model = _model(act="swiglu", rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0,
                   rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_context=16)
    save_hf(model, tmp_path / "hf")
    doc = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert doc["rope_parameters"]["rope_type"] == "llama3" and doc["rope_parameters"]["factor"] == 32.0
    _check(_ours(model), _hf_logits(tmp_path / "hf"), TOL, "llama3 RoPE export")
    back, _ = load_hf(tmp_path / "hf")
    assert back.config == model.config
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert ModelDir(tmp_path / "ours").config.rope_original_context == 16


def test_packed_export_of_packed_model_untied_swiglu_sharded(tmp_path):
    model = _model(act="swiglu", tie=False, seed=3)
    pack_(model, PackConfig(format="base3", head="fp32"))
    save_hf(model, tmp_path / "hf", max_shard_bytes=20_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "silu"
    _check(_ours(model), _hf_logits(tmp_path / "hf"), TOL, "packed export of a packed base3 model, swiglu, untied")
    _same_codes(model, load_hf(tmp_path / "hf")[0])


def test_int8_head_exports_its_dequantized_table(tmp_path):
    model = _model(seed=4)
    pack_(model)  # default: int8 per-row tied head
    save_hf(model, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    table = model.embed_tokens.table
    assert torch.equal(emb, table.qweight.float() * table.row_scale.unsqueeze(1))
    # transformers reads out in float, our int8 head quantizes the final activations per token
    ref, ours = _hf_logits(tmp_path / "hf"), _ours(model)
    assert float((ours.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9
    assert float((ours - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_bf16_layout_masters_requantize_online(tmp_path):
    model = _model(seed=5)
    save_hf(model, tmp_path / "f32", layout="bf16", dtype="float32")
    doc = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert doc["quantization_config"]["quantization_mode"] == "online"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "f32").eval()
    assert isinstance(hf.model.layers[0].mlp.up_proj, AutoBitLinear) and hf.model.layers[0].mlp.up_proj.online_quant
    with torch.no_grad():
        ref = hf(TOKENS).logits.float()
    _check(_ours(model), ref, ONLINE_TOL, "bf16 layout stored as fp32 (online quantization)")
    save_hf(model, tmp_path / "bf16", layout="bf16")  # the default storage: bfloat16 masters
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    ours, _ = load_hf(tmp_path / "bf16")  # the same rounded masters on our side
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(TOKENS).logits.float()
    _check(_ours(ours), ref, ONLINE_TOL, "bf16 masters")


def test_bf16_layout_of_packed_model_gives_back_its_codes(tmp_path):
    model = _model(act="swiglu", seed=6)
    pack_(model, PackConfig(head="fp32"))
    save_hf(model, tmp_path / "hf", layout="bf16", dtype="float32")
    latent, _ = load_hf(tmp_path / "hf")
    _same_codes(model, latent)


def test_fp_twin_exports_as_plain_bitnet(tmp_path):
    model = _model(mode="fp", seed=7)
    save_hf(model, tmp_path / "hf", layout="bf16", dtype="float32")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    _check(_ours(model), _hf_logits(tmp_path / "hf"), TOL, "fp twin, no quantization")


def test_checkpoint_directory_streams_to_the_same_bytes(tmp_path):
    model = _model(seed=8)
    checkpoint.save(model, tmp_path / "ckpt")
    save_hf(model, tmp_path / "from_model")
    save_hf(tmp_path / "ckpt", tmp_path / "from_dir")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "from_model" / file).read_bytes() == (tmp_path / "from_dir" / file).read_bytes()


def test_refusals_are_one_line(tmp_path):
    cases = [(_model(mode="b1"), "packed", "binary (b1)"),
             (_model(norm_placement="inner"), "packed", "norm_placement 'inner'"),
             (_model(mode="fp"), "packed", "--bf16"),
             (_model(act_quant="tensor"), "bf16", "per token"),
             (_model(), "gguf", "unknown Hugging Face layout")]
    for model, layout, fragment in cases:
        with pytest.raises(ConfigError) as e:
            save_hf(model, tmp_path / "x", layout=layout)
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "x").exists()


# --- streamed import and the CLI -----------------------------------------------------------------

def _cli_error(capsys, argv, *fragments):
    capsys.readouterr()  # drop what earlier calls (transformers' progress bars) left on stderr
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitnet158: error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_export_then_import_round_trip(tmp_path, capsys):
    model = _model(act="swiglu", seed=9)
    tok = Tokenizer.train(["def f(x):\n    return x\n"] * 20, vocab_size=300)
    checkpoint.save(model, tmp_path / "ckpt", tok)
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert "packed ternary" in capsys.readouterr().out
    _check(_ours(model), _hf_logits(tmp_path / "hf"), TOL, "CLI export")
    _cli_error(capsys, ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")], "already exists")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "packed")]) == 0
    assert "packed (i2)" in capsys.readouterr().out
    packed, packed_tok = checkpoint.load(tmp_path / "packed")
    assert packed.packing.format == "i2" and packed_tok.encode("return x") == tok.encode("return x")
    _same_codes(model, packed)
    reference, _ = load_hf(tmp_path / "hf")  # the streamed import equals the in-memory one
    assert torch.equal(_ours(packed), _ours(reference))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "latent"), "--latent"]) == 0
    latent, _ = checkpoint.load(tmp_path / "latent")
    assert isinstance(latent.layers[0].mlp.up_proj, BitLinear)
    _same_codes(model, latent)
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf16"), "--bf16"]) == 0
    with safe_open(str(tmp_path / "hf16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    b1 = _model(mode="b1")
    checkpoint.save(b1, tmp_path / "b1")
    _cli_error(capsys, ["export-hf", str(tmp_path / "b1"), str(tmp_path / "out")], "binary (b1)")
    _cli_error(capsys, ["export-hf", str(tmp_path / "nothing"), str(tmp_path / "out")], "no such checkpoint")

    good = tmp_path / "good"
    save_hf(_model(), good, max_shard_bytes=20_000)

    def variant(name, edit_config=None, drop=None):
        import shutil
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit_config:
            doc = json.loads((d / "config.json").read_text())
            edit_config(doc)
            (d / "config.json").write_text(json.dumps(doc))
        if drop:
            (d / drop).unlink()
        return str(d)

    cases = [
        (variant("arch", lambda d: d.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")),
         "GPT2LMHeadModel", "supported: BitNetForCausalLM"),
        (variant("shard", drop="model-00002-of-00003.safetensors"), "shard model-00002-of-00003.safetensors is missing"),
        (variant("shape", lambda d: d.update(intermediate_size=96)), "config.json implies packed"),
        (variant("method", lambda d: d["quantization_config"].update(quant_method="gptq")),
         "quant_method 'gptq'", "expected 'bitnet'"),
    ]
    assert (good / "model-00002-of-00003.safetensors").exists()
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text((good / "config.json").read_text())
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80 never unpickled")
    cases.append((str(pickle_dir), "pickle", "pytorch_model.bin"))
    for directory, *fragments in cases:
        _cli_error(capsys, ["import-hf", directory, str(tmp_path / "out")], *fragments)
    assert not (tmp_path / "out").exists()


def test_import_refuses_float_weights_where_packed_expected(tmp_path, capsys):
    model = _model()
    save_hf(model, tmp_path / "hf", layout="bf16", dtype="float32")
    doc = json.loads((tmp_path / "hf" / "config.json").read_text())
    doc["quantization_config"]["quantization_mode"] = "offline"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(doc))
    _cli_error(capsys, ["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")], "q_proj.weight", "uint8")
    assert not (tmp_path / "out").exists()  # the failure came mid-stream: nothing was left behind
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]

