"""The API's wire format: OpenAI's request schemas with the bounds this server enforces, and OpenAI's error body.

Every request is checked here before any work is done, so bad input is a 400 naming the field, never a 500:
`seed` must fit the 64 bits a torch generator takes; text anywhere in a body must be valid Unicode (JSON allows a
lone surrogate escape such as "\\ud800", which no tokenizer can encode); assistant `tool_calls` and a named
`tool_choice` have OpenAI's shapes; stop strings are bounded in count and length (each is searched for after
every token of every choice); `logprobs` and `top_logprobs` ask for at most 20 alternatives; `response_format` is one
of OpenAI's three shapes; embedding inputs are bounded in count; an adapter's name and path are bounded and a path
holds no control characters. `validation_error` turns pydantic's report into the error body, with `param` the path
of the first bad field (`messages[0].tool_calls[0].function.arguments`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_STOPS, MAX_STOP_CHARS = 16, 100
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; its completions stop at 5)
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


class APIError(Exception):
    """An error answered with OpenAI's error body and `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request schemas ---------------------------------------------------------------------------------------
def _path(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if i else str(p) for i, p in enumerate(parts))


def _check_unicode(body: Any) -> None:
    """Raise for the first string (key or value) in `body` that cannot be encoded as UTF-8 (iterative: JSON may
    nest as deep as the parser allows)."""
    todo: list[tuple[Any, list[str | int]]] = [(body, [])]
    while todo:
        value, parts = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                where = _path(parts) or "the request"
                raise PydanticCustomError(
                    "invalid_unicode", "{where}: the text holds a lone surrogate (e.g. \\ud800), which is not valid "
                    "Unicode", {"where": where, "param": _path(parts)}) from None
        elif isinstance(value, dict):
            for k, v in value.items():
                todo += [(k, parts), (v, [*parts, k] if isinstance(k, str) else parts)]
        elif isinstance(value, list):
            todo += [(v, [*parts, i]) for i, v in enumerate(value)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted (extensions read model_extra)


class _Request(_Open):
    """A request body: its text must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class SamplingRequest(_Request):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise PydanticCustomError("stop", "at most {most} stop strings, got {got}",
                                      {"most": MAX_STOPS, "got": len(stops)})
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise PydanticCustomError("stop", "stop strings must have 1 to {most} characters",
                                      {"most": MAX_STOP_CHARS})
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt (lm-evaluation-harness)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class FunctionCall(_Open):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Open):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Open):
    type: Literal["text"]


class JSONObjectFormat(_Open):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Open):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


def _format_union(*models: type[BaseModel]) -> Any:
    """A union of formats chosen by their `type` (an unknown type is one clear error, not one per member)."""
    tags = {m.model_fields["type"].annotation.__args__[0]: m.__name__ for m in models}

    def tag(value: Any) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else None
        return tags.get(kind) if isinstance(kind, str) else None  # a list or dict there is no member (and unhashable)

    members = tuple(Annotated[m, Tag(m.__name__)] for m in models)
    return Annotated[Union[members], Discriminator(  # noqa: UP007 - a tuple of members needs Union[...]
        tag, custom_error_type="format_type",
        custom_error_message=f"type must be one of {', '.join(repr(t) for t in tags)}")]


ResponseFormat = _format_union(TextFormat, JSONObjectFormat, JSONSchemaResponseFormat)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs: logprobs must be true when top_logprobs is set",
                                      {"param": "top_logprobs"})
        return self

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        """`tool_choice` as OpenAI's JSON (a string or {"type": "function", "function": {"name": ...}})."""
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, BaseModel) else choice


# -- the Responses API -------------------------------------------------------------------------------------
class InputText(_Open):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]


class TextFormatJSONSchema(JSONSchemaFormat):
    type: Literal["json_schema"]


class TextConfig(_Open):
    format: _format_union(TextFormat, JSONObjectFormat, TextFormatJSONSchema) | None = None  # type: ignore[valid-type]


class ResponsesRequest(_Request):
    """POST /v1/responses: text or messages in, one message out (see docs/serve.md for what is not supported)."""

    model: str
    input: str | list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None


# -- embeddings and adapters -------------------------------------------------------------------------------
class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_EMBEDDING_INPUTS:
            raise PydanticCustomError("input", "input holds {got} items; send 1 to {most}",
                                      {"got": len(value), "most": MAX_EMBEDDING_INPUTS})
        return value


_NAME = r"^[A-Za-z0-9_.:@+/-]{1,128}$"


class LoadLoRAAdapterRequest(_Request):
    """POST /v1/load_lora_adapter (vLLM's shape): serve the adapter folder `lora_path` as model `lora_name`."""

    lora_name: str = Field(pattern=_NAME)
    lora_path: str = Field(min_length=1, max_length=4096)

    @field_validator("lora_path")
    @classmethod
    def _plain_path(cls, path: str) -> str:
        if re.search(r"[\x00-\x1f\x7f]", path):
            raise PydanticCustomError("lora_path", "lora_path must not hold control characters")
        return path


class UnloadLoRAAdapterRequest(_Request):
    """POST /v1/unload_lora_adapter (vLLM's shape; its `lora_int_id` is accepted and not needed)."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None


# -- errors ------------------------------------------------------------------------------------------------
# pydantic names the member of a union it tried in an error's location ('str', 'list[int]', 'NamedToolChoice');
# those are not fields, so `param` leaves them out
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none",
               *(c.__name__ for c in (SamplingRequest, CompletionRequest, FunctionCall, ToolCall, ChatMessage,
                                      FunctionName, NamedToolChoice, ChatCompletionRequest, InputText, InputMessage,
                                      TextFormat, JSONObjectFormat, JSONSchemaResponseFormat, TextFormatJSONSchema))}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc[1:] if isinstance(p, int) or (p not in _UNION_TAGS and re.fullmatch(r"[\w$-]+", p))]
    return _path(parts)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for a body that fails validation (FastAPI's `RequestValidationError.errors()`): the first bad field;
    for a union, the member that got furthest (the one the client meant)."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first["type"] == "json_invalid":
        where = f" (at character {first['loc'][1]})" if len(first["loc"]) > 1 else ""
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON{where}: {detail}".rstrip(": "))
    if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
        return APIError(400, "The request has no body; send a JSON object")
    top = first["loc"][:2]
    err = max((e for e in errors if e["loc"][:2] == top), key=lambda e: len(e["loc"]))
    ctx = err.get("ctx") or {}
    param = ctx["param"] if "param" in ctx else _field_path(err["loc"])  # ours name the field themselves
    message = err["msg"] if "param" in ctx or not param else f"{param}: {err['msg']}"
    return APIError(400, message, param=param or None)
