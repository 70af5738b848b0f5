"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`: its routes, the checks that run before a body is
read, and the error bodies.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `POST /v1/responses`,
`POST /v1/embeddings` (OpenAI's request and response schemas, `llmlab.serve.protocol`; `stream: true` sends
server-sent events: OpenAI's chunks ending with `data: [DONE]`, or the Responses API's typed events),
`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` (vLLM's, with `allow_adapter_loading`), `GET /health`
(liveness; the model, adapters and engine counters only for a client with the key) and `GET /` (the chat page,
`static/index.html`). The logic of each endpoint lives in its own module (`completions`, `chat`, `responses`,
`embeddings`), what they share in `server`. The request's `model` is the base model's name or a loaded adapter's.
Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 invalid parameters, 401 bad key, 403
adapter loading not enabled, 404 unknown model or route, 413 body over the size limit or prompt longer than the
context, 503 queue full (or embeddings without the retrieval extra). A client that disconnects cancels its
generation.

What runs before a request's body is read (so an oversized or unauthenticated request costs next to nothing):
Starlette's `TrustedHostMiddleware` (with `allowed_hosts`: a `Host` header naming another host, as a DNS-rebinding
page sends, is refused), its `AuthenticationMiddleware` (with an API key, a /v1 request without
`Authorization: Bearer KEY` is answered 401 from its headers alone; the key is compared in constant time), and
FastAPI's request body limit on the POST routes (`max_body_bytes`: 413 from `Content-Length` alone, or as soon as
the bytes read exceed it), in that order.
Tokenizing runs in a worker thread, so a long prompt never holds up the event loop (/health, other streams).

Extensions hook into chat completions (`ChatPlan`, `ChatExtension`: see `llmlab.serve.chat`). More routes can be
added with `app.include_router(...)` (protect them with `Depends(server.require_key)`); `app.state.server` is the
`Server` (engine, tokenizer, names, key).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection

from llmlab.errors import LLMLabError
from llmlab.serve.chat import ChatExtension, ChatPlan, ReplyStream, chat_completion
from llmlab.serve.completions import completion
from llmlab.serve.embeddings import EmbeddingModel, create_embeddings
from llmlab.serve.engine import Engine
from llmlab.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    ResponsesRequest,
    UnloadLoRAAdapterRequest,
    validation_error,
)
from llmlab.serve.responses import create_response
from llmlab.serve.server import Server
from llmlab.tokenizer import Tokenizer

__all__ = ["APIError", "ChatCompletionRequest", "ChatExtension", "ChatPlan", "CompletionRequest", "ReplyStream",
           "Server", "create_app"]

STATIC = Path(__file__).parent / "static"
MIN_BODY_BYTES = 1 << 20  # the default body limit: 1 MiB, or 16 bytes per token of context if that is more


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


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


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               extensions: Sequence[ChatExtension] = (), allowed_hosts: Sequence[str] | None = None,
               max_body_bytes: int | None = None, embeddings: EmbeddingModel | None = None,
               allow_adapter_loading: bool = False) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_name` (adapters under their own names).

    `allowed_hosts`: the host names the `Host` header may give ("*.example.com" matches subdomains; None or "*":
    any). `max_body_bytes`: the largest request body (default: 1 MiB, or 16 bytes per token of context if more).
    `embeddings`: the model `/v1/embeddings` serves (None: that route answers 404). `allow_adapter_loading`: accept
    `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (they name folders on this machine, so it needs `api_key`).
    """
    if allow_adapter_loading and not api_key:
        raise LLMLabError("--allow-adapter-loading needs an API key (--api-key or LLMLAB_API_KEY): loading names "
                          "folders on this machine, so only a client with the key may do it")
    server = Server(engine, tokenizer, model_name, api_key, extensions, embeddings, allow_adapter_loading)
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
        if embeddings is not None:  # `purpose` tells the chat page (and people) it does not chat
            data.append({"id": embeddings.name, "object": "model", "created": server.created, "owned_by": "llmlab",
                         "purpose": "embeddings"})
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=auth, max_body_size=limit)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await completion(server, body, request)

    @app.post("/v1/chat/completions", dependencies=auth, max_body_size=limit)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await chat_completion(server, body, request)

    @app.post("/v1/responses", dependencies=auth, max_body_size=limit)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        return await create_response(server, body, request)

    @app.post("/v1/embeddings", dependencies=auth, max_body_size=limit)
    async def embed(body: EmbeddingRequest) -> dict[str, Any]:
        return await create_embeddings(embeddings, body, [model_name, *server.adapters()])

    @app.post("/v1/load_lora_adapter", dependencies=auth, max_body_size=limit)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        _check_loading(server)
        if body.lora_name == model_name or (embeddings is not None and body.lora_name in embeddings.names):
            raise APIError(400, f"lora_name '{body.lora_name}' is the name of a model this server serves already",
                           param="lora_name")
        try:
            await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        except LLMLabError as e:
            taken = "is loaded already" in str(e)
            raise APIError(400, str(e), param="lora_name" if taken else "lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth, max_body_size=limit)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        _check_loading(server)
        try:
            await run_in_threadpool(engine.unload_adapter, body.lora_name)
        except LLMLabError as e:
            raise APIError(404, str(e), param="lora_name", code="model_not_found") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _check_loading(server: Server) -> None:
    if not server.allow_adapter_loading:
        raise APIError(403, "loading and unloading adapters is off on this server; start it with "
                       "--allow-adapter-loading (and an API key) to allow it", code="adapter_loading_disabled")
