"""Files of other projects ⇄ our models. Scale conventions of foreign formats are converted here
and only here; inside the package every scale is a dequantization multiplier.

    from bitnet158.interop import load_hf, save_hf
    model, tokenizer = load_hf("path/to/bitnet-b1.58-2B-4T")
    save_hf(model, "out/hf", tokenizer=tokenizer)
"""

from .hf import import_hf, load_hf
from .hf_export import save_hf

__all__ = ["load_hf", "import_hf", "save_hf"]
