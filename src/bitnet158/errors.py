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


class GenerationError(BitNetError):
    """A model that loaded but computes garbage while generating (non-finite logits)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a user-facing message (its first line, or its type)."""
    text = str(exc)
    return text.splitlines()[0][:limit] if text.strip() else type(exc).__name__


def short_repr(value: object, limit: int = 40) -> str:
    """A value as a short repr for a one-line message: long strings and containers are cut, and an
    integer too long to print (Python refuses to render more than 4300 digits) is described."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]  # repr of the head only: a hostile string may be megabytes long
    elif isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an over-long int or a deep nest inside a container
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(text: str, limit: int = 80) -> str:
    """A name from a file as it is when short and printable, else its short repr: a newline or
    U+2028 inside it would break the one-line message."""
    return text if len(text) <= limit and text.isprintable() else short_repr(text, limit)
