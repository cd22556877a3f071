"""The HTTP layer alone, over a real uvicorn server and the fake engine of serve_helpers: OpenAI's
shapes (whole and streamed, logprobs, echo, usage), loading and health, the API key, the queue,
client disconnects, the body limit, metrics, a malformed-request suite where every case must get
its 4xx and OpenAI's error body (and leave the server healthy), and schemathesis over the schema."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from serve_helpers import SCRIPT_TEXT, TEXTS, FakeEngine, running_server, sse_payloads, wait_until
from serve_malformed_cases import CASES, LIMIT

from bitnet158.chat_template import DEFAULT_CHAT_TEMPLATE, encode_chat
from bitnet158.errors import CheckpointError, ConfigError
from bitnet158.serve.api import create_app
from bitnet158.tokenizer import Tokenizer

NAME = "fake"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def server(tok):
    engine = FakeEngine(tok, max_len=64, max_concurrency=2, max_queue=2)
    app = create_app(lambda: (engine, tok), model_name=NAME, max_body_bytes=LIMIT)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, engine


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message
    return body["error"]


# ----- shapes ---------------------------------------------------------------------------------
def test_completion_text_usage_and_ids(server, tok):
    client, _ = server
    body = client.post("/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 5}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == NAME
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["text"] == tok.decode(tok.encode(SCRIPT_TEXT)[:5])
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(tok.encode("hello")), "completion_tokens": 5,
                             "total_tokens": len(tok.encode("hello")) + 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_chat_uses_the_template_and_counts_its_prompt(server, tok):
    client, _ = server
    body = client.post("/v1/chat/completions", json={"model": NAME, "messages": HI, "max_tokens": 4}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == tok.decode(tok.encode(SCRIPT_TEXT)[:4])
    assert body["usage"]["prompt_tokens"] == len(encode_chat(tok, HI, DEFAULT_CHAT_TEMPLATE))
    assert body["usage"]["completion_tokens"] == 4


def test_chat_stream_role_first_then_content_usage_and_done(server):
    client, _ = server
    request = {"model": NAME, "messages": HI, "max_tokens": 6}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions",
                       json={**request, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == whole
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI: null until the last chunk
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completion_stream_with_echo_and_logprobs(server):
    client, _ = server
    request = {"model": NAME, "prompt": "hello", "max_tokens": 4, "echo": True, "logprobs": 1}
    whole = client.post("/v1/completions", json=request).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]
    assert [o for c in chunks for o in c["logprobs"]["text_offset"]] == whole["logprobs"]["text_offset"]


def test_completion_echo_logprobs_shape(server, tok):
    client, _ = server
    choice = client.post("/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 3,
                                                  "echo": True, "logprobs": 2}).json()["choices"][0]
    n_prompt = len(tok.encode("hello"))
    lp = choice["logprobs"]
    assert choice["text"].startswith("hello")
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"][1:])
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


def test_chat_logprobs_shape(server, tok):
    client, _ = server
    choice = client.post("/v1/chat/completions", json={"model": NAME, "messages": HI, "max_tokens": 3,
                                                       "logprobs": True, "top_logprobs": 2}).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 3
    for entry, token in zip(content, tok.encode(SCRIPT_TEXT)):
        assert entry["token"] == tok.decode([token]) and bytes(entry["bytes"]) == tok.token_bytes(token)
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]


def test_stop_string_and_end_token_finish_with_stop(server, tok):
    client, _ = server
    body = client.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 40,
                                                "stop": ["dolor"]}).json()
    assert body["choices"][0]["text"] == SCRIPT_TEXT[:SCRIPT_TEXT.index("dolor")]
    assert body["choices"][0]["finish_reason"] == "stop"
    ended = FakeEngine(tok, script=tok.encode(" lorem") + [tok.eos_id])
    with running_server(create_app(lambda: (ended, tok), model_name=NAME)) as url:
        choice = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": HI, "logprobs": True},
                            timeout=30).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == " lorem"
    assert len(choice["logprobs"]["content"]) == len(tok.encode(" lorem"))  # no entry for the end token


def test_models_and_openapi(server):
    client, _ = server
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    _error(client.get("/v1/models/other"), 404)
    schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_metrics_count_tokens_and_read_the_engine(server):
    client, _ = server
    client.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 3})
    text = client.get("/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["bitnet158_tokens_generated_total"] >= 3
    assert samples["bitnet158_requests_running"] == 0 and samples["bitnet158_requests_waiting"] == 0
    assert samples["bitnet158_time_to_first_token_seconds_count"] >= 1
    assert samples["bitnet158_decode_tokens_per_second_count"] >= 1


# ----- loading, keys, queue, disconnects, limits ------------------------------------------------
def test_health_is_503_while_loading_then_200(tok):
    release = threading.Event()
    engine = FakeEngine(tok)

    def slow_load():
        assert release.wait(30)
        return engine, tok

    with running_server(create_app(slow_load, model_name=NAME), wait_healthy=False) as url:
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        _error(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "a"}), 503)
        release.set()
        assert wait_until(lambda: httpx.get(url + "/health").status_code == 200)
    assert engine.shutdowns == [True]  # the lifespan drained the engine on the way out


def test_a_failed_load_is_reported(tok):
    heard = []

    def broken():
        raise CheckpointError("model.safetensors is truncated")

    with running_server(create_app(broken, model_name=NAME, on_load_error=heard.append), wait_healthy=False) as url:
        assert wait_until(lambda: httpx.get(url + "/health").json()["status"] == "error")
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "truncated" in health.json()["message"]
    assert len(heard) == 1 and isinstance(heard[0], CheckpointError)


def test_api_key(tok):
    engine = FakeEngine(tok)
    with running_server(create_app(lambda: (engine, tok), model_name=NAME, api_key="sesame")) as url:
        request = {"model": NAME, "prompt": "a", "max_tokens": 1}
        missing = httpx.post(url + "/v1/completions", json=request)
        assert _error(missing, 401)["code"] == "invalid_api_key" and missing.headers["www-authenticate"] == "Bearer"
        _error(httpx.post(url + "/v1/completions", json=request, headers={"Authorization": "Bearer nope"}), 401)
        _error(httpx.get(url + "/v1/models"), 401)
        good = {"Authorization": "Bearer sesame"}
        assert httpx.post(url + "/v1/completions", json=request, headers=good).status_code == 200
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_tokenize_and_detokenize_use_the_endpoints_own_encoding(server, tok):
    client, _ = server
    got = client.post("/tokenize", json={"model": NAME, "prompt": "def f(x):"}).json()
    assert got["tokens"] == tok.encode_prompt("def f(x):") and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 64
    chat = client.post("/tokenize", json={"messages": HI}).json()
    assert chat["tokens"] == encode_chat(tok, HI, DEFAULT_CHAT_TEMPLATE)
    completion = client.post("/v1/completions", json={"model": NAME, "prompt": "def f(x):", "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == got["count"]  # what a client budgets is what it is billed
    back = client.post("/detokenize", json={"tokens": got["tokens"]}).json()
    assert back == {"prompt": tok.decode(got["tokens"])}


def test_queue_full_is_429_and_the_server_recovers(tok):
    engine = FakeEngine(tok, max_concurrency=1, max_queue=0, delay=0.02)
    with running_server(create_app(lambda: (engine, tok), model_name=NAME)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        slow = {"model": NAME, "prompt": "a", "max_tokens": 30, "stream": True}
        with client.stream("POST", "/v1/completions", json=slow) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the first token is out: the one slot is taken
            error = _error(client.post("/v1/completions", json={"model": NAME, "prompt": "b"}), 429)
            assert error["code"] == "rate_limit_exceeded"
            assert sse_payloads(lines)[-1] == "[DONE]"
        assert client.post("/v1/completions", json={"model": NAME, "prompt": "b"}).status_code == 200


def test_a_batch_that_does_not_fit_is_429_and_leaves_nothing_running(tok):
    """A batch of prompts is submitted all or none: when the queue fills part way, the prompts
    already submitted are cancelled and the client gets 429."""
    engine = FakeEngine(tok, max_concurrency=2, max_queue=2, delay=0.02)
    with running_server(create_app(lambda: (engine, tok), model_name=NAME)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        slow = {"model": NAME, "prompt": "a", "max_tokens": 30, "stream": True}
        with client.stream("POST", "/v1/completions", json=slow) as r:
            lines = r.iter_lines()
            next(lines)  # one slot taken: 1 slot and 2 queue places are left for a batch of 4
            batch = {"model": NAME, "prompt": ["b", "c", "d", "e"], "max_tokens": 2}
            assert _error(client.post("/v1/completions", json=batch), 429)["code"] == "rate_limit_exceeded"
            refused = engine.streams[1:]
            assert len(refused) == 3 and all(s.cancelled for s in refused)
            assert sse_payloads(lines)[-1] == "[DONE]"
        answer = client.post("/v1/completions", json=batch).json()  # now it fits
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
        assert answer["usage"]["completion_tokens"] == 8


def test_a_streaming_client_that_leaves_frees_its_slot(tok):
    engine = FakeEngine(tok, max_concurrency=1, max_queue=0, delay=0.05)
    with running_server(create_app(lambda: (engine, tok), model_name=NAME)) as url:
        request = {"model": NAME, "prompt": "a", "max_tokens": 60, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as leaving, \
                leaving.stream("POST", "/v1/completions", json=request) as r:
            next(r.iter_lines())
        assert wait_until(lambda: engine.running == 0, timeout=10), "the slot was not freed"
        assert engine.streams[0].cancelled
        assert httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "b", "max_tokens": 2},
                          timeout=30).status_code == 200


def test_a_waiting_client_that_leaves_is_cancelled(tok):
    engine = FakeEngine(tok, max_concurrency=1, max_queue=0, delay=0.05)
    with running_server(create_app(lambda: (engine, tok), model_name=NAME)) as url:
        body = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 60}).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert wait_until(lambda: engine.running == 1)
        assert wait_until(lambda: engine.running == 0, timeout=10), "the slot was not freed"
        assert engine.streams[0].cancelled


def test_a_chunked_body_over_the_limit_is_413(server):
    client, _ = server
    port = client.base_url.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" \
               b"Transfer-Encoding: chunked\r\n\r\n"
        chunk = b"x" * 1024
        sock.sendall(head + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // 1024 + 2)))
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413")
    assert client.get("/health").status_code == 200


# ----- the malformed-request suite and schemathesis ---------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_request_gets_its_4xx_and_an_openai_error(server, case):
    client, _ = server
    if isinstance(case.body, bytes):
        response = client.request(case.method, case.path, content=case.body,
                                  headers={"Content-Type": "application/json"})
    elif case.body is None:
        response = client.request(case.method, case.path)
    else:
        response = client.request(case.method, case.path, json=case.body)
    error = _error(response, case.status)
    if case.param is not None:
        assert (error["param"] or "").startswith(case.param), error
    for text in case.says:
        assert text in error["message"], error
    assert client.get("/health").status_code == 200


def test_the_server_still_answers_after_the_suite(server):
    client, _ = server
    assert len(CASES) >= 40
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post("/v1/chat/completions", json={"model": NAME, "messages": HI}).status_code == 200


def _fuzz(operation, base: str) -> None:
    """Schema-valid and schema-violating requests to one operation; none may get a 5xx."""
    from schemathesis.generation import GenerationMode

    strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    # bounded for CI: a few dozen examples per operation, no shrinking, a fixed seed
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy, served=st.booleans())
    def check(case, served):
        if served and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = NAME  # half the cases reach the engine, not the 404
        response = case.call(base_url=base, timeout=30)
        assert response.status_code < 500, \
            f"{operation.label} {case.body!r:.600}: {response.status_code} {response.text[:300]}"

    check()


def test_schemathesis_finds_no_server_error(server):
    schemathesis = pytest.importorskip("schemathesis")
    client, _ = server
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
    for operation in operations:
        _fuzz(operation, str(client.base_url))
    assert client.get("/health").status_code == 200


def test_cors_answers_the_allowed_origins_only(tok):
    engine = FakeEngine(tok)
    allowed = "http://localhost:3000"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    with running_server(create_app(lambda: (engine, tok), model_name=NAME, cors_origins=[allowed])) as url:
        ok = httpx.options(url + "/v1/completions", headers={"Origin": allowed, **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
        other = httpx.options(url + "/v1/completions", headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        answer = httpx.post(url + "/v1/completions", headers={"Origin": allowed},
                            json={"model": NAME, "prompt": "a", "max_tokens": 2})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == allowed
    with running_server(create_app(lambda: (engine, tok), model_name=NAME)) as url:  # the default: none
        closed = httpx.options(url + "/v1/completions", headers={"Origin": allowed, **preflight})
        assert "access-control-allow-origin" not in closed.headers


def test_the_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path):
    from bitnet158.cli.serve import API_KEY_ENV, resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("s3cret\nignored\n")
    assert resolve_api_key("given", None, {}) == "given"
    assert resolve_api_key(None, str(key_file), {API_KEY_ENV: "env"}) == "s3cret"
    assert resolve_api_key(None, None, {API_KEY_ENV: "env"}) == "env"
    assert resolve_api_key(None, None, {}) is None
    (tmp_path / "empty").write_text("\n")
    for given, path, env, says in (("a", str(key_file), {}, "not both"), (None, str(tmp_path / "empty"), {}, "empty"),
                                   (None, str(tmp_path / "missing"), {}, "cannot read"),
                                   (None, None, {API_KEY_ENV: "  "}, "empty")):
        with pytest.raises(ConfigError, match=says):
            resolve_api_key(given, path, env)
