"""`bitnet158 chat`: turns read from stdin, the whole conversation rendered each turn, /reset and
/exit, stop texts, dropping the oldest turns at the context limit, and one-line user errors.

Most tests replace the generation call with a recording fake, so they check the verb's own logic
(what prompt each turn sends, what joins the history); the end-to-end tests run the real model and
compare each greedy answer with an uncached generation of the same prompt."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hf_fixtures import make_2b4t_like_hf_dir

import bitnet158 as bn
from bitnet158 import generate as generation
from bitnet158.chat_template import DEFAULT_TEMPLATE_STOPS, encode_chat
from bitnet158.cli import chat as chat_verb
from bitnet158.cli import main
from bitnet158.sampling import SamplingConfig

CKPT = Path(__file__).parent / "fixtures" / "v1-model"  # a tiny b1.58 checkpoint: 64-token context


def feed(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


class FakeGeneration:
    """Stands in for PromptCache + stream_generate: records each prompt and answers from a script."""

    def __init__(self, answers: list[list[str]] | None = None):
        self.answers = answers or []
        self.prompts: list[list[int]] = []
        self.stops: list[tuple[str, ...]] = []
        self.resets = 0

    def install(self, monkeypatch) -> FakeGeneration:
        fake = self

        class Cache:
            def __init__(self, config):
                self.config = config

            def reset(self):
                fake.resets += 1

        monkeypatch.setattr(chat_verb, "PromptCache", Cache)
        monkeypatch.setattr(chat_verb, "stream_generate", self.stream)
        return self

    def stream(self, model, tokenizer, prompt_ids, max_tokens=100, sampling=None, seed=None, *, stop=(),
               cache):
        assert isinstance(prompt_ids, list) and all(isinstance(i, int) for i in prompt_ids)
        self.prompts.append(prompt_ids)
        self.stops.append(tuple(stop))
        pieces = self.answers[len(self.prompts) - 1] if len(self.prompts) <= len(self.answers) else ["ok"]
        for n, piece in enumerate(pieces, 1):
            yield SimpleNamespace(text=piece, generated_tokens=n, tokens_per_second=12.5,
                                  finish_reason="stop" if n == len(pieces) else None)


@pytest.fixture(scope="module")
def tok():
    return bn.load(CKPT)[1]


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory, tok) -> Path:
    """The fixture's tokenizer on a tiny random model with a 512-token context: room for several turns."""
    torch.manual_seed(0)
    cfg = bn.preset("tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    vocab_size=tok.vocab_size, max_seq_len=512)
    return bn.save(bn.Transformer(cfg), tmp_path_factory.mktemp("chat") / "long", tokenizer=tok)


def test_turns_render_the_whole_conversation_and_reset_clears_it(monkeypatch, capsys, tok, long_ckpt):
    fake = FakeGeneration([[" Hi", " there."], [" Sure."], [" Again."]]).install(monkeypatch)
    feed(monkeypatch, "hello\nmore please\n\n/reset\nhi again\n/exit\nnever read\n")
    assert main(["chat", str(long_ckpt), "--system", "Be brief."]) == 0
    out, err = capsys.readouterr()
    assert out == " Hi there.\n Sure.\n Again.\n"
    system = {"role": "system", "content": "Be brief."}
    turn1 = [system, {"role": "user", "content": "hello"}]
    turn2 = [*turn1, {"role": "assistant", "content": " Hi there."}, {"role": "user", "content": "more please"}]
    turn3 = [system, {"role": "user", "content": "hi again"}]
    assert fake.prompts == [encode_chat(tok, m) for m in (turn1, turn2, turn3)]
    assert tok.decode(fake.prompts[1]).endswith(
        "User: hello\nAssistant: Hi there.<|endoftext|>\nUser: more please\nAssistant:")
    assert fake.resets == 2  # once when the session starts, once for /reset
    assert "[conversation cleared]" in err
    assert err.count("tok/s") == 3 and "[2 tokens, 12.5 tok/s, finish: stop]" in err
    assert "a base model is not an instruction model" in err


def test_default_template_stops_where_the_model_starts_the_next_turn(monkeypatch, capsys, tok, long_ckpt):
    fake = FakeGeneration([[" Yes", "."], [" Fine\n", "."]]).install(monkeypatch)
    feed(monkeypatch, "question\nnext\n")  # end of input without /exit ends the chat too
    assert main(["chat", str(long_ckpt)]) == 0
    out, err = capsys.readouterr()
    assert out == " Yes.\n Fine\n.\n" and "finish: stop" in err
    assert "\nUser:" in DEFAULT_TEMPLATE_STOPS and fake.stops == [DEFAULT_TEMPLATE_STOPS] * 2
    history = [{"role": "user", "content": "question"}, {"role": "assistant", "content": " Yes."},
               {"role": "user", "content": "next"}]
    assert fake.prompts[1] == encode_chat(tok, history)


def test_oldest_turns_are_dropped_to_fit_the_context(monkeypatch, capsys, tok):
    fake = FakeGeneration([[" a"]] * 6).install(monkeypatch)
    feed(monkeypatch, "".join(f"message {i}\n" for i in range(6)))
    assert main(["chat", str(CKPT), "--system", "S", "--max-tokens", "20"]) == 0
    err = capsys.readouterr().err
    assert "oldest messages to fit the model's 64-token context" in err
    for ids in fake.prompts:
        assert len(ids) + 20 <= 64
        text = tok.decode(ids)
        assert text.startswith("System: S\nUser: message ")  # the system message stays, a user turn follows
    assert tok.decode(fake.prompts[-1]).endswith("User: message 5\nAssistant:")


def test_a_message_too_long_for_the_context_is_not_sent(monkeypatch, capsys):
    fake = FakeGeneration([[" short"]]).install(monkeypatch)
    feed(monkeypatch, "x" * 300 + "\nhi\n")
    assert main(["chat", str(CKPT), "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "the model's context is 64: not sent" in err
    assert len(fake.prompts) == 1 and out == " short\n"


def test_ctrl_c_ends_the_chat_cleanly(monkeypatch, capsys):
    FakeGeneration().install(monkeypatch)

    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    assert main(["chat", str(CKPT)]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("extra,fragment", [
    (["--chat-template", "no/such/template.jinja"], "chat template file not found"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--temperature", "-1"], "temperature must be"),
    (["--system", "S", "--chat-template", "{TEMPLATE}"], "system messages are not supported"),
])
def test_user_errors_are_one_line(monkeypatch, capsys, tmp_path, extra, fragment):
    FakeGeneration().install(monkeypatch)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'system' %}"
                        "{{ raise_exception('system messages are not supported') }}{% endif %}"
                        "{{ m.content }}{% endfor %}")
    feed(monkeypatch, "hello\n")
    argv = ["chat", str(CKPT), *[a.replace("{TEMPLATE}", str(template)) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bitnet158: error: ") and fragment in err


def test_an_imported_llama3_style_model_uses_its_own_template(monkeypatch, capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = make_2b4t_like_hf_dir(tmp_path / "hf")
    out = tmp_path / "ckpt"
    assert main(["import-hf", str(hf_dir), str(out)]) == 0
    fake = FakeGeneration([[" Hi"], [" Bye"]]).install(monkeypatch)
    feed(monkeypatch, "hello\nbye\n")
    capsys.readouterr()
    assert main(["chat", str(out), "--system", "Be brief."]) == 0
    assert "the model's own chat template" in capsys.readouterr().err
    assert fake.stops == [(), ()]  # the model's own template ends turns with its end token
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": " Hi"}, {"role": "user", "content": "bye"}]
    for prompt, n in zip(fake.prompts, (2, 4)):
        assert prompt == hf_tok.apply_chat_template(history[:n], add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)


# --- end to end, with the real generation call ------------------------------------------------------

def greedy_answer(model, tok, messages, max_tokens: int) -> str:
    """What the chat should print for `messages`: an uncached greedy generation of the same prompt,
    cut at an end token and at the default template's stop texts."""
    ids = encode_chat(tok, messages)
    tokens = []
    for t in generation.generate_step(model, ids, SamplingConfig(temperature=0.0), max_tokens):
        if t in tok.end_ids:
            break
        tokens.append(t)
    text = tok.decode(tokens)
    cuts = [i for i in (text.find(s) for s in DEFAULT_TEMPLATE_STOPS) if i >= 0]
    return text[:min(cuts)] if cuts else text


def test_chat_streams_greedy_answers_and_reset_starts_afresh(monkeypatch, capsys):
    feed(monkeypatch, "hello\n/reset\nhi again\n/exit\n")
    assert main(["chat", str(CKPT), "--temperature", "0", "--max-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    model, tok = bn.load(CKPT)
    first = greedy_answer(model, tok, [{"role": "user", "content": "hello"}], 5)
    second = greedy_answer(model, tok, [{"role": "user", "content": "hi again"}], 5)
    assert out == f"{first}\n{second}\n"
    assert err.count("tok/s") == 2 and "[conversation cleared]" in err and "Traceback" not in err


def test_the_cached_second_turn_equals_an_uncached_generation(monkeypatch, capsys):
    feed(monkeypatch, "def f\nand g\n")
    assert main(["chat", str(CKPT), "--temperature", "0", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    model, tok = bn.load(CKPT)
    first = greedy_answer(model, tok, [{"role": "user", "content": "def f"}], 6)
    history = [{"role": "user", "content": "def f"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and g"}]
    assert out == f"{first}\n{greedy_answer(model, tok, history, 6)}\n"
