"""The benchmark scripts run end to end at toy sizes (their figures are meaningless here; the
real runs are in the issue notes and docs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet158 import kernels

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")


def run(script: str, *args: str) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@needs_ext
def test_kernels_benchmark_runs_and_reports_every_goal(tmp_path):
    out = run("kernels.py", "--shapes", "64x256,32x512", "--m", "1,4", "--threads", "1,2", "--rounds", "2",
              "--llc-multiple", "0.02", "--round-ms", "2", "--json", str(tmp_path / "k.json"))
    assert "paired" in out and "compute rate with the weights in cache" in out
    doc = json.loads((tmp_path / "k.json").read_text())
    # M = 1 speed and bandwidth goals at each thread count (the M = 128 goal needs M = 128)
    assert sorted((g["goal"][:9], g["threads"]) for g in doc["goals"]) == [
        ("M = 1 wei", 1), ("M = 1 wei", 2), ("M = 1 ≥ 6", 1), ("M = 1 ≥ 6", 2)]
    frac = [f for f in doc["bandwidth_fraction_m1"] if f["variant"].startswith("i2/")]
    assert frac and all(f["paired_median"] > 0 for f in frac)


def test_decode_benchmark_runs_on_a_tiny_model(tmp_path):
    out = run("decode.py", "--preset", "tiny", "--threads", "1", "--prompt", "8", "--tokens", "2", "--batch", "3",
              "--json", str(tmp_path / "d.json"))
    assert "the model's own peak" in out and "ratio" in out and "Python packed path" in out
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["speed"][0]["packed"]["decode_s"] > 0 and doc["model_peak_bytes"] > 0


def test_serve_benchmark_runs_on_a_tiny_model(tmp_path):
    out = run("serve.py", "--preset", "tiny", "--streams", "1,3", "--prompt", "4", "--tokens", "3",
              "--kv-cache", "fp16", "--json", str(tmp_path / "s.json"))
    assert "decode step tok/s" in out and "fp16 KV cache" in out
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["kv_cache"] == "fp16"
    rows = report["rows"]
    assert [r["streams"] for r in rows] == [1, 3] and all(r["aggregate_tok_s"] > 0 for r in rows)


def test_prompt_cache_benchmark_runs_on_a_tiny_model(tmp_path):
    out = run("prompt_cache.py", "--preset", "tiny", "--turns", "3", "--message", "6", "--answer", "3",
              "--streams", "3", "--system", "24", "--question", "4", "--json", str(tmp_path / "p.json"))
    assert "whole chat" in out and "answers identical" in out
    report = json.loads((tmp_path / "p.json").read_text())
    together = report["side_by_side"]
    assert together["same_tokens"] and together["no_cache"]["cached_tokens"] == 0
    assert together["cache"]["cached_tokens"] >= 2 * (24 - 16)  # the two later requests copied most of it
    rows = report["rows"]
    assert [r["turn"] for r in rows] == [1, 2, 3] and rows[0]["cached_tokens"] == 0
    # turn k holds the earlier turns: all of them but the last answer token were cached
    assert all(r["cached_tokens"] == prev["prompt_tokens"] + 3 - 1 for prev, r in zip(rows, rows[1:]))


@needs_ext
def test_vs_llamacpp_benchmark_runs_without_llamacpp(tmp_path):
    out = run("vs_llamacpp.py", "--preset", "tiny", "--no-llamacpp", "--threads", "1", "--runs", "1",
              "--prompt", "8", "--tokens", "2", "--json", str(tmp_path / "v.json"))
    assert "decode floor" in out and "ours ÷ floor" in out and "q4 head" in out
    row = json.loads((tmp_path / "v.json").read_text())["rows"][0]
    for head in ("int8", "q4"):  # both heads timed, each against its own floor
        assert row[f"ours_{head}_decode"][0] > 0 and row["floor_tok_s"][head] > 0
    assert row["floor_tok_s"]["q4"] > row["floor_tok_s"]["int8"]  # fewer bytes a token


def test_finetune_benchmark_runs_on_a_tiny_model(tmp_path):
    out = run("finetune.py", "--preset", "tiny", "--layers", "1", "--steps", "3", "--batch-size", "2",
              "--seq-len", "32", "--threads", "1", "--json", str(tmp_path / "f.json"))
    assert "LoRA / full: peak memory while training" in out
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "lora"] and rows[1]["trainable"] < rows[0]["trainable"]
    assert all(r["s_per_step"] > 0 for r in rows)  # nan compares false


def test_speculative_benchmark_runs_on_a_tiny_checkpoint(tmp_path):
    import torch

    from bitnet158 import checkpoint
    from bitnet158.config import ModelConfig
    from bitnet158.model import Transformer
    from bitnet158.tokenizer import Tokenizer

    tok = Tokenizer.train(["def f(x):\n    import os\n    return x\n"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=1, num_heads=4,
                                    num_kv_heads=2, intermediate_size=128, max_seq_len=128))
    checkpoint.save(model, tmp_path / "m", tok)
    out = run("speculative.py", "--checkpoint", str(tmp_path / "m"), "--prompt", "40", "--tokens", "12",
              "--draft-tokens", "2", "--draft", str(tmp_path / "m"))
    assert "plain" in out and "prompt lookup, k = 2" in out and "draft model, k = 2" in out
    assert "same tokens: yes" in out and "NO" not in out and "positions costs" in out


def test_kv_cache_benchmark_runs_on_a_tiny_model(tmp_path):
    out = run("kv_cache.py", "--preset", "tiny", "--contexts", "8,40", "--threads", "1", "--tokens", "2",
              "--repeats", "1", "--checkpoint", str(tmp_path / "none"))
    assert "quality: skipped" in out
    assert out.count("fp16 ÷ fp32") == 2 and " 40   fp16" in out
    assert out.count("q8 ÷ fp32") == 2 and " 40     q8" in out


def test_convert_memory_benchmark_runs_every_step_on_a_tiny_model():
    out = run("convert_memory.py", "--preset", "tiny")
    for label in ("import 1bitllm → i2", "import bf16 → i2", "import bf16 → fp32 latent", "pack fp32 → i2",
                  "export gguf tq2_0", "import gguf → i2", "export hf (packed)", "import hf (packed)"):
        assert label in out, label
    assert "ratio = (peak − baseline)" in out


def test_structured_benchmark_runs_on_a_tiny_model(tmp_path):
    out = run("structured.py", "--preset", "tiny", "--vocab", "600", "--corpus-chars", "300000", "--tokens", "6",
              "--threads", "1", "--runs", "1", "--json", str(tmp_path / "g.json"))
    assert "grammar ms/token" in out and "json_schema" in out
    doc = json.loads((tmp_path / "g.json").read_text())
    assert set(doc["tok_s"]) == {"none", "json_schema", "regex", "keyed"}
    assert all(v[0] > 0 for v in doc["grammar_ms"].values())
