"""The OpenAI-compatible HTTP layer: FastAPI routes over the batching engine.

    app = create_app(load, model_name="my-model")   # load() -> (started engine, tokenizer)
    uvicorn.run(app, host="127.0.0.1", port=8080)

The model loads in a background thread when the app starts, so /health answers 503 while it loads
(and a load balancer or a test can wait for 200) instead of the port refusing connections. Every
error is OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, which the official clients
turn into their typed exceptions; a client's mistake is always a 4xx, never a 500, and leaves the
server as healthy as before. The engine knows no HTTP: this module turns its GenerationResponses
into JSON or server-sent events, and cancels a request whose client went away.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..chat_template import encode_chat, stop_texts_for
from ..errors import BitNetError, ConfigError, first_line
from ..generate import GenerationRequest
from ..sampling import SamplingConfig
from ..structured import Grammar
from ..tokenizer import Tokenizer
from .engine import EngineStopped, QueueFull
from .http_errors import ApiError, BodyLimit, error_response, validation_message
from .metrics import RequestTracker, ServerMetrics
from .fanout import Merged, submit_all
from .responses import ChatShape, CompletionShape, Shape, ToolCallShape, as_batch, usage_chunk, whole
from .schemas import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    NamedToolChoice,
    Text,
    TokenizeRequest,
    Tokens,
)
from .state import Loaded, ServerState
from .tools import forced_grammar, template_tools

log = logging.getLogger("bitnet158.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more text than any context here holds
OPENAI_TEMPERATURE = 1.0          # OpenAI's default (the CLI's 0.8 is not what API clients expect)
# Below this, temperature means greedy (as vLLM does): logits / 1e-300 overflow float32 to inf,
# and a distribution that sharp is argmax anyway.
GREEDY_BELOW = 1e-5
# top_p below float32's smallest number compares as 0 and would drop every token; this keeps
# only the most likely one, which is what any top_p that small means
MIN_TOP_P = 1e-6

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "malformed or out-of-range request"), (401, "missing or wrong API key"),
        (404, "unknown model"), (413, "request body over the limit"), (429, "every slot and the queue are full"),
        (503, "the model is still loading, or the server is shutting down"))}
_STREAM = {"text/event-stream": {"schema": {"type": "string", "description": "data: {chunk} events, then data: [DONE]"}}}


def create_app(load: Callable[[], tuple[Any, Tokenizer]], *, model_name: str, api_key: str | None = None,
               chat_template: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               drain_timeout: float | None = None, cors_origins: list[str] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app. `load()` runs in a background thread at startup and returns (engine, tokenizer),
    the engine started; `chat_template` overrides the tokenizer's; `on_load_error` hears a failed
    load (the CLI stops the server). On shutdown the engine drains for up to `drain_timeout` s.
    `cors_origins`: web origins whose pages may call the API from a browser (none by default)."""
    state = ServerState(load, model_name=model_name, chat_template=chat_template,
                        drain_timeout=drain_timeout, on_load_error=on_load_error)
    metrics = ServerMetrics(lambda: state.engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        try:
            yield
        finally:
            await asyncio.to_thread(state.close)

    app = FastAPI(title="bitnet158", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions over a 1.58-bit BitNet model")
    app.state.server = state
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if cors_origins:  # added last, so it is outermost: a browser's preflight is answered before the rest
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):  # constant time: no key guessing by timing
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = [Depends(authorized)]

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        if state.engine is not None:
            return JSONResponse({"status": "ok"})
        if state.error is not None:
            return JSONResponse({"status": "error", "message": state.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def scrape() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, dependencies=v1, responses=_ERRORS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=v1, responses=_ERRORS)
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return state.card()

    @app.post("/v1/chat/completions", dependencies=v1, response_class=JSONResponse,
              responses={**_ERRORS, 200: {"model": ChatCompletion, "content": _STREAM}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        loaded = state.ready()
        state.check_model(body.model)
        tools, forced = body.active_tools(), body.forced_tools()
        try:
            prompt = encode_chat(loaded.tokenizer, [_message(m) for m in body.messages], loaded.template,
                                 tools=template_tools(tools))
        except ConfigError as e:
            raise ApiError(400, first_line(e), param="messages") from None
        # the default transcript template also ends an answer where the model starts the next turn
        stops = tuple(dict.fromkeys(body.stop_list() + stop_texts_for(loaded.template)))
        top = (body.top_logprobs or 0) if body.logprobs else None
        named = forced[0].function.name if isinstance(body.tool_choice, NamedToolChoice) else None
        grammar = await _grammar(body, loaded, forced_grammar(forced, named is not None) if forced else None)
        gen = _generation(body, loaded, prompt, body.max_completion_tokens or body.max_tokens, stops,
                          logprobs=top, echo=False, param="messages", grammar=grammar)
        shape = ChatShape(loaded.tokenizer, state.model_name, logprobs=top is not None) if not tools else \
            ToolCallShape(loaded.tokenizer, state.model_name, logprobs=top is not None,
                          names=[t.function.name for t in tools], forced=bool(forced), named=named,
                          parallel=body.parallel_tool_calls is not False)
        return await _answer(request, loaded, metrics, [gen], [shape], body.stream, body.include_usage())

    @app.post("/v1/completions", dependencies=v1, response_class=JSONResponse,
              responses={**_ERRORS, 200: {"model": Completion, "content": _STREAM}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        loaded = state.ready()
        state.check_model(body.model)
        tok, prompts = loaded.tokenizer, body.prompts()
        room = loaded.engine.max_concurrency + loaded.engine.max_queue
        if len(prompts) > room:
            raise ApiError(400, f"the request holds {len(prompts)} prompts; this server takes at most {room} at once "
                           f"(--max-concurrency + --max-queue)", param="prompt")
        max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens  # OpenAI: null is 16
        gens, shapes = [], []
        grammar = await _grammar(body, loaded)
        for one in prompts:
            prompt, prompt_text = _completion_prompt(tok, one)
            gens.append(_generation(body, loaded, prompt, max_tokens, body.stop_list(), logprobs=body.logprobs,
                                    echo=bool(body.echo), param="prompt", grammar=grammar))
            shapes.append(CompletionShape(tok, state.model_name, prompt_ids=prompt, prompt_text=prompt_text,
                                          logprobs=body.logprobs is not None, echo=bool(body.echo)))
        return await _answer(request, loaded, metrics, gens, as_batch(shapes), body.stream, body.include_usage())

    @app.post("/tokenize", dependencies=v1, response_model=Tokens, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        loaded = state.ready()
        if body.model is not None:
            state.check_model(body.model)
        if body.messages is not None:
            try:
                ids = encode_chat(loaded.tokenizer, [_message(m) for m in body.messages], loaded.template,
                                  add_generation_prompt=body.add_generation_prompt is not False,
                                  tools=template_tools(body.tools or []))
            except ConfigError as e:
                raise ApiError(400, first_line(e), param="messages") from None
        else:
            ids, _ = _completion_prompt(loaded.tokenizer, body.prompt or "")
        return {"tokens": ids, "count": len(ids), "max_model_len": loaded.engine.max_len}

    @app.post("/detokenize", dependencies=v1, response_model=Text, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        loaded = state.ready()
        if body.model is not None:
            state.check_model(body.model)
        _check_ids(body.tokens, loaded.tokenizer, "token id", "tokens")
        return {"prompt": loaded.tokenizer.decode(body.tokens)}

    return app


def _check_ids(ids: Iterable[int], tok: Tokenizer, what: str, param: str) -> None:
    """A 400 naming the first id outside the tokenizer's vocabulary (ids are >= 0 by the schema)."""
    bad = next((t for t in ids if t >= tok.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"{what} {bad} is outside the vocabulary (size {tok.vocab_size})", param=param)


def _completion_prompt(tok: Tokenizer, prompt: str | list[int]) -> tuple[list[int], str]:
    """A prompt's token ids and text, from either."""
    if isinstance(prompt, str):
        # as stream_generate encodes text, so greedy output here equals generate()'s
        return tok.encode_prompt(prompt) or [tok.bos_id if tok.bos_id is not None else tok.eos_id], prompt
    _check_ids(prompt, tok, "prompt token id", "prompt")
    return list(prompt), tok.decode(prompt)


def _message(m: ChatMessage) -> dict[str, Any]:
    """A validated message as the chat template takes it."""
    content: Any = m.content if isinstance(m.content, str) else \
        [p.model_dump() for p in m.content] if m.content is not None else ""  # null: an assistant's tool call
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}
    for key in ("name", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    if m.tool_calls is not None:
        out["tool_calls"] = [_template_call(call) for call in m.tool_calls]
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier tool call as chat templates expect it: OpenAI sends the arguments as JSON text,
    transformers' templates (LLaMA 3.1's `arguments | tojson`) take them as an object."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call  # not JSON: the template gets the text it was sent
    return {**call, "function": {**function, "arguments": arguments}}


async def _grammar(body: ChatCompletionRequest | CompletionRequest, loaded: Loaded,
                   forced: Grammar | None = None) -> Grammar | None:
    """The request's response_format (or a forced tool call's schema) as a grammar, compiled once
    here so that a bad schema is a 400 (on a worker thread: a large schema, or the first one, which
    reads the vocabulary, takes long enough to stall every other stream's event loop)."""
    param = "tools" if forced is not None else "response_format"
    try:
        grammar = forced or body.grammar()
        return await run_in_threadpool(grammar.validate, loaded.tokenizer) if grammar is not None else None
    except ConfigError as e:
        raise ApiError(400, first_line(e), param=param) from None


def _generation(body: ChatCompletionRequest | CompletionRequest, loaded: Loaded, prompt: list[int],
                max_tokens: int | None, stops: tuple[str, ...], *, logprobs: int | None, echo: bool,
                param: str, grammar: Grammar | None) -> GenerationRequest:
    n_ctx = loaded.engine.max_len
    if len(prompt) >= n_ctx:
        raise ApiError(400, f"the prompt is too long for the context: n_prompt_tokens={len(prompt)}, n_ctx={n_ctx} "
                       f"(a prompt must leave room for at least one new token)",
                       param=param, code="context_length_exceeded")
    room = n_ctx - len(prompt)  # the engine's slot holds prompt + answer; more would not fit
    bias = body.bias_by_id()
    _check_ids(bias, loaded.tokenizer, "logit_bias token id", "logit_bias")
    temperature = OPENAI_TEMPERATURE if body.temperature is None else body.temperature
    sampling = SamplingConfig(
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else max(body.top_p, MIN_TOP_P), min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias)
    gen = GenerationRequest(prompt=tuple(prompt), max_tokens=min(max_tokens or room, room), sampling=sampling,
                            stop=stops, seed=body.seed, logprobs=logprobs, echo=echo, grammar=grammar)
    try:
        return gen.validate()
    except ConfigError as e:
        raise ApiError(400, first_line(e)) from None


async def _answer(request: Request, loaded: Loaded, metrics: ServerMetrics, gens: list[GenerationRequest],
                  shapes: list[Shape], stream: bool | None, include_usage: bool) -> Response:
    """Submit the request's generations (one per choice, all or none) and answer with their
    choices, streamed or whole."""
    try:
        handles = submit_all(loaded.engine, gens)
    except QueueFull as e:
        metrics.rejected.labels(reason="queue_full").inc()
        raise ApiError(429, f"the server is busy: {first_line(e)}; retry later", type="requests",
                       code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    except EngineStopped as e:
        raise ApiError(503, first_line(e), type="server_error", code="shutting_down") from None
    except ConfigError as e:
        raise ApiError(400, first_line(e)) from None
    trackers = [metrics.track() for _ in handles]
    if stream:
        return StreamingResponse(_events(handles, shapes, trackers, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await _collect(request, handles, shapes, trackers))


def _cancel_unfinished(handles: list[Any], trackers: list[RequestTracker], finished: list[bool],
                       reason: str = "cancelled") -> None:
    for handle, tracker, done in zip(handles, trackers, finished):
        if not done:
            tracker.end(reason)
            handle.cancel()


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _events(handles: list[Any], shapes: list[Shape], trackers: list[RequestTracker],
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: every choice's chunks as they come. When the client disconnects Starlette
    cancels this generator at its await, and `finally` frees the requests' slots."""
    finished = [False] * len(handles)
    merged = Merged(handles)
    extra = {"usage": None} if include_usage else {}  # OpenAI: null on every chunk but the last
    try:
        for shape in shapes:
            for chunk in shape.opening():
                yield _event({**chunk, **extra})
        async for i, response in merged:
            trackers[i].response(response)
            chunk = shapes[i].add(response)
            if chunk is not None:
                yield _event({**chunk, **extra})
            finished[i] = response.finish_reason is not None
        if not all(finished):
            raise EngineStopped("the generation ended without a finish reason")
        if include_usage:
            yield _event(usage_chunk(shapes))
        yield b"data: [DONE]\n\n"
    except Exception as e:  # the status line is already out: say it in the stream, as OpenAI does
        if not isinstance(e, BitNetError):
            log.exception("generation failed")
        kind = "invalid_request_error" if isinstance(e, ConfigError) else "server_error"
        yield _event({"error": {"message": first_line(e), "type": kind, "param": None, "code": None}})
    finally:
        merged.close()
        _cancel_unfinished(handles, trackers, finished)


async def _collect(request: Request, handles: list[Any], shapes: list[Shape],
                   trackers: list[RequestTracker]) -> dict[str, Any]:
    """The whole answer, while watching the connection: a client that leaves cancels its requests
    (uvicorn does not cancel a handler whose client went away, and nothing is sent until the end)."""
    finished = [False] * len(handles)
    merged = Merged(handles)

    async def consume() -> bool:
        async for i, response in merged:
            trackers[i].response(response)
            shapes[i].add(response)
            finished[i] = response.finish_reason is not None
        return all(finished)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_disconnected(request))
    gone = False
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (a shutdown past its drain time)
        watcher.cancel()
        merged.close()
        if not consumer.done():
            gone = True
            consumer.cancel()
            _cancel_unfinished(handles, trackers, finished)
    if gone:
        raise ApiError(499, "the client closed the connection")  # nobody reads this; it keeps logs honest
    try:
        done = consumer.result()
    except BitNetError as e:
        _cancel_unfinished(handles, trackers, finished, "error")  # a batch's other choices stop too
        if isinstance(e, ConfigError):
            raise ApiError(400, first_line(e)) from None
        raise ApiError(503, first_line(e), type="server_error", code="shutting_down") from None
    if not done:
        raise ApiError(503, "the generation ended without a finish reason", type="server_error")
    return whole(shapes)


async def _disconnected(request: Request) -> None:
    # the body is already read, so the next message the server has for us is the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(BitNetError)
    async def user_error(request: Request, exc: BitNetError) -> JSONResponse:
        return error_response(400, first_line(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error", type="server_error")
