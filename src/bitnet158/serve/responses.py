"""GenerationResponses → OpenAI's JSON: chat completions and text completions, whole or as stream
chunks, with logprobs in each endpoint's own shape.

One object per choice (`ChatShape`, `CompletionShape`; a batch of prompts has a choice each) sees
every response of its request in order: `add` returns the stream chunk for that response (or None
when it adds nothing a client can see) and accumulates what `whole` returns for a non-streamed
answer, so both paths share one walk.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..generate import GenerationResponse
from ..logprobs import TokenLogprob, token_text
from ..tokenizer import Tokenizer
from .tools import may_become_call, new_call, parse_calls

# OpenAI reports -9999.0 for a token the model gives no chance at all; JSON has no -Infinity
FLOOR_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR_LOGPROB


def usage(shapes: Sequence[Shape]) -> dict[str, Any]:
    """The counts of one answer, or summed over a batch's choices."""
    lasts = [s.last for s in shapes if s.last is not None]
    prompt = sum(r.prompt_tokens for r in lasts)
    completion = sum(r.generated_tokens for r in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in lasts)}}


def usage_chunk(shapes: Sequence[Shape]) -> dict[str, Any]:
    """stream_options.include_usage: the last chunk, with no choices and the counts."""
    return {**shapes[0]._head(shapes[0].object_chunk), "choices": [], "usage": usage(shapes)}


def whole(shapes: Sequence[Shape]) -> dict[str, Any]:
    """The whole answer: one choice per shape (a batch of prompts has several), counts summed."""
    bodies = [s.whole() for s in shapes]
    return {**bodies[0], "choices": [c for b in bodies for c in b["choices"]], "usage": usage(shapes)}


def as_batch(shapes: Sequence[Shape]) -> list[Shape]:
    """The shapes of one request's choices: one id and time, choice i at index i."""
    for i, shape in enumerate(shapes):
        shape.index, shape.id, shape.created = i, shapes[0].id, shapes[0].created
    return list(shapes)


class Shape:
    """What both endpoints share: ids, the end-token rule for logprobs, the last response."""
    object_whole = ""
    object_chunk = ""
    id_prefix = ""

    def __init__(self, tokenizer: Tokenizer, model: str):
        self.tokenizer = tokenizer
        self.model = model
        self.id = f"{self.id_prefix}{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.index = 0  # the choice's index (a batch of prompts answers several)
        self.last: GenerationResponse | None = None
        self._end_ids = frozenset(tokenizer.end_ids)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _shown_logprob(self, response: GenerationResponse) -> TokenLogprob | None:
        # an end token is a signal, not text: OpenAI lists no logprob for it
        if response.finish_reason == "stop" and response.token in self._end_ids:
            return None
        return response.logprob

    def opening(self) -> list[dict[str, Any]]:
        """Chunks to send before the first token arrives."""
        return []


class ChatShape(Shape):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, tokenizer: Tokenizer, model: str, *, logprobs: bool):
        super().__init__(tokenizer, model)
        self.logprobs = logprobs
        self.text: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def _entry(self, lp: TokenLogprob) -> dict[str, Any]:
        def one(token: int, text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": finite(logprob), "bytes": list(self.tokenizer.token_bytes(token))}
        return {**one(lp.token, lp.text, lp.logprob), "top_logprobs": [one(*t) for t in lp.top]}

    def _chunk(self, delta: dict[str, Any], entries: list[dict[str, Any]] | None,
               finish: str | None) -> dict[str, Any]:
        choice = {"index": self.index, "delta": delta, "logprobs": {"content": entries} if entries is not None else None,
                  "finish_reason": finish}
        return {**self._head(self.object_chunk), "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, None, None)]

    def _record(self, response: GenerationResponse) -> list[dict[str, Any]] | None:
        """Keep the response's text and logprob entry; the new entries (None without logprobs)."""
        self.last = response
        self.text.append(response.text)
        if not self.logprobs:
            return None
        lp = self._shown_logprob(response)
        entries = [self._entry(lp)] if lp is not None else []
        self.entries += entries
        return entries

    def add(self, response: GenerationResponse) -> dict[str, Any] | None:
        entries = self._record(response)
        if not response.text and not entries and response.finish_reason is None:
            return None  # half a character so far: nothing to show yet
        delta = {"content": response.text} if response.text else {}
        return self._chunk(delta, entries, response.finish_reason)

    def whole(self) -> dict[str, Any]:
        choice = {"index": self.index, "message": {"role": "assistant", "content": "".join(self.text)},
                  "logprobs": {"content": self.entries} if self.logprobs else None,
                  "finish_reason": self.last.finish_reason if self.last else None}
        return {**self._head(self.object_whole), "choices": [choice]}


class ToolCallShape(ChatShape):
    """A chat answer that may be a tool call (serve/tools.py). A named call: the text is its
    arguments, streamed as they come (the id and name first, as OpenAI streams a call; cut by
    max_tokens, it ends with finish_reason "length"). "required": the text is {"name",
    "arguments"}, held whole until it ends. Auto: held back only while it may still become a
    call, then streamed as text. A "required" or auto call that does not parse (cut by
    max_tokens, an unknown tool) is answered as the text it is."""

    def __init__(self, tokenizer: Tokenizer, model: str, *, logprobs: bool, names: Sequence[str], forced: bool,
                 named: str | None = None, parallel: bool = True):
        super().__init__(tokenizer, model, logprobs=logprobs)
        self.names, self.forced, self.named, self.parallel = list(names), forced, named, parallel
        self.holding = True
        self.call: dict[str, Any] | None = None  # a named call, built as it streams
        self.calls: list[dict[str, Any]] = []

    def _named(self, response: GenerationResponse) -> dict[str, Any] | None:
        first = self.call is None
        if first:
            self.call = new_call(self.named or "", "")
        entries = self._record(response)
        self.call["function"]["arguments"] += response.text
        if not first and not response.text and not entries and response.finish_reason is None:
            return None
        part: dict[str, Any] = {"index": 0, "function": {"arguments": response.text}}
        if first:
            part = {"index": 0, "id": self.call["id"], "type": "function",
                    "function": {"name": self.named, "arguments": response.text}}
        return self._chunk({"tool_calls": [part]}, entries, self._call_finish(response.finish_reason))

    @staticmethod
    def _call_finish(reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" else reason  # a completed call; else "length" (cut) or None

    def add(self, response: GenerationResponse) -> dict[str, Any] | None:
        if self.named is not None:
            return self._named(response)
        if not self.holding:
            return super().add(response)
        self._record(response)
        entries = self.entries if self.logprobs else None  # nothing was sent yet: all of them
        text = "".join(self.text)
        if response.finish_reason is None:
            if self.forced or may_become_call(text):
                return None
            self.holding = False  # plainly text: what was held, then the rest as it comes
            return self._chunk({"content": text}, entries, None)
        self.holding = False
        parsed = parse_calls(text, self.names) or []
        self.calls = [new_call(*c) for c in parsed[:None if self.parallel else 1]]
        if self.calls:
            parts = [{"index": i, **call} for i, call in enumerate(self.calls)]
            return self._chunk({"tool_calls": parts}, entries, "tool_calls")
        return self._chunk({"content": text} if text else {}, entries, response.finish_reason)

    def whole(self) -> dict[str, Any]:
        body = super().whole()
        calls = [self.call] if self.call is not None else self.calls
        if calls:
            choice = body["choices"][0]
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = self._call_finish(self.last.finish_reason if self.last else None)
        return body


class CompletionShape(Shape):
    object_whole = "text_completion"
    object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, tokenizer: Tokenizer, model: str, *, prompt_ids: list[int], prompt_text: str,
                 logprobs: bool, echo: bool):
        super().__init__(tokenizer, model)
        self.prompt_ids, self.prompt_text = prompt_ids, prompt_text
        self.logprobs, self.echo = logprobs, echo
        # OpenAI's text_offset counts from the start of the prompt, echoed or not
        self.offset = 0 if echo else len(prompt_text)
        self.text: list[str] = []
        self.arrays: dict[str, list[Any]] = _empty_arrays()

    def _arrays(self, pairs: list[tuple[int, TokenLogprob | None]]) -> dict[str, list[Any]]:
        """The four parallel lists for these (token id, logprob entry) pairs; None for the prompt's
        first token, which nothing predicts."""
        out = _empty_arrays()
        for token, lp in pairs:
            text = lp.text if lp is not None else token_text(self.tokenizer, token)
            out["tokens"].append(text)
            out["token_logprobs"].append(finite(lp.logprob) if lp is not None else None)
            out["top_logprobs"].append({t: finite(v) for _, t, v in lp.top} if lp is not None else None)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        for key, values in out.items():
            self.arrays[key] += values
        return out

    def add(self, response: GenerationResponse) -> dict[str, Any] | None:
        first = self.last is None
        self.last = response
        text, pairs = response.text, []
        if first and self.echo:
            text = self.prompt_text + text
            prompt_lps = response.prompt_logprobs or [None] * len(self.prompt_ids)
            pairs += list(zip(self.prompt_ids, prompt_lps))
        lp = self._shown_logprob(response)
        if lp is not None:
            pairs.append((response.token, lp))
        self.text.append(text)
        arrays = self._arrays(pairs) if self.logprobs else None
        if not text and not (arrays and arrays["tokens"]) and response.finish_reason is None:
            return None
        choice = {"index": self.index, "text": text, "logprobs": arrays, "finish_reason": response.finish_reason}
        return {**self._head(self.object_chunk), "choices": [choice]}

    def whole(self) -> dict[str, Any]:
        choice = {"index": self.index, "text": "".join(self.text), "logprobs": self.arrays if self.logprobs else None,
                  "finish_reason": self.last.finish_reason if self.last else None}
        return {**self._head(self.object_whole), "choices": [choice]}


def _empty_arrays() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
