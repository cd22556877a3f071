"""bitnet158: train, convert, pack and run 1.58-bit (ternary) BitNet language models on a CPU.

    >>> import bitnet158 as bn
    >>> cfg = bn.preset("tiny")                 # a ModelConfig; cfg.twin("fp") is its FP twin
    >>> model = bn.Transformer(cfg)             # BitLinear layers: latent weights, fake-quant + STE
"""

__version__ = "0.1.0"

from .config import ModelConfig, TrainConfig, preset, PRESETS  # noqa: E402
from .errors import BitNetError, CheckpointError, ConfigError, DataError, FormatError  # noqa: E402
from .layers import BitLinear, RMSNorm, convert  # noqa: E402
from .model import Transformer  # noqa: E402
from .cache import KVCache  # noqa: E402
from .checkpoint import load, save, save_packed  # noqa: E402
from .pack import PackConfig, PackedBitLinear, pack_  # noqa: E402
from .interop.hf import import_hf, load_hf  # noqa: E402
from .interop.hf_export import save_hf  # noqa: E402

__all__ = [
    "ModelConfig", "TrainConfig", "preset", "PRESETS", "BitNetError", "CheckpointError", "ConfigError",
    "DataError", "FormatError", "BitLinear", "RMSNorm", "convert", "Transformer", "KVCache", "load", "save",
    "save_packed", "PackConfig", "PackedBitLinear", "pack_", "load_hf", "import_hf", "save_hf",
]
