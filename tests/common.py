"""Helpers several test modules share (imported as `from common import ...`, like hf_fixtures)."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import kernels
from bitnet158.config import ModelConfig
from bitnet158.errors import BitNetError
from bitnet158.model import Transformer
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig

needs_step = pytest.mark.skipif(not kernels.extension_available() or kernels.current_path() == kernels.TORCH_PATH,
                                reason="the native step needs the compiled extension")


def small_packed_model(seed: int = 0, **overrides) -> Transformer:
    """A 2-layer i2 model with an int8 head and GQA (4 heads, 2 KV heads), in eval mode."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=96, max_seq_len=64), **overrides})
    return pack_(Transformer(cfg), PackConfig(format="i2", head="int8")).eval()


def one_line(exc: BaseException, *fragments: str) -> str:
    """A user error as the project promises it: a BitNetError whose message is one non-empty line
    holding every fragment."""
    assert isinstance(exc, BitNetError), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert "\n" not in msg and msg.strip(), repr(msg)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: torch's thread pool only adds wake-up latency (10× slower on a busy 2-core box).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` after importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
