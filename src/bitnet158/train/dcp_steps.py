"""Sharded training steps through torch.distributed.checkpoint (DCP), and their export to an
ordinary model directory.

A sharded step directory:

    step-000200/
      dcp/            DCP's files: one `__R_0.distcp` per rank (its shards of the weights and of the
                      AdamW moments) and `.metadata` (which slice of which tensor lies where)
      config.json     the model's config document, with "sharded": {...} (rank 0)
      tokenizer.json  (rank 0)
      trainer.json    the loop's state: step, history, evals, train_config, world size (rank 0)

Every rank writes its shards into one hidden temporary directory; when DCP's save has returned on
every rank (its last collective), rank 0 renames the directory into place and points `latest` at
it, so a kill during a save leaves the previous step loadable. The state dicts come from
`get_state_dict` (plain names, whatever the wrapping), and DCP reshards on load, so a run resumes
on any world size; `export_run` loads a step into one plain Transformer and writes a model
directory. DCP's `.metadata` is a pickle: it is read here with an unpickler that builds only DCP's
own metadata classes, torch sizes and dtypes (`_SafeReader`; anything else is a one-line
CheckpointError, and no other code runs), and DCP reads its tensor files with weights_only.
Exported model directories are safetensors + JSON like every other.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import checkpoint
from ..config import ModelConfig
from ..errors import CheckpointError, first_line
from ..fileio import atomic_write_bytes, atomic_write_json, clean_stale_temporaries, fsync_path, fsync_tree
from ..jsonio import get_float, get_int, get_list, read_json_object
from ..model import Transformer
from .distributed import Dist


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns each time it runs without a process group; a job of one (Dist.single, export-run)
    does so on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield

DCP_DIR = "dcp"
STATE = checkpoint.TRAINER_STATE

# What a DCP .metadata pickle may name (torch 2.13 writes these; found by recording a save's loads)
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
      ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
      ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: a pickle naming any other global (os.system, say)
    stops before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which checkpoint metadata never holds")


class _SafeReader(FileSystemReader):
    """DCP's file reader with its one unrestricted pickle.load replaced by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # missing, truncated, or naming what it may not
            raise CheckpointError(f"{path}: not a checkpoint's metadata ({first_line(e)})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a checkpoint's metadata (a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _read_metadata(directory: Path) -> Metadata:
    """The step's DCP metadata, read (safely) before DCP reads it: DCP wraps a reader's error in
    its own multi-line exception, so a bad file is named here in one line first."""
    return _SafeReader(directory / DCP_DIR).read_metadata()


def is_sharded(step_dir: Path) -> bool:
    return (Path(step_dir) / DCP_DIR).is_dir()


def latest_step(run_dir: str | os.PathLike) -> Path:
    """The newest step directory of a run (CheckpointError when there is none)."""
    return checkpoint.resolve(run_dir)


def run_is_sharded(run_dir: str | os.PathLike) -> bool:
    run_dir = Path(run_dir)
    try:
        return run_dir.is_dir() and is_sharded(latest_step(run_dir))
    except CheckpointError:
        return False


def save_step(d: Dist, run_dir: str | os.PathLike, step: int, model: Transformer,
              optimizer: torch.optim.Optimizer, tokenizer, state: dict[str, Any], keep: int = 2) -> Path:
    """Write run_dir/step-NNNNNN from every rank (collective: all ranks call it), atomically."""
    run_dir = Path(run_dir)
    target = run_dir / f"step-{step:06d}"
    tmp = run_dir / f".{target.name}.sharded.tmp"  # one name every rank knows; stale ones are cleaned
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(run_dir)
        tmp.mkdir()
    d.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / DCP_DIR, no_dist=not d.initialized)
    if d.is_main:
        sharded = {"format": "torch.distributed.checkpoint", "world_size": d.world_size,
                   "parallel": d.config.parallel if d.world_size > 1 else "none"}
        atomic_write_json(tmp / checkpoint.CONFIG,
                          checkpoint.config_document(model.config, None, tokenizer, {"sharded": sharded}))
        if tokenizer is not None:
            tokenizer.save(tmp / checkpoint.TOKENIZER)
        (tmp / STATE).write_text(json.dumps({"step": step, "world_size": d.world_size, **state}, indent=2) + "\n")
        fsync_tree(tmp)
        if target.exists():  # the same step again (a resumed run that saves where it started)
            shutil.rmtree(target)
        os.rename(tmp, target)
        fsync_path(run_dir)
        atomic_write_bytes(run_dir / checkpoint.LATEST, target.name.encode())
        steps = sorted((int(c.name[5:]), c) for c in run_dir.iterdir()
                       if c.name.startswith("step-") and c.name[5:].isdigit())
        for _, old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return target


def check_step(directory: Path, config: ModelConfig) -> dict[str, Any]:
    """A sharded step's trainer.json, after checking the step is sharded and holds `config`'s model."""
    if not is_sharded(directory):
        raise CheckpointError(f"{directory}: not a sharded step (a single-process run wrote it); "
                              "resume it without torchrun")
    saved = checkpoint.ModelDir(directory).config
    if saved != config:
        diff = [f.name for f in config.__dataclass_fields__.values()
                if getattr(saved, f.name) != getattr(config, f.name)]
        raise CheckpointError(f"{directory}: the run holds another model (its {', '.join(diff)} differ); "
                              "resume with the same preset and options")
    file = directory / STATE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (an unfinished or foreign step)")
    state = read_json_object(file, nonfinite=True)
    get_int(state, "step", file, lo=0)
    get_list(state, "history", file, default=[], items=dict)
    get_list(state, "evals", file, default=[], items=dict)
    get_float(state, "seconds", file, default=0.0, lo=0.0)
    return state


def restore_step(d: Dist, run_dir: str | os.PathLike, model: Transformer,
                 optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the newest sharded step into `model` and `optimizer` (wrapped or not, on any world
    size: DCP reads each rank's slices); return its trainer.json."""
    directory = latest_step(run_dir)
    state = d.agree(lambda: (_read_metadata(directory), check_step(directory, model.config))[1])
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet():
        dcp.load({"model": model_state, "optim": optim_state}, storage_reader=_SafeReader(directory / DCP_DIR),
                 no_dist=not d.initialized)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    return state


def load_step_model(run: str | os.PathLike) -> tuple[Transformer, Any, Path]:
    """(model, tokenizer, step directory): a run's newest sharded step in one plain process."""
    directory = latest_step(run)
    if not is_sharded(directory):
        raise CheckpointError(f"{directory}: not a sharded step; it is already a model directory")
    md = checkpoint.ModelDir(directory)
    _read_metadata(directory)
    model = Transformer(md.config)
    weights = model.state_dict()
    # one process, no process group; the optimizer's keys are left unread
    with _quiet():
        dcp.load({"model": weights}, storage_reader=_SafeReader(directory / DCP_DIR), no_dist=True)
    model.load_state_dict(weights)
    return model, md.tokenizer(), directory


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a sharded run's newest step as an ordinary model directory (pack, generate and
    export-hf read it)."""
    model, tokenizer, _ = load_step_model(run)
    return checkpoint.save(model, out, tokenizer, overwrite=overwrite)
