"""What the engine's test modules share (imported as `from engine_fixtures import ...`): a small
trained tokenizer and a tiny packed model with GQA, both module-scoped."""

from __future__ import annotations

import pytest
import torch

import bitnet158 as bn
from bitnet158.config import ModelConfig
from bitnet158.sampling import SamplingConfig
from bitnet158.tokenizer import Tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "The with statement wraps a block of code.\n",
         "for i in range(10):\n    print(i)\n"] * 10
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128)
    return bn.pack_(bn.Transformer(cfg)).eval()
