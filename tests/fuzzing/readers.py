"""What each reader is asked to do with a (mutated) input: read it whole, as a user's command
would, and then use it a little (two generated tokens, an encode), because some hostile inputs
load cleanly and fail only when used."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

PROMPT = "def f(x): é 中"


def _use(model, tokenizer) -> None:
    """Two greedy tokens: what a user's first `generate` does after loading."""
    from bitnet158.generate import generate
    from bitnet158.sampling import SamplingConfig

    if tokenizer is None:
        with torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long))
        return
    generate(model, tokenizer, PROMPT, max_tokens=2, sampling=SamplingConfig(temperature=0.0))
    generate(model, tokenizer, PROMPT, max_tokens=2, sampling=SamplingConfig(temperature=1.0), seed=0)


def read_model(path: Path) -> None:
    from bitnet158.checkpoint import ModelDir

    md = ModelDir(path)
    md.tensor(md.names()[0])  # the streamed reader (conversions) as well as the memory-mapped one
    _use(*md.load())


def read_run(path: Path) -> None:
    from bitnet158.checkpoint import ModelDir, load_training_state

    md = ModelDir(path)
    model, tokenizer = md.load()
    optimizer = torch.optim.AdamW(model.parameters())
    load_training_state(md.path, model, optimizer)
    # one resumed step: optimizer state of the wrong shape or dtype fails only here
    model(torch.zeros(1, 4, dtype=torch.long)).float().logsumexp(-1).mean().backward()
    optimizer.step()
    _use(model, tokenizer)


def read_hf(path: Path) -> None:
    from bitnet158.interop import load_hf

    _use(*load_hf(path))


def read_gguf(path: Path) -> None:
    from bitnet158.interop.gguf_import import read_gguf

    model, tokenizer, _ = read_gguf(path)
    _use(model, tokenizer)


def read_tokenizer(path: Path) -> None:
    from bitnet158.tokenizer import Tokenizer

    tok = Tokenizer.load(path)
    ids = tok.encode(PROMPT)
    tok.decode(ids)
    detok = tok.streaming_detokenizer()
    for i in ids:
        detok.add(i)
    detok.finalize()


def read_data(path: Path) -> None:
    from bitnet158.train.data import load_corpus

    load_corpus([path])


READ: dict[str, Callable[[Path], None]] = {
    "model": read_model, "packed": read_model, "run": read_run, "hf": read_hf, "gguf": read_gguf,
    "tokenizer": read_tokenizer, "data": read_data,
}
