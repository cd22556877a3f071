"""The `bitnet158` command line: a small end-to-end run (train → info → generate → resume), and
every user mistake the Core issue lists ending in one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet158.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
SENTENCES = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
             "for i in range(10):\n    print(i * i)\n", "class Point:\n    x: int\n    y: int\n"]
SMALL_RUN = ["--preset", "tiny", "--vocab-size", "300", "--steps", "4", "--batch-size", "2",
             "--seq-len", "32", "--warmup", "1", "--eval-every", "2", "--save-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(SENTENCES * 300), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *SMALL_RUN, "--data", str(text_file), "--out", str(out)]) == 0
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "bitnet158.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_user_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitnet158: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


# --- the happy path --------------------------------------------------------------------------------

def test_train_writes_a_checkpoint_that_info_describes(trained, capsys):
    assert (trained / "latest").exists()
    capsys.readouterr()
    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "b158" in out and "1.58 bits" in out and "300 tokens" in out
    assert "KV cache" in out and "KB a position in fp32" in out


def test_info_reads_the_same_facts_without_torch(trained, tmp_path):
    """The header-only path a torch-free install takes gives what the torch path gives, and a
    damaged weights file is a one-line error there too."""
    import shutil

    from bitnet158.cli import info
    from bitnet158.errors import CheckpointError

    headers, full = info._from_headers(str(trained)), info._with_torch(str(trained))
    assert (headers.path, headers.config, headers.packing, headers.packed_bytes, repr(headers.tokenizer)) == \
        (full.path, full.config, full.packing, full.packed_bytes, repr(full.tokenizer))
    broken = tmp_path / "broken"
    shutil.copytree(info._with_torch(str(trained)).path, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors file"):
        info._from_headers(str(broken))


def test_generate_streams_text(trained, capsys):
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "def ", "--max-tokens", "8", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and len(captured.out) > len("def \n")
    assert "prompt tokens" in captured.err


def test_generate_with_an_fp16_kv_cache(trained, capsys):
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "def ", "--max-tokens", "8", "--temperature", "0",
                 "--kv-cache", "fp16"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(trained), "--kv-cache", "bf16"])
    assert exit_.value.code == 2 and "invalid choice: 'bf16'" in capsys.readouterr().err


def test_generate_speculates_without_changing_greedy_output(trained, capsys):
    base = ["generate", str(trained), "--prompt", "def f(x):", "--max-tokens", "12", "--temperature", "0"]
    capsys.readouterr()
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--speculate", "ngram", "--draft-tokens", "3"], ["--draft", str(trained)]):
        assert main(base + extra) == 0
        captured = capsys.readouterr()
        assert captured.out == plain and "drafts accepted" in captured.err
    assert_user_error(capsys, base + ["--speculate", "ngram", "--draft-tokens", "0"], "draft tokens")


def test_train_refuses_to_overwrite_then_resumes_to_more_steps(trained, text_file, capsys):
    assert_user_error(capsys, ["train", *SMALL_RUN, "--data", str(text_file), "--out", str(trained)],
                      "already exists", "--resume")
    longer = [a if a != "4" else "6" for a in SMALL_RUN]
    assert main(["train", *longer, "--data", str(text_file), "--out", str(trained), "--resume"]) == 0
    latest = (trained / "latest").read_text().strip()
    assert latest.endswith("6"), latest


# --- bad input: one line, exit 2 -------------------------------------------------------------------

def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert_user_error(capsys, ["train", *SMALL_RUN, "--data", str(missing), "--out", str(tmp_path / "o")],
                      str(missing), "no such file")


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_user_error(capsys, ["train", *SMALL_RUN, "--data", str(empty), "--out", str(tmp_path / "o")],
                      "empty file")


def test_binary_data_file(tmp_path, capsys):
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 10)
    assert_user_error(capsys, ["train", *SMALL_RUN, "--data", str(blob), "--out", str(tmp_path / "o")],
                      "binary")


def test_non_utf8_text(tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    assert_user_error(capsys, ["train", *SMALL_RUN, "--data", str(latin), "--out", str(tmp_path / "o")],
                      "not UTF-8", "0xe9")


def test_unknown_preset(tmp_path, text_file, capsys):
    argv = ["train", *SMALL_RUN, "--data", str(text_file), "--out", str(tmp_path / "o")]
    argv[argv.index("tiny")] = "huge"
    assert_user_error(capsys, argv, "huge", "tiny")


def test_unknown_mode(tmp_path, text_file, capsys):
    assert_user_error(capsys, ["train", *SMALL_RUN, "--mode", "b3", "--data", str(text_file),
                               "--out", str(tmp_path / "o")], "b3")


def test_truncated_weights(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained / (trained / "latest").read_text().strip(), copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(capsys, ["info", str(copy)], "model.safetensors")
    assert_user_error(capsys, ["generate", str(copy), "--max-tokens", "2"], "model.safetensors")


def test_config_disagreeing_with_weights(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained / (trained / "latest").read_text().strip(), copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["hidden_size"] *= 2
    (copy / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, ["info", str(copy)], "shape")


def test_not_a_checkpoint(tmp_path, capsys):
    assert_user_error(capsys, ["info", str(tmp_path / "missing")], "missing")
    assert_user_error(capsys, ["generate", str(tmp_path)], str(tmp_path))


def test_bad_numbers(tmp_path, text_file, capsys):
    assert_user_error(capsys, ["train", *SMALL_RUN, "--threads", "0", "--data", str(text_file)], "--threads")
    assert_user_error(capsys, ["train", *SMALL_RUN, "--batch-size", "0", "--data", str(text_file),
                               "--out", str(tmp_path / "o")], "batch_size")


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    """The same contract seen from outside: a real interpreter, stderr as a user sees it."""
    done = run_cli("train", *SMALL_RUN, "--data", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bitnet158: error: "), done.stderr
    done = run_cli("info", str(tmp_path / "none"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
