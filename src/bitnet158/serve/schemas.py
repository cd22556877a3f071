"""The OpenAI-compatible bodies: requests as pydantic v2 models (what FastAPI validates and what the
OpenAPI schema shows), responses as models for the schema only (the handlers build plain dicts,
which is cheaper per streamed chunk than validating a model each time).

Requests are strict: OpenAI answers 400 for "0.5" where a number belongs or 1 where a boolean
belongs, and lax coercion would accept them silently. Unknown fields are ignored, so a client that
sends newer options (tools, ...) still gets an answer; `response_format` is honoured (structured
output), never ignored: a client that asks for JSON must get JSON or a 400. `null` means "the default"
for every optional field, as some clients send every field they know. Ranges are OpenAI's; top_k,
min_p and repetition_penalty are extensions (repetition_penalty kept within [0.01, 100], where
logits / penalty stays finite in float32).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from ..logprobs import MAX_LOGPROBS
from ..sampling import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES
from ..structured import Grammar

MAX_STOP = 4            # OpenAI's limit on stop sequences
MAX_INT = 2**31 - 1     # token counts beyond this cannot fit any context; refusing them keeps ints small
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator's seed can hold
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_PROMPTS = 64        # prompts in one /v1/completions batch
MAX_TOOLS = 128         # OpenAI's limit on functions in one request

StopText = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; the JSON field is still "schema"
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="absent: any JSON value")
    strict: bool | None = Field(None, description="the output always matches the schema, whatever this says")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object (name and schema)")
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "json_object":
            return Grammar.json_object()
        if self.type == "json_schema" and self.json_schema is not None:
            schema = self.json_schema.schema_
            return Grammar.json_schema(True if schema is None else schema)
        return None


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for the system role; the API maps it to "system"
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="which call a tool message answers")


FunctionName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class FunctionDefinition(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = Field(None, description="forced calls always match `parameters`, whatever this says")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class _GenerationFields(_Strict):
    """What chat and text completions share."""
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT, description="extension: 0 disables")
    min_p: float | None = Field(None, ge=0, le=1, description="extension: 0 disables")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # bounded so logits / penalty stays far inside float32 (a penalty near 0 overflows to inf)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                             description="extension: 1 disables")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS_ENTRIES, description="token id (as a string) → bias added to its logit")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    n: int | None = Field(1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: structured output")
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int:
        if n not in (None, 1):
            raise ValueError(f"must be 1 (this server generates one choice per request), got {n}")
        return 1

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()) or len(key) > 10:
                raise ValueError(f"keys must be token ids (non-negative integers), got {key[:20]!r}")
        return bias

    def bias_by_id(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def grammar(self) -> Grammar | None:
        return self.response_format.grammar() if self.response_format else None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="required or a named function: the answer is a call, its arguments matching the schema")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (forced calls are one anyway)")

    @model_validator(mode="after")
    def _tools_agree(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two functions share a name")
        choice = self.tool_choice
        if choice == "required" and not names:
            raise ValueError("tool_choice: required needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: {choice.function.name!r} is not one of the tools")
        if self.forced_tools() and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: a forced tool call already decides the answer's format")
        return self

    def active_tools(self) -> list[Tool]:
        """The tools the model is shown: all of them unless tool_choice is none."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    def forced_tools(self) -> list[Tool]:
        """The tools one of which the answer must call: the named one, all for required, none otherwise."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == choice.function.name]
        return list(self.tools or []) if choice == "required" else []

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        # OpenAI refuses alternatives without logprobs; 0 or null is what some clients always send
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return top


class CompletionRequest(_GenerationFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description=f"text or token ids; a list of texts or of id lists is a batch of up to {MAX_PROMPTS} "
                    f"prompts, answered with a choice each")
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=1, le=MAX_INT)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="the chosen token's logprob and this many alternatives")
    echo: bool | None = False
    best_of: int | None = Field(None, description="only 1 is supported")
    suffix: str | None = Field(None, description="not supported (insertion)")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> Any:
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise ValueError("is empty: give text or at least one token id")
        if isinstance(prompt[0], (str, list)):
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request")
            if any(isinstance(p, list) and not p for p in prompt):
                raise ValueError("holds an empty list of token ids: give at least one id per prompt")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The batch: one text or id list per choice (a lone prompt is a batch of one)."""
        if isinstance(self.prompt, str) or not isinstance(self.prompt[0], (str, list)):
            return [self.prompt]
        return list(self.prompt)

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError(f"must be 1 (this server generates one choice), got {best_of}")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("is not supported (insertion)")
        return suffix


# ----- responses (for the OpenAPI schema) ----------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys were already cached (not prefilled again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    """The whole answer; with `stream` the body is server-sent events instead: `data: {chunk}`
    lines of object "chat.completion.chunk" (choices[0].delta: role first, then content) and a
    final `data: [DONE]`."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """The whole answer; with `stream` the body is server-sent events of the same object (each
    choice's text is the new piece) and a final `data: [DONE]`."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenizeRequest(_Strict):
    """Text (`prompt`) or a conversation (`messages`, rendered with the chat template) → token ids,
    exactly as the completions endpoints encode them (vLLM's extension)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, description="rendered with messages, as chat does")
    add_generation_prompt: bool | None = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=MAX_INT)


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class Text(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    message: str | None = None
