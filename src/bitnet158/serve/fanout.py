"""Several engine requests behind one HTTP request: a /v1/completions batch of prompts (what
lm-evaluation-harness sends with `batch_size` > 1). Each prompt is its own engine request, so they
run side by side in the batched step, and their responses come back merged as they arrive, each
tagged with its prompt's index. One prompt is the same path with one request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..generate import GenerationRequest, GenerationResponse


def submit_all(engine: Any, requests: Sequence[GenerationRequest]) -> list[Any]:
    """Submit every request, or none: when one is refused (queue full, shutting down, a bad
    request) the ones already submitted are cancelled and the error goes up."""
    handles: list[Any] = []
    try:
        for request in requests:
            handles.append(engine.submit(request))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


class Merged:
    """The responses of several request streams in arrival order, as (index, response); iteration
    ends when every stream has delivered its last response. `close()` stops listening (the engine
    requests themselves are cancelled by their owner)."""

    def __init__(self, handles: Sequence[Any]):
        self.handles = list(handles)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    async def _pump(self, index: int, handle: Any) -> None:
        try:
            async for response in handle:
                self._queue.put_nowait((index, response))
        except Exception as e:  # an engine error ends that stream: the reader raises it
            self._queue.put_nowait((index, e))
            return
        self._queue.put_nowait((index, None))

    async def __aiter__(self) -> AsyncIterator[tuple[int, GenerationResponse]]:
        if len(self.handles) == 1:  # the common case, without tasks
            async for response in self.handles[0]:
                yield 0, response
            return
        self._tasks = [asyncio.ensure_future(self._pump(i, h)) for i, h in enumerate(self.handles)]
        remaining = len(self.handles)
        while remaining:
            index, item = await self._queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
