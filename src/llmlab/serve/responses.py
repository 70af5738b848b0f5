"""POST /v1/responses: OpenAI's Responses API on the same engine, for one assistant message.

`input` is a string (one user message) or a list of messages (`role` user, assistant, system or developer; content a
string or `input_text` / `output_text` parts); `instructions` goes first as a system message (developer messages are
rendered as system messages too: small models' chat templates know no other); `max_output_tokens`, `temperature`,
`top_p` and `text.format` (text, `json_object`, `json_schema`: the reply then matches it, as with chat's
`response_format`) apply. The reply is one `message` output item with one `output_text` part; `status` is
"incomplete" with `incomplete_details.reason` "max_output_tokens" when the output was cut. `stream: true` sends the
typed events OpenAI sends (`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
`response.content_part.done`, `response.output_item.done`, then `response.completed` or `response.incomplete`; a
failure is `response.failed`), each as an SSE `event:` line and its JSON with a `sequence_number`.

Nothing is stored (the response says `store: false`): `previous_response_id`, `conversation` and `background` are
refused, and so are `tools` (function calling on this route: use chat completions); see docs/serve.md for the table.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from llmlab.serve.chat import json_factory, reply_schema
from llmlab.serve.protocol import APIError, ResponsesRequest
from llmlab.serve.request import GenerationRequest
from llmlab.serve.server import Choice, Run, Server, chat_ids, guarded, sse, sse_response

_REFUSED = {"previous_response_id": "nothing is stored on this server: send the whole conversation as `input`",
            "conversation": "nothing is stored on this server: send the whole conversation as `input`",
            "tools": "tools are not supported on /v1/responses; use /v1/chat/completions with tools"}


def _messages(body: ResponsesRequest) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for item in body.input:
        content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
        messages.append({"role": "system" if item.role == "developer" else item.role, "content": content})
    return messages


async def create_response(server: Server, body: ResponsesRequest, request: Request) -> Any:
    adapter = server.resolve_model(body.model)
    for name, why in _REFUSED.items():
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported: {why}", param=name)
    if body.background:
        raise APIError(400, "background is not supported: responses are answered while the request waits",
                       param="background")
    fmt = body.text.format if body.text is not None else None
    schema = reply_schema(fmt, "text.format.schema")
    factory = await run_in_threadpool(json_factory, server, schema, "text.format.schema") if schema else None
    ids = await run_in_threadpool(chat_ids, server.tokenizer, _messages(body), "input")
    max_tokens = server.budget(ids, body.max_output_tokens, "max_output_tokens", "input")
    req = GenerationRequest(ids, max_tokens, server.sampling(body.temperature, body.top_p), 1, (), adapter, factory)
    run = Run(server.engine)
    run.submit(req, 0)
    reply = _Reply(body, run, fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"})
    if body.stream:
        return sse_response(guarded(run, reply.events(), done=False))
    choice = (await run.collect(request, 1))[0]
    return reply.response(choice)


class _Reply:
    """The response object and its stream of events, for one request."""

    def __init__(self, body: ResponsesRequest, run: Run, text_format: dict[str, Any]) -> None:
        self.body, self.run, self.format = body, run, text_format
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def response(self, choice: Choice | None, status: str | None = None, error: dict | None = None) -> dict[str, Any]:
        """The response object: in progress (no `choice` yet), finished, or failed (`error`)."""
        incomplete = choice is not None and choice.reason == "length"
        status = status or ("in_progress" if choice is None else "incomplete" if incomplete else "completed")
        body = self.body
        usage = None
        if choice is not None:
            u = self.run.usage()
            usage = {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": u["total_tokens"]}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
                "output": [] if choice is None else [self.message(choice.text, "incomplete" if incomplete else
                                                                  "completed")],
                "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
                "previous_response_id": None, "reasoning": None, "store": False,
                "temperature": 1.0 if body.temperature is None else body.temperature, "text": {"format": self.format},
                "tool_choice": "auto", "tools": [], "top_p": 1.0 if body.top_p is None else body.top_p,
                "truncation": "disabled", "usage": usage, "user": body.user, "metadata": body.metadata or {}}

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, event=kind)

    async def events(self) -> AsyncIterator[str]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield self.event("response.created", response=self.response(None))
        yield self.event("response.in_progress", response=self.response(None))
        yield self.event("response.output_item.added", output_index=0, item=self.message(None, "in_progress"))
        yield self.event("response.content_part.added", **where, part=self.part(""))
        choice = Choice()
        try:
            async for ev in self.run.events():
                if ev.kind in ("delta", "finish"):
                    choice.add(ev)
                    if ev.text:
                        yield self.event("response.output_text.delta", **where, delta=ev.text, logprobs=[])
        except APIError as e:
            error = {"code": e.code or "server_error", "message": e.message}
            yield self.event("response.failed", response=self.response(None, "failed", error))
            return
        final = self.response(choice)
        item = final["output"][0]
        yield self.event("response.output_text.done", **where, text=choice.text, logprobs=[])
        yield self.event("response.content_part.done", **where, part=item["content"][0])
        yield self.event("response.output_item.done", output_index=0, item=item)
        yield self.event(f"response.{final['status']}", response=final)
