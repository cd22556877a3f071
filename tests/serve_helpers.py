"""What the server tests share: a real uvicorn server in a thread on a free 127.0.0.1 port, bounded
waits, and a fake engine with serve.engine.Engine's interface for testing the HTTP layer alone.

The fake feeds scripted logits (the script's next token far above every other) through the real
`SequenceDecoder`, so stop strings, end tokens, logprobs and echo behave exactly as in the engine,
while the test decides the text, the speed and how many slots there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import torch
import uvicorn

from bitnet158.errors import ConfigError
from bitnet158.generate import GenerationRequest, GenerationResponse, SequenceDecoder
from bitnet158.serve.engine import QueueFull
from bitnet158.tokenizer import Tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "The with statement wraps a block of code.\n",
         "for i in range(10):\n    print(i)\n", "lorem ipsum dolor sit amet, consectetur adipiscing elit\n"] * 10
SCRIPT_TEXT = " lorem ipsum dolor sit amet, consectetur adipiscing elit."


def wait_until(check: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll `check` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


@contextlib.contextmanager
def running_server(app: Any, *, wait_healthy: bool = True, timeout: float = 60.0) -> Iterator[str]:
    """uvicorn serving `app` on 127.0.0.1 at a port the OS picks; yields the base URL. The socket is
    bound here and handed to uvicorn, so no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout), "uvicorn did not start"
        if wait_healthy:
            assert wait_until(lambda: _healthy(url), timeout), "the server never became healthy"
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def sse_payloads(lines: Iterator[str]) -> list[Any]:
    """The `data:` payloads of a server-sent event stream: JSON objects, and "[DONE]" as itself."""
    import json
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class FakeEngine:
    """serve.engine.Engine's interface over scripted logits (see the module docstring).

    A request holds a slot from submit until it finishes or is cancelled; others wait (up to
    max_queue of them) and take slots in order. `delay` seconds pass before each token."""

    def __init__(self, tokenizer: Tokenizer, *, max_len: int = 64, max_concurrency: int = 2, max_queue: int = 2,
                 delay: float = 0.0, script: list[int] | None = None):
        self.tokenizer = tokenizer
        self.max_len, self.max_concurrency, self.max_queue, self.delay = max_len, max_concurrency, max_queue, delay
        self.script = script if script is not None else tokenizer.encode(SCRIPT_TEXT)
        self.streams: list[FakeStream] = []
        self.shutdowns: list[bool] = []

    @property
    def running(self) -> int:
        return sum(s.state == "running" for s in self.streams)

    def cache_summary(self) -> str:
        return "KV cache: none (scripted logits)"

    @property
    def waiting(self) -> int:
        return sum(s.state == "waiting" for s in self.streams)

    def submit(self, request: GenerationRequest) -> FakeStream:
        request.validate()
        if len(request.prompt) >= self.max_len:
            raise ConfigError(f"the prompt has {len(request.prompt)} tokens; the context is {self.max_len}")
        free = self.max_concurrency - self.running
        if self.waiting - free >= self.max_queue:
            raise QueueFull(f"all {self.max_concurrency} slots are busy and {self.waiting} requests wait")
        stream = FakeStream(self, request, "running" if free > 0 and not self.waiting else "waiting")
        self.streams.append(stream)
        return stream

    def _promote(self) -> None:
        for stream in self.streams:
            if stream.state == "waiting" and self.running < self.max_concurrency:
                stream.state = "running"

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self.shutdowns.append(drain)


class FakeStream:
    def __init__(self, engine: FakeEngine, request: GenerationRequest, state: str):
        self.engine, self.request, self.state = engine, request, state
        self.cancelled = False

    def cancel(self) -> None:
        if self.state != "done":
            self.cancelled = True
            self._done()

    def _done(self) -> None:
        self.state = "done"
        self.engine._promote()

    def _logits(self, token: int) -> torch.Tensor:
        logits = torch.full((self.engine.tokenizer.vocab_size,), -30.0)
        logits[token] = 30.0
        return logits

    async def __aiter__(self):
        deadline = time.monotonic() + 30  # a fake must never hang a test
        while self.state == "waiting":
            if time.monotonic() > deadline:
                raise RuntimeError("fake engine: waited 30 s for a slot")
            await asyncio.sleep(0.01)
        try:
            async for response in self._generate():
                yield response
        except Exception:  # as the engine does, an error frees the slot (a consumer that stops must cancel)
            self._done()
            raise

    async def _generate(self):
        request, script = self.request, self.engine.script
        decoder = SequenceDecoder(self.engine.tokenizer, request, context=self.engine.max_len)
        prompt_logprobs = None
        if request.echo:  # the prompt "predicts" itself: logits that favour each next prompt token
            rows = [self._logits(t) for t in request.prompt[1:]] + [self._logits(script[0])]
            prompt_logprobs = decoder.prompt_logprobs(torch.stack(rows))
        for i in range(self.engine.max_len):
            if self.engine.delay:
                await asyncio.sleep(self.engine.delay)
            if self.state == "done":
                return
            response: GenerationResponse = decoder.step(self._logits(script[i % len(script)]))
            if i == 0 and prompt_logprobs is not None:
                response = dataclasses.replace(response, prompt_logprobs=prompt_logprobs)
            if response.finish_reason is not None:
                self._done()  # as the engine does: the slot is free once the last response is out
            yield dataclasses.replace(response, tokens_per_second=100.0, prefill_seconds=0.001)
            if response.finish_reason is not None:
                return
