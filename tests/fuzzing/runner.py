"""Run fuzz cases in worker processes with a time and a memory limit, and classify each outcome.

    ok         the reader accepted the input (and used it)
    error      a one-line BitNetError: what we promise for a bad file
    traceback  any other exception (PanicException and other BaseExceptions included)
    oom        MemoryError under the worker's address-space limit: a memory blow-up
    hang       no answer within the time limit (the worker is killed and replaced)
    crash      the worker died (a signal, an abort, a segfault)
    modified   the reader changed its input (hashed before and after)
    harness    the fuzzer itself failed to build the case (a bug in tests/fuzzing)

Workers are `python -m fuzzing.runner --worker` subprocesses speaking JSON lines on stdin/stdout.
Reproduce one case in this process, with its traceback:

    cd tests && python -m fuzzing.runner READER INDEX [MASTER_SEED]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .mutators import mutate

OUTCOMES = ("ok", "error", "traceback", "oom", "hang", "crash", "modified", "harness")
FAILURES = ("traceback", "oom", "hang", "crash", "modified", "harness")
TIMEOUT_S = 20.0
MEMORY_BYTES = 2 * 2**30
STARTUP_S = 180.0  # a worker's imports, on a machine another job keeps busy
TESTS_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    reader: str
    index: int
    master_seed: int = 0

    def rng(self) -> random.Random:
        return random.Random(f"{self.master_seed}:{self.reader}:{self.index}")


@dataclass
class CaseResult:
    reader: str
    index: int
    outcome: str
    detail: str = ""
    mutations: list[str] = field(default_factory=list)


def case_folder(case: Case, work: Path) -> Path:
    return work / f"{case.reader}-{case.master_seed}-{case.index}"


def prepare_case(case: Case, seeds: Path, variants: dict[str, list[str]], work: Path) -> tuple[Path, Path, list[str]]:
    """Copy the case's seed into a fresh folder and mutate it: (folder, path to read, mutations)."""
    rng = case.rng()
    variant = rng.choice(variants[case.reader])
    case_dir = case_folder(case, work)
    if case_dir.exists():
        shutil.rmtree(case_dir)
    shutil.copytree(seeds / case.reader / variant, case_dir, symlinks=True)
    path, done = mutate(rng, case.reader, variant, case_dir)
    return case_dir, path, [f"{variant}: {d}" for d in done]


def tree_hash(root: Path) -> str:
    """Names, kinds and contents of everything under `root`; FIFOs by name (reading one blocks)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            h.update(os.fsencode(p))
            if os.path.islink(p):
                h.update(b"L" + os.fsencode(os.readlink(p)))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    h.update(b"F" + hashlib.sha256(f.read()).digest())
            else:
                h.update(b"D" if os.path.isdir(p) else b"O")
    return h.hexdigest()


def _signature(exc: BaseException) -> str:
    """The exception type, its first line and the innermost frame in bitnet158 (else the last)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "bitnet158" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    text = str(exc).splitlines()[0][:120] if str(exc).strip() else ""
    return f"{type(exc).__name__} @ {where}: {text}"


def run_case(case: Case, seeds: Path, variants: dict[str, list[str]], work: Path) -> CaseResult:
    """One case in this process: prepare, hash, read, classify, hash again, clean up."""
    from bitnet158.errors import BitNetError

    from .readers import READ

    try:
        case_dir, path, done = prepare_case(case, seeds, variants, work)
    except Exception as e:  # noqa: BLE001 — reported, so one bad mutation does not stop a campaign
        shutil.rmtree(case_folder(case, work), ignore_errors=True)
        return CaseResult(case.reader, case.index, "harness", _signature(e))
    result = CaseResult(case.reader, case.index, "ok", mutations=done)
    before = tree_hash(case_dir)
    try:
        if os.environ.get("BITNET158_FUZZ_SABOTAGE"):
            _sabotage(case.index, path)
        else:
            READ[case.reader](path)
    except BitNetError as e:
        result.outcome, result.detail = "error", str(e)[:300]
    except MemoryError as e:
        result.outcome, result.detail = "oom", _signature(e)
    except BaseException as e:  # noqa: BLE001 — a panic or an interrupt is as much a failure as a bug
        result.outcome, result.detail = "traceback", _signature(e)
    if result.outcome not in FAILURES and tree_hash(case_dir) != before:
        result.outcome, result.detail = "modified", "the input changed while it was read"
    shutil.rmtree(case_dir, ignore_errors=True)
    return result


def _sabotage(index: int, path: Path) -> None:
    """A reader gone wrong in each way the harness must report (its own test sets the variable)."""
    if index % 4 == 0:
        time.sleep(3600)
    elif index % 4 == 1:
        os.abort()
    elif index % 4 == 2:
        raise KeyError("a bug")
    else:
        path.parent.joinpath("added-by-the-reader").write_bytes(b"")


# --- the worker process -------------------------------------------------------------------------

def worker_main(seeds: Path, work: Path, memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # a stray print must not corrupt the protocol
    import torch

    torch.set_num_threads(1)
    import bitnet158.interop.gguf_import  # noqa: F401 — every reader imported before "ready"
    import bitnet158.train.data  # noqa: F401

    from .readers import READ  # noqa: F401

    variants = json.loads((seeds / "variants.json").read_text())
    proto.write("ready\n")
    for line in sys.stdin:
        case = Case(**json.loads(line))
        proto.write(json.dumps(asdict(run_case(case, seeds, variants, work)), ensure_ascii=True) + "\n")


def _replay(case: Case, seeds: Path, work: Path) -> list[str]:
    """The mutations of a case whose worker hung or died (they are deterministic)."""
    variants = json.loads((seeds / "variants.json").read_text())
    replay = work / "replay"
    try:
        return prepare_case(case, seeds, variants, replay)[2]
    except Exception as e:  # noqa: BLE001 — the worker reported the harness failure already
        return [f"(not replayable: {_signature(e)})"]
    finally:
        shutil.rmtree(replay, ignore_errors=True)


class _Worker:
    def __init__(self, seeds: Path, work: Path, memory: int, log: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               # pyarrow's jemalloc reserves gigabytes of address space up front: under the
               # RLIMIT_AS limit every later allocation would fail for reasons of the harness
               "ARROW_DEFAULT_MEMORY_POOL": "system"}
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fuzzing.runner", "--worker", str(seeds), str(work),
                                          str(memory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=env, cwd=TESTS_DIR)
        self.buf = b""
        self.case: Case | None = None
        self.ready = False
        self.deadline = time.monotonic() + STARTUP_S

    def send(self, case: Case, timeout: float) -> None:
        self.case, self.deadline = case, time.monotonic() + timeout
        self.proc.stdin.write((json.dumps(asdict(case)) + "\n").encode())
        self.proc.stdin.flush()

    def lines(self) -> list[str] | None:
        """Complete lines read so far, or None at end of file (the worker died)."""
        data = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not data:
            return None
        self.buf += data
        *done, self.buf = self.buf.split(b"\n")
        return [d.decode() for d in done]

    def kill(self) -> str:
        self.proc.kill()
        self.proc.wait()
        tail = self.log.read_bytes()[-300:].decode(errors="replace").strip().splitlines()
        return f"exit {self.proc.returncode}; {tail[-1] if tail else ''}"


def run_campaign(cases: list[Case], seeds: Path, work: Path, *, workers: int = 2, timeout: float = TIMEOUT_S,
                 memory: int = MEMORY_BYTES) -> list[CaseResult]:
    """Every case through `workers` worker processes; a hung or dead worker is replaced."""
    pending, results = deque(cases), []
    sel = selectors.DefaultSelector()
    pool: list[_Worker] = []

    def start() -> None:
        w = _Worker(seeds, work, memory, work / f"worker-{len(results)}-{len(pool)}-{time.monotonic_ns()}.log")
        pool.append(w)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)

    def retire(w: _Worker, outcome: str) -> None:
        sel.unregister(w.proc.stdout)
        pool.remove(w)
        detail = w.kill()
        if w.case is None:
            raise RuntimeError(f"a fuzz worker died before its first case: {detail}")
        shutil.rmtree(case_folder(w.case, work), ignore_errors=True)
        results.append(CaseResult(w.case.reader, w.case.index, outcome, detail, _replay(w.case, seeds, work)))
        if pending or any(x.case for x in pool):
            start()

    for _ in range(min(workers, len(cases))):
        start()
    while pending or any(w.case for w in pool):
        for w in pool:
            if w.ready and w.case is None and pending:
                w.send(pending.popleft(), timeout)
        wait = max(0.0, min(w.deadline for w in pool) - time.monotonic()) if pool else 0.0
        for key, _ in sel.select(wait):
            w = key.data
            lines = w.lines()
            if lines is None:
                retire(w, "crash")
                continue
            for line in lines:
                if line == "ready":
                    w.ready = True
                else:
                    results.append(CaseResult(**json.loads(line)))
                    w.case = None
        now = time.monotonic()
        for w in list(pool):
            if now > w.deadline and (w.case is not None or not w.ready):
                retire(w, "hang")
    for w in pool:
        sel.unregister(w.proc.stdout)
        w.proc.stdin.close()
        w.proc.wait()
    return results


def summarize(results: list[CaseResult]) -> str:
    """Counts per reader and outcome, then every distinct failure (signature: count, one example)."""
    readers = sorted({r.reader for r in results})
    counts = Counter((r.reader, r.outcome) for r in results)
    lines = [f"{'reader':10s}" + "".join(f"{o:>10s}" for o in OUTCOMES) + f"{'total':>10s}"]
    for reader in readers:
        row = [counts[reader, o] for o in OUTCOMES]
        lines.append(f"{reader:10s}" + "".join(f"{n:10d}" for n in row) + f"{sum(row):10d}")
    total = [sum(counts[r, o] for r in readers) for o in OUTCOMES]
    lines.append(f"{'all':10s}" + "".join(f"{n:10d}" for n in total) + f"{sum(total):10d}")
    failures: dict[str, list[CaseResult]] = {}
    for r in results:
        if r.outcome in FAILURES:
            failures.setdefault(f"{r.reader} {r.outcome} {r.detail}", []).append(r)
    for sig, rs in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"{len(rs):5d}× {sig}  (e.g. case {rs[0].index}: {'; '.join(rs[0].mutations)[:200]})")
    return "\n".join(lines)


def build(root: Path) -> dict[str, list[str]]:
    """Seeds under root/seeds (variants.json beside them, for the workers)."""
    from .seeds import build_seeds

    seeds = root / "seeds"
    variants = build_seeds(seeds)
    (seeds / "variants.json").write_text(json.dumps(variants))
    return variants


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--worker":
        worker_main(Path(argv[1]), Path(argv[2]), int(argv[3]))
        return
    reader, index = argv[0], int(argv[1])
    master = int(argv[2]) if len(argv) > 2 else 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        variants = build(root)
        case_dir, path, done = prepare_case(Case(reader, index, master), root / "seeds", variants, root)
        print("\n".join(done))
        from .readers import READ

        READ[reader](path)
        print("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
