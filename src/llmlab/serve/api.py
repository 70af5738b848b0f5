"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`: models, completions, chat completions, a chat page.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (OpenAI's request and response
schemas, `llmlab.serve.protocol`; `stream: true` sends server-sent events in OpenAI's chunk format ending with
`data: [DONE]`), `GET /health` (liveness; the model, adapters and engine counters only for a client with the key)
and `GET /` (the chat page, `static/index.html`). The request's `model` is the base model's name or a loaded
adapter's. Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 invalid parameters,
401 bad key, 404 unknown model or route, 413 body over the size limit or prompt longer than the context, 503 queue
full. A client that disconnects cancels its generation.

What runs before a request's body is read (so an oversized or unauthenticated request costs next to nothing):
Starlette's `TrustedHostMiddleware` (with `allowed_hosts`: a `Host` header naming another host, as a DNS-rebinding
page sends, is refused), its `AuthenticationMiddleware` (with an API key, a /v1 request without
`Authorization: Bearer KEY` is answered 401 from its headers alone; the key is compared in constant time), and
FastAPI's request body limit on the POST routes (`max_body_bytes`: 413 from `Content-Length` alone, or as soon as
the bytes read exceed it), in that order.
Tokenizing runs in a worker thread, so a long prompt never holds up the event loop (/health, other streams).

Extensions (retrieval, tool calls, plug-ins) hook into chat completions without forking this module: pass
`extensions=[...]` to `create_app`; each has `prepare_chat(request, plan) -> ChatPlan | None`, called (in a worker
thread) before the prompt is rendered. A `ChatPlan` holds the messages to render (add retrieved context, tool
descriptions), an optional `prompt_ids` that replaces the rendering, a `logits_processor_factory` (constrained
decoding: called once per choice, see `llmlab.serve.engine`), a `finish(text) -> (message fields, finish_reason or
None)` that turns the generated text into the reply message (e.g. `{"content": None, "tool_calls": [...]}`,
"tool_calls"), and `extra` fields added to the response body (e.g. `sources`). Request models accept unknown fields
(`model_extra`) and declare `tools` and `tool_choice`; without an extension, a request with `tools` is refused
(400). More routes can be added with `app.include_router(...)` (protect them with `Depends(server.require_key)`);
`app.state.server` is the `Server` (engine, tokenizer, names, key).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection

from llmlab.errors import LLMLabError
from llmlab.generate import LogitsProcessor, SamplingParams
from llmlab.serve.engine import Engine, Event, GenerationRequest, QueueFull
from llmlab.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
    validation_error,
)
from llmlab.tokenizer import Tokenizer

__all__ = ["APIError", "ChatCompletionRequest", "ChatExtension", "ChatPlan", "CompletionRequest", "Server",
           "create_app"]

STATIC = Path(__file__).parent / "static"
MIN_BODY_BYTES = 1 << 20  # the default body limit: 1 MiB, or 16 bytes per token of context if that is more


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# -- extensions --------------------------------------------------------------------------------------------
@dataclass(slots=True)  # slots: setting a field that does not exist (a misspelt hook) raises
class ChatPlan:
    """What a chat request becomes before generation; extensions may change any field (see the module docstring)."""

    messages: list[dict[str, Any]]
    prompt_ids: list[int] | None = None
    logits_processor_factory: Callable[[], LogitsProcessor] | None = None
    finish: Callable[[str], tuple[dict[str, Any], str | None]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)


class ChatExtension(Protocol):
    def prepare_chat(self, request: ChatCompletionRequest, plan: ChatPlan) -> ChatPlan | None: ...


# -- the server ----------------------------------------------------------------------------------------------
class _KeyCheck(AuthenticationBackend):
    """Starlette authentication from the headers alone: with a key, a /v1 request without it is refused here,
    before its body is read; other routes (/health, the page) stay open and learn whether the client has it."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if self.api_key is None or (scheme.lower() == "bearer" and
                                    hmac.compare_digest(token.strip().encode(), self.api_key.encode())):
            return AuthCredentials(["api"]), SimpleUser("client")
        path = conn.scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            raise AuthenticationError("Incorrect API key provided: send the server's key as "
                                      "`Authorization: Bearer KEY`")
        return None


class Server:
    """What the routes share: the engine, the tokenizer, the served model names, the key."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
                 extensions: Sequence[ChatExtension] = ()) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.extensions = api_key, list(extensions)
        self.created = int(time.time())

    def adapters(self) -> list[str]:
        return list(self.engine.adapters.names) if self.engine.adapters is not None else []

    @staticmethod
    def require_key(request: Request) -> None:
        """A route dependency: 401 unless the authentication middleware accepted the request's key."""
        if "api" not in request.auth.scopes:
            raise APIError(401, "Incorrect API key provided: send the server's key as `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    def resolve_model(self, name: str) -> str | None:
        """The adapter a `model` field names (None: the base model); 404 for names this server does not serve."""
        if name == self.model_name:
            return None
        if name in self.adapters():
            return name
        served = [self.model_name, *self.adapters()]
        raise APIError(404, f"The model '{name}' does not exist; this server serves {served}", param="model",
                       code="model_not_found")

    def budget(self, prompt_ids: list[int], max_tokens: int | None, param: str, prompt_param: str) -> int:
        """max_tokens for a prompt: 413 when the prompt leaves no room, 400 when max_tokens does not fit."""
        room = self.engine.max_seq_len - len(prompt_ids)
        if room < 1:
            raise APIError(413, f"The prompt has {len(prompt_ids)} tokens; this server's context is "
                           f"{self.engine.max_seq_len} tokens for prompt and output together", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(400, f"{param} {max_tokens} + the prompt's {len(prompt_ids)} tokens exceed this server's "
                           f"context of {self.engine.max_seq_len} tokens; ask for at most {room}", param=param,
                           code="context_length_exceeded")
        return max_tokens

    def sampling(self, body: SamplingRequest) -> SamplingParams:
        temperature = 1.0 if body.temperature is None else body.temperature
        return SamplingParams(temperature=temperature,  # below generate.GREEDY_BELOW it decodes greedily
                              top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed)

    def choices_per_prompt(self, body: SamplingRequest) -> int:
        n = body.n or 1
        if n > self.engine.max_batch:
            raise APIError(400, f"n must be at most {self.engine.max_batch} (the server's --max-batch), got {n}",
                           param="n")
        return n


class _Run:
    """The engine requests of one HTTP request, their events merged into one asyncio queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.requests: list[GenerationRequest] = []
        self.open = 0

    def submit(self, req: GenerationRequest, offset: int) -> None:
        def sink(ev: Event) -> None:
            ev.index += offset
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        req.sink = sink
        try:
            self.engine.submit(req)
        except QueueFull as e:
            self.cancel()
            raise APIError(503, str(e), type="server_error", code="queue_full") from e
        except LLMLabError as e:
            self.cancel()
            raise APIError(400, str(e)) from e
        self.requests.append(req)
        self.open += 1

    def cancel(self) -> None:
        for req in self.requests:
            self.engine.cancel(req)

    async def events(self, request: Request | None = None) -> AsyncIterator[Event]:
        """Events until every engine request is done. With `request` (non-streamed responses, which Starlette does
        not watch), polls it for a disconnect every half second and cancels the generation if the client left."""
        checked = self.loop.time()
        while self.open:
            try:
                ev: Event | None = await asyncio.wait_for(self.queue.get(), 0.5)
            except asyncio.TimeoutError:
                ev = None
            if request is not None and self.loop.time() - checked >= 0.5:
                checked = self.loop.time()
                if await request.is_disconnected():
                    self.cancel()
                    return
            if ev is None:
                continue
            if ev.kind == "done":
                self.open -= 1
            if ev.kind == "error":
                self.cancel()
                raise APIError(500, ev.message or "generation failed", type="server_error")
            yield ev

    def usage(self) -> dict[str, int]:
        prompt = sum(len(r.prompt_ids) for r in self.requests)
        completion = sum(r.completion_tokens for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _message_text(msg: ChatMessage) -> str | None:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content
    parts = []
    for part in msg.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"message content parts of type {part.get('type')!r} are not supported (text only)",
                           param="messages")
        parts.append(part["text"])
    return "".join(parts)


# -- routes ------------------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               extensions: Sequence[ChatExtension] = (), allowed_hosts: Sequence[str] | None = None,
               max_body_bytes: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_name` (adapters under their own names).

    `allowed_hosts`: the host names the `Host` header may give ("*.example.com" matches subdomains; None or "*":
    any). `max_body_bytes`: the largest request body (default: 1 MiB, or 16 bytes per token of context if more)."""
    server = Server(engine, tokenizer, model_name, api_key, extensions)
    limit = max(MIN_BODY_BYTES, 16 * engine.max_seq_len) if max_body_bytes is None else max_body_bytes
    app = FastAPI(title="llmlab", summary="OpenAI-compatible API of an llmlab model")
    app.state.server = server
    app.add_middleware(AuthenticationMiddleware, backend=_KeyCheck(api_key), on_error=lambda conn, exc:
                       _error_response(APIError(401, str(exc), code="invalid_api_key")))
    if allowed_hosts is not None and "*" not in allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))  # outermost: runs first

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return _error_response(APIError(413, f"The request body is larger than this server's limit of {limit} "
                                            "bytes", code="request_too_large"))
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    auth = [Depends(server.require_key)]

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if "api" not in request.auth.scopes:  # liveness for anyone; what is served and how busy, for key holders
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "adapters": server.adapters(), **engine.status()}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        data = [{"id": model_name, "object": "model", "created": server.created, "owned_by": "llmlab"}]
        data += [{"id": a, "object": "model", "created": server.created, "owned_by": "llmlab", "parent": model_name,
                  "root": model_name} for a in server.adapters()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=auth, max_body_size=limit)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        adapter = server.resolve_model(body.model)
        for name in ("logprobs", "best_of", "suffix"):
            if getattr(body, name) is not None and not (name == "best_of" and body.best_of == 1):
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if body.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        n = server.choices_per_prompt(body)
        sampling, stops = server.sampling(body), body.stops()
        prompts = await run_in_threadpool(_prompt_ids, tokenizer, body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        reqs = [GenerationRequest(ids, server.budget(ids, max_tokens, "max_tokens", "prompt"), sampling, n, stops,
                                  adapter) for ids in prompts]
        run = _Run(engine)
        for i, req in enumerate(reqs):
            run.submit(req, i * n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        if body.stream:
            return _stream(run, head, body, lambda ev: {"index": ev.index, "text": ev.text, "logprobs": None,
                                                                  "finish_reason": ev.finish_reason})
        texts, reasons = await _collect(run, request, len(reqs) * n)
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": run.usage()}

    @app.post("/v1/chat/completions", dependencies=auth, max_body_size=limit)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        adapter = server.resolve_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs is not supported by this server", param="logprobs")
        n = server.choices_per_prompt(body)
        plan = ChatPlan([{**m.model_dump(exclude_none=True), "content": _message_text(m) or ""}
                         for m in body.messages], stop=body.stops())
        for ext in server.extensions:
            plan = await run_in_threadpool(ext.prepare_chat, body, plan) or plan
        if body.tools and not server.extensions:
            raise APIError(400, "this server has no tool-call support (no extension loaded)", param="tools")
        if plan.prompt_ids is None:
            plan.prompt_ids = await run_in_threadpool(_chat_ids, tokenizer, plan.messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = server.budget(plan.prompt_ids, limit, param, "messages")
        req = GenerationRequest(plan.prompt_ids, max_tokens, server.sampling(body), n, plan.stop, adapter,
                                plan.logits_processor_factory)
        run = _Run(engine)
        run.submit(req, 0)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": body.model, **plan.extra}
        if body.stream:
            return _stream_chat(run, {**head, "object": "chat.completion.chunk"}, body, n, plan)
        texts, reasons = await _collect(run, request, n)
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if plan.finish is not None:
                fields, override = plan.finish(text)
                message, reason = {**message, **fields}, override or reason
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason})
        return {**head, "choices": choices, "usage": run.usage()}

    return app


def _chat_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt of a chat request: its messages through the chat template (message text stays text)."""
    if not tokenizer.chat_template:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        return tokenizer.encode_chat(messages)
    except LLMLabError as e:
        raise APIError(400, str(e), param="messages") from e


def _prompt_ids(tokenizer: Tokenizer, prompt: Any) -> list[list[int]]:
    """The token ids of each prompt of a completions request (a string, strings, ids or lists of ids)."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, token ids or a list of token-id lists",
                       param="prompt")
    for p in prompts:
        if not p:
            raise APIError(400, "prompt is empty (0 tokens)", param="prompt")
        if any(not 0 <= t < tokenizer.vocab_size for t in p):
            raise APIError(400, f"prompt has token ids outside the vocabulary of {tokenizer.vocab_size}",
                           param="prompt")
    return prompts


async def _collect(run: _Run, request: Request, count: int) -> tuple[list[str], list[str | None]]:
    texts: list[list[str]] = [[] for _ in range(count)]
    reasons: list[str | None] = [None] * count
    async for ev in run.events(request):
        if ev.kind in ("delta", "finish"):
            texts[ev.index].append(ev.text)
            if ev.kind == "finish":
                reasons[ev.index] = ev.finish_reason
    return ["".join(t) for t in texts], reasons


def _wants_usage(body: SamplingRequest) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def _sse_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _guarded(run: _Run, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE chunks, an error chunk if generation fails, then [DONE]; the engine stops if the client leaves."""
    finished = False
    try:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            yield _sse(e.body())
        yield _sse("[DONE]")
        finished = True
    finally:
        if not finished:  # cancelled (client disconnect) or closed early
            run.cancel()


def _stream(run: _Run, head: dict[str, Any], body: SamplingRequest,
            choice: Callable[[Event], dict[str, Any]]) -> StreamingResponse:
    async def chunks() -> AsyncIterator[str]:
        async for ev in run.events():
            if ev.kind in ("delta", "finish"):
                yield _sse({**head, "choices": [choice(ev)]})
        if _wants_usage(body):
            yield _sse({**head, "choices": [], "usage": run.usage()})

    return _sse_response(_guarded(run, chunks()))


def _stream_chat(run: _Run, head: dict[str, Any], body: ChatCompletionRequest, n: int,
                 plan: ChatPlan) -> StreamingResponse:
    def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]})

    async def chunks() -> AsyncIterator[str]:
        held: list[list[str]] = [[] for _ in range(n)]  # with a finish hook the reply is only known at the end
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in run.events():
            if ev.kind not in ("delta", "finish"):
                continue
            reason = ev.finish_reason
            if plan.finish is not None:
                held[ev.index].append(ev.text)
                if ev.kind == "finish":
                    fields, override = plan.finish("".join(held[ev.index]))
                    if fields.get("tool_calls"):  # a streamed call carries its position (OpenAI's delta format)
                        calls = [{"index": j, **c} for j, c in enumerate(fields["tool_calls"])]
                        fields = {**fields, "tool_calls": calls}
                    yield chunk(ev.index, {"content": "".join(held[ev.index]), **fields})
                    yield chunk(ev.index, {}, override or reason)
                continue
            if ev.text:
                yield chunk(ev.index, {"content": ev.text})
            if ev.kind == "finish":
                yield chunk(ev.index, {}, reason)
        if _wants_usage(body):
            yield _sse({**head, "choices": [], "usage": run.usage()})

    return _sse_response(_guarded(run, chunks()))
