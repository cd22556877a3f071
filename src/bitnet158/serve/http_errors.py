"""Errors as OpenAI clients expect them, and the request-body limit that runs before any parsing.

OpenAI's error body is {"error": {"message", "type", "param", "code"}}; the official clients read
`message` into their exception and pick the exception class from the status code, so the status
carries the meaning and the message says, in one line, what to change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# pydantic puts union branches and validator names into an error's location ("str",
# "list[TextPart]", "function-after[...]"); a field name is what a client can act on
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
MAX_MESSAGE = 300  # an error repeats no input at length


class ApiError(Exception):
    """An HTTP error with OpenAI's fields; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers) if headers else None


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    line = " ".join(message.split())[:MAX_MESSAGE] or "error"  # one line, whatever the cause wrote
    return {"error": {"message": line, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type=type, param=param, code=code), status_code=status,
                        headers=dict(headers) if headers else None)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """FastAPI's validation errors → (one-line message, OpenAI's param): the first error, named by
    the field path a client sent, e.g. "messages[0].role: Input should be 'system', ..."."""
    if not errors:
        return "invalid request", None
    error = errors[0]
    loc = list(error.get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "not JSON")
        where = f" at character {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return f"malformed JSON: {detail}{where}", None
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif isinstance(item, str) and _FIELD.fullmatch(item) and item not in _TYPE_TAGS:
            path += f".{item}" if path else item
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not path and error.get("type") in ("missing", "model_attributes_type"):
        return "the request body must be a JSON object", None
    return f"{path or 'request body'}: {message}", path or None


class BodyLimit:
    """ASGI middleware: refuse a body over `max_bytes` with 413 before anything parses it.

    A declared Content-Length over the limit is refused without reading; otherwise the body is read
    (chunked uploads included) up to the limit and handed on in one piece. Later receive() calls go
    to the server, so the app still hears the client's disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, None)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        what = f"{size} bytes" if size is not None else f"over {self.max_bytes} bytes"
        response = error_response(413, f"the request body is {what}; this server takes at most {self.max_bytes}",
                                  code="request_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)
