"""How many tokens speculative decoding drafts before each verifying forward.

A forward that verifies k drafted tokens yields from 1 to k + 1 tokens, and costs whatever k + 1
rows cost on this machine: hardly more than one row where a step is memory-bound (the weights are
read once for all rows), nearly k + 1 rows where it is compute-bound (AVX2 cores at the 2B4T
shapes), plus the drafter's own time (a draft model's k small forwards). So no fixed k suits every
machine and text: on the demo model with prompt lookup (one EPYC core), k = 2 decoded at
1.02-1.09x plain, k = 4 at 0.99-1.04x and k = 8 at 0.92-0.99x. `AdaptiveDraftLength` ("auto", the
default; 1.01-1.09x there) picks k before every forward from what the generation has measured:

- acceptance: each drafted position is taken with probability a until the first rejection, so
  a = accepted / (accepted + rejections), from counts that decay so that a follows the text (a
  prior of 3 accepted, 1 rejected: one early miss must not stop drafting for good);
- cost: the seconds of a whole decoding iteration with j drafted tokens (draft, forward, deciding
  and streaming its tokens), fitted as t(j) = t0 + j * d from plain iterations (t0) and drafted
  ones (d), also decaying;
- k maximizes the expected tokens per second, (1 - a^(k+1)) / (1 - a) / t(k); k = 0 (a plain
  step) when no k beats t0. After `probe_every` plain steps in a row it drafts one token, so a
  text that starts repeating is noticed (where drafts never pay, probes cost ~2 % of the speed).

The choice changes speed only: tokens are decided as without drafts (the same greedy tokens,
the same sampling distribution). A seeded *sampled* run draws its random numbers differently
for different k, so it repeats exactly only with a fixed `draft_tokens`.
"""

from __future__ import annotations

from typing import Literal, Protocol

from .errors import ConfigError

MAX_DRAFT_TOKENS = 64  # more is never worth a forward: acceptance decays with every position
AUTO_MAX_DRAFT_TOKENS = 8  # the longest draft "auto" tries
DraftTokens = int | Literal["auto"]


def check_draft_tokens(k: DraftTokens | str) -> DraftTokens:
    """A fixed draft length in [1, MAX_DRAFT_TOKENS], or "auto" (also as command-line text)."""
    if k == "auto":
        return "auto"
    if isinstance(k, str):
        try:
            k = int(k)
        except ValueError:
            raise ConfigError(f"draft tokens must be 'auto' or an integer in [1, {MAX_DRAFT_TOKENS}], "
                              f"got {k!r}") from None
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ConfigError(f"draft tokens must be 'auto' or an integer in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
    return k


class DraftLength(Protocol):
    def choose(self) -> int:
        """Tokens to draft next (0: a plain step)."""

    def timed(self, drafted: int, seconds: float) -> None:
        """An iteration with `drafted` tokens drafted (0: plain) took `seconds`."""

    def judged(self, accepted: int, rejected: bool) -> None:
        """Of a verified draft, `accepted` tokens were taken, then one was refused (or none was)."""


class FixedDraftLength:
    """Always the same k (reproducible seeded sampling; benchmarks)."""

    def __init__(self, k: int):
        self.k = k

    def choose(self) -> int:
        return self.k

    def timed(self, drafted: int, seconds: float) -> None:
        pass

    def judged(self, accepted: int, rejected: bool) -> None:
        pass


class AdaptiveDraftLength:
    """The k with the most expected tokens per second so far (see the module's docstring)."""

    def __init__(self, max_tokens: int = AUTO_MAX_DRAFT_TOKENS, *, decay: float = 0.9, probe_every: int = 4):
        self.max_tokens, self.decay, self.probe_every = max_tokens, decay, probe_every
        self.accepted, self.rejections = 3.0, 1.0  # a prior of a = 3/4 worth four observations
        self.t0: float | None = None  # seconds of a plain iteration
        self.d: float | None = None  # seconds each drafted token adds
        self.plain_run = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejections)

    def choose(self) -> int:
        if self.t0 is None:  # time a plain step first: everything is measured against it
            return 0
        if self.d is None:
            return min(2, self.max_tokens)
        a, best, best_rate = self.acceptance, 0, 1.0 / self.t0
        for k in range(1, self.max_tokens + 1):
            expected = (1.0 - a ** (k + 1)) / (1.0 - a) if a < 1.0 else k + 1.0
            rate = expected / (self.t0 + k * self.d)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:
            self.plain_run += 1
            if self.plain_run >= self.probe_every:
                self.plain_run = 0
                return 1
        else:
            self.plain_run = 0
        return best

    def timed(self, drafted: int, seconds: float) -> None:
        if drafted == 0:
            self.t0 = seconds if self.t0 is None else self.decay * self.t0 + (1 - self.decay) * seconds
        elif self.t0 is not None:
            per_token = max(seconds - self.t0, 0.0) / drafted
            self.d = per_token if self.d is None else self.decay * self.d + (1 - self.decay) * per_token

    def judged(self, accepted: int, rejected: bool) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.rejections = self.decay * self.rejections + (1.0 if rejected else 0.0)


def draft_length(k: DraftTokens) -> DraftLength:
    k = check_draft_tokens(k)
    return AdaptiveDraftLength() if k == "auto" else FixedDraftLength(k)
