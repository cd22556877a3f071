"""Files of other projects ⇄ our models. Scale conventions of foreign formats are converted here
and only here; inside the package every scale is a dequantization multiplier.

    from bitnet158.interop import load_hf
    model, tokenizer = load_hf("path/to/bitnet-b1.58-2B-4T")
"""

from .hf import load_hf

__all__ = ["load_hf"]
