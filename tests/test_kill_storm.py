"""Kill storm (issue 18): `bitnet158 train` SIGKILLed at random moments (while it steps and while it
saves: it saves every step), each time continued with `--resume`, ends with exactly the losses of
an uninterrupted run, and after every kill the run directory loads.

Slow: 50 kills take several minutes (each restart imports torch). BITNET158_KILL_STORM_KILLS
sets another count.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitnet158 import checkpoint
from bitnet158.errors import BitNetError

KILLS = int(os.environ.get("BITNET158_KILL_STORM_KILLS", "50"))
STEPS = 30
WORDS = "the quick brown fox jumps over a lazy dog def return import class self value list dict".split()


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)))
    return path


def _train(run: Path, data: Path, resume: bool) -> subprocess.Popen:
    args = ["train", "--data", str(data), "--out", str(run), "--steps", str(STEPS), "--warmup", "5",
            "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300", "--save-every", "1",
            "--eval-every", "1000", "--seed", "0", "--threads", "1", "--quiet"]
    args.append("--resume" if resume else "--force")
    return subprocess.Popen([sys.executable, "-m", "bitnet158.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _newest_step(run: Path) -> int | None:
    """The step a resume starts from (None: nothing saved yet); the directory must load."""
    try:
        step = checkpoint.resolve(run)
    except BitNetError:
        return None
    checkpoint.ModelDir(step).load()
    return json.loads((step / checkpoint.TRAINER_STATE).read_text())["step"]


def _losses(run: Path) -> list[float]:
    state = json.loads((checkpoint.resolve(run) / checkpoint.TRAINER_STATE).read_text())
    return [row["loss"] for row in state["history"]]


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


@pytest.mark.slow
def test_kill_storm(tmp_path):
    data = _corpus(tmp_path / "corpus.txt")
    ref = tmp_path / "reference"
    t0 = time.monotonic()
    proc = _train(ref, data, resume=False)
    while not (ref / "latest").exists() and proc.poll() is None:
        time.sleep(0.05)
    first = time.monotonic() - t0  # start-up: imports, data, tokenizer, the first step and save
    _finish(proc)
    per_step = (time.monotonic() - t0 - first) / (STEPS - 1)
    expected = _losses(ref)
    assert len(expected) == STEPS

    rng = random.Random(0)
    run, kills, rounds, resumed_from = tmp_path / "storm", 0, 0, []
    while kills < KILLS:
        rounds += 1
        done = None
        while done != STEPS:
            proc = _train(run, data, resume=done is not None)
            _wait_for_a_moment(rng, proc, run, done, first, per_step)
            if proc.poll() is None and kills < KILLS:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                _finish(proc)
            done = _newest_step(run)
            resumed_from.append(done)
        assert _losses(run) == expected, f"round {rounds}: resumed from steps {resumed_from}"
    print(f"\n{kills} kills over {rounds} round(s); resumed from steps {resumed_from}; losses exact")


def _latest(run: Path) -> int | None:
    try:
        return int((run / checkpoint.LATEST).read_text().strip().removeprefix("step-"))
    except (OSError, ValueError):
        return None


def _wait_for_a_moment(rng: random.Random, proc: subprocess.Popen, run: Path, done: int | None,
                       first: float, per_step: float) -> None:
    """Sleep until a random moment of this process's life: one time in five during its start-up
    (data, tokenizer, resume, first step), otherwise after its first save, somewhere in the steps
    (and saves) that remain."""
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0, first))
        return
    while proc.poll() is None and (_latest(run) or 0) <= (done or 0):
        time.sleep(0.02)
    remaining = STEPS - (_latest(run) or 0)
    time.sleep(rng.uniform(0, max(0.0, remaining - 1) * per_step))
