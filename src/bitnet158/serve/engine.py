"""Continuous batching: one engine thread advances every active request by one token per step in
one batched forward. It knows nothing of HTTP.

    engine = Engine(model, tokenizer, max_concurrency=8)
    engine.start()
    stream = engine.submit(GenerationRequest(prompt=tuple(ids), max_tokens=64))
    for response in stream:            # or `async for` inside an event loop
        print(response.text, end="")

Each request holds a slot of a SlotKVCache while it runs. A step admits waiting requests into
free slots, then runs one forward over the newest token of every decoding sequence and up to
`prefill_chunk` tokens of the admitted prompts, side by side (`SlotKVCache.bind_rows`): M rows
through the packed GEMM, each at its own position with its own keys, so the weights are read once
per step for all of them, and a long prompt is prefilled a chunk per step instead of stalling the
others for its whole length. Requests beyond the slots wait in a bounded queue; beyond that `submit`
raises QueueFull. A finished or cancelled request frees its slot at once, and the slot keeps its
keys for the next request that starts with the same tokens; running requests lend a shared prefix
by copy (`prompt_cache`).

Every sequence is decoded by its own `SequenceDecoder` (sampling with its own seeded generator,
stop strings, end tokens, logprobs), the same object `stream_generate` uses, and attention reads
each sequence's keys alone: a request gives the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..config import kv_cache_bytes
from ..errors import BitNetError, ConfigError
from ..generate import GenerationRequest, GenerationResponse, SequenceDecoder
from ..runner import runner_for
from ..memory import available_memory
from ..tokenizer import Tokenizer
from .prompt_cache import WAIT_FOR_SHARED, SlotPrefixes, best_lender, reusable


class QueueFull(BitNetError):
    """Every slot is busy and the waiting queue is full."""


class EngineStopped(BitNetError):
    """The engine shut down before the request finished."""


class RequestStream:
    """The responses of one request, in order, ending with the one whose finish_reason is set.
    Iterate it (`for`, blocking) or, when it was submitted from an event loop, `async for`."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop this request: its slot is freed at the engine's next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _deliver(self, item: GenerationResponse | BaseException) -> None:  # engine thread
        if self._async_queue is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancelled.set()

    def __iter__(self) -> Iterator[GenerationResponse]:
        if self._async_queue is not None:
            raise RuntimeError("this stream was submitted from an event loop: use `async for`")
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[GenerationResponse]:
        if self._async_queue is None:
            raise RuntimeError("this stream was not submitted from an event loop: use `for`")
        while True:
            item = await self._async_queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


@dataclasses.dataclass
class _Sequence:
    stream: RequestStream
    decoder: SequenceDecoder
    slot: int
    submitted: float
    first_token: float | None = None
    pending: list[int] = dataclasses.field(default_factory=list)  # prompt tokens not yet in the cache
    fed: list[int] = dataclasses.field(default_factory=list)      # the tokens whose keys the slot holds
    cached: int = 0                                               # prompt tokens it did not prefill itself
    reuses: bool = True                                           # it may start from other slots' keys

    @property
    def prefilling(self) -> bool:
        return bool(self.pending)


def _check_cache_fits(runner: Any, slots: int, positions: int) -> None:
    """The slots' KV cache is allocated up front for the whole context; one that cannot fit in the
    memory left is a clear error now, not an out-of-memory kill once the slots fill up."""
    need = kv_cache_bytes(runner.config, slots, positions, runner.kv_dtype)
    free = available_memory()
    if free is not None and need > free:
        smaller = {"fp32": ", or use --kv-cache fp16 (half) or q8 (about a quarter)",
                   "fp16": ", or use --kv-cache q8 (about half)"}.get(runner.kv_dtype, "")
        raise ConfigError(f"the KV cache for {slots} slots × {positions} positions would take {need / 1e9:.1f} GB "
                          f"({runner.kv_dtype}), more than the {free / 1e9:.1f} GB available; lower "
                          f"--max-concurrency or --context{smaller}")


class Engine:
    """The batching loop over one model (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Tokenizer, *, max_concurrency: int = 8, max_queue: int = 64,
                 max_len: int | None = None, prefill_chunk: int = 512, prompt_cache: bool = True):
        """`model`: a torch Transformer or a torch-free runtime model (any `runner.Runner`).
        `max_len`: positions per slot (prompt + answer), the model's context by default; the
        KV cache takes max_concurrency × max_len positions up front. `prefill_chunk`: prompt
        tokens a step takes at most (a longer prompt is prefilled over several steps, so the
        sequences already decoding wait at most one chunk for their next token). `prompt_cache`:
        a request whose prompt starts with tokens a free slot holds, or a running request's slot,
        prefills only the rest (see `prompt_cache.py`)."""
        if max_concurrency < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ConfigError(f"max_concurrency and prefill_chunk must be ≥ 1 and max_queue ≥ 0, got "
                              f"{max_concurrency}, {prefill_chunk}, {max_queue}")
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer = model, tokenizer
        self.runner = runner_for(model)
        self.max_queue = max_queue
        context = self.runner.config.max_seq_len
        self.max_len = min(max_len or context, context)
        if self.max_len < 2:
            raise ConfigError(f"a slot needs room for at least 2 positions (a prompt token and an answer), got {max_len}")
        _check_cache_fits(self.runner, max_concurrency, self.max_len)
        self.cache = self.runner.new_slot_cache(max_concurrency, self.max_len)
        self._slots = SlotPrefixes(max_concurrency, enabled=prompt_cache)
        self._waiting: collections.deque[tuple[RequestStream, float]] = collections.deque()
        self._active: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decode-only forwards by rows
        self.decode_seconds: collections.Counter[int] = collections.Counter()  # their time, by rows
        self.mixed_forwards = 0  # forwards that also carried prompt tokens

    # --- the caller's side ----------------------------------------------------------------------
    def cache_summary(self) -> str:
        """What the preallocated KV cache holds, for the server's log."""
        return (f"KV cache: {self.cache.slots} slots × {self.max_len} positions, {self.cache.nbytes / 1e6:.0f} MB "
                f"({self.runner.kv_dtype}); prompt cache {'on' if self._slots.enabled else 'off'}")

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def max_concurrency(self) -> int:
        return self.cache.slots

    def start(self) -> "Engine":
        if self._thread is None:
            self._worker = self.runner.worker()  # made here: it reads the starter's settings
            self._thread = threading.Thread(target=self._run, name="bitnet158-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its stream delivers the responses. ConfigError for a prompt that does
        not fit the context, QueueFull when max_queue requests already wait."""
        request.validate()
        if not request.prompt:
            raise ConfigError("the prompt is empty: give at least one token")
        if len(request.prompt) >= self.max_len:
            raise ConfigError(f"the prompt has {len(request.prompt)} tokens; the model's context is {self.max_len}")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        stream = RequestStream(request, loop)
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) - self._slots.free >= self.max_queue:  # free slots take waiters first
                raise QueueFull(f"all {self.max_concurrency} slots are busy and {len(self._waiting)} requests wait")
            self._waiting.append((stream, time.perf_counter()))
            self._wake.notify()
        return stream

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the engine thread: after the running and waiting requests finish (drain), or at
        once, ending every open stream with EngineStopped."""
        with self._wake:
            self._stopping, self._drain = True, drain
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        with self._worker:
            while True:
                with self._wake:
                    while not (self._waiting or self._active or self._stopping):
                        self._wake.wait()
                    if self._stopping and (not self._drain or not (self._waiting or self._active)):
                        break
                self._step()
        self._abort_all(EngineStopped("the server shut down before the request finished"))

    def _step(self) -> None:
        """Admit waiting requests into free slots, then run one forward over the next token of
        every decoding sequence and up to `prefill_chunk` prompt tokens of the admitted ones."""
        self._drop_cancelled()
        while self._slots.free:
            with self._wake:
                if not self._waiting:
                    break
                stream, submitted = self._waiting.popleft()
            if not stream.cancelled:
                self._admit(stream, submitted)
        rows = [seq for seq in self._active if not seq.prefilling]
        segments = [(seq.slot, [seq.decoder.next_input] + self._forced(seq)) for seq in rows]
        budget = self.prefill_chunk
        for seq in self._active:
            if not seq.prefilling or budget <= 0:
                continue
            if seq.reuses:
                self._borrow(seq)
                if self._waits(seq):
                    continue
            # an echo needs every prompt position's logits in one forward: its prompt goes whole
            take = len(seq.pending) if seq.stream.request.echo else min(budget, len(seq.pending))
            budget -= take
            rows.append(seq)
            segments.append((seq.slot, seq.pending[:take]))
        if segments:
            self._forward(rows, segments)

    def _forced(self, seq: _Sequence) -> list[int]:
        """The tokens seq's grammar forces after its last one, as many as fit (checked in this
        forward beside its next token, as generate() checks them)."""
        try:
            return seq.decoder.forced_tokens(self.max_len - len(seq.fed))
        except Exception:  # the grammar failed: its next step reports that to the sequence alone
            return []

    def _admit(self, stream: RequestStream, submitted: float) -> None:
        prompt = stream.request.prompt
        # an echo needs every prompt position's logits: it cannot start from cached keys
        reuses = self._slots.enabled and not stream.request.echo
        slot, keep = self._slots.take(prompt, reuse=reuses)
        self.cache.truncate(slot, keep)
        seq = _Sequence(stream, SequenceDecoder(self.tokenizer, stream.request), slot, submitted,
                        pending=list(prompt[keep:]), fed=list(prompt[:keep]), cached=keep, reuses=reuses)
        self._active.append(seq)

    def _borrow(self, seq: _Sequence) -> None:
        """Copy into seq's slot the longest start of its prompt that another running sequence's slot
        holds, when that is more than seq has."""
        prompt = seq.stream.request.prompt
        found = best_lender(prompt, len(seq.fed), {o.slot: o.fed for o in self._active if o is not seq})
        if found is not None:
            lender, n = found
            self.cache.copy_prefix(lender, seq.slot, n)
            seq.cached += n - len(seq.fed)
            seq.fed, seq.pending = list(prompt[:n]), list(prompt[n:])

    def _waits(self, seq: _Sequence) -> bool:
        """Whether an earlier sequence is still prefilling a long prefix it shares with seq: seq then
        waits and copies it (`_borrow`) rather than computing the same keys beside it."""
        prompt = seq.stream.request.prompt
        for other in self._active:
            if other is seq:
                return False
            if other.prefilling:
                shared = reusable(other.stream.request.prompt, prompt)
                if shared - len(seq.fed) >= WAIT_FOR_SHARED and len(other.fed) < shared:
                    return True
        return False

    def _forward(self, rows: list[_Sequence], segments: list[tuple[int, list[int]]]) -> None:
        """One forward over the segments' tokens side by side; then every sequence whose logits it
        produced takes its next token."""
        out_rows, at = [], 0
        for seq, (_, tokens) in zip(rows, segments):
            at += len(tokens)
            every_row = not seq.prefilling or seq.stream.request.echo  # forced tokens / an echo: all rows
            if not seq.prefilling or len(tokens) == len(seq.pending):  # a token to choose after this forward
                out_rows.extend(range(at - len(tokens), at) if every_row else [at - 1])
        decoding = sum(not seq.prefilling for seq in rows)
        ids = [t for _, tokens in segments for t in tokens]
        binding = self.cache.bind_rows([(slot, len(tokens)) for slot, tokens in segments], out_rows)
        start = time.perf_counter()
        try:
            logits = self.runner.rows_logits(ids, binding)  # [len(out_rows), vocab]
        except Exception as e:  # a bug must not take the engine (and every other request) down
            for seq in rows:
                seq.fed.clear()  # what the slot holds is unknown now
                self._release(seq)
                seq.stream._deliver(e)
            return
        if decoding == len(rows):
            self.batch_sizes[decoding] += 1
            self.decode_seconds[decoding] += time.perf_counter() - start
        else:
            self.mixed_forwards += 1
        got = 0
        for seq, (_, tokens) in zip(rows, segments):
            if not seq.prefilling:
                self._decode(seq, tokens, logits[got:got + len(tokens)])
                got += len(tokens)
                continue
            seq.fed.extend(tokens)
            del seq.pending[:len(tokens)]
            if seq.pending:
                continue  # more of its prompt next step
            try:
                prompt_logprobs = None
                if seq.stream.request.echo:
                    prompt_logprobs = seq.decoder.prompt_logprobs(logits[got:got + len(tokens)])
                    got += len(tokens)
                    response = seq.decoder.step(logits[got - 1])
                else:
                    response = seq.decoder.step(logits[got])
                    got += 1
            except Exception as e:  # one sequence's failure ends that sequence, not the engine
                self._release(seq)
                seq.stream._deliver(e)
                continue
            seq.first_token = time.perf_counter()
            self._emit(seq, dataclasses.replace(response, prompt_logprobs=prompt_logprobs))

    def _decode(self, seq: _Sequence, tokens: list[int], row_logits: Any) -> None:
        """A decoding sequence's rows: its last token, then any tokens its grammar forced. Each row's
        token is sampled as without them; at the first that differs from the forced one (or the end)
        the rows after it were computed from a wrong input, and the slot forgets them."""
        base = len(seq.fed)
        seq.fed.extend(tokens)
        for i in range(len(tokens)):
            try:
                response = seq.decoder.step(row_logits[i])
            except Exception as e:  # one sequence's failure ends that sequence, not the engine
                self._keep_fed(seq, base + i + 1)
                self._release(seq)
                seq.stream._deliver(e)
                return
            stop = response.finish_reason is not None or (i + 1 < len(tokens) and response.token != tokens[i + 1])
            if stop:
                self._keep_fed(seq, base + i + 1)
            self._emit(seq, response)
            if stop:
                return

    def _keep_fed(self, seq: _Sequence, n: int) -> None:
        if n < len(seq.fed):
            del seq.fed[n:]
            self.cache.truncate(seq.slot, n)

    def _emit(self, seq: _Sequence, response: GenerationResponse) -> None:
        now = time.perf_counter()
        n = response.generated_tokens
        rate = (n - 1) / (now - seq.first_token) if n > 1 and now > seq.first_token else 0.0
        seq.stream._deliver(dataclasses.replace(response, tokens_per_second=rate, cached_tokens=seq.cached,
                                                prefill_seconds=seq.first_token - seq.submitted))
        if response.finish_reason is not None:
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        if seq in self._active:
            self._active.remove(seq)
            self._slots.release(seq.slot, seq.fed)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._active if s.stream.cancelled]:
            self._release(seq)

    def _abort_all(self, error: BitNetError) -> None:
        for seq in list(self._active):
            self._release(seq)
            seq.stream._deliver(error)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for stream, _ in waiting:
            stream._deliver(error)
