"""Chat templates: a conversation (a list of {"role", "content"} messages) → one prompt string → ids.

A chat model is trained on conversations laid out in one exact text format (LLaMA 3's header
tokens, ChatML's <|im_start|>, ...), and its tokenizer ships that format as a Jinja template. The
prompt must be rendered *exactly* as the model saw in training, so this renders the way Hugging
Face transformers' `apply_chat_template` does: the same sandboxed Jinja environment
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, the loop-controls extension) and
the same extras (`raise_exception`, a `tojson` filter that does not HTML-escape, `strftime_now`,
`{% generation %}` blocks, hardened `dict` / `namespace`). Tests compare against transformers.

Templates are untrusted code (they come from downloaded checkpoints), which is why the sandbox
is the immutable one: a template cannot mutate the lists and dicts it is given or reach Python
internals. Every problem a template or a conversation can cause is a one-line ConfigError
(ChatTemplateError for the template itself), which an HTTP layer can turn into a 400.

>>> render_chat(DEFAULT_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}], bos_token=None,
...             eos_token="<|endoftext|>")
'User: Hi\\nAssistant:'
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError, first_line
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# Our own models are *base* models: trained on raw text to continue it, never taught to follow
# instructions or to take turns. A base model is not an instruction model, so no template makes
# it a good assistant; this one only lays a conversation out as the kind of plain transcript a
# base model has seen in ordinary text, which gives it the best chance to continue in the
# assistant's voice:
#
#     System: You are terse.
#     User: Hello
#     Assistant: Hi there.<|endoftext|>
#     User: And now?
#     Assistant:
#
# One "Role: content" line per message (content trimmed), eos after each assistant answer (where
# a model fine-tuned on this layout learns to stop, and what generation stops at), and the
# generation prompt "Assistant:" without a trailing space, because byte-level BPE vocabularies
# hold the space together with the next word (" Hi"), so the model writes it. A base model often
# goes on to write the user's next line itself; DEFAULT_TEMPLATE_STOPS ends the answer there.
# `{{ '\n' }}` instead of a literal newline: trim_blocks eats the newline that follows a tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}System: Functions you may call. To call one, answer with only a JSON object "
    "{\"name\": ..., \"arguments\": {...}}.{{ '\\n' }}"
    "{% for tool in tools %}{{ tool['function'] | tojson }}{{ '\\n' }}{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}"
    "{% if 'tool_calls' in message %}{% for call in message['tool_calls'] %}"
    "{{ call['function'] | tojson }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' and eos_token is defined %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Text that ends an answer under the default template: the base model starting the next turn.
DEFAULT_TEMPLATE_STOPS = ("\nUser:", "\nSystem:")


class ChatTemplateError(ConfigError):
    """A chat template that does not parse, or that refused the conversation (raise_exception)."""


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """raise_exception(...) from inside a template: its message is meant for the user as it is."""


# ----- the environment, as transformers builds it ----------------------------------------------
class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's text for training masks in
    transformers; rendering a prompt only needs the body, so the block renders it unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, ') for web pages; a prompt needs the plain JSON
    # transformers writes, with the same keyword arguments.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the `dict` type
    itself (whose attributes lead toward Python internals)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (as transformers does) so a template cannot
    plant dunder attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick: `self` may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set the attribute {name!r} on a namespace")


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """The compiled template; cached because a chat or a server renders the same one every turn."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template syntax error on line {exc.lineno}: {first_line(exc)}") from None


# ----- messages ------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(value: Any, where: str) -> Any:
    """`value` as plain JSON data (what a template may see), or a ConfigError naming `where`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{where} must be JSON data (string, number, list, object), got {_short(value)}")


def _content_text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or OpenAI's list of {"type": "text", "text"}
    parts joined by newlines (as vLLM joins them); any other part (an image, audio) is refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConfigError(f"{where}.content must be a string or a list of text parts, got {_short(content)}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ConfigError(f"{where}.content[{i}] must be {{\"type\": \"text\", \"text\": string}} "
                              f"(only text is supported), got {_short(part)}")
        texts.append(part["text"])
    return "\n".join(texts)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Fresh plain copies of `messages`: each a dict with a known role and string content (other
    keys, such as name or tool_call_id, kept; None values dropped, as transformers drops them so
    templates test for a missing key). A one-line ConfigError names the first bad item."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, "
                          f"got {_short(messages)}")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ConfigError(f"{where} must be an object with \"role\" and \"content\", "
                              f"got {_short(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise ConfigError(f"{where}.role must be one of {', '.join(ROLES)}, got {_short(role)}")
        if "content" not in message:
            raise ConfigError(f"{where} has no \"content\"")
        plain = {k: _plain(v, f"{where}.{k}") for k, v in message.items() if v is not None and k != "content"}
        plain["content"] = _content_text(message["content"], where)
        out.append(plain)
    return out


# ----- rendering and encoding ----------------------------------------------------------------
def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str | None, eos_token: str | None, **extra: Any) -> str:
    """`messages` rendered by `template` exactly as transformers' apply_chat_template(tokenize=False)
    renders them. The template sees messages, add_generation_prompt, bos_token / eos_token (left
    undefined when None, as transformers leaves a token the tokenizer does not have), tools and
    documents (None unless given) and any `extra` variable."""
    compiled = _compile(template)
    variables: dict[str, Any] = {"tools": None, "documents": None}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    variables.update({k: _plain(v, k) for k, v in extra.items()})
    variables.update(messages=validate_messages(messages), add_generation_prompt=bool(add_generation_prompt))
    try:
        return compiled.render(**variables)
    except _TemplateRaised as exc:
        raise ChatTemplateError(first_line(exc)) from None
    except jinja2.exceptions.TemplateError as exc:  # undefined names, sandbox refusals
        raise ChatTemplateError(f"chat template failed: {first_line(exc)}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        # a template's own expression failing (e.g. None + "text"): the template's fault, not ours
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {first_line(exc)}") from None


def chat_template_for(tokenizer: Tokenizer, override: str | None = None) -> str:
    """The template to use: `override` (e.g. a --chat-template file's text), else the tokenizer's
    own (an instruction model's), else DEFAULT_CHAT_TEMPLATE."""
    if override is not None:
        return override
    if tokenizer.chat_template:
        return tokenizer.chat_template
    return DEFAULT_CHAT_TEMPLATE


def stop_texts_for(template: str) -> tuple[str, ...]:
    """Text that ends an answer besides the tokenizer's end tokens: the default template's next
    turn header (a base model writes it); nothing for a model's own template."""
    return DEFAULT_TEMPLATE_STOPS if template == DEFAULT_CHAT_TEMPLATE else ()


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], template: str | None = None,
                add_generation_prompt: bool = True, **extra: Any) -> list[int]:
    """Render with `template` (default: chat_template_for(tokenizer)), then encode. Special tokens
    written by the template (LLaMA 3's <|eot_id|>) become their single ids; bos is prepended only
    when the tokenizer's model expects it and the template did not already write it, so a template
    that starts with bos_token never gets two."""
    template = chat_template_for(tokenizer, template)
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, **extra)
    ids = tokenizer.encode_prompt(text)
    if not ids:
        raise ChatTemplateError("the chat template rendered an empty prompt")
    return ids


def read_template_file(path: str | os.PathLike) -> str:
    """A Jinja chat template from a file, checked to parse; a one-line ConfigError otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: chat template file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable chat template ({first_line(exc)})") from None
    if not text.strip():
        raise ConfigError(f"{path}: the chat template file is empty")
    try:
        _compile(text)
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"{path}: {exc}") from None
    return text
