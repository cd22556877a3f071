"""Errors a user can cause. Each carries a one-line message; the CLI prints it and exits 2.

Programming errors (bugs) stay ordinary Python exceptions with tracebacks.
"""


class BitNetError(Exception):
    """Base class: a problem with the user's input, files or settings, told in one line."""


class ConfigError(BitNetError):
    """An unknown preset, a bad option value, a config that contradicts itself."""


class DataError(BitNetError):
    """A missing, empty, binary or unreadable data file."""


class CheckpointError(BitNetError):
    """A missing, truncated or inconsistent checkpoint (names, shapes, dtypes, values)."""


class FormatError(BitNetError):
    """A packed or foreign file (GGUF, HF) whose bytes disagree with what its format says."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a user-facing message (its first line, or its type)."""
    text = str(exc)
    return text.splitlines()[0][:limit] if text.strip() else type(exc).__name__
