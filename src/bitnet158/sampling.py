"""Turning logits into the next token, in numpy (no torch: the torch-free runtime samples here too).

`sample` applies, in this order (the order of vLLM and Hugging Face's logits processors):

1. logit bias (OpenAI's: a number added to chosen tokens' logits; ±100 bans or forces a token),
2. repetition penalty (CTRL-style, over prompt + generated tokens),
3. presence and frequency penalties (OpenAI's, over generated tokens only),
4. temperature (0 = greedy: argmax of the penalized logits, no filter matters),
5. top-k, 6. top-p, 7. min-p (each on what the previous step kept),

then draws from the remaining distribution with an optional `numpy.random.Generator` (or, when a
speculative drafter proposed a token, `sample_with_draft` accepts or replaces it so that every
token keeps exactly that distribution). With no bias or penalty in effect greedy is exactly
`argmax` of the raw logits. `TokenSampler` is one sequence's state (its config, its own generator, its
penalty history): every caller that samples a sequence — `generate_step`, `SequenceDecoder`, the
batching engine — goes through it, so the same seed gives the same tokens whatever else runs
beside it.

Logits may be numpy arrays or torch tensors (converted once: a model on another device hands
its row over here); the filters answer numpy arrays.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]
MAX_LOGIT_BIAS = 100.0        # OpenAI's range for a logit bias: [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on how many tokens one request biases
_SEED_RANGE = 2**64  # numpy seeds are non-negative; a request's seed may be any int64 or uint64


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8   # 0 means greedy
    top_k: int = 0             # 0 disables
    top_p: float = 1.0         # 1 disables
    repetition_penalty: float = 1.0   # CTRL-style, 1 disables
    min_p: float = 0.0         # keep tokens with p >= min_p * p(most likely); 0 disables
    presence_penalty: float = 0.0     # OpenAI: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0    # OpenAI: logit -= frequency * count
    # OpenAI: logit[id] += bias; give a {token id: bias} mapping, kept as sorted (id, bias) pairs
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, Mapping):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))

    def validate(self) -> "SamplingConfig":
        # `not x >= 0` style comparisons also refuse NaN, which every ordered test lets through
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ConfigError(f"repetition_penalty must be a finite number > 0, "
                              f"got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ConfigError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ConfigError(f"logit_bias holds {len(self.logit_bias)} tokens; at most {MAX_LOGIT_BIAS_ENTRIES}")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ConfigError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # also refuses NaN
                raise ConfigError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                  f"got {bias} for token {token}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def as_logits(logits: Any) -> np.ndarray:
    """float32 numpy logits from a numpy array, a list or a torch tensor (on any device)."""
    if hasattr(logits, "detach"):  # a torch tensor, without importing torch
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float32)


def generator(seed: int) -> np.random.Generator:
    """A sequence's own generator (PCG64); any int64 or uint64 seed."""
    return np.random.default_rng(seed % _SEED_RANGE)


def apply_repetition_penalty(logits: Any, seen: Any, penalty: float) -> np.ndarray:
    """CTRL-style: divide positive logits of already-seen tokens by `penalty`, multiply negative ones.

    `seen` is either token ids (duplicates allowed) or a bool mask over the vocabulary; both give
    the same values (the mask is what a long-running sequence keeps, so a step costs O(vocab))."""
    logits = as_logits(logits)
    seen = np.asarray(seen.numpy() if hasattr(seen, "numpy") else seen)
    if penalty == 1.0 or seen.size == 0:
        return logits
    with np.errstate(over="ignore"):  # an overflow to ±inf is clipped by the caller (`_penalized`)
        penalized = np.where(logits > 0, logits / np.float32(penalty), logits * np.float32(penalty))
    if seen.dtype == np.bool_:
        return np.where(seen, penalized, logits)
    out = logits.copy()
    out[..., seen] = penalized[..., seen]
    return out


def apply_logit_bias(logits: Any, bias: Sequence[tuple[int, float]]) -> np.ndarray:
    """OpenAI's logit bias: logit[id] += b for each (id, b); an id outside the vocabulary is an error."""
    logits = as_logits(logits)
    if not bias:
        return logits
    ids = np.array([t for t, _ in bias], dtype=np.int64)
    if ids.max() >= logits.shape[-1]:
        raise ConfigError(f"logit_bias token id {int(ids.max())} is outside the vocabulary ({logits.shape[-1]})")
    out = logits.copy()
    out[..., ids] += np.array([b for _, b in bias], dtype=np.float32)
    return out


def apply_presence_frequency_penalty(logits: Any, counts: Any, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= presence * (counts[j] > 0) + frequency * counts[j], where
    counts [vocab] holds how often each token was generated so far (the prompt does not count)."""
    logits = as_logits(logits)
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = as_logits(counts)
    return logits - (np.float32(presence) * (counts > 0) + np.float32(frequency) * counts).astype(np.float32)


def filter_top_k(logits: Any, k: int) -> np.ndarray:
    logits = as_logits(logits)
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = np.partition(logits, vocab - k, axis=-1)[..., vocab - k:vocab - k + 1]
    return np.where(logits < kth, np.float32(-np.inf), logits)


def softmax(logits: Any) -> np.ndarray:
    """float32 probabilities along the last axis (numpy's pairwise sums keep a long vocabulary's
    small terms)."""
    x = as_logits(logits)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def log_softmax(logits: Any) -> np.ndarray:
    """float32 log-probabilities along the last axis."""
    x = as_logits(logits).astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def filter_top_p(logits: Any, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (always >= 1 token)."""
    logits = as_logits(logits)
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = np.take_along_axis(softmax(logits), order, axis=-1)
    drop_sorted = np.cumsum(probs, axis=-1) - probs >= p  # mass before this token already reaches p
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, np.float32(-np.inf), logits)


def filter_min_p(logits: Any, p: float) -> np.ndarray:
    """Keep tokens whose probability is at least p times the most likely token's (the most likely
    token always survives). Scale-free, so it adapts to how peaked the distribution is."""
    logits = as_logits(logits)
    if p <= 0.0:
        return logits
    probs = softmax(logits)
    threshold = probs.max(axis=-1, keepdims=True) * p
    return np.where(probs < threshold, np.float32(-np.inf), logits)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn with the given (unnormalized, non-negative) weights: the inverse of the CDF
    at one uniform number, so a zero-weight token is never chosen."""
    cumulative = np.cumsum(probs, dtype=np.float64)
    return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))


def sample(logits: Any, cfg: SamplingConfig, seen: Any = None, generator: np.random.Generator | None = None,
           *, counts: Any = None) -> np.ndarray:
    """logits [..., vocab] → token ids [...] (an int64 array), in the order of the module docstring.

    seen: prompt + generated ids (or a bool mask) for the repetition penalty; counts [vocab]: how
    often each token was generated, for the presence and frequency penalties."""
    logits = _penalized(as_logits(logits), cfg, seen, counts)
    if cfg.temperature == 0:
        return np.argmax(logits, axis=-1)
    probs = _filtered_probs(logits, cfg)
    rng = generator if generator is not None else np.random.default_rng()
    flat = probs.reshape(-1, probs.shape[-1])
    return np.array([_draw(row, rng) for row in flat], dtype=np.int64).reshape(probs.shape[:-1])


def _penalized(logits: np.ndarray, cfg: SamplingConfig, seen: Any, counts: Any) -> np.ndarray:
    logits = apply_logit_bias(logits, cfg.logit_bias)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None:
        logits = apply_presence_frequency_penalty(logits, counts, cfg.presence_penalty, cfg.frequency_penalty)
    big = np.finfo(np.float32).max
    return np.clip(logits, -big, big)  # a strong penalty can overflow to ±inf; keep every logit finite


def _filtered_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution a non-greedy draw samples from: temperature, then top-k, top-p, min-p."""
    # shifted so the largest is 0 before dividing: a tiny temperature then gives -inf, never inf - inf
    shifted = (logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)) / cfg.temperature
    with np.errstate(over="ignore"):  # far below the top: -inf in float32, probability 0 either way
        logits = filter_top_k(shifted.astype(np.float32), cfg.top_k)
    return softmax(filter_min_p(filter_top_p(logits, cfg.top_p), cfg.min_p))


def sample_with_draft(logits: Any, cfg: SamplingConfig, draft: int, seen: Any = None,
                      generator: np.random.Generator | None = None, *, counts: Any = None) -> int:
    """One token from next-token logits [vocab] when a drafter has proposed `draft` (speculative
    decoding with a deterministic drafter): accept it with probability p(draft), else draw from p
    with the draft removed. Each token y then comes out with probability p(y) — exactly the
    distribution of `sample` (the standard rejection rule with a one-hot draft distribution).
    Greedy: the argmax, which the caller compares with the draft."""
    logits = _penalized(as_logits(logits), cfg, seen, counts)
    if cfg.temperature == 0:
        return int(np.argmax(logits, axis=-1))
    probs = _filtered_probs(logits, cfg)
    rng = generator if generator is not None else np.random.default_rng()
    p_draft = float(probs[draft]) if 0 <= draft < probs.size else 0.0
    if rng.random() < p_draft:
        return draft
    rest = probs.copy()
    if 0 <= draft < rest.size:
        rest[draft] = 0.0
    return _draw(rest, rng)


def fresh_seed() -> int:
    """A seed for an unseeded sequence: from torch's global generator when torch is loaded (so
    `torch.manual_seed` still makes a run reproducible), else from the operating system."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.randint(0, 2**62, ()).item())
    return int(np.random.default_rng().integers(0, 2**62))


class TokenSampler:
    """One sequence's sampling: its config, its own generator and its penalty history.

    The generator belongs to the sequence, so a seeded sequence draws the same tokens alone or
    batched beside others. Without a seed one is drawn when the sampler is built (`fresh_seed`);
    greedy sampling draws nothing and leaves every global generator alone.
    """

    def __init__(self, cfg: SamplingConfig, prompt: Sequence[int] = (), seed: int | None = None):
        self.cfg = cfg.validate()
        if seed is None and not cfg.greedy:
            seed = fresh_seed()
        self.seed = seed
        self._prompt = list(prompt)
        self._ready = False
        self._generator = generator(seed) if seed is not None else None
        self._seen: np.ndarray | None = None     # bool [vocab]: prompt + generated (repetition)
        self._counts: np.ndarray | None = None   # [vocab]: generated only (presence, frequency)

    def _history_for(self, vocab: int) -> None:
        """The penalty history, made the first time (the sampler is made before the model has run,
        so it cannot know the vocabulary earlier)."""
        if self.cfg.repetition_penalty != 1.0:
            self._seen = np.zeros(vocab, dtype=np.bool_)
            ids = [t for t in self._prompt if 0 <= t < vocab]
            self._seen[ids] = True
        if self.cfg.presence_penalty != 0.0 or self.cfg.frequency_penalty != 0.0:
            self._counts = np.zeros(vocab, dtype=np.float32)

    def __call__(self, logits: Any, draft: int | None = None) -> int:
        """Sample the next token from next-token logits [vocab] and record it in the history.
        `draft`: a speculative drafter's proposal for this position (see `sample_with_draft`)."""
        logits = as_logits(logits)
        if not self._ready:
            self._history_for(logits.shape[-1])
            self._ready = True
        if draft is None:
            token = int(sample(logits, self.cfg, self._seen, self._generator, counts=self._counts))
        else:
            token = sample_with_draft(logits, self.cfg, draft, self._seen, self._generator, counts=self._counts)
        if self._seen is not None and token < self._seen.size:
            self._seen[token] = True
        if self._counts is not None and token < self._counts.size:
            self._counts[token] += 1
        return token
