"""The API's wire format: OpenAI's request schemas with the bounds this server enforces, and OpenAI's error body.

Every request is checked here before any work is done, so bad input is a 400 naming the field, never a 500:
`seed` must fit the 64 bits a torch generator takes; text anywhere in a body must be valid Unicode (JSON allows a
lone surrogate escape such as "\\ud800", which no tokenizer can encode); assistant `tool_calls` and a named
`tool_choice` have OpenAI's shapes; stop strings are bounded in count and length (each is searched for after
every token of every choice). `validation_error` turns pydantic's report into the error body, with `param`
the path of the first bad field (`messages[0].tool_calls[0].function.arguments`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_STOPS, MAX_STOP_CHARS = 16, 100


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


class SamplingRequest(_Open):
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

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data

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
    echo: bool | None = False
    logprobs: int | None = None
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


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        """`tool_choice` as OpenAI's JSON (a string or {"type": "function", "function": {"name": ...}})."""
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, BaseModel) else choice


# -- errors ------------------------------------------------------------------------------------------------
# pydantic names the member of a union it tried in an error's location ('str', 'list[int]', 'NamedToolChoice');
# those are not fields, so `param` leaves them out
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", *(c.__name__ for c in (
    SamplingRequest, CompletionRequest, FunctionCall, ToolCall, ChatMessage, FunctionName, NamedToolChoice,
    ChatCompletionRequest))}


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
