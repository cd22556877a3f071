"""ModelDir: one reader for every model directory, and directories written by release 0.1.0
(format_version 1, committed under tests/fixtures) still load and compute what they did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import bitnet158 as bn
from bitnet158.checkpoint import FORMAT_VERSION, ModelDir, model_entries, write_model_dir
from bitnet158.errors import CheckpointError
from bitnet158.packed_layers import Int8Head, PackedBitLinear

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "v1-expected.json").read_text())


@pytest.mark.parametrize("name,key", [("v1-model", "model_last_logits"), ("v1-packed", "packed_last_logits")])
def test_release_0_1_directories_load_and_give_the_same_logits(name, key):
    md = ModelDir(FIXTURES / name)
    assert md.doc["format_version"] == 1
    model, tok = md.load()
    assert tok is not None and tok.eos_token == "<|endoftext|>" and tok.end_tokens == ["<|endoftext|>"]
    assert tok.encode(EXPECTED["prompt"]) == EXPECTED["ids"]
    with torch.no_grad():
        logits = model(torch.tensor([EXPECTED["ids"]]))[0, -1]
    torch.testing.assert_close(logits, torch.tensor(EXPECTED[key]), rtol=0, atol=1e-5)


def test_packed_directory_declares_its_packing_and_builds_a_meta_skeleton():
    md = ModelDir(FIXTURES / "v1-packed")
    assert md.kind == "packed" and md.packing == bn.PackConfig(format="i2", head="int8")
    skeleton = md.skeleton()
    assert skeleton.packing == md.packing
    assert all(t.is_meta for t in skeleton.state_dict().values())
    assert isinstance(skeleton.layers[0].mlp.down_proj, PackedBitLinear)
    assert isinstance(skeleton.lm_head, Int8Head)
    assert md.names() == list(skeleton.state_dict())


def test_streamed_tensor_equals_the_memory_mapped_one():
    md = ModelDir(FIXTURES / "v1-packed")
    mapped = md.tensors()
    for name in md.names():
        assert torch.equal(md.tensor(name), mapped[name]), name


def test_resave_writes_the_current_format_and_keeps_every_tensor(tmp_path):
    model, tok = bn.load(FIXTURES / "v1-packed")
    out = bn.save_packed(model, tmp_path / "again", tok)
    md = ModelDir(out)
    assert md.doc["format_version"] == FORMAT_VERSION
    assert md.doc["tokenizer"]["end_tokens"] == ["<|endoftext|>"]
    again = md.tensors()
    for name, t in ModelDir(FIXTURES / "v1-packed").tensors().items():
        assert torch.equal(again[name], t), name


def test_write_model_dir_is_atomic_and_refuses_to_overwrite(tmp_path):
    model, tok = bn.load(FIXTURES / "v1-model")
    target = tmp_path / "m"
    write_model_dir(target, model.config, None, model_entries(model), tok)
    with pytest.raises(CheckpointError, match="already exists"):
        write_model_dir(target, model.config, None, model_entries(model), tok)
    entries = model_entries(model)

    def boom():
        raise RuntimeError("disk full")

    broken = entries[:-1] + [type(entries[-1])(entries[-1].name, entries[-1].dtype, entries[-1].shape, boom)]
    with pytest.raises(RuntimeError):
        write_model_dir(target, model.config, None, broken, tok, overwrite=True)
    assert ModelDir(target).load()[0] is not None  # the first write is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_a_bad_tensor_is_named(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "v1-packed", bad)
    model, tok = bn.load(bad)
    model.layers[0].self_attn.q_proj.weight_scale.fill_(-1.0)
    bn.save_packed(model, bad, tok, overwrite=True)
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj\.weight_scale"):
        bn.load(bad)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_scale"):
        ModelDir(bad).tensor("layers.0.self_attn.q_proj.weight_scale")


def test_a_newer_format_version_is_refused_in_one_line(tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(FIXTURES / "v1-model", newer)
    doc = json.loads((newer / "config.json").read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="newer than this bitnet158 reads"):
        ModelDir(newer)
