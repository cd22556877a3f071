"""The arm64 kernels, checked under qemu without ARM hardware (scripts/check_arm.sh --quick).

The script cross-compiles the kernels and tests/native/arm_check.cpp and runs them under
qemu-aarch64 on CPUs with and without dotprod / i8mm: every path bit for bit against the scalar
oracle, the run-time path choice on each CPU, a forced path, a refused one, and a deliberately
broken neon build that must fail. Skipped where the cross compiler or qemu is missing (this test
never installs them; the script does when run by hand as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_arm.sh"
CXX = os.environ.get("CXX_AARCH64", "aarch64-linux-gnu-g++")
QEMU = os.environ.get("QEMU_AARCH64", "qemu-aarch64")


def _missing() -> str | None:
    absent = [tool for tool in (CXX, QEMU, "bash") if shutil.which(tool) is None]
    if not absent:
        return None
    return f"needs {' and '.join(absent)} (apt-get install qemu-user g++-aarch64-linux-gnu)"


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_arm64_kernels_match_the_scalar_oracle_under_qemu():
    env = {**os.environ, "BITNET158_NO_INSTALL": "1"}
    env.pop("BITNET158_KERNEL", None)  # the script sets it per run
    proc = subprocess.run(["bash", str(SCRIPT), "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "SKIP" not in out, out[-2000:]
    assert "PASS: arm64 kernels equal the scalar oracle" in out, out[-6000:]
    # each CPU got the path its features allow, and the broken build was caught
    assert "best i8mm" in out and "best dotprod" in out and "best neon" in out, out[-6000:]
    assert "kernel path 'i8mm' is not supported by this CPU" in out, out[-6000:]
    assert "(failed, as it must)" in out, out[-6000:]
