"""Turning logits into the next token.

`sample` applies, in this order (the order of vLLM and Hugging Face's logits processors):

1. repetition penalty (CTRL-style, over prompt + generated tokens),
2. presence and frequency penalties (OpenAI's, over generated tokens only),
3. temperature (0 = greedy: argmax of the penalized logits, no filter matters),
4. top-k, 5. top-p, 6. min-p (each on what the previous step kept),

then draws from the remaining distribution with an optional `torch.Generator` (or, when a
speculative drafter proposed a token, `sample_with_draft` accepts or replaces it so that every
token keeps exactly that distribution). With no penalty
in effect greedy is exactly `argmax` of the raw logits. `TokenSampler` is one sequence's state
(its config, its own generator, its penalty history): every caller that samples a sequence —
`generate_step`, `SequenceDecoder`, the batching engine — goes through it, so the same seed gives
the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError

MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8   # 0 means greedy
    top_k: int = 0             # 0 disables
    top_p: float = 1.0         # 1 disables
    repetition_penalty: float = 1.0   # CTRL-style, 1 disables
    min_p: float = 0.0         # keep tokens with p >= min_p * p(most likely); 0 disables
    presence_penalty: float = 0.0     # OpenAI: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0    # OpenAI: logit -= frequency * count

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
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already-seen tokens by `penalty`, multiply negative ones.

    `seen` is either token ids (duplicates allowed) or a bool mask over the vocabulary; both give
    the same values (the mask is what a long-running sequence keeps, so a step costs O(vocab))."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    if seen.dtype == torch.bool:
        return torch.where(seen, penalized, logits)
    logits = logits.clone()
    logits[..., seen] = penalized[..., seen]
    return logits


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit[j] -= presence * (counts[j] > 0) + frequency * counts[j], where
    counts [vocab] holds how often each token was generated so far (the prompt does not count)."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - (presence * (counts > 0).to(logits.dtype) + frequency * counts)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always >= 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least p times the most likely token's (the most likely
    token always survives). Scale-free, so it adapts to how peaked the distribution is."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.amax(-1, keepdim=True) * p
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None, *, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [..., vocab] → token ids [...], in the order of the module docstring.

    seen: prompt + generated ids (or a bool mask) for the repetition penalty; counts [vocab]: how
    often each token was generated, for the presence and frequency penalties."""
    logits = _penalized(logits, cfg, seen, counts)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = _filtered_probs(logits, cfg)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _penalized(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None,
               counts: torch.Tensor | None) -> torch.Tensor:
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if counts is not None:
        logits = apply_presence_frequency_penalty(logits, counts, cfg.presence_penalty, cfg.frequency_penalty)
    big = torch.finfo(logits.dtype).max
    return logits.clamp(-big, big)  # a strong penalty can overflow to ±inf; keep every logit finite


def _filtered_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a non-greedy draw samples from: temperature, then top-k, top-p, min-p."""
    # shifted so the largest is 0 before dividing: a tiny temperature then gives -inf, never inf - inf
    logits = filter_top_k((logits - logits.amax(-1, keepdim=True)) / cfg.temperature, cfg.top_k)
    return filter_min_p(filter_top_p(logits, cfg.top_p), cfg.min_p).softmax(-1)


def sample_with_draft(logits: torch.Tensor, cfg: SamplingConfig, draft: int, seen: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, *, counts: torch.Tensor | None = None) -> int:
    """One token from next-token logits [vocab] when a drafter has proposed `draft` (speculative
    decoding with a deterministic drafter): accept it with probability p(draft), else draw from p
    with the draft removed. Each token y then comes out with probability p(y) — exactly the
    distribution of `sample` (the standard rejection rule with a one-hot draft distribution).
    Greedy: the argmax, which the caller compares with the draft."""
    logits = _penalized(logits, cfg, seen, counts)
    if cfg.temperature == 0:
        return int(logits.argmax(-1))
    probs = _filtered_probs(logits, cfg)
    p_draft = float(probs[draft]) if 0 <= draft < probs.numel() else 0.0
    if float(torch.rand((), generator=generator)) < p_draft:
        return draft
    rest = probs.clone()
    if 0 <= draft < rest.numel():
        rest[draft] = 0.0
    return int(torch.multinomial(rest, 1, generator=generator))


class TokenSampler:
    """One sequence's sampling: its config, its own generator and its penalty history.

    The generator belongs to the sequence, so a seeded sequence draws the same tokens alone or
    batched beside others. Without a seed one is drawn from torch's global generator when the
    sampler is built (so `torch.manual_seed` still makes a run reproducible); greedy sampling
    draws nothing and leaves the global generator alone.
    """

    def __init__(self, cfg: SamplingConfig, prompt: Sequence[int] = (), seed: int | None = None):
        self.cfg = cfg.validate()
        if seed is None and not cfg.greedy:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.seed = seed
        self._prompt = list(prompt)
        self._ready = False
        self._generator: torch.Generator | None = None
        self._seen: torch.Tensor | None = None     # bool [vocab]: prompt + generated (repetition)
        self._counts: torch.Tensor | None = None   # [vocab]: generated only (presence, frequency)

    def _state_for(self, logits: torch.Tensor) -> None:
        """Build the generator and history on the logits' device the first time (the sampler is
        made before the model has run, so it cannot know the device or vocabulary earlier)."""
        vocab, device = logits.shape[-1], logits.device
        if self.seed is not None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        if self.cfg.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [t for t in self._prompt if 0 <= t < vocab]
            if ids:
                self._seen[torch.tensor(ids, device=device)] = True
        if self.cfg.presence_penalty != 0.0 or self.cfg.frequency_penalty != 0.0:
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor, draft: int | None = None) -> int:
        """Sample the next token from next-token logits [vocab] and record it in the history.
        `draft`: a speculative drafter's proposal for this position (see `sample_with_draft`)."""
        if not self._ready:
            self._state_for(logits)
            self._ready = True
        if draft is None:
            token = int(sample(logits, self.cfg, self._seen, self._generator, counts=self._counts))
        else:
            token = sample_with_draft(logits, self.cfg, draft, self._seen, self._generator, counts=self._counts)
        if self._seen is not None and token < self._seen.numel():
            self._seen[token] = True
        if self._counts is not None and token < self._counts.numel():
            self._counts[token] += 1
        return token
