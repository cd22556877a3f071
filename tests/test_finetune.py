"""`bitnet158 finetune` end to end at toy sizes: LoRA runs write PEFT adapters (the projections and
the tied embedding/head's one update) that lower the held-out loss, resume exactly, apply unmerged
to packed models (`generate --adapter`: greedy tokens as the float model's), load in PEFT on our
`export-hf` model with our logits, merge, and refuse adapters of other shapes in one line."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bitnet158 import ModelConfig, Transformer, checkpoint
from bitnet158.checkpoint.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_adapter,
                                          resolve_adapter, save_adapter)
from bitnet158.cli import main
from bitnet158.errors import CheckpointError, ConfigError
from bitnet158.lora import (PROJECTIONS, LoRAConfig, LoRAEmbedding, LoRAHead, add_lora, lora_layers,
                            lora_modules)
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.data.chat import read_conversations
from bitnet158.train.sft import chat_loss, sft, sft_train_config
from common import one_torch_thread  # noqa: F401  (the fixture, by name)

COLOURS = ["red", "green", "blue", "black", "white", "pink", "grey", "brown", "gold", "cyan", "lime", "teal"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows() -> list[dict]:
    rows = []
    for i, c in enumerate(COLOURS):
        rows.append({"messages": [{"role": "user", "content": f"Name colour {i}"},
                                  {"role": "assistant", "content": f"Colour {i} is {c}."}]})
        rows.append({"prompt": f"Spell {c}", "completion": " ".join(c)})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny training-form model directory with a tokenizer, and the chat data file."""
    root = tmp_path_factory.mktemp("ft")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    texts = [f"User: Name colour {i}\nAssistant: Colour {i} is {c}.\nUser: Spell {c}\nAssistant: {' '.join(c)}\n"
             for i, c in enumerate(COLOURS)] * 3
    tok = Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=64, activation="relu2")
    checkpoint.save(Transformer(cfg), root / "base", tok)
    return root, data


@pytest.fixture(scope="module")
def lora_run(base):
    root, data = base
    run = root / "run-lora"
    args = ["finetune", str(root / "base"), "--data", str(data), "--out", str(run), "--steps", "20",
            "--batch-size", "4", "--seq-len", "48", "--eval-every", "20", "--save-every", "10", "--rank", "4",
            "--heldout", "0.25", "--lr", "3e-3", "--quiet"]
    assert main(args) == 0
    return run


def test_lora_run_writes_a_peft_adapter_and_lowers_heldout_loss(lora_run, capsys, base):
    root, data = base
    step = resolve_adapter(lora_run)
    assert step.name == "step-000020" and (step / ADAPTER_WEIGHTS).is_file()
    cfg = json.loads((step / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and len(cfg["target_modules"]) == 9
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"]) and cfg["ensure_weight_tying"] is True
    from safetensors.torch import load_file
    tensors = load_file(str(step / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in tensors
    assert len(tensors) == 2 * 7 * 2 + 4  # and the table's update, on embed_tokens and lm_head (PEFT's names)
    ea = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]  # [r, vocab]
    eb = tensors["base_model.model.model.embed_tokens.lora_embedding_B"]  # [hidden, r]
    assert ea.shape == (4, 300) and eb.shape == (32, 4) and ea.abs().max() > 0  # it trained
    assert torch.equal(tensors["base_model.model.lm_head.lora_A.weight"], eb.T)  # one update, tied
    assert torch.equal(tensors["base_model.model.lm_head.lora_B.weight"], ea.T)
    state = json.loads((step / "trainer.json").read_text())
    assert state["step"] == 20 and state["evals"]
    assert not (step / "model.safetensors").exists()  # the base is never copied into a LoRA run


def test_heldout_loss_drops_and_only_adapters_change(base):
    root, data = base
    model, tok = checkpoint.load(root / "base")
    codes_before = {n: m.quantized_weight()[0].clone() for n, m in model.named_modules() if hasattr(m, "quantized_weight")}
    tc = sft_train_config(steps=30, batch_size=4, seq_len=48, eval_every=30, lr=3e-3, warmup=2)
    seen = []
    result = sft(model, tok, read_conversations(data), tc, lora=LoRAConfig(r=4), heldout=0.25, progress=False,
                 on_step=lambda step, m: seen.append(step))
    assert result.heldout_loss_after < result.heldout_loss_before
    assert seen == list(range(30))  # the hook reaches the loop (the benchmark times steps with it)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base.codes, codes_before[name])


@pytest.mark.parametrize("vocab", [50, 40000])  # 40000: several chunks of rows in the loss
def test_chat_loss_is_cross_entropy_on_the_scored_tokens(vocab):
    torch.manual_seed(0)
    logits = torch.randn(3, 9, vocab) * 3
    targets = torch.randint(0, vocab, (3, 9))
    targets[0, :4] = -100  # not scored
    ours, theirs = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss, _ = chat_loss(ours * 1.0, None, targets)  # * 1.0: logits made by a layer, as in training
    want = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    (loss * 0.5).backward()
    (want * 0.5).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-8)


def test_resume_gives_the_uninterrupted_adapter(base, tmp_path):
    root, data = base
    convs = read_conversations(data)
    tc = sft_train_config(steps=6, batch_size=2, seq_len=48, eval_every=3, save_every=3, warmup=1)

    def fresh():
        return checkpoint.load(root / "base")

    m1, tok = fresh()
    sft(m1, tok, convs, tc, run_dir=tmp_path / "a", progress=False)
    m2, _ = fresh()
    sft(m2, tok, convs, tc, run_dir=tmp_path / "b", until=3, progress=False)
    m3, _ = fresh()
    sft(m3, tok, convs, tc, run_dir=tmp_path / "b", resume=True, progress=False)
    _, a = read_adapter(tmp_path / "a")
    _, b = read_adapter(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name


def test_targets_leave_the_table_out(base, tmp_path):
    root, data = base
    run = tmp_path / "proj"
    assert main(["finetune", str(root / "base"), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--warmup", "1", "--batch-size", "2", "--seq-len", "48", "--targets", ",".join(PROJECTIONS),
                 "--quiet"]) == 0
    config, pairs = read_adapter(run)
    assert set(config.targets) == set(PROJECTIONS) and len(pairs) == 14 and "embed_tokens" not in pairs
    assert "ensure_weight_tying" not in json.loads((resolve_adapter(run) / ADAPTER_CONFIG).read_text())


def test_full_method_writes_model_steps(base, tmp_path):
    root, data = base
    run = tmp_path / "full"
    assert main(["finetune", str(root / "base"), "--data", str(data), "--out", str(run), "--method", "full",
                 "--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "48", "--quiet"]) == 0
    tuned, _ = checkpoint.load(run)
    original, _ = checkpoint.load(root / "base")
    assert not torch.equal(tuned.layers[0].self_attn.q_proj.weight, original.layers[0].self_attn.q_proj.weight)


def test_packed_model_with_adapter_unmerged_matches_the_training_form(base, lora_run, tmp_path, capsys):
    root, _ = base
    model, tok = checkpoint.load(root / "base")
    checkpoint.save_packed(_packed(model, head="fp32"), tmp_path / "packed", tok)
    ours, _ = checkpoint.load(root / "base")
    load_adapter(ours, lora_run)
    packed, _ = checkpoint.load(tmp_path / "packed")
    load_adapter(packed, lora_run)
    tokens = torch.tensor([tok.encode("User: Name colour 3\nAssistant:")])
    with torch.no_grad():
        ref, got = ours.eval()(tokens), packed.eval()(tokens)
        plain, _ = checkpoint.load(tmp_path / "packed")
        without = plain.eval()(tokens)
    assert (ref - got).abs().max() < 1e-5  # an fp32 head: only float summation order differs
    assert (got - without).abs().max() > 1e-3  # the adapter is applied
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "packed"), "--adapter", str(lora_run), "--prompt",
                 "User: Name colour 3\nAssistant:", "--max-tokens", "4", "--temperature", "0", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("User: Name colour 3\nAssistant:")


def test_generate_with_the_table_adapter_gives_the_float_models_greedy_tokens(base, lora_run, tmp_path):
    """The packed model's cached steps (the native step cannot add the embedding's update, so the
    Python path runs) give the greedy tokens of the training-form model recomputing each step."""
    from bitnet158.generate import generate_step
    from bitnet158.sampling import SamplingConfig

    root, _ = base
    model, tok = checkpoint.load(root / "base")
    checkpoint.save_packed(_packed(model, head="fp32"), tmp_path / "packed", tok)
    packed, _ = checkpoint.load(tmp_path / "packed")
    load_adapter(packed, lora_run)
    assert isinstance(packed.embed_tokens, LoRAEmbedding) and isinstance(packed.lm_head, LoRAHead)
    ours, _ = checkpoint.load(root / "base")
    load_adapter(ours, lora_run)
    ours.eval()
    prompt = tok.encode("User: Spell gold\nAssistant:")
    got = list(generate_step(packed.eval(), list(prompt), SamplingConfig(temperature=0.0), 8))
    want, tokens = [], list(prompt)
    with torch.no_grad():
        for _ in range(8):  # no cache: the whole sequence each step, in float
            nxt = int(ours(torch.tensor([tokens]))[0, -1].argmax())
            want.append(nxt)
            tokens.append(nxt)
    assert got == want
    plain, _ = checkpoint.load(tmp_path / "packed")
    assert list(generate_step(plain.eval(), list(prompt), SamplingConfig(temperature=0.0), 8)) != got


def test_a_head_only_adapter_keeps_the_native_step_and_adds_after_it(base):
    """With the embedding untouched the native step still runs the packed model; it hands back the
    final-normed rows and the adapted head finishes them: the greedy tokens of the Python path."""
    from bitnet158 import kernels, native_step
    from bitnet158.generate import generate_step
    from bitnet158.sampling import SamplingConfig

    root, _ = base
    model, tok = checkpoint.load(root / "base")
    packed = _packed(model)
    add_lora(packed, LoRAConfig(r=4, targets=("lm_head",)), frozen_base=False)
    torch.manual_seed(5)
    with torch.no_grad():
        packed.lm_head.lora_B.normal_(std=0.5)
    if kernels.extension_available():
        with torch.no_grad():
            assert native_step.usable(packed), native_step.unsupported_reason(packed)
    prompt = tok.encode("User: Spell gold\nAssistant:")
    greedy = SamplingConfig(temperature=0.0)
    got = list(generate_step(packed, list(prompt), greedy, 8))
    native_step.set_enabled(False)
    try:
        want = list(generate_step(packed, list(prompt), greedy, 8))
    finally:
        native_step.set_enabled(None)
    assert got == want
    plain = _packed(checkpoint.load(root / "base")[0])
    assert list(generate_step(plain, list(prompt), greedy, 8)) != got  # the head's update shows


def _packed(model: Transformer, head: str = "int8") -> Transformer:
    from bitnet158.pack import pack_
    from bitnet158.packed_layers import PackConfig
    return pack_(model.eval(), PackConfig(format="i2", head=head))


def test_adapter_for_another_model_is_one_line(lora_run, tmp_path, capsys):
    other = Transformer(ModelConfig(vocab_size=300, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=64))
    with pytest.raises(CheckpointError, match="another model") as info:
        load_adapter(other, lora_run)
    assert "\n" not in str(info.value)
    assert not lora_layers(other)  # checked before anything changed
    deeper = Transformer(ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                     intermediate_size=64, max_seq_len=64))
    with pytest.raises(CheckpointError, match="this model lacks"):
        load_adapter(deeper, lora_run)
    wider_vocab = Transformer(ModelConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4,
                                          num_kv_heads=2, intermediate_size=64, max_seq_len=64))
    with pytest.raises(CheckpointError, match="300x32|320x32") as info:
        load_adapter(wider_vocab, lora_run)
    assert "another model" in str(info.value) and "\n" not in str(info.value)
    assert not lora_modules(wider_vocab)


def test_cli_bad_input_is_one_line(base, tmp_path, capsys):
    root, data = base
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    cases = [
        (["--data", str(bad)], "no assistant turn"),
        (["--data", str(data), "--rank", "0"], "rank must be a positive integer"),
        (["--data", str(data), "--targets", "norm"], "unknown LoRA target"),
    ]
    for extra, fragment in cases:
        capsys.readouterr()
        assert main(["finetune", str(root / "base"), "--out", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and "\n" not in err, err


# --- PEFT on the export-hf model ------------------------------------------------------------------

def test_peft_loads_our_adapter_on_the_export_hf_model(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet helpers are torch.compile'd
    import peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bitnet158.interop.hf_export import save_hf

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=64, activation="relu2")
    model = Transformer(cfg).eval()
    with torch.no_grad():  # O(1) embeddings, so the logits are O(10) and a missed term would show
        model.embed_tokens.weight.normal_()
    tok = Tokenizer.train(["def f(x):\n    return x\n"] * 20, vocab_size=300)
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    lora = LoRAConfig(r=4, alpha=8.0)  # the projections and the tied table's one update
    add_lora(model, lora)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.2)
        model.embed_tokens.lora_embedding_A.normal_(std=0.5)  # starts at zero: make the table's update show
    save_adapter(model.eval(), tmp_path / "adapter", lora)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), peft_model(tokens).logits.float()
    diff = float((ours - theirs).abs().max())
    print(f"PEFT {peft.__version__} on export-hf vs ours (projections + tied embedding/head): "
          f"max |logit diff| = {diff:.3g} (logit scale {float(ours.abs().max()):.3g})")
    assert diff < 1e-4
    with peft_model.disable_adapter(), torch.no_grad():
        base_only = peft_model(tokens).logits.float()
    assert float((base_only - theirs).abs().max()) > 1e-2  # the adapter really contributed
    inner = peft_model.base_model.model
    emb, head = inner.model.embed_tokens, inner.lm_head
    assert emb.lora_embedding_A["default"].abs().max() > 0  # PEFT applied the embedding's update ...
    # ... and the head's, the same factors transposed
    torch.testing.assert_close(head.lora_A["default"].weight, emb.lora_embedding_B["default"].T)
    # the table's update alone, at both ends: without it the logits would differ
    with torch.no_grad():
        model.embed_tokens.lora_embedding_A.zero_()
        assert float((model(tokens) - theirs).abs().max()) > 1e-2

    # and back: what PEFT saves (with its copy of the base table), we load, to the same tensors
    peft_model.save_pretrained(tmp_path / "peft-saved")
    fresh = Transformer(cfg)
    load_adapter(fresh, tmp_path / "peft-saved")
    for name, layer in lora_layers(model).items():
        assert torch.equal(lora_layers(fresh)[name].lora_B, layer.lora_B)
    assert torch.equal(fresh.embed_tokens.lora_embedding_B, model.embed_tokens.lora_embedding_B)
    assert fresh.lm_head.tied is fresh.embed_tokens  # one update again


def test_separate_embedding_and_head_updates_on_a_tied_model(base, lora_run, tmp_path):
    """An adapter PEFT trained without tying (the embedding's and head's updates differ) applies
    unmerged as it is; merge cannot fold two updates into one table and says so in one line."""
    from safetensors.torch import load_file, save_file

    root, _ = base
    step = resolve_adapter(lora_run)
    other = tmp_path / "untied"
    other.mkdir()
    (other / ADAPTER_CONFIG).write_text((step / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(step / ADAPTER_WEIGHTS))
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(300, 4) * 0.1
    save_file(tensors, str(other / ADAPTER_WEIGHTS))
    model, tok = checkpoint.load(root / "base")
    load_adapter(model, other)
    assert model.lm_head.tied is None
    want = tensors["base_model.model.lm_head.lora_B.weight"]
    torch.testing.assert_close(model.lm_head.lora_B.detach(), want)
    from bitnet158.train.merge import merge_lora
    with pytest.raises(ConfigError, match="differently") as info:
        merge_lora(model)
    assert "\n" not in str(info.value)


def test_merge_folds_the_adapter_into_latent_weights(base, lora_run, tmp_path, capsys):
    root, data = base
    capsys.readouterr()
    assert main(["merge", str(root / "base"), str(lora_run), str(tmp_path / "merged"), "--data", str(data),
                 "--seq-len", "48", "--heldout", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "unmerged →" in out and "merged (re-ternarized)" in out
    merged, _ = checkpoint.load(tmp_path / "merged")
    original, _ = checkpoint.load(root / "base")
    config, pairs = read_adapter(lora_run)
    scale = config.alpha / config.r
    assert scale == 2.0  # --rank 4 and the default alpha, 2 x rank
    a, b = pairs["layers.0.mlp.up_proj"]
    want = original.layers[0].mlp.up_proj.weight + (b @ a) * scale
    torch.testing.assert_close(merged.layers[0].mlp.up_proj.weight, want, rtol=0, atol=1e-6)
    a, b = pairs["embed_tokens"]  # the tied table takes its one update, exactly (a float table)
    table = original.embed_tokens.weight.detach()
    want = table + (b @ a).T * scale
    assert merged.lm_head is None and float((want - table).abs().max()) > 1e-4
    torch.testing.assert_close(merged.embed_tokens.weight, want, rtol=0, atol=1e-6)
    assert main(["merge", str(root / "base"), str(lora_run), str(tmp_path / "merged")]) == 2  # exists: one line
