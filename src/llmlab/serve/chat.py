"""POST /v1/chat/completions: the plan a request becomes (extensions may change it), structured replies
(`response_format`), log-probabilities, and the streamed reply.

Extensions (retrieval, tool calls, plug-ins) hook into chat completions without forking this module: pass
`extensions=[...]` to `create_app`; each has `prepare_chat(request, plan) -> ChatPlan | None`, called (in a worker
thread) before the prompt is rendered. A `ChatPlan` holds the messages to render (add retrieved context, tool
descriptions), an optional `prompt_ids` that replaces the rendering, a `logits_processor_factory` (constrained
decoding: called once per choice, see `llmlab.serve.engine`), a `finish(text) -> (message fields, finish_reason or
None)` that turns the generated text into the reply message (e.g. `{"content": None, "tool_calls": [...]}`,
"tool_calls"), a `stream` factory giving each streamed choice a `ReplyStream` that turns the text into deltas as it is
generated (without one, a streamed reply with a `finish` hook is held back and sent as one delta at the end), and
`extra` fields added to the response body (e.g. `sources`). `json_schema` is the schema `response_format` asks for
(None: free text); when no extension sets a processor, the reply is constrained to it here, and an extension that
sets one builds it in (the copilot's tool grammar does). Request models accept unknown fields (`model_extra`) and
declare `tools` and `tool_choice`; without an extension, a request with `tools` is refused (400).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from llmlab.errors import LLMLabError
from llmlab.generate import LogitsProcessor
from llmlab.serve.logprobs import chat_logprobs
from llmlab.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    JSONObjectFormat,
    JSONSchemaFormat,
    JSONSchemaResponseFormat,
)
from llmlab.serve.request import GenerationRequest, TokenLogprob
from llmlab.serve.server import Run, Server, chat_ids, guarded, sse, sse_response, wants_usage


class ReplyStream(Protocol):
    """Turns one streamed choice's text into chat deltas as it is generated."""

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas for newly generated `text` (none while it is held back)."""
        ...

    def close(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas and the choice's finish_reason, once the choice has ended with `finish_reason`."""
        ...


@dataclass(slots=True)  # slots: setting a field that does not exist (a misspelt hook) raises
class ChatPlan:
    """What a chat request becomes before generation; extensions may change any field (see the module docstring)."""

    messages: list[dict[str, Any]]
    prompt_ids: list[int] | None = None
    logits_processor_factory: Callable[[], LogitsProcessor] | None = None
    finish: Callable[[str], tuple[dict[str, Any], str | None]] | None = None
    stream: Callable[[], ReplyStream] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None


class ChatExtension(Protocol):
    def prepare_chat(self, request: ChatCompletionRequest, plan: ChatPlan) -> ChatPlan | None: ...


# -- structured replies ------------------------------------------------------------------------------------
def reply_schema(fmt: Any, param: str) -> dict[str, Any] | None:
    """The JSON schema a `response_format` (or the Responses API's `text.format`) asks for: None for text, a
    bounded object for `json_object`, the given schema (checked against the meta-schema) for `json_schema`. `param`
    names the schema's field in errors."""
    from llmlab.constrained import check_schema, json_object_schema

    if isinstance(fmt, JSONObjectFormat):
        return json_object_schema()
    if isinstance(fmt, JSONSchemaResponseFormat):
        fmt = fmt.json_schema
    if not isinstance(fmt, JSONSchemaFormat):
        return None
    if fmt.schema_ is None:
        raise APIError(400, f"{param} is required: the JSON schema the reply must match", param=param)
    try:
        check_schema(fmt.schema_, param)
    except LLMLabError as e:
        raise APIError(400, str(e), param=param) from e
    return fmt.schema_


def json_factory(server: Server, schema: dict[str, Any], param: str) -> Callable[[], LogitsProcessor]:
    """A processor factory whose choices are each one JSON value matching `schema` (compiles the grammar: call it in
    a worker thread); 400 naming `param` for a schema llguidance cannot compile."""
    from llmlab.constrained import json_processor

    try:
        processor = json_processor(server.tokenizer, schema, server.engine.model.config.vocab_size)
    except LLMLabError as e:
        raise APIError(400, f"{param}: {e}", param=param) from e
    return processor.fork  # a parser of its own for each choice


def _message_text(msg: ChatMessage, i: int) -> str | None:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content
    parts = []
    for j, part in enumerate(msg.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"message content parts of type {part.get('type')!r} are not supported (text only)",
                           param=f"messages[{i}].content[{j}]")
        parts.append(part["text"])
    return "".join(parts)


# fields OpenAI accepts that would change the reply, refused rather than ignored (docs/serve.md lists the others)
_REFUSED = {"functions": "it is the legacy form of tools; send tools",
            "function_call": "it is the legacy form of tool_choice; send tool_choice",
            "audio": "this server generates text only"}


# -- the route's logic -------------------------------------------------------------------------------------
async def chat_completion(server: Server, body: ChatCompletionRequest, request: Request) -> Any:
    adapter = server.resolve_model(body.model)
    for name, why in _REFUSED.items():
        if (body.model_extra or {}).get(name):
            raise APIError(400, f"{name} is not supported: {why}", param=name)
    n = server.choices_per_prompt(body)
    plan = ChatPlan([{**m.model_dump(exclude_none=True), "content": _message_text(m, i) or ""}
                     for i, m in enumerate(body.messages)], stop=body.stops())
    param = "response_format.json_schema.schema"
    plan.json_schema = reply_schema(body.response_format, param)
    for ext in server.extensions:
        plan = await run_in_threadpool(ext.prepare_chat, body, plan) or plan
    if body.tools and not server.extensions:
        raise APIError(400, "this server has no tool-call support (no extension loaded)", param="tools")
    if plan.logits_processor_factory is None and plan.json_schema is not None:
        plan.logits_processor_factory = await run_in_threadpool(json_factory, server, plan.json_schema, param)
    if plan.prompt_ids is None:
        plan.prompt_ids = await run_in_threadpool(chat_ids, server.tokenizer, plan.messages)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = server.budget(plan.prompt_ids, limit, name, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    req = GenerationRequest(plan.prompt_ids, max_tokens, server.sampling(body.temperature, body.top_p, body.seed), n,
                            plan.stop, adapter, plan.logits_processor_factory, logprobs=top)
    run = Run(server.engine)
    run.submit(req, 0)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model, **plan.extra}
    if body.stream:
        return sse_response(guarded(run, _chunks(server, run, {**head, "object": "chat.completion.chunk"}, body, n,
                                                 plan, top)))
    choices = []
    for i, choice in enumerate(await run.collect(request, n)):
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        reason = choice.reason
        if plan.finish is not None:
            fields, override = plan.finish(choice.text)
            message, reason = {**message, **fields}, override or reason
        choices.append({"index": i, "message": message, "logprobs": _logprobs(server, choice.logprobs, top),
                        "finish_reason": reason})
    return {**head, "choices": choices, "usage": run.usage()}


def _logprobs(server: Server, entries: list[TokenLogprob], top: int | None) -> dict[str, Any] | None:
    if top is None:
        return None
    return {"content": chat_logprobs(server.token_text, entries, top), "refusal": None}


async def _chunks(server: Server, run: Run, head: dict[str, Any], body: ChatCompletionRequest, n: int,
                  plan: ChatPlan, top: int | None) -> AsyncIterator[str]:
    """The streamed reply: per choice the role, then content (or tool-call) deltas as they are generated, then an
    empty delta with the finish_reason; token log-probabilities ride on the first chunk after their tokens."""
    pending: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> str:
        scores = None
        if top is not None and (pending[index] or reason is not None):
            scores, pending[index] = _logprobs(server, pending[index], top), []
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": scores, "finish_reason": reason}]})

    streams = [plan.stream() if plan.stream is not None else None for _ in range(n)]
    held: list[list[str]] = [[] for _ in range(n)]  # a finish hook without a stream: the reply is known at the end
    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for ev in run.events():
        if ev.kind not in ("delta", "finish"):
            continue
        i, reason = ev.index, ev.finish_reason
        pending[i] += ev.logprobs or []
        stream = streams[i]
        if stream is not None:
            deltas = stream.feed(ev.text)
            if ev.kind == "finish":
                last, reason = stream.close(reason)
                deltas += last
        elif plan.finish is not None:
            held[i].append(ev.text)
            deltas = []
            if ev.kind == "finish":
                fields, override = plan.finish("".join(held[i]))
                if fields.get("tool_calls"):  # a streamed call carries its position (OpenAI's delta format)
                    fields = {**fields, "tool_calls": [{"index": j, **c} for j, c in enumerate(fields["tool_calls"])]}
                deltas, reason = [{"content": "".join(held[i]), **fields}], override or reason
        else:
            deltas = [{"content": ev.text}] if ev.text else []
        for delta in deltas:
            yield chunk(i, delta)
        if ev.kind == "finish":
            yield chunk(i, {}, reason)
    if wants_usage(body.stream_options):
        yield sse({**head, "choices": [], "usage": run.usage()})
