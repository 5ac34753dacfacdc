"""The request bodies of the OpenAI API this endpoint accepts, and OpenAI's error format.

Every model forbids unknown fields, so a field this server does not know is a 400 naming it (OpenAI's own wording,
"Unrecognized request argument supplied"). Fields OpenAI defines that this server cannot honour are known here only
to be refused unless they carry their neutral value (``n`` 1, ``logprobs`` null/false, ...), so a client that sets
them learns it instead of getting a silently different answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

UINT64_MAX = (1 << 64) - 1
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind or {400: "invalid_request_error", 404: "invalid_request_error"}.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def unsupported(field: str, why: str = "") -> APIError:
    return APIError(f"{field} is not supported by this server{': ' + why if why else ''}", param=field,
                    code="unsupported_parameter")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; nothing to do here
    # Known to OpenAI, refused unless neutral (checked in `check_fields`).
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def check_fields(self) -> None:
        """What field types cannot say: combinations, and OpenAI fields this server refuses unless neutral."""
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")
        if self.n not in (None, 1):
            raise unsupported("n", "one choice per request (n=1)")
        if self.logit_bias:
            raise unsupported("logit_bias")
        if self.logprobs not in (None, False, 0):
            raise unsupported("logprobs", "the TensorRT-LLM llmapi model returns no token log-probabilities")
        if self.top_logprobs:
            raise unsupported("top_logprobs")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def check_fields(self) -> None:
        super().check_fields()
        if self.best_of not in (None, 1):
            raise unsupported("best_of")
        if self.suffix:
            raise unsupported("suffix", "DeepSeek-V3.2 has no fill-in-the-middle encoding")

    def prompt_text(self) -> str:
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise APIError("prompt must not be empty", param="prompt")
            return p
        if p and all(isinstance(x, str) for x in p):
            raise unsupported("prompt", "one prompt per request")
        raise unsupported("prompt", "token-id prompts (the model takes text)")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallItem(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # DeepSeek's field for an assistant turn's thinking
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def as_encoding_input(self) -> dict[str, Any]:
        """The message as the chat encoding takes it (text parts joined; OpenAI's tool-call shape kept)."""
        if self.name:
            raise unsupported("messages.name", "DeepSeek-V3.2's encoding has no participant names")
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatTemplateKwargs(_Strict):
    """The switch vLLM and trtllm-serve use for DeepSeek-V3.2's thinking mode (both spellings)."""

    thinking: bool | None = None
    enable_thinking: bool | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    reasoning_effort: str | None = None

    def check_fields(self) -> None:
        super().check_fields()
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            raise unsupported("tool_choice", "only \"auto\" and \"none\" (no constrained decoding)")
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported("response_format", "only {\"type\": \"text\"} (no constrained decoding)")
        if self.reasoning_effort is not None:
            raise unsupported("reasoning_effort", "use chat_template_kwargs.thinking for DeepSeek-V3.2")

    @property
    def thinking(self) -> bool:
        k = self.chat_template_kwargs
        return bool(k and (k.thinking or k.enable_thinking))

    @property
    def tool_list(self) -> list[dict[str, Any]]:
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, as OpenAI words it, naming the field (``messages[0].content``)."""
    err = exc.errors()[0]
    # A union's branch (``str``, ``list[str]``, ``function-after[...]``) in the location names no field.
    loc = [p for p in err.get("loc", ()) if isinstance(p, int) or not (p in _TYPE_NAMES or "[" in p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if err.get("type") == "extra_forbidden":
        return APIError(f"Unrecognized request argument supplied: {param}", param=param)
    if err.get("type") == "missing":
        return APIError(f"Missing required parameter: '{param}'.", param=param)
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(f"Invalid value for '{param}': {message}", param=param or None)
