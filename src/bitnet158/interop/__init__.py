"""Files of other projects ⇄ our models. Scale conventions of foreign formats are converted here
and only here; inside the package every scale is a dequantization multiplier.

One naming rule: `load_*` returns a model (and its tokenizer), `import_*` writes our model
directory, `export_*` / `save_*` writes theirs.

    from bitnet158.interop import load_hf, import_hf, save_hf
    model, tokenizer = load_hf("path/to/bitnet-b1.58-2B-4T")
    import_hf("path/to/bitnet-b1.58-2B-4T", "runs/2b4t")
    save_hf(model, "out/hf", tokenizer=tokenizer)

GGUF lives in interop.gguf_import (load_gguf, import_gguf) and interop.gguf_export (export_gguf),
imported on demand.
"""

from .hf_export import save_hf
from .hf_import import import_hf, load_hf

__all__ = ["load_hf", "import_hf", "save_hf"]
