"""benchmarks/train_scale.py at toy sizes (slow: two torchrun jobs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dist_helpers import LAUNCH_TIMEOUT, TESTS, job_env

pytestmark = pytest.mark.slow
SCRIPT = TESTS.parent / "benchmarks" / "train_scale.py"


def test_train_scale_reports_1_and_2_ranks(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--parallel", "ddp", "--steps", "2", "--warmup", "1",
                           "--seq-len", "32", "--batch-size", "4"], cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=2 * LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("ddp")]
    assert [r[1] for r in rows] == ["1", "2"] and all(float(r[2].replace(",", "")) > 0 for r in rows)
    assert len(rows[1][4].split("/")) == 2  # a peak for each rank
