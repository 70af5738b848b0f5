"""POST /v1/completions: prompts in, text out, with OpenAI's legacy `logprobs` and `echo`.

`echo` puts the prompt in front of each choice's text (the string as sent, or the decoded ids); with `logprobs` the
prompt's tokens are scored as well (the first has no score: `null`, as OpenAI sends). `max_tokens` 0 with `echo`
scores the prompt and generates nothing: lm-evaluation-harness's `local-completions` model asks for `echo`,
`logprobs` and one token and reads the prompt's scores, the same numbers `llmlab evaluate` sums
(`llmlab.eval.scoring.token_logprobs` computes both).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from llmlab.serve.logprobs import CompletionLogprobs
from llmlab.serve.protocol import APIError, CompletionRequest
from llmlab.serve.request import Event, GenerationRequest
from llmlab.serve.server import Run, Server, guarded, prompt_ids, sse, sse_response, wants_usage


async def completion(server: Server, body: CompletionRequest, request: Request) -> Any:
    adapter = server.resolve_model(body.model)
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported by this server (use n)", param="best_of")
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    echo = bool(body.echo)
    if body.max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens 0 asks for nothing: it is allowed with echo (score the prompt)",
                       param="max_tokens")
    n = server.choices_per_prompt(body)
    sampling, stops = server.sampling(body.temperature, body.top_p, body.seed), body.stops()
    prompts = await run_in_threadpool(prompt_ids, server.tokenizer, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
    top = body.logprobs
    scored = top if top is not None else (0 if echo and max_tokens == 0 else None)  # the engine's echo-only mode
    reqs = [GenerationRequest(ids, server.budget(ids, max_tokens, "max_tokens", "prompt"), sampling, n, stops,
                              adapter, logprobs=top, prompt_logprobs=scored if echo else None) for ids in prompts]
    echoes = await run_in_threadpool(_echo_texts, server, body.prompt, prompts) if echo else None
    run = Run(server.engine)
    for i, req in enumerate(reqs):
        run.submit(req, i * n)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    choices = [_Choice(server, reqs[i // n], echoes[i // n] if echoes else None, top is not None)
               for i in range(len(reqs) * n)]
    if body.stream:
        return sse_response(guarded(run, _chunks(run, head, body, choices)))
    async for ev in run.events(request):
        if ev.kind in ("delta", "finish"):
            choices[ev.index].add(ev)
    return {**head, "choices": [c.body(i) for i, c in enumerate(choices)], "usage": run.usage()}


def _echo_texts(server: Server, prompt: Any, ids: list[list[int]]) -> list[str]:
    """The prompt text `echo` shows for each prompt: the string as sent, or the ids decoded (special tokens kept)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [server.tokenizer.decode(p, skip_special_tokens=False) for p in ids]


class _Choice:
    """One choice's text, finish reason and `logprobs` object, built from its events."""

    def __init__(self, server: Server, req: GenerationRequest, echo: str | None, logprobs: bool) -> None:
        self.server, self.req, self.echo = server, req, echo
        self.pieces: list[str] = []
        self.reason: str | None = None
        self.logprobs = CompletionLogprobs(server.token_text) if logprobs else None
        self.started = False

    def add(self, ev: Event) -> str:
        """Take an event; returns its text (with the echoed prompt in front on the choice's first event)."""
        text = ev.text
        if not self.started:
            self.started = True
            if self.echo is not None:
                text = self.echo + text
                self._add_prompt()
        if self.logprobs is not None and ev.logprobs:
            special = self.server.token_text.special  # the text leaves them out (EOS)
            self.logprobs.add(ev.logprobs, [e.token for e in ev.logprobs], [e.token not in special
                                                                            for e in ev.logprobs])
        self.pieces.append(text)
        if ev.kind == "finish":
            self.reason = ev.finish_reason
        return text

    def _add_prompt(self) -> None:
        if self.logprobs is None or self.req.prompt_scores is None:
            return
        ids, tok = self.req.prompt_ids, self.server.tokenizer
        # a BOS the tokenizer added to a prompt string is not part of the echoed text
        added_bos = ids[0] == tok.bos_id and tok.bos_token is not None and not self.echo.startswith(tok.bos_token)
        self.logprobs.add(self.req.prompt_scores, ids, [not (i == 0 and added_bos) for i in range(len(ids))])

    def body(self, index: int) -> dict[str, Any]:
        logprobs = self.logprobs.body() if self.logprobs is not None else None
        return {"index": index, "text": "".join(self.pieces), "logprobs": logprobs, "finish_reason": self.reason}


async def _chunks(run: Run, head: dict[str, Any], body: CompletionRequest, choices: list[_Choice]
                  ) -> AsyncIterator[str]:
    async for ev in run.events():
        if ev.kind in ("delta", "finish"):
            choice = choices[ev.index]
            text = choice.add(ev)
            logprobs = choice.logprobs.take() if choice.logprobs is not None else None
            yield sse({**head, "choices": [{"index": ev.index, "text": text, "logprobs": logprobs,
                                            "finish_reason": ev.finish_reason}]})
    if wants_usage(body.stream_options):
        yield sse({**head, "choices": [], "usage": run.usage()})
