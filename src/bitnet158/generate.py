"""Generation in three layers (as mlx-lm does): `generate_step` yields token ids from a KV-cached
model; `stream_generate` turns them into text pieces with speed statistics; `generate` returns the
whole string. The CLI (and later chat and server) call only `stream_generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .cache import KVCache
from .errors import ConfigError
from .sampling import SamplingConfig, sample
from .tokenizer import StreamingDetokenizer, Tokenizer


@torch.no_grad()
def generate_step(model, prompt: list[int], sampling: SamplingConfig | None = None, max_tokens: int = 100,
                  seed: int | None = None) -> Iterator[int]:
    """Yield up to max_tokens new token ids. The prompt is prefilled in one forward; each new
    token then costs one single-position forward over the KV cache."""
    sampling = (sampling or SamplingConfig()).validate()
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token")
    cfg = model.config
    if len(prompt) >= cfg.max_seq_len:
        raise ConfigError(f"the prompt has {len(prompt)} tokens; the model's context is {cfg.max_seq_len}")
    max_tokens = min(max_tokens, cfg.max_seq_len - len(prompt))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(cfg, batch_size=1, device=device)
    model.eval()
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    seen = torch.tensor(prompt, dtype=torch.long, device=device)
    logits = model(tokens, cache, last_only=True)[0, -1]
    for _ in range(max_tokens):
        token = int(sample(logits, sampling, seen, generator))
        yield token
        seen = torch.cat([seen, seen.new_tensor([token])])
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]


@dataclass
class GenerationResponse:
    text: str                   # the new text this step (may be empty while a character is incomplete)
    token: int
    generated_tokens: int
    prompt_tokens: int
    tokens_per_second: float    # decode speed so far (excluding the prompt's prefill)
    prefill_seconds: float
    finish_reason: str | None   # "stop" (any end token), "length", or None while running


def stream_generate(model, tokenizer: Tokenizer, prompt: str, max_tokens: int = 100,
                    sampling: SamplingConfig | None = None, seed: int | None = None) -> Iterator[GenerationResponse]:
    ids = tokenizer.encode_prompt(prompt)  # with bos in front when the model expects it
    if not ids:  # an empty prompt starts a new document: bos, or eos where it doubles as bos
        ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    end_ids = frozenset(tokenizer.end_ids)  # eos and end-of-turn alike (LLaMA 3: <|eot_id|>)
    detok = StreamingDetokenizer(tokenizer)
    start = time.perf_counter()
    first = None
    n = 0
    for token in generate_step(model, ids, sampling, max_tokens, seed):
        now = time.perf_counter()
        if first is None:
            first = now
        n += 1
        decode_time = now - first
        rate = (n - 1) / decode_time if decode_time > 0 else 0.0
        if token in end_ids:
            yield GenerationResponse(detok.finalize(), token, n, len(ids), rate, first - start, "stop")
            return
        text = detok.add(token)
        finish = "length" if n == max_tokens else None
        if finish:
            text += detok.finalize()
        yield GenerationResponse(text, token, n, len(ids), rate, first - start, finish)


def generate(model, tokenizer, prompt: str, max_tokens: int = 100, sampling: SamplingConfig | None = None,
             seed: int | None = None) -> str:
    """The generated continuation of `prompt` as one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, sampling, seed))
