"""Fuzz cases through the command line (issue 18): a hostile file is exit status 2 and exactly one
line on stderr starting `bitnet158: error:`, or the command succeeds (exit 0).

Each case is the same deterministic mutation as in test_fuzz.py, run by the verb a user would
type: `info` (and every third time `generate`) for model, packed and run directories and for a
model directory holding a mutated tokenizer.json, `import-hf` for Hugging Face directories,
`import-gguf` for GGUF files and a one-step `train --data` for data files. A sample of ~20 runs
in CI; the slow test runs 350 (50 per reader).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fuzzing import READERS
from fuzzing.runner import Case, build, prepare_case, tree_hash

QUICK_PER_READER = 3  # 21 cases
SLOW_PER_READER = 50  # 350 cases
TIMEOUT_S = 300  # a CLI start (torch import) on a busy 2-core machine, plus one tiny training step
TRAIN = ["--steps", "1", "--warmup", "0", "--batch-size", "1", "--seq-len", "8", "--vocab-size", "300",
         "--eval-every", "1000", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-cli")
    build(root)
    return root


def _command(case: Case, root: Path) -> tuple[list[str], Path]:
    """The CLI arguments that read the case's mutated input, and the folder holding that input."""
    seeds = root / "seeds"
    variants = json.loads((seeds / "variants.json").read_text())
    case_dir, path, _ = prepare_case(case, seeds, variants, root)
    out = root / f"out-{case.reader}-{case.master_seed}-{case.index}"
    if case.reader == "tokenizer":  # a model directory around the mutated tokenizer.json
        for name in ("config.json", "model.safetensors"):
            shutil.copy(seeds / "model" / "b158" / name, case_dir / name)
        path = case_dir
    if case.reader in ("model", "packed", "run", "tokenizer"):
        if case.index % 3 == 2:
            return ["generate", str(path), "--prompt", "def f", "--max-tokens", "2", "--seed", "0", "--quiet"], case_dir
        return ["info", str(path)], case_dir
    if case.reader == "hf":
        return ["import-hf", str(path), str(out)], case_dir
    if case.reader == "gguf":
        return ["import-gguf", str(path), str(out)], case_dir
    return ["train", "--data", str(path), "--out", str(out), *TRAIN], case_dir


def _run(case: Case, root: Path) -> str | None:
    """None when the CLI kept its promise for this case, else what went wrong."""
    args, case_dir = _command(case, root)
    before = tree_hash(case_dir)
    try:
        run = subprocess.run([sys.executable, "-m", "bitnet158.cli", *args], capture_output=True,
                             timeout=TIMEOUT_S, cwd=root, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return f"{case}: no exit within {TIMEOUT_S} s: {args}"
    err = run.stderr.decode("utf-8", "replace")
    try:
        if tree_hash(case_dir) != before:
            return f"{case}: the input changed: {args}"
        if run.returncode == 0:
            return None
        lines = err.splitlines()
        if run.returncode == 2 and len(lines) == 1 and lines[0].startswith("bitnet158: error:") \
                and err.endswith("\n") and "\r" not in err:
            return None
        return f"{case}: exit {run.returncode}, stderr {err[-600:]!r}: {args}"
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)


def _sample(root: Path, per_reader: int, master_seed: int) -> None:
    cases = [Case(reader, i, master_seed) for i in range(per_reader) for reader in READERS]
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(lambda c: _run(c, root), cases) if p is not None]
    print(f"\n{len(cases)} fuzz cases through the CLI, {len(problems)} broke the promise")
    assert not problems, "\n".join(problems)


def test_fuzz_cases_through_the_cli(fuzz_root):
    _sample(fuzz_root, QUICK_PER_READER, master_seed=0)


@pytest.mark.slow
def test_fuzz_cases_through_the_cli_sample(fuzz_root):
    _sample(fuzz_root, SLOW_PER_READER, master_seed=3)
