"""Chat templates render exactly as transformers' apply_chat_template renders them (the LLaMA-3-style
fixture and other real-world-shaped templates), encode to the same ids, and every bad template or
conversation is a one-line ConfigError."""

from __future__ import annotations

import pytest
from hf_fixtures import BOS, EOT, make_2b4t_like_hf_dir

from bitnet158.chat_template import (DEFAULT_CHAT_TEMPLATE, DEFAULT_TEMPLATE_STOPS, ChatTemplateError,
                                     chat_template_for, encode_chat, read_template_file, render_chat,
                                     stop_texts_for, validate_messages)
from bitnet158.errors import ConfigError
from bitnet158.interop.hf_tokenizer import read_hf_tokenizer
from bitnet158.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# ChatML (Qwen-style): a default system message, loop.last, the generation prompt.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if loop.last and message['role'] == 'assistant' %}{{ '' }}{% else %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-style: roles must alternate, checked with raise_exception; bos written by the template;
# written over several lines, so trim_blocks / lstrip_blocks decide the whitespace.
ALTERNATING = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] + '\n\n' %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system = '' %}
    {% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] + eos_token }}{% endgeneration %}
    {% else %}
        {{ raise_exception('Only user and assistant roles are supported!') }}
    {% endif %}
{% endfor %}
"""
# Tool use: tools and arguments through tojson (non-ASCII and <, > must come out unescaped),
# namespace, dict, loop controls, a date from strftime_now.
TOOLS = (
    "{%- set ns = namespace(count=0) -%}"
    "{%- set meta = dict(today=strftime_now('%Y-%m-%d')) -%}"
    "<|system|>date: {{ meta.today }}"
    "{%- if tools is not none %}\ntools: {{ tools | tojson }}\n"
    "pretty: {{ tools | tojson(indent=2) }}{% endif %}\n"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}{%- continue -%}{%- endif -%}"
    "{%- set ns.count = ns.count + 1 -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{%- if message.tool_calls is defined %} calls={{ message.tool_calls | tojson }}{% endif %}\n"
    "{%- if ns.count >= 4 -%}{%- break -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
CONVERSATION = [
    {"role": "system", "content": "  Answer briefly.  "},
    {"role": "user", "content": "Hello! café 😀 <b>bold</b>"},
    {"role": "assistant", "content": "Hi. What do you need?"},
    {"role": "user", "content": "Two plus two?\nThanks."},
]
TOOL_LIST = [{"type": "function", "function": {"name": "add", "description": "a + b → ünïcode <ok>",
                                               "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_2b4t_like_hf_dir(tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def tok(hf_dir) -> Tokenizer:
    return read_hf_tokenizer(hf_dir)


def ours(tok: Tokenizer, template: str, messages, gen: bool, **extra) -> str:
    return render_chat(template, messages, add_generation_prompt=gen, bos_token=tok.bos_token,
                       eos_token=tok.eos_token, **extra)


def theirs(hf_tok, template: str | None, messages, gen: bool, **kwargs):
    return hf_tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen,
                                      tokenize=False, **kwargs)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_llama3_fixture_renders_and_encodes_like_transformers(hf_tok, tok, gen, n):
    messages = CONVERSATION[:n]
    text = ours(tok, tok.chat_template, messages, gen)
    assert text == theirs(hf_tok, None, messages, gen)
    assert text.startswith(BOS)
    ids = encode_chat(tok, messages, add_generation_prompt=gen)
    assert ids == hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                             return_dict=False)
    # bos is in the text, so it is there exactly once; every end of turn is the single <|eot_id|> id
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.backend.token_to_id(EOT)) == n


@pytest.mark.parametrize("template", [CHATML, ALTERNATING, TOOLS], ids=["chatml", "alternating", "tools"])
@pytest.mark.parametrize("gen", [True, False])
def test_other_templates_render_like_transformers(hf_tok, tok, template, gen):
    messages = CONVERSATION if template != ALTERNATING else CONVERSATION[:3]
    assert ours(tok, template, messages, gen) == theirs(hf_tok, template, messages, gen)
    if template == CHATML:  # without a system message the template writes its own
        assert ours(tok, template, messages[1:], gen) == theirs(hf_tok, template, messages[1:], gen)


def test_tools_and_tool_messages_render_like_transformers(hf_tok, tok):
    messages = [*CONVERSATION[1:3],
                {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 2}}]},
                {"role": "tool", "content": "4"}, {"role": "user", "content": "and?"}]
    text = ours(tok, TOOLS, messages, True, tools=TOOL_LIST)
    assert text == theirs(hf_tok, TOOLS, messages, True, tools=TOOL_LIST)
    # tojson neither HTML-escapes nor ASCII-fies
    assert "ünïcode <ok>" in text and '"arguments": {"a": 2}' in text


def test_encode_chat_matches_transformers_ids_and_adds_bos_only_when_missing(hf_tok, tok):
    messages = CONVERSATION[:3]
    hf_ids = hf_tok.apply_chat_template(messages, chat_template=ALTERNATING, add_generation_prompt=False,
                                        tokenize=True, return_dict=False)
    assert encode_chat(tok, messages, ALTERNATING, add_generation_prompt=False) == hf_ids
    # ChatML writes no bos; transformers encodes the text as it is, while a tokenizer whose model
    # expects bos (add_bos) gets it in front, once
    hf_ids = hf_tok.apply_chat_template(messages, chat_template=CHATML, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert tok.add_bos
    assert encode_chat(tok, messages, CHATML) == [tok.bos_id, *hf_ids]
    assert encode_chat(tok.replace(add_bos=False), messages, CHATML) == hf_ids


def test_raise_exception_is_the_templates_own_one_line_message(hf_tok, tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate"):
        theirs(hf_tok, ALTERNATING, bad, True)
    with pytest.raises(ChatTemplateError) as info:
        ours(tok, ALTERNATING, bad, True)
    assert str(info.value) == "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(ChatTemplateError, match="^Only user and assistant roles are supported!$"):
        ours(tok, ALTERNATING, [bad[0], {"role": "tool", "content": "x"}], True)


@pytest.mark.parametrize("template,fragment", [
    ("{% for m in messages %}{{ m.content }", "syntax error on line 1"),
    ("hello\n{% if %}", "syntax error on line 2"),
    ("{% endfor %}", "syntax error"),
    ("{{ missing.attribute }}", "chat template failed"),
    ("{{ messages.append(1) }}", "chat template failed"),               # the sandbox is immutable
    ("{% set ns = namespace(_x=1) %}", "cannot set the attribute '_x'"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),
    ("{{ None + 'x' }}", "TypeError"),
])
def test_bad_templates_are_one_line_chat_template_errors(template, fragment):
    with pytest.raises(ChatTemplateError) as info:
        render_chat(template, [{"role": "user", "content": "hi"}], bos_token=None, eos_token=None)
    assert isinstance(info.value, ConfigError)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("messages,fragment", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hello"], "messages[0] must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
     "messages[1].role must be one of"),
    ([{"content": "a"}], "messages[0].role"),
    ([{"role": "user"}], "has no \"content\""),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
    ([{"role": "user", "content": None}], "messages[0].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0] must be"),
    ([{"role": "user", "content": "a", "name": object()}], "messages[0].name must be JSON data"),
])
def test_bad_messages_are_one_line_config_errors(messages, fragment):
    with pytest.raises(ConfigError) as info:
        render_chat(DEFAULT_CHAT_TEMPLATE, messages, bos_token=None, eos_token="</s>")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_text_parts_are_joined_and_none_keys_dropped():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    got = validate_messages([{"role": "user", "content": parts, "name": None}])
    assert got == [{"role": "user", "content": "first\nsecond"}]
    original = [{"role": "user", "content": "x"}]
    validate_messages(original)[0]["content"] = "changed"
    assert original == [{"role": "user", "content": "x"}]  # the caller's messages are never touched


def test_default_template_is_a_plain_transcript(hf_tok):
    messages = [*CONVERSATION, {"role": "tool", "content": "ok"}]
    text = render_chat(DEFAULT_CHAT_TEMPLATE, messages, bos_token=None, eos_token="<|endoftext|>")
    assert text == ("System: Answer briefly.\nUser: Hello! café 😀 <b>bold</b>\n"
                    "Assistant: Hi. What do you need?<|endoftext|>\nUser: Two plus two?\nThanks.\n"
                    "Tool: ok\nAssistant:")
    no_prompt = render_chat(DEFAULT_CHAT_TEMPLATE, messages[:2], add_generation_prompt=False,
                            bos_token=None, eos_token=None)
    assert no_prompt == "System: Answer briefly.\nUser: Hello! café 😀 <b>bold</b>\n"
    # and transformers renders it the same way
    hf = hf_tok.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True,
                                    tokenize=False, eos_token="<|endoftext|>")
    assert hf == text
    assert stop_texts_for(DEFAULT_CHAT_TEMPLATE) == DEFAULT_TEMPLATE_STOPS and stop_texts_for(CHATML) == ()


def test_template_choice_override_then_tokenizer_then_default(tok):
    assert chat_template_for(tok) == tok.chat_template
    assert chat_template_for(tok, CHATML) == CHATML
    bare = tok.replace(chat_template=None)
    assert chat_template_for(bare) == DEFAULT_CHAT_TEMPLATE
    ids = encode_chat(bare, [{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "User: hi\nAssistant:"


def test_base_tokenizer_without_bos_encodes_the_default_template():
    base = Tokenizer.train(["User: hello there\nAssistant: hi\n"] * 20, vocab_size=300)
    ids = encode_chat(base, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                             {"role": "user", "content": "again"}])
    assert base.decode(ids) == "User: hello\nAssistant: hi<|endoftext|>\nUser: again\nAssistant:"
    assert ids.count(base.eos_id) == 1  # the eos between turns is the special token, not its letters


def test_read_template_file(tmp_path):
    good = tmp_path / "t.jinja"
    good.write_text(CHATML, encoding="utf-8")
    assert read_template_file(good) == CHATML
    for name, text, fragment in [("missing.jinja", None, "not found"), ("empty.jinja", "  \n", "empty"),
                                 ("bad.jinja", "{% if %}", "syntax error"),
                                 ("binary.jinja", b"\xff\xfe{{", "not a readable chat template")]:
        path = tmp_path / name
        if isinstance(text, str):
            path.write_text(text, encoding="utf-8")
        elif text is not None:
            path.write_bytes(text)
        with pytest.raises(ConfigError) as info:
            read_template_file(path)
        assert fragment in str(info.value) and name in str(info.value) and "\n" not in str(info.value)
