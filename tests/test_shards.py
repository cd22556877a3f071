"""prepare-data: the shards hold exactly the tokenizer's ids of the same files (EOS after each
document), whole files held out by the name rule, a killed preparation resumes to the same bytes,
and training reads the shards through np.memmap with the batches of the in-memory stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitnet158.cli import main
from bitnet158.errors import BitNetError, DataError
from bitnet158.tokenizer import Tokenizer
from bitnet158.train import shard_units, shards
from bitnet158.train.data import batch_for_step, eval_windows
from bitnet158.train.data.corpus import is_heldout
from bitnet158.train.shards import ShardDir, prepare_shards
from common import one_line


def _texts() -> list[str]:
    import pydoc_data.topics as topics
    return list(topics.topics.values())


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(_texts()[:80], vocab_size=400)


@pytest.fixture
def inputs(tmp_path):
    """Three .txt files (doc35 is held out by the name rule, doc36 and doc40 are not) and a .jsonl
    file; small pieces so every file is cut many times."""
    folder = tmp_path / "in"
    folder.mkdir()
    texts = _texts()
    for k, name in enumerate(["doc35.txt", "doc36.txt", "doc40.txt"]):
        (folder / name).write_text("\n\n".join(texts[k * 15:k * 15 + 25]) + "\n  x \n", encoding="utf-8")
    rows = [json.dumps({"text": t}) for t in texts[60:75]]
    (folder / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert is_heldout("doc35.txt") and not any(map(is_heldout, ["doc36.txt", "doc40.txt", "rows.jsonl"]))
    return folder


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(shard_units, "PIECE_BYTES", 8192)


def _expected(folder, tokenizer) -> dict[str, list[int]]:
    out = {"train": [], "heldout": []}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".jsonl":
            ids = [i for line in path.read_text().splitlines() for i in
                   tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eos_id]]
        else:
            ids = tokenizer.encode(path.read_text(encoding="utf-8")) + [tokenizer.eos_id]
        out["heldout" if is_heldout(path.name) else "train"] += ids
    return out


def test_shards_hold_the_tokenizers_ids_of_the_same_files(inputs, tokenizer, tmp_path):
    assert len(shard_units.plan_units([str(inputs)])) > 20  # really cut into pieces
    shard_dir = prepare_shards([str(inputs)], tokenizer, tmp_path / "out", workers=2, shard_tokens=5000,
                               progress=False, log=lambda *a: None)
    expected = _expected(inputs, tokenizer)
    for split in ("train", "heldout"):
        assert shard_dir.split(split).tensor().tolist() == expected[split], split
    assert shard_dir.manifest["dtype"] == "uint16" and len(shard_dir.files) > 3
    assert shard_dir.manifest["splits"]["train"]["tokens"] == len(expected["train"])
    # a glob and the files one by one give the same shards
    again = prepare_shards([str(inputs / "*.txt"), str(inputs / "rows.jsonl")], tokenizer, tmp_path / "glob",
                           workers=1, shard_tokens=5000, progress=False, log=lambda *a: None)
    assert again.split("train").tensor().tolist() == expected["train"]


def test_a_killed_preparation_resumes_to_the_same_shards(inputs, tokenizer, tmp_path, monkeypatch):
    whole = prepare_shards([str(inputs)], tokenizer, tmp_path / "whole", workers=2, shard_tokens=5000,
                           progress=False, log=lambda *a: None)
    calls = {"n": 0}
    append = shards._append

    def dying(out, state, unit, ids, shard_tokens, dtype):
        append(out, state, unit, ids, shard_tokens, dtype)
        calls["n"] += 1
        if calls["n"] == 9:  # after writing a unit's ids, before recording them: the worst moment
            raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_append", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([str(inputs)], tokenizer, tmp_path / "cut", workers=2, shard_tokens=5000, progress=False,
                       log=lambda *a: None)
    monkeypatch.setattr(shards, "_append", append)
    assert (tmp_path / "cut" / shards.PROGRESS).exists() and not (tmp_path / "cut" / shards.MANIFEST).exists()
    with pytest.raises(BitNetError) as e:
        ShardDir(tmp_path / "cut")
    one_line(e.value, "unfinished")
    resumed = prepare_shards([str(inputs)], tokenizer, tmp_path / "cut", workers=2, shard_tokens=5000,
                             progress=False, log=lambda *a: None)
    assert [r["file"] for r in resumed.files] == [r["file"] for r in whole.files]
    for row in whole.files:
        assert (tmp_path / "cut" / row["file"]).read_bytes() == (tmp_path / "whole" / row["file"]).read_bytes()
    with pytest.raises(DataError) as e:  # a finished directory is never overwritten silently
        prepare_shards([str(inputs)], tokenizer, tmp_path / "cut", progress=False, log=lambda *a: None)
    one_line(e.value, "--force")


def test_training_reads_shards_like_the_in_memory_stream(inputs, tokenizer, tmp_path):
    shard_dir = prepare_shards([str(inputs)], tokenizer, tmp_path / "out", workers=1, shard_tokens=3000,
                               progress=False, log=lambda *a: None)
    mapped = shard_dir.split("train")
    assert isinstance(mapped.maps[0], np.memmap) and len(mapped.maps) > 3
    stream = mapped.tensor()
    for step in range(5):  # windows crossing shard boundaries included
        for a, b in zip(batch_for_step(mapped, step, 16, 64, 0), batch_for_step(stream, step, 16, 64, 0)):
            assert torch.equal(a, b)
    held = shard_dir.split("heldout")
    assert all(torch.equal(a, b) for a, b in zip(eval_windows(held, 32, 8), eval_windows(held.tensor(), 32, 8)))


def test_shards_of_another_tokenizer_and_bad_inputs_are_one_line_errors(inputs, tokenizer, tmp_path):
    shard_dir = prepare_shards([str(inputs)], tokenizer, tmp_path / "out", workers=1, progress=False,
                               log=lambda *a: None)
    other = Tokenizer.train(_texts()[80:120], vocab_size=350)
    with pytest.raises(DataError) as e:
        shard_dir.check_tokenizer(other)
    one_line(e.value, "another tokenizer")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe not utf-8\n")
    with pytest.raises(DataError) as e:
        prepare_shards([str(tmp_path / "bad.txt")], tokenizer, tmp_path / "bad", workers=1, progress=False)
    one_line(e.value, "bad.txt", "UTF-8")
    with pytest.raises(DataError) as e:
        prepare_shards([str(tmp_path / "none-*.txt")], tokenizer, tmp_path / "none", workers=1, progress=False)
    one_line(e.value, "matches no")
    (tmp_path / "out" / "train-00000.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError) as e:
        ShardDir(tmp_path / "out")
    one_line(e.value, "truncated")


def test_prepare_data_verb_and_training_on_shards(inputs, tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    out = tmp_path / "shards"
    assert main(["prepare-data", str(inputs), "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(out),
                 "--workers", "1", "--quiet"]) == 0
    assert main(["train", "--data-dir", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--warmup", "1", "--eval-every", "2", "--eval-batches", "1", "--out", str(tmp_path / "run"),
                 "--threads", "1", "--quiet"]) == 0
    assert (tmp_path / "run" / "step-000002" / "model.safetensors").exists()
