"""PackConfig: how a model is packed (the ternary format, per weight shape for `auto`, and the
head's storage). Plain data, no torch: the torch-free runtime reads packed directories too."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import ConfigError
from .formats import FORMATS

HEADS = ("int8", "q4", "fp16", "fp32")
TABLE_HEADS = ("int8", "q4")  # heads stored as a quantized table (the others are float)


AUTO = "auto"


def shape_key(n: int, k: int) -> str:
    """How PackConfig.shapes names an [n, k] weight."""
    return f"{n}x{k}"


@dataclass(frozen=True)
class PackConfig:
    """format: packed ternary layout (``i2`` 2 bits, ``base3`` 1.6 bits, ``lut2`` 2 bits for the
    lookup-table kernel; see bitnet158.formats), or ``auto``: each weight shape in whichever is
    fastest on this machine, timed when packing (bitnet158.tuning).
    head: output head (and tied embedding) storage: ``int8`` per-row (default), ``q4`` (4-bit codes with
    an fp16 scale per 32 values: 4.5 bits, 56 % of int8's bytes; needs hidden % 64 == 0), ``fp16``, ``fp32``.
    shapes: for ``auto``, the choice made ({"NxK": format}); stored with the packed model."""

    format: str = "i2"
    head: str = "int8"
    shapes: dict[str, str] = field(default_factory=dict)

    def validate(self) -> "PackConfig":
        if self.format not in FORMATS and self.format != AUTO:
            raise ConfigError(f"unknown packed format {self.format!r}; known: {', '.join(sorted(FORMATS))} or auto")
        if self.head not in HEADS:
            raise ConfigError(f"unknown head {self.head!r}; expected one of {', '.join(HEADS)}")
        if not isinstance(self.shapes, dict):
            raise ConfigError("packing shapes must map 'NxK' to a format")
        for key, fmt in self.shapes.items():
            if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", str(key)) or fmt not in FORMATS:
                raise ConfigError(f"bad packing shape entry {key!r}: {fmt!r} (expected 'NxK': one of "
                                  f"{', '.join(sorted(FORMATS))})")
        return self

    def format_for(self, n: int, k: int) -> str:
        """The format of an [n, k] weight under this config."""
        if self.format != AUTO:
            return self.format
        try:
            return self.shapes[shape_key(n, k)]
        except KeyError:
            raise ConfigError(f"packing format auto has no choice for a {n}x{k} weight") from None

    def describe(self) -> str:
        if self.format != AUTO:
            return self.format
        return "auto (" + ", ".join(f"{k.replace('x', '×')} {v}" for k, v in sorted(self.shapes.items())) + ")"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["shapes"]:  # only format auto records choices; files stay as they were otherwise
            del d["shapes"]
        return d
