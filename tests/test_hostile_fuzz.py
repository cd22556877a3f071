"""Failures the project's own fuzz suite (tests/fuzzing, tests/test_fuzz.py) found, one test per
class, each failing before its fix: every one is now a one-line BitNetError naming the file (or a
clean load), never a traceback, a hang or a memory blow-up."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bitnet158 as bn
from bitnet158 import checkpoint
from bitnet158.checkpoint import ModelDir
from bitnet158.errors import BitNetError
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.data import load_corpus
from common import one_line


def test_reading_a_small_json_file_allocates_what_it_holds_not_the_size_limit(tmp_path):
    """read_json asked the OS for its whole 256 MB limit on every call: under an address-space
    limit (ulimit -v, a container) a 100-byte config.json was a MemoryError traceback."""
    (tmp_path / "small.json").write_text('{"a": 1}')
    script = textwrap.dedent(f"""
        import re, resource
        from bitnet158.jsonio import read_json
        vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        limit = vm + 128 * 2**20  # room for the file, not for a 256 MB buffer
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        assert read_json({str(tmp_path / "small.json")!r}) == {{"a": 1}}
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("name", [b"\xff.txt", b"caf\xe9.jsonl"])
def test_a_data_file_whose_name_is_not_utf8_loads(tmp_path, name):
    """The held-out rule hashed the name's UTF-8 encoding: a name that is not UTF-8 (Linux names
    are bytes; Python keeps the odd ones as surrogate escapes) was a UnicodeEncodeError traceback."""
    path = os.path.join(os.fsencode(tmp_path), name)
    body = b'{"text": "hello there"}\n' if name.endswith(b".jsonl") else b"hello there\n"
    with open(path, "wb") as f:
        f.write(body * 40)
    corpus = load_corpus([Path(os.fsdecode(path))])
    assert corpus.train and corpus.heldout


# --- a FIFO where a file should be: every reader used to wait for a writer forever -------------

def _read_in_a_subprocess(call: str, path: Path, timeout: float = 120.0) -> BaseException:
    """`call` (Python, reading `P`) in a fresh interpreter, which is killed if it blocks: the Rust
    reader holds the GIL while it waits in open(), so a thread here would block the test too.
    Returns the BitNetError it raised, rebuilt; any other exception fails the test."""
    script = textwrap.dedent(f"""
        import json, torch
        from pathlib import Path
        from bitnet158 import checkpoint
        from bitnet158.errors import BitNetError
        P = Path({str(path)!r})
        try:
            {call}
            print(json.dumps(None))
        except BitNetError as e:
            print(json.dumps(str(e)))
    """)
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the reader waited on the FIFO {path.name} for {timeout:.0f} s")
    assert run.returncode == 0, run.stderr[-2000:]
    message = json.loads(run.stdout.strip().splitlines()[-1])
    assert message is not None, "the FIFO was read as a valid file"
    return BitNetError(message)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["def f(x):\n    return x * 2  # é ü 中文\n"] * 30, vocab_size=300)


def _model(tok: Tokenizer) -> bn.Transformer:
    torch.manual_seed(0)
    return bn.Transformer(bn.preset("tiny", vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                                    num_kv_heads=1, intermediate_size=32, max_seq_len=32))


def _with_fifo(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("how", ["load", "tensor"])
def test_a_fifo_as_model_safetensors(tmp_path, tok, how):
    d = checkpoint.save(_model(tok), tmp_path / "m", tok)
    fifo = _with_fifo(d / "model.safetensors")
    call = "checkpoint.ModelDir(P).load()" if how == "load" else "checkpoint.ModelDir(P).tensor('norm.weight')"
    one_line(_read_in_a_subprocess(call, d), "model.safetensors", "not a regular file")


def test_a_fifo_as_an_hf_shard(tmp_path, tok):
    from bitnet158.interop import save_hf

    d = save_hf(_model(tok), tmp_path / "hf", tokenizer=tok, max_shard_bytes=4_000)
    fifo = _with_fifo(sorted(d.glob("model-*.safetensors"))[-1])
    call = "from bitnet158.interop import load_hf; load_hf(P)"
    one_line(_read_in_a_subprocess(call, d), fifo.name, "not a regular file")


def test_a_fifo_as_trainer_safetensors(tmp_path, tok):
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters())
    step = checkpoint.save_training_checkpoint(tmp_path / "run", 1, model, tok, opt, {"history": []})
    _with_fifo(step / "trainer.safetensors")
    call = ("m, _ = checkpoint.ModelDir(P).load(); "
            "checkpoint.load_training_state(P, m, torch.optim.AdamW(m.parameters()))")
    one_line(_read_in_a_subprocess(call, step), "trainer.safetensors", "not a regular file")


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl", "corpus.parquet"])
def test_a_fifo_as_a_data_file(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    call = "from bitnet158.train.data import load_corpus; load_corpus([P])"
    one_line(_read_in_a_subprocess(call, fifo), name, "not a regular file")


# --- values the parsers accept but Python cannot convert -----------------------------------------

def test_a_safetensors_shape_of_infinity(tmp_path, tok):
    """json.loads reads Infinity; int(inf) is an OverflowError, which the header check missed."""
    d = checkpoint.save(_model(tok), tmp_path / "m", tok)
    file = d / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["norm.weight"]["shape"] = "<inf>"
    text = json.dumps(header).replace('"<inf>"', "[Infinity]").encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(BitNetError) as e:
        ModelDir(d).tensor("norm.weight")
    one_line(e.value, "model.safetensors", "norm.weight")


def test_a_corrupted_parquet_string_column(tmp_path):
    """The strings of a column are decoded only by to_pylist, which ran outside the error handling:
    a flipped byte in a data page was a UnicodeDecodeError traceback."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["hello there, general kenobi"] * 3}), str(path), compression="NONE",
                   use_dictionary=False)
    data = path.read_bytes()
    assert b"general" in data
    path.write_bytes(data.replace(b"general", b"gen\xffral"))
    with pytest.raises(BitNetError) as e:
        load_corpus([path])
    one_line(e.value, "corpus.parquet")


def test_a_gguf_vocabulary_listing_a_token_twice(tmp_path):
    """Two equal tokens collapse into one id: the vocabulary had a gap and the first token's id
    indexed past the id → bytes table mid-generation (IndexError)."""
    from bitnet158.interop.gguf_header import GGUFHeader
    from bitnet158.interop.gguf_tokenizer import tokenizer_from_gguf

    tokens = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["<|endoftext|>", "q"]
    header = GGUFHeader(tmp_path / "m.gguf", 3, kv={
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 26})
    with pytest.raises(BitNetError) as e:
        tokenizer_from_gguf(header)
    one_line(e.value, "m.gguf", "token q twice")


@pytest.mark.parametrize("section", ["model", "decoder", "pre_tokenizer", "normalizer", "post_processor"])
def test_a_tokenizer_component_type_that_is_a_list(tmp_path, tok, section):
    """`type in {...}` with a list or object for the type: TypeError (unhashable), a traceback."""
    doc = json.loads(tok.backend.to_str())
    if doc.get(section) is None:
        doc[section] = {}
    doc[section]["type"] = [["ByteLevel"]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(BitNetError) as e:
        Tokenizer.load(path)
    one_line(e.value, "tokenizer.json", "type")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"])
def test_an_hf_tokenizer_side_file_that_is_a_directory_counts_as_absent(tmp_path, tok, name):
    """(Already so at the start of this work; kept because the issue lists it.) The reader asks
    is_file() of each optional side file, so a directory in its place is an absent file."""
    from bitnet158.interop import load_hf, save_hf

    d = save_hf(_model(tok), tmp_path / "hf", tokenizer=tok)
    side = d / name
    if side.exists():
        side.unlink()
    side.mkdir()
    _, loaded = load_hf(d)
    assert loaded is not None and loaded.vocab_size == tok.vocab_size


def test_a_token_id_of_two_to_the_31(tmp_path, tok):
    """The id check built set(range(vocab size)): one id of 2**31 made that 2**31 integers, a
    MemoryError (or tens of GB) before the one-line error."""
    doc = json.loads(tok.backend.to_str())
    token = next(t for t, i in doc["model"]["vocab"].items() if i == 100)
    doc["model"]["vocab"][token] = 2**31
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    call = "from bitnet158.tokenizer import Tokenizer; Tokenizer.load(P)"
    # a subprocess under a 4 GB address-space limit: the old check would need far more
    script = f"import resource; resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30)); {call}"
    one_line(_read_in_a_subprocess(script, path), "tokenizer.json", "id 100 is missing")


def test_optimizer_state_of_the_wrong_shape_is_refused_at_resume(tmp_path, tok):
    """trainer.safetensors holding a moment of another shape loaded fine and failed at the resumed
    run's first optimizer step (a RuntimeError traceback from torch's AdamW)."""
    one_line(_resume_with_optimizer_tensor(tmp_path, tok, "norm.weight::exp_avg", torch.zeros(16, 1)),
             "trainer.safetensors", "norm.weight::exp_avg", "[16, 1]")


def _resume_with_optimizer_tensor(tmp_path: Path, tok: Tokenizer, key: str, value: torch.Tensor) -> BitNetError:
    """A one-step run's trainer.safetensors with `key` replaced by `value`; the error its resume raises."""
    from safetensors.torch import load_file, save_file

    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).float().mean().backward()
    opt.step()
    step = checkpoint.save_training_checkpoint(tmp_path / "run", 1, model, tok, opt, {"history": []})
    tensors = load_file(step / "trainer.safetensors")
    tensors[key] = value
    save_file(tensors, step / "trainer.safetensors")
    fresh = _model(tok)
    with pytest.raises(BitNetError) as e:
        checkpoint.load_training_state(step, fresh, torch.optim.AdamW(fresh.parameters()))
    return e.value


@pytest.mark.parametrize("key, value, words", [
    ("norm.weight::step", torch.tensor(-1e30), "step count"),
    ("norm.weight::step", torch.tensor(float("nan")), "NaN"),
    ("norm.weight::exp_avg_sq", -torch.ones(16), "negative second moment"),
])
def test_optimizer_state_out_of_range_is_refused_at_resume(tmp_path, tok, key, value, words):
    """The full fuzz run found a flipped byte in trainer.safetensors that made the step count huge:
    it loaded, and the resumed run's first AdamW step raised OverflowError (beta ** step)."""
    one_line(_resume_with_optimizer_tensor(tmp_path, tok, key, value), "trainer.safetensors", key, words)
