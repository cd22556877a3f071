"""What several verbs share: the runs folder, thread settings, defaults read from what a verb drives."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

DEFAULT_RUNS = "runs"


def default_of(func: Callable[..., Any], name: str) -> Any:
    """The default of `func`'s parameter `name`: a verb's flag defaults to what its function does."""
    return inspect.signature(func).parameters[name].default


def set_threads(n: int | None) -> None:
    """torch's CPU threads (None: torch's own default, all cores)."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    import torch  # here: the torch-free verbs never call this

    torch.set_num_threads(n)


def directory_megabytes(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) / 1e6


def peak_resident_megabytes() -> float:
    """This process's peak resident set so far (what a long conversion reports at its end)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # macOS reports bytes, Linux KiB
