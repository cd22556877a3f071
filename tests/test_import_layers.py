"""The package's layers point one way (pyproject.toml's import-linter contract), and the check
really catches an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install '.[test]')")


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([LINT, "--config", str(ROOT / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept():
    result = _lint(ROOT / "src", ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "bitnet158", src / "bitnet158",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    model = src / "bitnet158" / "model.py"
    # the model learning about files: exactly what the layers forbid
    model.write_text(model.read_text() + "\nfrom .checkpoint import load as _upward  # noqa\n")
    result = _lint(src, tmp_path)
    assert result.returncode != 0
    assert "bitnet158.model is not allowed to import bitnet158.checkpoint" in result.stdout
