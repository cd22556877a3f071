"""The embedded default instruction set: questions about the Python documentation topics every
install carries (`pydoc_data.topics`, ~80 topics), answered with the start of the section's text.

Each section of a topic (its title underlined with *, = or -) becomes one conversation:

    user:      What is the "assert" statement?
    assistant: Assert statements are a convenient way to insert debugging assertions into a program: ...

Held out by whole topics (`groups`), so the evaluation asks about topics the model never saw answered.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

SOURCE = "pydoc_data.topics"
MAX_ANSWER_CHARS = 600  # a few sentences: fits the demo's windows with its question
MIN_ANSWER_CHARS = 40
_QUESTIONS = ("What is {t}?", "Explain {t} in Python.", "Tell me about {t}.", "How does Python define {t}?")
_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")


def _sections(text: str) -> list[tuple[str, str]]:
    """(title, body) for every underlined heading of a topic's text."""
    lines = text.splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and _UNDERLINE.match(lines[i + 1].strip())
             and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 1]
    out = []
    for n, i in enumerate(heads):
        end = heads[n + 1] if n + 1 < len(heads) else len(lines)
        out.append((lines[i].strip(), "\n".join(lines[i + 2:end]).strip()))
    return out


def _answer(body: str) -> str:
    """The first prose paragraphs of a section (grammar and code blocks, which are indented, skipped),
    up to MAX_ANSWER_CHARS at a paragraph or sentence end, with lines joined."""
    parts: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", body):
        if not para.strip() or para.startswith((" ", "\t")):
            continue
        text = " ".join(line.strip() for line in para.splitlines())
        if size and size + len(text) > MAX_ANSWER_CHARS:
            break
        parts.append(text)
        size += len(text)
    answer = " ".join(parts)
    if len(answer) > MAX_ANSWER_CHARS:
        cut = answer.rfind(". ", 0, MAX_ANSWER_CHARS)
        answer = answer[:cut + 1] if cut > MIN_ANSWER_CHARS else answer[:MAX_ANSWER_CHARS]
    return answer


def _question(title: str) -> str:
    subject = title[0].lower() + title[1:] if title[:1].isupper() and not title[1:2].isupper() else title
    pick = hashlib.blake2b(title.encode(), digest_size=2).digest()[0] % len(_QUESTIONS)
    return _QUESTIONS[pick].format(t=subject)


def default_instructions() -> tuple[list[tuple[str, list[dict[str, Any]]]], list[str]]:
    """(conversations as (where, messages), the topic of each: the held-out split's groups)."""
    from pydoc_data.topics import topics  # the standard library's own docs: no download, ships with Python

    conversations, groups = [], []
    for topic in sorted(topics):
        for k, (title, body) in enumerate(_sections(topics[topic])):
            answer = _answer(body)
            if len(answer) < MIN_ANSWER_CHARS:
                continue
            messages = [{"role": "user", "content": _question(title)}, {"role": "assistant", "content": answer}]
            conversations.append((f"{SOURCE}[{topic!r}] section {k + 1}", messages))
            groups.append(topic)
    return conversations, groups
