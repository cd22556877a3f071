"""The real server end to end: a tiny packed model saved to disk, loaded by `bitnet158 serve`'s own
loader into the batching engine, behind uvicorn on 127.0.0.1, driven with the official openai
client. Greedy output through HTTP equals generate()'s token for token; streaming equals whole;
logprobs, echo, stop strings and usage come back in OpenAI's shapes; errors arrive as the client's
typed exceptions; a client that disconnects frees its slot; SIGTERM lets a running stream finish."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import TEXTS, running_server, sse_payloads, wait_until

import bitnet158 as bn
from bitnet158 import checkpoint
from bitnet158.chat_template import DEFAULT_CHAT_TEMPLATE, encode_chat, stop_texts_for
from bitnet158.cli import main
from bitnet158.cli.serve import engine_loader
from bitnet158.config import ModelConfig
from bitnet158.generate import generate, generate_step
from bitnet158.sampling import SamplingConfig
from bitnet158.serve.api import create_app
from bitnet158.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

NAME = "tiny"
GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = ["def f(x):", "The with", "for i in", ""]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=256)
    path = tmp_path_factory.mktemp("serve") / NAME
    bn.save_packed(bn.pack_(bn.Transformer(cfg)), path, tok)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same directory loaded for generate(): what the server must reproduce."""
    model, tok = checkpoint.load(model_dir)
    return model, tok


@pytest.fixture(scope="module")
def served(model_dir):
    app = create_app(engine_loader(model_dir, max_concurrency=3, max_queue=4), model_name=NAME)
    with running_server(app) as url:
        yield url, app.state.server.engine


@pytest.fixture(scope="module")
def client(served):
    url, _ = served
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_generate(client, reference, prompt):
    model, tok = reference
    expected = generate(model, tok, prompt, 24, GREEDY)
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert answer.choices[0].text == expected
    assert answer.usage.prompt_tokens == max(1, len(tok.encode_prompt(prompt)))  # "" starts with bos alone
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_greedy_chat_equals_generate_on_the_rendered_prompt(client, reference):
    model, tok = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]
    ids = encode_chat(tok, messages)
    expected = generate(model, tok, ids, 20, GREEDY, stop=stop_texts_for(DEFAULT_CHAT_TEMPLATE))
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(ids)


def test_a_chats_next_turn_is_served_from_the_cached_prefix(client, served, reference):
    """The client resends the conversation; the server prefills only what its slots did not hold,
    says so in usage.prompt_tokens_details.cached_tokens and /metrics, and answers as generate()."""
    model, tok = reference
    messages = [{"role": "user", "content": "The with statement"}]
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "for i in range(10):"}]
    ids = encode_chat(tok, messages)
    expected = generate(model, tok, ids, 12, GREEDY, stop=stop_texts_for(DEFAULT_CHAT_TEMPLATE))
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert second.choices[0].message.content == expected
    assert first.usage.prompt_tokens <= second.usage.prompt_tokens_details.cached_tokens < len(ids)
    metrics = httpx.get(served[0] + "/metrics", timeout=10).text
    counted = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("bitnet158_prompt_tokens_cached_total")))
    assert counted >= second.usage.prompt_tokens_details.cached_tokens


def test_logit_bias_bans_the_greedy_token_as_generate_does(client, reference):
    model, tok = reference
    plain = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=6, temperature=0)
    first = next(generate_step(model, tok.encode_prompt("def f(x):"), GREEDY, 1))  # the token greedy picks first
    answer = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=6, temperature=0,
                                       logit_bias={str(first): -100})
    expected = generate(model, tok, "def f(x):", 6, SamplingConfig(temperature=0.0, logit_bias={first: -100}))
    assert answer.choices[0].text == expected and answer.choices[0].text != plain.choices[0].text


def test_a_batch_of_prompts_gives_a_choice_each_equal_to_generate(client, reference):
    """/v1/completions with a list of prompts (lm-eval's batch_size > 1): choice i answers prompt i,
    whole and streamed, as generate() does; texts and token-id lists alike; usage is the sum."""
    model, tok = reference
    texts = PROMPTS[:3]
    expected = [generate(model, tok, p, 10, GREEDY) for p in texts]
    whole = client.completions.create(model=NAME, prompt=texts, max_tokens=10, temperature=0)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == expected
    ids = [tok.encode_prompt(p) for p in texts]
    assert whole.usage.prompt_tokens == sum(map(len, ids))
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0).usage for p in texts]
    assert whole.usage.completion_tokens == sum(u.completion_tokens for u in alone)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert [c.text for c in by_ids.choices] == expected
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    usage = None
    for chunk in client.completions.create(model=NAME, prompt=texts, max_tokens=10, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        for choice in chunk.choices:
            pieces[choice.index].append(choice.text)
        usage = chunk.usage or usage
    assert ["".join(pieces[i]) for i in range(3)] == expected
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_each_equal_generate(served, reference):
    url, _ = served
    model, tok = reference
    expected = [generate(model, tok, p, 16, GREEDY) for p in PROMPTS[:3]]

    def ask(prompt: str) -> str:
        body = {"model": NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(ask, PROMPTS[:3])) == expected


def test_streaming_equals_whole_with_usage(client):
    messages = [{"role": "user", "content": "for i in"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    pieces = list(client.completions.create(model=NAME, prompt="The with", max_tokens=12, temperature=0, stream=True))
    streamed = "".join(p.choices[0].text for p in pieces)
    assert streamed == client.completions.create(model=NAME, prompt="The with", max_tokens=12,
                                                 temperature=0).choices[0].text


def test_chat_logprobs_under_greedy_pick_the_top_token(client):
    answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "The with"}],
                                            max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    stopped_by_end = answer.choices[0].finish_reason == "stop"
    assert len(content) == answer.usage.completion_tokens - (1 if stopped_by_end else 0)
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)


def test_completion_echo_and_logprobs(client, reference):
    _, tok = reference
    prompt = "def f(x):"
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    choice, n_prompt = answer.choices[0], len(tok.encode_prompt(prompt))
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    if choice.finish_reason == "length":
        assert len(lp.tokens) == n_prompt + answer.usage.completion_tokens
    assert lp.text_offset == sorted(lp.text_offset)


def test_a_batch_scores_each_prompt_as_alone(client):
    """What lm-eval's local-completions sends with batch_size > 1: token-id prompts with echo and
    logprobs; each choice's prompt log-probabilities equal that prompt's own request's."""
    prompts = [[5, 9, 14, 3], [7, 7, 2], [5, 9, 20, 1, 4]]
    ask = {"model": NAME, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    batch = client.completions.create(prompt=prompts, **ask)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, batch.choices):
        alone = client.completions.create(prompt=prompt, **ask).choices[0]
        assert choice.logprobs.token_logprobs == alone.logprobs.token_logprobs
        assert choice.logprobs.tokens == alone.logprobs.tokens and choice.text == alone.text


def test_stop_string(client, reference):
    model, tok = reference
    full = generate(model, tok, "def f(x):", 24, GREEDY)
    assert len(full) >= 6, f"the fixture model's output is too short to cut: {full!r}"
    stop = full[len(full) // 2:len(full) // 2 + 3]
    answer = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=24, temperature=0, stop=[stop])
    assert answer.choices[0].text == generate(model, tok, "def f(x):", 24, GREEDY, stop=[stop])
    assert stop not in answer.choices[0].text and answer.choices[0].finish_reason == "stop"


def test_errors_are_the_clients_typed_exceptions_and_the_server_stays_healthy(client, served):
    url, _ = served
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="must be 1"):
        client.chat.completions.create(model=NAME, messages=hi, n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nothing", messages=hi)
    with pytest.raises(openai.BadRequestError, match="n_prompt_tokens=.*n_ctx=256"):
        client.completions.create(model=NAME, prompt="lorem ipsum " * 300)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="a", temperature=5)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=NAME, messages=[{"role": "narrator", "content": "x"}])
    assert httpx.get(url + "/health").status_code == 200
    assert client.completions.create(model=NAME, prompt="a", max_tokens=2).usage.completion_tokens >= 1


def test_context_sets_the_positions_of_each_slot(model_dir):
    engine, _ = engine_loader(model_dir, max_concurrency=2, max_queue=0, context=48)()
    try:
        assert engine.max_len == 48 and "2 slots × 48 positions" in engine.cache_summary()
    finally:
        engine.shutdown(drain=False, timeout=10)


def test_a_client_that_disconnects_frees_its_slot(model_dir):
    app = create_app(engine_loader(model_dir, max_concurrency=1, max_queue=0, kv_dtype="fp16"), model_name=NAME)
    with running_server(app) as url:
        engine = app.state.server.engine
        assert "(fp16)" in engine.cache_summary()  # --kv-cache reaches the engine's slots
        forwards = sum(engine.batch_sizes.values())
        with httpx.Client(base_url=url, timeout=60) as leaving:
            request = {"model": NAME, "prompt": "a", "max_tokens": 240, "temperature": 0, "stream": True}
            with leaving.stream("POST", "/v1/completions", json=request) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
        assert wait_until(lambda: engine.running == 0 and engine.waiting == 0, timeout=20)
        # cancelled, not run to the end: far fewer decode steps than the 240 tokens asked for
        assert sum(engine.batch_sizes.values()) - forwards < 200
        answer = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "b", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_a_running_stream_finish_and_exits_cleanly(model_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "bitnet158.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-concurrency", "1", "--drain-timeout", "30"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(lambda: proc.poll() is not None or healthy(), timeout=120, step=0.2), "never healthy"
        assert proc.poll() is None, proc.stdout.read()
        request = {"model": NAME, "prompt": "a", "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=request, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            try:
                events = sse_payloads([first, *lines])
            except httpx.HTTPError as e:  # keep what the server said: a broken drain is otherwise mute
                proc.kill()
                raise AssertionError(f"the stream broke ({e}); the server printed:\n{proc.stdout.read()[-3000:]}")
        assert events[-1] == "[DONE]", events[-3:]
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def test_serve_verb_stops_with_one_line_when_the_model_does_not_load(tmp_path, capsys):
    # the port opens, the loading thread fails, the server stops itself and the verb exits 2
    assert main(["serve", str(tmp_path), "--port", str(_free_port())]) == 2
    assert "bitnet158: error:" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    capsys.readouterr()


def test_serve_verb_refuses_a_cache_that_cannot_fit(model_dir, capsys):
    assert main(["serve", str(model_dir), "--port", str(_free_port()), "--max-concurrency", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "bitnet158: error:" in err and "--kv-cache fp16" in err and "GB available" in err
    assert main(["serve", str(model_dir), "--context", "1"]) == 2
    assert "--context must be at least 2" in capsys.readouterr().err


def test_32_concurrent_streams_with_stops_each_equal_their_single_request_output(model_dir, reference):
    """32 streaming requests at once (mixed prompts and lengths, a third with stop strings), on a
    server with 32 slots: every stream completes and equals generate() for its request, and the
    engine really ran decode forwards over several sequences."""
    model, tok = reference
    words = "def f x return the with for i in range print block code".split()
    jobs = []
    for i in range(32):
        prompt = " ".join(words[(i * 5 + j) % len(words)] for j in range(1 + i % 7))
        stop = [" the", "(", "\n"][i % 3] if i % 3 == 0 else None
        jobs.append((prompt, 4 + (i * 7) % 21, stop))
    expected = [generate(model, tok, p, n, GREEDY, stop=(s,) if s else ()) for p, n, s in jobs]
    app = create_app(engine_loader(model_dir, max_concurrency=32, max_queue=8), model_name=NAME)
    with running_server(app) as url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                                   timeout=120) as client:
        def ask(job) -> str:
            prompt, n, stop = job
            stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                               stop=stop, stream=True)
            return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            got = list(pool.map(ask, jobs))
        batch_sizes = app.state.server.engine.batch_sizes
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, (i, jobs[i])
    assert max(batch_sizes) > 1
