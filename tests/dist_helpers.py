"""Launching torchrun jobs from tests: gloo on 127.0.0.1 at a free port, one thread per rank, and a
wall-clock timeout on every launch so a hang fails the test instead of blocking CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 240  # seconds for one torchrun job on a busy 2-core box; a hang fails the test


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])})
    return env


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]


def torchrun(nproc: int, *args: str, cwd: Path, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a torchrun job to its end (TimeoutExpired fails the test: nothing may hang)."""
    return subprocess.run(torchrun_command(nproc, *args), cwd=cwd, env=job_env(), capture_output=True,
                          text=True, timeout=timeout)


def cli(*args: str, cwd: Path, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m bitnet158.cli ...` in one plain process."""
    return subprocess.run([sys.executable, "-m", "bitnet158.cli", *args], cwd=cwd, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)


def history(run: Path, step: int) -> list[float]:
    state = json.loads((run / f"step-{step:06d}" / "trainer.json").read_text())
    return [row["loss"] for row in state["history"]]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("bitnet158: error:")]
