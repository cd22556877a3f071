"""Prometheus metrics of one server: requests running and waiting (read from the engine at scrape
time, so they are never stale), tokens generated, time to first token and decode speed.

Each app gets its own CollectorRegistry rather than prometheus_client's global one: tests (and
anyone embedding the app) create several apps in one process, and the global registry refuses a
second metric of the same name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..generate import GenerationResponse

PREFIX = "bitnet158_"
# time to first token spans a warm tiny model (ms) to a long prompt queued behind others (minutes)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)


class ServerMetrics:
    def __init__(self, engine: Callable[[], Any | None]):
        """`engine`: returns the engine, or None while the model loads (the gauges read 0)."""
        self.registry = CollectorRegistry()
        r = self.registry

        def reading(name: str) -> Callable[[], float]:
            def read() -> float:
                current = engine()
                return float(getattr(current, name)) if current is not None else 0.0
            return read

        Gauge(PREFIX + "requests_running", "Requests holding a slot (generating)",
              registry=r).set_function(reading("running"))
        Gauge(PREFIX + "requests_waiting", "Requests queued for a slot",
              registry=r).set_function(reading("waiting"))
        # Counter names get "_total" appended in the exposition: bitnet158_tokens_generated_total
        self.tokens = Counter(PREFIX + "tokens_generated", "Tokens generated (all requests)", registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens (cached or prefilled)", registry=r)
        self.cached_tokens = Counter(PREFIX + "prompt_tokens_cached",
                                     "Prompt tokens whose keys a slot already held (not prefilled again)", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "From accepting a request to its first token (queueing and prefill)",
                              buckets=TTFT_BUCKETS, registry=r)
        self.decode_rate = Histogram(PREFIX + "decode_tokens_per_second",
                                     "Per request: tokens after the first / the time they took",
                                     buckets=RATE_BUCKETS, registry=r)
        self.finished = Counter(PREFIX + "requests_finished", "Requests ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter(PREFIX + "requests_rejected", "Requests refused before generating, by reason",
                                ["reason"], registry=r)

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTracker:
    """One request's measurements; `end` runs once whatever ends the request."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.started = time.perf_counter()
        self.first: float | None = None
        self.ended = False

    def response(self, response: GenerationResponse) -> None:
        m = self.metrics
        if self.first is None:
            self.first = time.perf_counter()
            m.ttft.observe(self.first - self.started)
            m.prompt_tokens.inc(response.prompt_tokens)
            m.cached_tokens.inc(response.cached_tokens)
        m.tokens.inc()
        if response.finish_reason is not None:
            if response.generated_tokens > 1 and response.tokens_per_second > 0:
                m.decode_rate.observe(response.tokens_per_second)
            self.end(response.finish_reason)

    def end(self, reason: str) -> None:
        """finish_reason ("stop", "length") or why it ended early ("cancelled", "error")."""
        if not self.ended:
            self.ended = True
            self.metrics.finished.labels(finish_reason=reason).inc()
