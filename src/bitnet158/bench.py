"""`bitnet158 bench CKPT`: prefill and decode speed of one checkpoint (packed or training-form)
on random tokens, with the kernel path and thread count it ran with; and the random packed model
the serving benchmarks run."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from . import checkpoint, kernels
from .cache import KVCache, kv_torch_dtype
from .config import preset
from .errors import ConfigError
from .pack import random_packed
from .packed_layers import PackConfig
from .runner import set_kv_dtype
from .tokenizer import Tokenizer


@torch.no_grad()
def time_model(model, prompt_tokens: int, decode_tokens: int, repeats: int = 3, seed: int = 0,
               kv_dtype: str | None = None) -> dict[str, float]:
    """Median seconds of a `prompt_tokens` prefill (last position's logits) and per decode step.
    The KV cache is `kv_dtype` ("fp32" or "fp16"), or by default the model's own dtype."""
    cfg = model.config
    if prompt_tokens < 1 or decode_tokens < 1:
        raise ConfigError("--prompt-tokens and --decode-tokens must be at least 1")
    if prompt_tokens + decode_tokens > cfg.max_seq_len:
        raise ConfigError(f"{prompt_tokens} + {decode_tokens} tokens exceed the model's context {cfg.max_seq_len}")
    model.eval()
    # the KV cache follows the model (fp32, or bf16 for a bf16 twin) unless asked otherwise
    dtype = kv_torch_dtype(kv_dtype) if kv_dtype else next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=gen)
    prefill, decode = [], []
    for _ in range(repeats):
        cache = KVCache(cfg, batch_size=1, max_len=prompt_tokens + decode_tokens, dtype=dtype)
        t0 = time.perf_counter()
        logits = model(prompt, cache, last_only=True)
        prefill.append(time.perf_counter() - t0)
        token = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(token, cache)[:, -1].argmax(-1, keepdim=True)
        decode.append((time.perf_counter() - t0) / decode_tokens)
    return {"prefill_s": statistics.median(prefill), "decode_s": statistics.median(decode)}


def use_kernel_threads(threads: int | None = None) -> int:
    """For packed inference: the kernels' pool gets the cores and torch's own ops run on one
    thread. Both at N threads fight over the cores — torch's OpenMP workers spin after each small
    op while the pool wants the same cores — and decode ran 2-3× slower that way on 2 cores."""
    n = threads or max(kernels.get_num_threads(), torch.get_num_threads())
    kernels.set_num_threads(n)
    torch.set_num_threads(1)
    return n


def random_served_model(preset_name: str, fmt: str = "i2", kv_dtype: str = "fp32") -> tuple[Any, Tokenizer]:
    """A packed model with random ternary codes at a preset's shapes (speed does not depend on the
    values; int8 head) and a small trained tokenizer that decodes its ids: what the serving
    benchmarks put behind the engine."""
    model = random_packed(preset(preset_name), PackConfig(format=fmt), progress=True)
    set_kv_dtype(model, kv_dtype)
    tokenizer = Tokenizer.train(["def f(x):\n    return x\n", "The with statement.\n"] * 20, vocab_size=300)
    return model, tokenizer


def run_bench(path: str, prompt_tokens: int = 128, decode_tokens: int = 64, threads: int | None = None,
              log=print, kv_dtype: str = "fp32") -> dict[str, float]:
    model, _ = checkpoint.load(path, with_tokenizer=False)
    packing = model.packing
    if packing is not None:
        use_kernel_threads(threads)
    what = f"packed {packing.describe()}, head {packing.head}, kernel {kernels.current_path()}" if packing \
        else f"training form ({model.config.mode}, torch fp32)"
    t = time_model(model, prompt_tokens, decode_tokens, kv_dtype=kv_dtype)
    threads_used = (f"{kernels.get_num_threads()} kernel threads (torch ops on {torch.get_num_threads()})" if packing
                    else f"{torch.get_num_threads()} torch threads")
    log(f"{path}: {what}, {threads_used}, {kv_dtype} KV cache")
    log(f"prefill {prompt_tokens} tokens: {t['prefill_s'] * 1e3:.1f} ms ({prompt_tokens / t['prefill_s']:,.0f} tokens/s)")
    log(f"decode: {t['decode_s'] * 1e3:.2f} ms per token ({1 / t['decode_s']:,.1f} tokens/s)")
    return t
