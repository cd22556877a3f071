"""SIGKILL one rank of a 2-process job in the middle of a run: the job stops (torchrun ends the other
rank and exits non-zero), and `--resume` from the last saved step, with 2 processes and separately
with 1, reproduces the uninterrupted run's losses bit for bit (CPU, fixed seed). Slow: five jobs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from dist_helpers import LAUNCH_TIMEOUT, cli, history, job_env, torchrun, torchrun_command

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]

STEPS = 12
ARGS = ["train", "--parallel", "fsdp", "--data", "data.txt", "--vocab-size", "300", "--steps", str(STEPS),
        "--batch-size", "4", "--seq-len", "32", "--warmup", "1", "--eval-every", "6", "--eval-batches", "1",
        "--save-every", "2", "--quiet"]


def _ranks(parent: int) -> dict[int, int]:
    """rank → pid of the torchrun job's workers (from /proc: their RANK variable)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def _latest(run: Path) -> int:
    return int((run / "latest").read_text().strip().split("-")[1])


def test_sigkill_of_a_rank_stops_the_job_and_resume_on_2_or_1_processes_is_exact(tmp_path):
    import pydoc_data.topics as topics
    (tmp_path / "data.txt").write_text("\n\n".join(list(topics.topics.values())[:40]), encoding="utf-8")
    whole = torchrun(2, "-m", "bitnet158.cli", *ARGS, "--out", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = history(tmp_path / "whole", STEPS)

    log = open(tmp_path / "cut.log", "w")
    job = subprocess.Popen(torchrun_command(2, "-m", "bitnet158.cli", *ARGS, "--out", "cut"), cwd=tmp_path,
                           env=job_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (tmp_path / "cut" / "step-000004").exists():
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "cut.log").read_text()[-3000:]
            time.sleep(0.05)
        ranks = _ranks(job.pid)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        assert job.wait(timeout=120) != 0  # the job stops; torchrun ended rank 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        log.close()
    cut = tmp_path / "cut"
    saved = _latest(cut)
    assert 4 <= saved < STEPS, saved
    assert history(cut, saved) == reference[:saved]

    for nproc in (2, 1):
        run = tmp_path / f"resumed{nproc}"
        shutil.copytree(cut, run)
        if nproc == 2:
            done = torchrun(2, "-m", "bitnet158.cli", *ARGS, "--out", run.name, "--resume", cwd=tmp_path)
        else:  # one plain process: the same flags (the run keeps its batch layout: 2 micro-batches of 2)
            done = cli(*ARGS, "--threads", "1", "--out", run.name, "--resume", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        got = history(run, STEPS)
        worst = max(abs(a - b) / abs(b) for a, b in zip(got[saved:], reference[saved:]))
        print(f"resumed at step {saved} on {nproc} process(es): largest relative difference {worst:.3g}")
        assert got == reference
