"""Checkpoints: round trips, run-directory resolution, a process SIGKILLed mid-save, and every kind
of bad checkpoint giving a one-line CheckpointError (never an unpickle)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet158 import checkpoint
from bitnet158.config import preset
from bitnet158.errors import CheckpointError
from bitnet158.model import Transformer
from bitnet158.tokenizer import Tokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
            vocab_size=300, max_seq_len=64)
TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
        "for i in range(10):\n    print(i * i)\n"] * 30


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXT, vocab_size=300)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **{**TINY, **overrides}))


TOKENS = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7, 7, 0, 12, 299]])


def logits(model: Transformer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(TOKENS)


def state_equal(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    return checkpoint.save(tiny_model(), tmp_path / "model", tokenizer)


def assert_one_line(err: CheckpointError, *fragments: str) -> None:
    msg = str(err)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


# --- round trips and resolution ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["b158", "fp"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer, mode):
    model = tiny_model(seed=3, mode=mode)
    before = logits(model)
    checkpoint.save(model, tmp_path / "m", tokenizer)
    loaded, tok = checkpoint.load(tmp_path / "m")
    assert loaded.config == model.config
    assert state_equal(model, loaded)
    assert torch.equal(logits(loaded), before)
    assert tok is not None and tok.encode("def add(a, b):") == tokenizer.encode("def add(a, b):")
    # The file says what it holds; no pickle anywhere in the directory.
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["format"] == "bitnet158" and doc["kind"] == "model" and doc["model"]["mode"] == mode
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors",
                                                                   "tokenizer.json"]


def test_save_refuses_to_overwrite_unless_asked(model_dir, tokenizer):
    other = tiny_model(seed=1)
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save(other, model_dir, tokenizer)
    assert not state_equal(checkpoint.load(model_dir)[0], other)
    checkpoint.save(other, model_dir, tokenizer, overwrite=True)
    assert state_equal(checkpoint.load(model_dir)[0], other)
    assert [p.name for p in model_dir.parent.iterdir()] == ["model"]  # no leftovers beside it


def _training_run(run_dir: Path, tokenizer, steps=(1, 2, 3), keep=5) -> dict[int, Transformer]:
    models = {}
    for step in steps:
        model = tiny_model(seed=step)
        opt = torch.optim.AdamW(model.parameters())
        checkpoint.save_training_checkpoint(run_dir, step, model, tokenizer, opt, {"history": []}, keep=keep)
        models[step] = model
    return models


def test_load_run_directory_follows_latest(tmp_path, tokenizer):
    run = tmp_path / "run"
    models = _training_run(run, tokenizer)
    assert (run / "latest").read_text() == "step-000003"
    assert state_equal(checkpoint.load(run)[0], models[3])
    (run / "latest").write_text("step-000002\n")  # `latest` wins over the highest number
    assert checkpoint.resolve(run) == run / "step-000002"
    loaded, tok = checkpoint.load(run)
    assert state_equal(loaded, models[2]) and tok is not None


def test_missing_latest_falls_back_to_highest_complete_step(tmp_path, tokenizer):
    run = tmp_path / "run"
    models = _training_run(run, tokenizer)
    (run / "latest").unlink()
    (run / "step-000009").mkdir()  # an incomplete step (no config.json) is skipped
    (run / "step-000009" / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.resolve(run) == run / "step-000003"
    assert state_equal(checkpoint.load(run)[0], models[3])
    # A `latest` naming a step that is gone also falls back.
    (run / "latest").write_text("step-000004")
    assert state_equal(checkpoint.load(run)[0], models[3])


def test_training_checkpoints_are_pruned_to_keep(tmp_path, tokenizer):
    run = tmp_path / "run"
    _training_run(run, tokenizer, steps=(1, 2, 3, 4), keep=2)
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000003", "step-000004"]


def test_load_training_state_restores_adamw_moments(tmp_path, tokenizer):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(TOKENS).square().mean().backward()
    opt.step()
    directory = checkpoint.save_training_checkpoint(tmp_path / "run", 1, model, tokenizer, opt,
                                                    {"history": [{"step": 1, "loss": 0.125}]})
    fresh = tiny_model(seed=9)
    fresh.load_state_dict(checkpoint.load(directory)[0].state_dict())
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoint.load_training_state(directory, fresh, opt2)
    assert state["step"] == 1 and state["history"] == [{"step": 1, "loss": 0.125}]
    names = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        for slot in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2.state[p][slot], opt.state[names[name]][slot]), (name, slot)


def test_model_directory_is_not_a_training_checkpoint(model_dir):
    model = tiny_model()
    with pytest.raises(CheckpointError, match="trainer.json is missing"):
        checkpoint.load_training_state(model_dir, model, torch.optim.AdamW(model.parameters()))


# --- a process killed with SIGKILL in the middle of a save ---------------------------------------

CHILD = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from bitnet158 import checkpoint
    from bitnet158.config import preset
    from bitnet158.model import Transformer

    run_dir, ref = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **{tiny!r}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(12)[None]).square().mean().backward()
    opt.step()
    checkpoint.save_training_checkpoint(run_dir, 1, model, None, opt, {{"history": []}})
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, ref)
    print("SAVED-1", flush=True)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    original = checkpoint.writer.write_model_files

    def slow_write_model_files(directory, *args, **kwargs):
        # Write model.safetensors the slow way: half of it, then more bytes forever.
        with open(directory / checkpoint.WEIGHTS, "wb") as f:
            f.write(b"\\x00" * 4096)
            f.flush()
            print("INSIDE-SAVE-2", flush=True)
            while True:
                f.write(b"\\x01" * 65536)
                f.flush()
                time.sleep(0.01)

    checkpoint.writer.write_model_files = slow_write_model_files
    checkpoint.save_training_checkpoint(run_dir, 2, model, None, opt, {{"history": []}})
    print("UNREACHABLE", flush=True)
""").format(tiny=TINY)


def test_sigkill_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    ref = tmp_path / "reference.safetensors"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(ref)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.strip() == "INSIDE-SAVE-2":
                break
        assert lines == ["SAVED-1", "INSIDE-SAVE-2"], (lines, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(0.1)  # let it write some more of the doomed file
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    # The save was really interrupted: its temporary directory is still there, half written.
    stale = [p for p in run.iterdir() if p.name.startswith(".step-000002")]
    assert len(stale) == 1 and stale[0].is_dir() and (stale[0] / "model.safetensors").stat().st_size > 4096
    assert not (run / "step-000002").exists()
    assert (run / "latest").read_text() == "step-000001"

    # Loading the run gives step 1's weights exactly.
    loaded, _ = checkpoint.load(run)
    expected = load_file(str(ref))
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)

    # The next save works and sweeps the stale temporary away.
    model = tiny_model(seed=5)
    checkpoint.save_training_checkpoint(run, 2, model, None, torch.optim.AdamW(model.parameters()),
                                        {"history": []})
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000001", "step-000002"]
    assert state_equal(checkpoint.load(run)[0], model)


# --- bad checkpoints: one line, naming the problem -----------------------------------------------

def _rewrite_weights(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def _edit_config(directory: Path, **changes) -> None:
    doc = json.loads((directory / "config.json").read_text())
    doc["model"].update(changes)
    (directory / "config.json").write_text(json.dumps(doc))


def test_truncated_weights(model_dir):
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "model.safetensors", "truncated or corrupt")


def test_empty_weights_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "model.safetensors", "truncated or corrupt")


def test_missing_weights_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "model.safetensors", "missing")


def test_config_hidden_size_disagrees_with_weights(model_dir):
    _edit_config(model_dir, hidden_size=128)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "embed_tokens.weight", "[300, 64]", "[300, 128]")


def test_config_with_more_layers_than_weights(model_dir):
    _edit_config(model_dir, num_layers=3)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "layers.2.", "missing")


def test_config_with_fewer_layers_than_weights(model_dir):
    _edit_config(model_dir, num_layers=1)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "unexpected tensor layers.1.")


def test_invalid_model_config_value(model_dir):
    _edit_config(model_dir, num_heads=3)  # 64 is not divisible by 3
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "config.json", "num_heads")


def test_missing_tensor(model_dir):
    _rewrite_weights(model_dir, lambda t: t.pop("layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "tensor layers.1.mlp.down_proj.weight is missing")


def test_unexpected_extra_tensor(model_dir):
    _rewrite_weights(model_dir, lambda t: t.update({"lm_head.weight": torch.zeros(300, 64)}))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "unexpected tensor lm_head.weight")


def test_nan_in_a_weight(model_dir):
    def poison(t):
        t["layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")
    _rewrite_weights(model_dir, poison)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "layers.0.self_attn.q_proj.weight", "NaN")


def test_integer_weight(model_dir):
    def to_int(t):
        t["norm.weight"] = t["norm.weight"].to(torch.int32)
    _rewrite_weights(model_dir, to_int)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "norm.weight", "float")


@pytest.mark.parametrize("content", ["{not json", "", "\xff\xfe"])
def test_invalid_config_json(model_dir, content):
    (model_dir / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "config.json", "not a readable JSON file")  # not JSON, not UTF-8 alike


def test_config_json_of_something_else(model_dir):
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "config.json", "not a bitnet158 config")


def test_newer_format_version(model_dir):
    doc = json.loads((model_dir / "config.json").read_text())
    doc["format_version"] = 99
    (model_dir / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "format_version 99")


def test_nonexistent_directory_and_a_file(tmp_path, model_dir):
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path / "nope")
    assert_one_line(e.value, "nope", "no such checkpoint directory")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir / "model.safetensors")
    assert_one_line(e.value, "expected a checkpoint directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path / "empty")
    assert_one_line(e.value, "not a checkpoint")


class _Booby:
    """Unpickling this creates the marker file: proof that a loader ran pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_as_weights_is_rejected_without_unpickling(model_dir, tmp_path, writer):
    marker = tmp_path / "UNPICKLED"
    target = model_dir / "model.safetensors"
    payload = {"embed_tokens.weight": _Booby(str(marker))}
    if writer == "pickle":
        target.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, target)
    # Sanity: the payload really is armed.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Booby(str(probe)))).close()
    assert probe.exists()
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(model_dir)
    assert_one_line(e.value, "model.safetensors", "truncated or corrupt")
    assert not marker.exists()


def test_corrupt_newest_step_is_reported_not_skipped(tmp_path, tokenizer):
    """A corrupt newest step is reported (not silently skipped to an older one)."""
    run = tmp_path / "run"
    _training_run(run, tokenizer, steps=(1, 2))
    f = run / "step-000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(run)
    assert_one_line(e.value, "step-000002", "truncated or corrupt")
    shutil.rmtree(run / "step-000002")
    assert checkpoint.resolve(run) == run / "step-000001"
