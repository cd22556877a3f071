"""bitnet158: train, convert, pack and run 1.58-bit (ternary) BitNet language models on a CPU.

    >>> import bitnet158 as bn
    >>> cfg = bn.preset("tiny")                 # a ModelConfig; cfg.twin("fp") is its FP twin
    >>> model = bn.Transformer(cfg)             # BitLinear layers: latent weights, fake-quant + STE
"""

from ._version import __version__
from .cache import KVCache
from .checkpoint import ModelDir, load, pack_dir, save, save_packed
from .config import PRESETS, ModelConfig, TrainConfig, preset
from .errors import BitNetError, CheckpointError, ConfigError, DataError, FormatError, GenerationError
from .interop.hf_export import save_hf
from .interop.hf_import import import_hf, load_hf
from .layers import BitLinear, RMSNorm, convert
from .model import Transformer
from .pack import pack_
from .packed_layers import PackConfig, PackedBitLinear

__all__ = [
    "__version__", "ModelConfig", "TrainConfig", "preset", "PRESETS", "BitNetError", "CheckpointError",
    "ConfigError", "DataError", "FormatError", "GenerationError", "BitLinear", "RMSNorm", "convert",
    "Transformer", "KVCache",
    "ModelDir", "load", "pack_dir", "save", "save_packed", "PackConfig", "PackedBitLinear", "pack_", "load_hf",
    "import_hf", "save_hf",
]
