"""The malformed-request suite of test_serve_api: each case a request a client might get wrong and
the status (and OpenAI `param`, and words of the message) it must get back. None of them may
answer 5xx or leave the server unhealthy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LIMIT = 16384  # the test server's body limit, bytes
MODEL = "fake"
DROP = object()  # a key to leave out of the base request
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any                   # a dict (sent as JSON), raw bytes, or None (no body)
    status: int = 400
    param: str | None = None    # OpenAI's `param` must start with this
    says: tuple[str, ...] = ()  # words the message must contain
    method: str = "POST"


def chat(**changes: Any) -> dict[str, Any]:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return {k: v for k, v in {**base, **changes}.items() if v is not DROP}


def completion(**changes: Any) -> dict[str, Any]:
    base = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    return {k: v for k, v in {**base, **changes}.items() if v is not DROP}


def message(**changes: Any) -> dict[str, Any]:
    return chat(messages=[{k: v for k, v in {"role": "user", "content": "hi", **changes}.items() if v is not DROP}])


LONG = "lorem ipsum dolor sit amet " * 40  # far past the fake engine's 64-token context

CASES = [
    # the body itself
    Case("malformed-json", CHAT, b'{"model": "fake", "messages": [', says=("malformed JSON",)),
    Case("json-array", CHAT, b"[]", says=("JSON object",)),
    Case("json-string", CHAT, b'"hello"'),
    Case("empty-body", CHAT, b""),
    Case("not-utf8", CHAT, b'\xff\xfe{"model"'),
    Case("nested-too-deep", CHAT, b"[" * 12000),
    Case("nan-temperature", CHAT, b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], '
                                  b'"temperature": NaN}', param="temperature"),
    Case("body-over-limit", CHAT, b'{"model": "' + b"x" * (LIMIT + 10) + b'"}', status=413, says=("16384",)),
    # messages
    Case("missing-messages", CHAT, chat(messages=DROP), param="messages"),
    Case("empty-messages", CHAT, chat(messages=[]), param="messages"),
    Case("messages-string", CHAT, chat(messages="hi"), param="messages"),
    Case("message-not-object", CHAT, chat(messages=["hi"]), param="messages[0]"),
    Case("missing-role", CHAT, message(role=DROP), param="messages[0].role"),
    Case("unknown-role", CHAT, message(role="wizard"), param="messages[0].role"),
    Case("content-number", CHAT, message(content=42), param="messages[0].content"),
    Case("content-image-part", CHAT, message(content=[{"type": "image_url", "image_url": {"url": "x"}}]),
         param="messages[0].content"),
    Case("chat-prompt-too-long", CHAT, message(content=LONG), param="messages", says=("n_prompt_tokens", "n_ctx=64")),
    # model
    Case("missing-model", CHAT, chat(model=DROP), param="model"),
    Case("model-not-string", CHAT, chat(model=7), param="model"),
    Case("unknown-model", CHAT, chat(model="gpt-17"), status=404, param="model", says=("gpt-17",)),
    # sampling
    Case("temperature-string", CHAT, chat(temperature="hot"), param="temperature"),
    Case("temperature-negative", CHAT, chat(temperature=-0.1), param="temperature"),
    Case("temperature-above-2", CHAT, chat(temperature=2.5), param="temperature"),
    Case("top-p-zero", CHAT, chat(top_p=0), param="top_p"),
    Case("top-p-above-1", CHAT, chat(top_p=1.5), param="top_p"),
    Case("top-k-negative", CHAT, chat(top_k=-1), param="top_k"),
    Case("top-k-fraction", CHAT, chat(top_k=1.5), param="top_k"),
    Case("min-p-above-1", CHAT, chat(min_p=1.5), param="min_p"),
    Case("presence-above-2", CHAT, chat(presence_penalty=3), param="presence_penalty"),
    Case("frequency-below-minus-2", CHAT, chat(frequency_penalty=-3), param="frequency_penalty"),
    Case("repetition-penalty-zero", CHAT, chat(repetition_penalty=0), param="repetition_penalty"),
    Case("repetition-penalty-tiny", CHAT, chat(repetition_penalty=1e-300), param="repetition_penalty"),
    Case("seed-string", CHAT, chat(seed="42"), param="seed"),
    Case("seed-past-64-bits", CHAT, chat(seed=2**70), param="seed"),
    Case("logit-bias-word-key", CHAT, chat(logit_bias={"hello": 5}), param="logit_bias", says=("token ids",)),
    Case("logit-bias-negative-id", COMPLETIONS, completion(logit_bias={"-3": 5}), param="logit_bias"),
    Case("logit-bias-over-100", CHAT, chat(logit_bias={"3": 100.5}), param="logit_bias"),
    Case("logit-bias-string-value", CHAT, chat(logit_bias={"3": "5"}), param="logit_bias"),
    Case("logit-bias-a-list", CHAT, chat(logit_bias=[3, 5]), param="logit_bias"),
    Case("response-format-unknown-type", CHAT, chat(response_format={"type": "yaml"}), param="response_format"),
    Case("response-format-a-string", COMPLETIONS, completion(response_format="json"), param="response_format"),
    Case("json-schema-format-without-schema-object", CHAT, chat(response_format={"type": "json_schema"}),
         param="response_format", says=("json_schema object",)),
    Case("json-schema-invalid", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}),
        param="response_format", says=("grammar is invalid",)),
    Case("json-schema-unsupported-keyword", COMPLETIONS, completion(response_format={"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"not": {"type": "string"}}}}), param="response_format", says=("not",)),
    Case("tool-choice-required-without-tools", CHAT, chat(tool_choice="required"), says=("needs tools",)),
    Case("tool-choice-names-a-missing-tool", CHAT, chat(tools=[{"type": "function", "function": {"name": "a"}}],
                                                       tool_choice={"type": "function", "function": {"name": "b"}}),
         says=("not one of the tools",)),
    Case("tools-not-a-list", CHAT, chat(tools={"type": "function"}), param="tools"),
    Case("tool-of-unknown-type", CHAT, chat(tools=[{"type": "retrieval", "function": {"name": "a"}}]), param="tools"),
    Case("tool-choice-unknown-word", CHAT, chat(tools=[{"type": "function", "function": {"name": "a"}}],
                                                tool_choice="always"), param="tool_choice"),
    Case("json-schema-name-with-spaces", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "my reply", "schema": {}}}), param="response_format"),
    Case("logit-bias-301-tokens", COMPLETIONS, completion(logit_bias={str(i): 1 for i in range(301)}),
         param="logit_bias"),
    Case("logit-bias-outside-vocabulary", CHAT, chat(logit_bias={"999999": -100}), param="logit_bias",
         says=("outside the vocabulary",)),
    # lengths and choices
    Case("max-tokens-zero", CHAT, chat(max_tokens=0), param="max_tokens"),
    Case("max-tokens-negative", CHAT, chat(max_tokens=-5), param="max_tokens"),
    Case("max-tokens-string", CHAT, chat(max_tokens="10"), param="max_tokens"),
    Case("max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), param="max_completion_tokens"),
    Case("n-two", CHAT, chat(n=2), param="n", says=("must be 1",)),
    Case("n-zero", CHAT, chat(n=0), param="n"),
    # stop, stream, logprobs
    Case("five-stops", CHAT, chat(stop=["a", "b", "c", "d", "e"]), param="stop"),
    Case("stop-number", CHAT, chat(stop=5), param="stop"),
    Case("stop-empty-string", CHAT, chat(stop=[""]), param="stop"),
    Case("stream-string", CHAT, chat(stream="yes"), param="stream"),
    Case("stream-options-list", CHAT, chat(stream=True, stream_options=[1]), param="stream_options"),
    Case("chat-logprobs-number", CHAT, chat(logprobs=5), param="logprobs"),
    Case("top-logprobs-21", CHAT, chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    Case("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=3), param="top_logprobs"),
    # text completions
    Case("missing-prompt", COMPLETIONS, completion(prompt=DROP), param="prompt"),
    Case("prompt-number", COMPLETIONS, completion(prompt=3.5), param="prompt"),
    Case("tokenize-nothing", "/tokenize", {}, says=("either prompt or messages",)),
    Case("tokenize-both", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "hi"}]},
         says=("either prompt or messages",)),
    Case("tokenize-unknown-model", "/tokenize", {"model": "nope", "prompt": "a"}, status=404, param="model"),
    Case("detokenize-outside-vocabulary", "/detokenize", {"tokens": [10**6]}, param="tokens",
         says=("outside the vocabulary",)),
    Case("detokenize-negative-id", "/detokenize", {"tokens": [-1]}, param="tokens"),
    Case("detokenize-text", "/detokenize", {"tokens": "hello"}, param="tokens"),
    Case("65-prompts", COMPLETIONS, completion(prompt=["a"] * 65), param="prompt", says=("at most 64",)),
    Case("more-prompts-than-slots-and-queue", COMPLETIONS, completion(prompt=["a"] * 9), param="prompt",
         says=("at most", "--max-queue")),
    Case("a-batch-with-an-empty-id-list", COMPLETIONS, completion(prompt=[[1, 2], []]), param="prompt"),
    Case("prompt-empty-list", COMPLETIONS, completion(prompt=[]), param="prompt"),
    Case("prompt-negative-id", COMPLETIONS, completion(prompt=[1, -2]), param="prompt"),
    Case("prompt-id-outside-vocab", COMPLETIONS, completion(prompt=[99999]), param="prompt", says=("vocabulary",)),
    Case("completion-prompt-too-long", COMPLETIONS, completion(prompt=LONG), param="prompt",
         says=("n_prompt_tokens", "n_ctx=64")),
    Case("completion-logprobs-21", COMPLETIONS, completion(logprobs=21), param="logprobs"),
    Case("completion-logprobs-bool", COMPLETIONS, completion(logprobs=True), param="logprobs"),
    Case("echo-string", COMPLETIONS, completion(echo="yes"), param="echo"),
    Case("completion-n-three", COMPLETIONS, completion(n=3), param="n"),
    Case("best-of-two", COMPLETIONS, completion(best_of=2), param="best_of"),
    Case("suffix", COMPLETIONS, completion(suffix="end"), param="suffix"),
    Case("completion-unknown-model", COMPLETIONS, completion(model="other"), status=404, param="model"),
    # paths and methods
    Case("unknown-path", "/v1/nothing", completion(), status=404),
    Case("unknown-model-card", "/v1/models/other", None, status=404, method="GET"),
    Case("get-on-a-post-route", COMPLETIONS, None, status=405, method="GET"),
]
