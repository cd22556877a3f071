"""The fuzz suite over every reader of user files (issue 18; the fuzzer lives in tests/fuzzing).

Each case copies a small valid seed (model, packed and run directories, Hugging Face directories,
GGUF files, tokenizer.json, .txt/.jsonl/.parquet data), mutates it deterministically from its
(reader, index, master seed), and reads it in a worker process with a 20 s time limit and a 2 GB
address-space limit. Only two outcomes are allowed: the reader accepts the input, or it raises a
one-line BitNetError; and it never changes its input. The quick subset (~1,000 cases) runs in
CI; the full set (10,000 per reader) is `-m slow`. Both print counts per reader and outcome.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fuzzing import READERS
from fuzzing.runner import FAILURES, Case, build, run_campaign, summarize

QUICK_PER_READER = 143  # ~1,000 cases in all
FULL_PER_READER = 10_000
WORKERS = min(2, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    build(root)
    return root


def _campaign(root: Path, per_reader: int, master_seed: int) -> None:
    cases = [Case(reader, i, master_seed) for i in range(per_reader) for reader in READERS]
    t0 = time.perf_counter()
    results = run_campaign(cases, root / "seeds", root, workers=WORKERS)
    report = summarize(results)
    print(f"\n{len(results)} fuzz cases in {time.perf_counter() - t0:.1f} s ({WORKERS} workers)\n{report}")
    assert len(results) == len(cases)
    bad = [r for r in results if r.outcome in FAILURES]
    assert not bad, f"{len(bad)} cases broke the one-line-error promise:\n{report}"
    # the mutations must not be so destructive that nothing reaches the deeper checks
    assert all(any(r.outcome == "ok" for r in results if r.reader == reader) for reader in READERS), report


def test_fuzz_quick(fuzz_root):
    _campaign(fuzz_root, QUICK_PER_READER, master_seed=0)


@pytest.mark.slow
def test_fuzz_full(fuzz_root):
    _campaign(fuzz_root, FULL_PER_READER, master_seed=1)


def test_a_hang_a_crash_and_a_traceback_are_reported(fuzz_root, monkeypatch):
    """The harness itself: a reader that sleeps, dies or raises is classified, and the worker
    that hung or died is replaced so the next case still runs."""
    monkeypatch.setenv("BITNET158_FUZZ_SABOTAGE", "1")
    cases = [Case("tokenizer", i, master_seed=99) for i in range(4)]
    results = run_campaign(cases, fuzz_root / "seeds", fuzz_root, workers=1, timeout=3.0)
    assert sorted(r.outcome for r in results) == sorted(["hang", "crash", "traceback", "modified"]), results
