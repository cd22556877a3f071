"""Packed ternary formats: a registry name → format instance.

>>> import numpy as np
>>> from bitnet158.formats import get_format
>>> fmt = get_format("i2")
>>> codes = np.array([[1, 0, -1]], dtype=np.int8)
>>> packed = fmt.pack(codes)
>>> packed.size, fmt.unpack(packed, 1, 3).tolist()
(256, [[1, 0, -1]])
"""

from __future__ import annotations

from ..errors import FormatError
from .base import TILE_N, PackedFormat
from .base3 import Base3Format
from .i2 import I2Format
from .lut2 import Lut2Format

FORMATS: dict[str, PackedFormat] = {}


def register(fmt: PackedFormat) -> PackedFormat:
    FORMATS[fmt.name] = fmt
    return fmt


register(I2Format())
register(Base3Format())
register(Lut2Format())


def get_format(name: str | PackedFormat) -> PackedFormat:
    if isinstance(name, PackedFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown packed format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


__all__ = ["FORMATS", "TILE_N", "PackedFormat", "I2Format", "Base3Format", "Lut2Format", "get_format", "register"]
