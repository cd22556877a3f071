"""Tool (function) calling for /v1/chat/completions, on any model.

- `tool_choice` "required" or a named function: the answer *is* a call. Generation is held to a
  JSON schema (bitnet158.structured): the named function's `parameters`, or for "required" an
  object {"name": one of the tools, "arguments": that tool's parameters}. So even a model never
  trained for tools returns a call whose arguments match the schema.
- "auto" (the default when tools are given): the tools are rendered into the prompt (the chat
  template's `tools` variable) and the model decides. An answer made only of calls is returned
  as calls: a JSON object {"name": a tool, "arguments" (or "parameters"): {...}} (LLaMA 3.1), a
  JSON list of them, or one or more <tool_call>...</tool_call> blocks holding one each (Hermes,
  Qwen; several are parallel calls); anything else is text. With parallel_tool_calls false only
  the first of several is kept.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from ..structured import Grammar
from .schemas import Tool

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def forced_grammar(tools: Sequence[Tool], named: bool) -> Grammar:
    """What a forced answer must match: the named tool's arguments, or {"name", "arguments"} over
    every tool for "required"."""
    if named:
        return Grammar.json_schema(_parameters(tools[0]))
    return Grammar.json_schema({"anyOf": [
        {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
         "required": ["name", "arguments"], "additionalProperties": False} for t in tools]})


def template_tools(tools: Sequence[Tool]) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them (transformers passes OpenAI's tool objects)."""
    return [t.model_dump(exclude_none=True) for t in tools] or None


def new_call(name: str, arguments: Any) -> dict[str, Any]:
    """One entry of OpenAI's tool_calls; arguments as JSON text, as OpenAI sends them."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _one_call(value: Any, names: Sequence[str]) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters"))
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_calls(text: str, names: Sequence[str]) -> list[tuple[str, Any]] | None:
    """[(name, arguments), ...] when `text` is nothing but calls of known tools, else None."""
    body = text.strip()
    if body.startswith(TOOL_CALL_OPEN):
        blocks = []
        while body.startswith(TOOL_CALL_OPEN):
            end = body.find(TOOL_CALL_CLOSE)
            if end < 0:
                return None
            blocks.append(body[len(TOOL_CALL_OPEN):end])
            body = body[end + len(TOOL_CALL_CLOSE):].lstrip()
        values = [_json(b) for b in blocks] if not body else [None]
    else:
        value = _json(body)
        values = value if isinstance(value, list) and value else [value]
    calls = [_one_call(v, names) for v in values]
    return calls if all(c is not None for c in calls) else None  # type: ignore[return-value]


def may_become_call(text: str) -> bool:
    """Could an answer that starts with `text` still turn out to be a call? (Text is held back
    from a stream while it could.)"""
    start = text.lstrip()
    if start.startswith("["):  # a list of calls: "[{" ...
        rest = start[1:].lstrip()
        return not rest or rest.startswith("{")
    return start.startswith("{") or start.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(start)
