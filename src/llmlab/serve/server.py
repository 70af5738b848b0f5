"""What every route of the API shares: the `Server` (engine, tokenizer, names, key, options), `Run` (one HTTP
request's engine requests and their events), prompt encoding, and server-sent events.

The routes themselves are in `llmlab.serve.api`; the logic of each endpoint in its own module (`completions`,
`chat`, `responses`, `embeddings`), the way vLLM's entrypoints separate schemas, logic and routes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from functools import cached_property
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmlab.errors import LLMLabError
from llmlab.generate import SamplingParams
from llmlab.serve.engine import Engine
from llmlab.serve.protocol import APIError, SamplingRequest
from llmlab.serve.request import Event, GenerationRequest, QueueFull
from llmlab.tokenizer import Tokenizer


class Server:
    """What the routes share: the engine, the tokenizer, the served model names, the key, the options."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
                 extensions: Sequence[Any] = (), embeddings: Any = None, allow_adapter_loading: bool = False) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.extensions = api_key, list(extensions)
        self.embeddings = embeddings  # an llmlab.serve.embeddings.EmbeddingModel or None
        self.allow_adapter_loading = allow_adapter_loading
        self.created = int(time.time())

    def adapters(self) -> list[str]:
        return self.engine.adapter_names()

    @cached_property
    def token_text(self) -> Any:
        """Token ids -> bytes and text, for log-probabilities (`llmlab.serve.logprobs.TokenText`)."""
        from llmlab.serve.logprobs import TokenText

        return TokenText(self.tokenizer)

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
        if self.embeddings is not None and name in self.embeddings.names:
            raise APIError(400, f"'{name}' is an embedding model: use /v1/embeddings; this route serves {served}",
                           param="model", code="model_not_found")
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

    @staticmethod
    def sampling(temperature: float | None, top_p: float | None, seed: int | None = None) -> SamplingParams:
        return SamplingParams(temperature=1.0 if temperature is None else temperature,  # below generate.GREEDY_BELOW
                              top_p=1.0 if top_p is None else top_p, seed=seed)  # it decodes greedily

    def choices_per_prompt(self, body: SamplingRequest) -> int:
        n = body.n or 1
        if n > self.engine.max_batch:
            raise APIError(400, f"n must be at most {self.engine.max_batch} (the server's --max-batch), got {n}",
                           param="n")
        return n


class Run:
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

    async def collect(self, request: Request, count: int) -> list[Choice]:
        """Wait for every choice (non-streamed responses)."""
        choices = [Choice() for _ in range(count)]
        async for ev in self.events(request):
            if ev.kind in ("delta", "finish"):
                choices[ev.index].add(ev)
        return choices

    def usage(self) -> dict[str, int]:
        prompt = sum(len(r.prompt_ids) for r in self.requests)
        completion = sum(r.completion_tokens for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Choice:
    """One choice's text, finish reason and (with logprobs) token scores, gathered from its events."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.reason: str | None = None
        self.logprobs: list[Any] = []

    def add(self, ev: Event) -> None:
        self.pieces.append(ev.text)
        self.logprobs += ev.logprobs or []
        if ev.kind == "finish":
            self.reason = ev.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.pieces)


# -- prompts -----------------------------------------------------------------------------------------------
def chat_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], param: str = "messages") -> list[int]:
    """The prompt of a chat request: its messages through the chat template (message text stays text)."""
    if not tokenizer.chat_template:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param=param)
    try:
        return tokenizer.encode_chat(messages)
    except LLMLabError as e:
        raise APIError(400, str(e), param=param) from e


def prompt_ids(tokenizer: Tokenizer, prompt: Any) -> list[list[int]]:
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


# -- server-sent events ------------------------------------------------------------------------------------
def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


def wants_usage(stream_options: dict[str, Any] | None) -> bool:
    return bool((stream_options or {}).get("include_usage"))


def sse_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def guarded(run: Run, chunks: AsyncIterator[str], done: bool = True) -> AsyncIterator[str]:
    """The SSE chunks, an error chunk if generation fails, then `[DONE]` (unless `done` is False: the Responses API
    ends with its own event); the engine stops if the client leaves."""
    finished = False
    try:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            yield sse(e.body())
        if done:
            yield sse("[DONE]")
        finished = True
    finally:
        if not finished:  # cancelled (client disconnect) or closed early
            run.cancel()
