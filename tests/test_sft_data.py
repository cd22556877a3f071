"""Chat fine-tuning data (bitnet158.train.data.chat): the assistant-only mask on a hand-written
two-turn conversation, packing that never lets a loss cross samples, the held-out split, and
one-line errors for bad rows and templates."""

from __future__ import annotations

import json

import pytest
import torch

from bitnet158.chat_template import ChatTemplateError
from bitnet158.errors import DataError
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.data.chat import (IGNORE, ChatSample, chat_segments, encode_conversation, pack_samples,
                                       prepare_chat_data, read_conversations, split_heldout, window_batches)
from common import one_torch_thread  # noqa: F401  (the fixture, by name)

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour"},
    {"role": "assistant", "content": "Red."},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = ["System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Name a colour\nAssistant: Red.\n"] * 30
    return Tokenizer.train(text, vocab_size=300)


def test_segments_of_a_hand_written_two_turn_conversation(tok):
    from bitnet158.chat_template import DEFAULT_CHAT_TEMPLATE
    segments = chat_segments(DEFAULT_CHAT_TEMPLATE, TWO_TURNS, bos_token=None, eos_token="<|endoftext|>")
    assert segments == [
        ("System: Be brief.\nUser: Hi\nAssistant:", False),
        (" Hello.<|endoftext|>\n", True),
        ("User: Name a colour\nAssistant:", False),
        (" Red.<|endoftext|>\n", True),
    ]


def test_assistant_only_mask_on_the_two_turn_example(tok):
    sample = encode_conversation(tok, TWO_TURNS)
    assert len(sample.ids) == len(sample.assistant)
    # the masked tokens decode to exactly the two answers, each with its end-of-text token
    answer = [i for i, m in zip(sample.ids, sample.assistant) if m]
    assert tok.decode(answer) == " Hello.<|endoftext|>\n Red.<|endoftext|>\n"
    prompt = [i for i, m in zip(sample.ids, sample.assistant) if not m]
    assert tok.decode(prompt) == "System: Be brief.\nUser: Hi\nAssistant:User: Name a colour\nAssistant:"
    # the whole sample is the rendered conversation, and eos is one token inside the answers
    assert tok.decode(sample.ids).startswith("System: Be brief.\nUser: Hi\nAssistant: Hello.<|endoftext|>")
    assert sum(1 for i, m in zip(sample.ids, sample.assistant) if m and i == tok.eos_id) == 2
    # targets: next-token labels, scored exactly on the assistant tokens
    inputs, targets, cut = pack_samples([sample], seq_len=len(sample.ids) + 4, pad_id=tok.eos_id)
    scored = targets[0][targets[0] != IGNORE].tolist()
    assert scored == answer and cut == 0
    assert inputs[0, :len(sample.ids)].tolist() == sample.ids


def test_prompt_completion_rows_and_messages_rows(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": TWO_TURNS}, {"prompt": "Hi", "completion": "Hello.", "system": "Be brief."}, {}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    convs = read_conversations(path)
    assert [w for w, _ in convs] == [f"{path}:1", f"{path}:2"]
    assert convs[1][1] == TWO_TURNS[:3]


def test_packing_keeps_samples_whole_and_losses_inside_them():
    a = ChatSample([1, 2, 3, 4], [False, False, True, True])
    b = ChatSample([5, 6, 7], [False, True, True])
    c = ChatSample([8, 9, 10, 11, 12, 13, 14, 15, 16], [False] * 6 + [True] * 3)
    inputs, targets, cut = pack_samples([a, b, c], seq_len=7, pad_id=0)
    # window 1: a + b (7 tokens of 8); c (9 tokens) starts window 2, cut to 8
    assert inputs.tolist()[0] == [1, 2, 3, 4, 5, 6, 7]
    assert targets.tolist()[0] == [IGNORE, 3, 4, IGNORE, 6, 7, IGNORE]  # 4 → 5 crosses samples: not scored
    assert inputs.tolist()[1] == [8, 9, 10, 11, 12, 13, 14] and targets.tolist()[1] == [IGNORE] * 5 + [14, 15]
    assert cut == 1


def test_heldout_split_is_whole_conversations_and_seeded(tok):
    assert split_heldout(20, 0.1, seed=3) == split_heldout(20, 0.1, seed=3)
    assert len(split_heldout(20, 0.1, seed=3)) == 2 and split_heldout(1, 0.5, seed=0) == set()
    convs = [(f"f:{i}", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
             for i in range(10)]
    data = prepare_chat_data(convs, tok, seq_len=32, heldout=0.2, seed=0)
    assert data.conversations == 10 and data.heldout_conversations == 2
    assert data.heldout_inputs.shape[0] >= 1 and data.train_target_tokens > 0
    batches = window_batches(data.train_inputs, data.train_targets, batch_size=3, seed=5)
    x1, y1 = batches(7)
    x2, y2 = batches(7)
    assert x1.shape == (3, 32) and (x1 == x2).all() and (y1 == y2).all()


@pytest.mark.parametrize("row, fragment", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}, "role must be one of"),
    ({"prompt": "Hi"}, "expected \"messages\" or \"prompt\" and \"completion\""),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "starts with"),
    ([1, 2], "expected an object"),
])
def test_bad_rows_are_one_line_errors(tmp_path, row, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=fragment) as info:
        read_conversations(path)
    assert str(info.value).startswith(f"{path}:2: ") and "\n" not in str(info.value)


def test_template_that_fails_to_render_is_one_line(tok):
    convs = [("data.jsonl:1", TWO_TURNS)]
    with pytest.raises(ChatTemplateError, match="data.jsonl:1: ") as info:
        prepare_chat_data(convs, tok, seq_len=64, template="{{ raise_exception('no system role here') }}")
    assert "no system role here" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ChatTemplateError, match="undefined|failed"):
        prepare_chat_data(convs, tok, seq_len=64, template="{{ messages[0].content.nope() }}")
    # a template that rewrites earlier turns: the assistant's tokens cannot be found
    rewriting = "{% for m in messages %}{{ m.content if loop.last else '' }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot be found"):
        prepare_chat_data(convs, tok, seq_len=64, template=rewriting)


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_conversations(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="no such"):
        read_conversations(tmp_path / "nope.jsonl")


def test_embedded_instruction_set_holds_out_whole_topics(tok):
    from bitnet158.train.data.instructions import default_instructions
    convs, groups = default_instructions()
    assert len(convs) > 150 and len(set(groups)) > 60 and len(convs) == len(groups)
    where, messages = convs[0]
    assert where.startswith("pydoc_data.topics[") and [m["role"] for m in messages] == ["user", "assistant"]
    assert all(40 <= len(m[1]["content"]) <= 600 for _, m in convs)
    data = prepare_chat_data(convs[:40], tok, seq_len=256, heldout=0.25, seed=0, groups=groups[:40])
    assert 0 < data.heldout_conversations < 40
    # the held-out conversations are exactly those of the held-out topics
    held = split_heldout(len(set(groups[:40])), 0.25, 0)
    keys = sorted(set(groups[:40]))
    assert data.heldout_conversations == sum(1 for g in groups[:40] if g in {keys[i] for i in held})
