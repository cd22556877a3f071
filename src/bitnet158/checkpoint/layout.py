"""What a model directory is on disk: file names, the config.json document, and which directory a
path names (itself, or the newest step of a training run).

    config.json         {"format": "bitnet158", "format_version": 2, "kind": "model" | "packed",
                         "bitnet158_version": ..., "model": {...}, "packing": {...} (packed only),
                         "tokenizer": {...} (with a tokenizer: its special tokens and chat template)}
    model.safetensors   the tensors (metadata: format, kind), 64-byte aligned for the kernels
    tokenizer.json      when the model was saved with a tokenizer

format_version 1 (release 0.1.0) had the same files; its tokenizer section held only
`eos_token`. Both are read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import ModelConfig
from ..errors import BitNetError, CheckpointError, first_line, short_repr
from ..jsonio import read_json_object
from ..pack_config import PackConfig
from ..tokenizer import Tokenizer

FORMAT = "bitnet158"
FORMAT_VERSION = 2
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
LATEST = "latest"
WEIGHT_ALIGN = 64  # tensor data offsets in model.safetensors: whole cache lines for the kernels
HEAD_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # a float head is stored at its precision
STEP_DIR = re.compile(r"^step-(\d+)$")
# A scale multiplies a layer's output. Two scaled outputs meet in the attention scores and in the
# gated FFN (s²), whose RMSNorm squares again (s⁴ times the sums over hidden units): beyond about
# 1e6, float32 overflows to inf and the logits become NaN. Real scales are ~1e-3 … 1e1.
MAX_SCALE = 1e6
# Norm weights multiply normalized (unit-RMS) activations; real ones stay below ~1e2.
MAX_NORM_WEIGHT = 1e4


def config_document(config: ModelConfig, packing: PackConfig | None, tokenizer=None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a model directory (`tokenizer`: a bitnet158 Tokenizer, for its section)."""
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                           "kind": "packed" if packing is not None else "model",
                           "bitnet158_version": __version__, "model": config.to_dict()}
    if packing is not None:
        doc["packing"] = packing.to_dict()
    if tokenizer is not None:
        doc["tokenizer"] = tokenizer.section()
    doc.update(extra or {})
    return doc


def resolve(path: str | os.PathLike) -> Path:
    """The model directory `path` names: itself, or the newest step of a training run."""
    path = Path(path)
    try:
        return _resolve(path)
    except (OSError, ValueError) as e:  # a name too long for the filesystem, a NUL byte, no permission
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise CheckpointError(f"{path}: cannot read the checkpoint directory ({reason})") from None


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if (path / CONFIG).exists():
        return path
    latest = _latest_step(path)
    if latest is not None and (latest / CONFIG).exists():
        return latest
    steps = sorted((int(m.group(1)), child) for child in path.iterdir()
                   if (m := STEP_DIR.match(child.name)) and (child / CONFIG).exists())
    if steps:
        return steps[-1][1]
    raise CheckpointError(f"{path}: not a checkpoint (no {CONFIG}, no step directories)")


def _latest_step(run: Path) -> Path | None:
    """The step directory `latest` names, or None when it names none: we write it as one line
    `step-NNNNNN`, so anything else (a directory, other bytes, a path elsewhere, a huge file) is
    ignored and the newest complete step directory is used instead."""
    latest = run / LATEST
    try:
        if not latest.is_file():
            return None
        with open(latest, "rb") as f:
            name = f.read(64).decode("utf-8").strip()  # a step name is ~12 bytes; more is not ours
    except (OSError, UnicodeDecodeError):
        return None
    return run / name if STEP_DIR.match(name) else None


def read_config_document(directory: Path) -> dict[str, Any]:
    """config.json of a model directory, checked to be ours and not newer than this reader."""
    file = directory / CONFIG
    doc = read_json_object(file)
    if doc.get("format") != FORMAT or "model" not in doc:
        raise CheckpointError(f"{file}: not a bitnet158 config (no format/model keys)")
    version = doc.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{file}: format_version must be an integer, got {short_repr(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {version} is newer than this bitnet158 reads "
                              f"({FORMAT_VERSION}); upgrade bitnet158")
    return doc


def model_config(directory: Path, doc: dict[str, Any]) -> ModelConfig:
    """The document's model section as a ModelConfig, or CheckpointError naming the file."""
    try:
        return ModelConfig.from_dict(doc["model"])
    except BitNetError as e:
        raise CheckpointError(f"{directory / CONFIG}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{directory / CONFIG}: bad model config ({e})") from None


def packing_config(directory: Path, doc: dict[str, Any]) -> PackConfig | None:
    """The document's packing section (None for a training-form model), or CheckpointError."""
    if doc.get("kind") != "packed":
        return None
    section = doc.get("packing", {})
    try:
        if not isinstance(section, dict):
            raise TypeError("expected an object")
        return PackConfig(**section).validate()
    except (TypeError, BitNetError) as e:
        raise CheckpointError(f"{directory / CONFIG}: bad packing section ({e})") from None


def read_tokenizer(directory: Path, doc: dict[str, Any], rows: int) -> Tokenizer | None:
    """The tokenizer saved beside the weights (special tokens and chat template from the config's
    tokenizer section), or None; CheckpointError when it has more tokens than the embedding's `rows`."""
    if not (directory / TOKENIZER).exists():
        return None
    tokenizer = Tokenizer.load(directory / TOKENIZER, section=doc.get("tokenizer"))
    if tokenizer.vocab_size > rows:  # else its top ids would index past the embedding mid-generation
        raise CheckpointError(f"{directory / TOKENIZER}: the tokenizer has {tokenizer.vocab_size} tokens "
                              f"but the model's embedding has {rows} rows")
    return tokenizer
