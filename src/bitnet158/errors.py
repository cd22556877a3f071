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
