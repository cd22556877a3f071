"""Training past one process (torch.distributed, gloo on CPU): 2 ranks equal 1 process with the same
global batch (DDP and FSDP2), absmean sees the whole weight under FSDP2, sharded steps resume on
another world size and export to a model directory, and bad input ends every rank with one line.

Every job is launched through torchrun on 127.0.0.1 at a free port with a wall-clock timeout
(dist_helpers.py). The kill-and-resume run is in test_distributed_kill.py (slow)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist

from bitnet158 import checkpoint
from bitnet158.cli import main
from bitnet158.config import TrainConfig
from bitnet158.errors import BitNetError
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.dcp_steps import export_run, load_step_model
from bitnet158.train.distributed import Dist, ParallelConfig, check_launch
from bitnet158.train.shards import ShardDir, write_streams
from bitnet158.train.trainer import train
from common import one_line, one_torch_thread  # noqa: F401  (a fixture)
from dist_helpers import TESTS, error_lines, history, torchrun
from dist_worker import config, tokens

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is needed"),
              pytest.mark.usefixtures("one_torch_thread")]

TOLERANCE = 1e-5  # relative, per step (the acceptance bound; on CPU the runs agree bit for bit)


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    assert len(a) == len(b)
    return [abs(x - y) / abs(y) for x, y in zip(a, b)]


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "losses.json"
    job = torchrun(2, str(TESTS / "dist_worker.py"), str(out), "ddp,fsdp,absmean", "20", cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world_size"] == 2
    # one process, the same global batch of 8 windows: 4 rows × 2 micro-batches
    mc, tc = config(20, batch_size=4, grad_accum=2)
    reference = [row["loss"] for row in train(mc, tc, tokens(), tokens(4_000, seed=1), progress=False).history]
    for mode in ("ddp", "fsdp"):
        worst = max(relative_differences(got[mode]["losses"], reference))
        print(f"{mode}: largest relative loss difference over 20 steps {worst:.3g}")
        assert worst <= TOLERANCE, (mode, got[mode]["losses"], reference)
    # absmean under FSDP2: every BitLinear quantized its whole [out, in] weight (the all-gathered
    # one), and its scale is the full weight's mean |W|, not a shard's
    check = got["absmean"]
    assert check["param_type"] == "DTensor"  # the model really was sharded
    full_shapes = {tuple(s) for s in check["shapes"]}
    assert check["seen"] and all(tuple(shape) in full_shapes for shape, _, _ in check["seen"])
    for _, scale, _ in check["seen"]:
        assert any(math.isclose(scale, e, rel_tol=0, abs_tol=0) for e in check["expected"]), scale


def test_sharded_steps_in_one_process_resume_exactly_and_export(tmp_path):
    """A job of one (no process group): DCP steps, a resume equal to the uninterrupted run, and
    export-run to a model directory that loads and holds the same weights."""
    mc, tc = config(6, batch_size=4)
    tc = tc.__class__(**{**tc.to_dict(), "save_every": 2, "eval_every": 3})
    whole = train(mc, tc, tokens(), tokens(4_000, seed=1), progress=False, run_dir=tmp_path / "a", dist=Dist.single())
    train(mc, tc, tokens(), tokens(4_000, seed=1), progress=False, run_dir=tmp_path / "b", dist=Dist.single(),
          until=4)
    resumed = train(mc, tc, tokens(), tokens(4_000, seed=1), progress=False, run_dir=tmp_path / "b",
                    dist=Dist.single(), resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert (tmp_path / "b" / "step-000004" / "dcp" / ".metadata").is_file()
    model, _, step = load_step_model(tmp_path / "a")
    assert step.name == "step-000006"
    for name, value in whole.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    exported = export_run(tmp_path / "a", tmp_path / "model")
    loaded, _ = checkpoint.load(exported)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in whole.model.state_dict().items())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A sharded run of the tiny preset made in one process (--parallel: DCP steps, no process
    group), in this interpreter; returns its folder and the train arguments (paths relative to it)."""
    root = tmp_path_factory.mktemp("dist_cli")
    (root / "data.txt").write_text(_text(), encoding="utf-8")
    args = ["train", "--parallel", "ddp", "--data", "data.txt", "--vocab-size", "300", "--steps", "2",
            "--batch-size", "4", "--seq-len", "32", "--warmup", "1", "--eval-every", "2", "--eval-batches", "1",
            "--save-every", "2", "--threads", "1", "--quiet", "--out", "run"]
    here = os.getcwd()
    os.chdir(root)
    try:
        assert main(args) == 0
    finally:
        os.chdir(here)
        torch.set_num_threads(1)
    return root, args


def _text() -> str:
    import pydoc_data.topics as topics  # stdlib text every Python has
    return "\n\n".join(list(topics.topics.values())[:40])


def test_export_run_cli_writes_a_model_directory(base_run):
    root, _ = base_run
    assert main(["export-run", str(root / "run"), str(root / "model")]) == 0
    assert main(["export-run", str(root / "run"), str(root / "model")]) == 2  # never overwrites silently
    model, tokenizer = checkpoint.load(root / "model")
    assert tokenizer is not None and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)
    assert len(history(root / "run", 2)) == 2


class _Payload:
    """A pickle that would create a file if unpickled with plain pickle.load."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hostile_dcp_metadata_is_refused_without_running_it(base_run, tmp_path, capsys):
    import pickle
    import shutil

    root, _ = base_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    step = checkpoint.resolve(run)
    marker = tmp_path / "pwned"
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    assert main(["export-run", str(run), str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a checkpoint's metadata" in err and "open, which checkpoint metadata never holds" in err and "\n" not in err, err
    assert not marker.exists() and not (tmp_path / "model").exists()


def _expect_one_line(job, *fragments: str) -> None:
    assert job.returncode != 0
    lines = error_lines(job.stdout + job.stderr)
    assert len(lines) == 1, job.stderr[-3000:]  # rank 0 only
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _with_batch(args: list[str], batch: str) -> list[str]:
    i = args.index("--batch-size")
    return [*args[:i + 1], batch, *args[i + 2:]]


def _other_shards(root) -> str:
    other = Tokenizer.train([_text()[::-1]], vocab_size=280)
    ids = torch.tensor(other.encode(_text()), dtype=torch.int32)
    write_streams(root / "other_shards", other, ids[:-200], ids[-200:])
    return "other_shards"


def test_bad_input_ends_every_rank_with_one_line(base_run, tmp_path):
    """Two jobs of 2 ranks: an error every rank finds before the process group exists, and one found
    after it (the run's model differs): rank 0 prints one line, every rank exits non-zero, in time."""
    root, args = base_run
    fresh = [a if a != "run" else str(tmp_path / "fresh") for a in args]
    job = torchrun(2, "-m", "bitnet158.cli", *_with_batch(fresh, "3"), cwd=root)
    _expect_one_line(job, "--batch-size 3", "2 processes")
    job = torchrun(2, "-m", "bitnet158.cli", *args, "--resume", "--mode", "fp", cwd=root)
    _expect_one_line(job, "another model", "mode")


def test_nccl_on_cpu_and_another_tokenizers_shards_are_one_line_errors(base_run):
    root, args = base_run
    with pytest.raises(BitNetError) as e:
        check_launch(ParallelConfig(backend="nccl"), TrainConfig(), 2)
    one_line(e.value, "nccl", "CUDA")
    shards = ShardDir(root / _other_shards(root))
    with pytest.raises(BitNetError) as e:
        shards.check_tokenizer(checkpoint.ModelDir(root / "run").tokenizer())
    one_line(e.value, "another tokenizer")


@pytest.mark.slow
def test_bad_input_through_torchrun_slow(base_run, tmp_path):
    """The same two errors as whole 2-rank jobs (NCCL on CPU; resuming on another tokenizer's shards)."""
    root, args = base_run
    fresh = [a if a != "run" else str(tmp_path / "fresh") for a in args]
    job = torchrun(2, "-m", "bitnet158.cli", *fresh, "--backend", "nccl", cwd=root)
    _expect_one_line(job, "nccl", "CUDA")
    job = torchrun(2, "-m", "bitnet158.cli", *args, "--resume", "--data-dir", _other_shards(root), cwd=root)
    _expect_one_line(job, "another tokenizer")


def test_parallel_config_rejects_unknown_values():
    with pytest.raises(Exception) as e:
        ParallelConfig(parallel="tp").validate()
    one_line(e.value, "--parallel", "ddp, fsdp")


def test_a_save_cut_short_leaves_the_previous_step(tmp_path, monkeypatch):
    """DCP writes into a hidden temporary directory; a failure (a kill) before the rename leaves
    `latest` on the previous step, which resumes; the next save clears the leftover."""
    from bitnet158.train import dcp_steps
    mc, tc = config(4, batch_size=4)
    tc = tc.__class__(**{**tc.to_dict(), "save_every": 2, "eval_every": 4})
    run = tmp_path / "run"
    train(mc, tc, tokens(), None, progress=False, run_dir=run, dist=Dist.single(), until=2)
    real_save = dcp_steps.dcp.save

    def dying_save(state, *, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)  # every shard written, not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp_steps.dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(mc, tc, tokens(), None, progress=False, run_dir=run, dist=Dist.single(), resume=True)
    monkeypatch.setattr(dcp_steps.dcp, "save", real_save)
    assert (run / "latest").read_text() == "step-000002" and not (run / "step-000004").exists()
    assert list(run.glob(".*.tmp"))  # the unfinished step, hidden
    resumed = train(mc, tc, tokens(), None, progress=False, run_dir=run, dist=Dist.single(), resume=True)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert not list(run.glob(".*.tmp")) and (run / "latest").read_text() == "step-000004"
