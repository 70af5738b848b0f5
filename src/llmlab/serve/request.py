"""What a request to the serving engine is and what it gets back: `GenerationRequest` (a prompt, its sampling, stops,
adapter, log-probability options and the `sink` its events go to), `Event` (text deltas, finishes, usage, errors),
`TokenLogprob` (a sampled or prompt token's log-probability and its alternatives) and `QueueFull` (the waiting queue
is full). The engine (`llmlab.serve.engine`) fills in the fields marked as its own; the API layer builds requests and
turns events into OpenAI's responses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmlab.errors import LLMLabError
from llmlab.eval.scoring import TokenScores
from llmlab.generate import LogitsProcessor, SamplingParams


class QueueFull(LLMLabError):
    """The waiting queue holds `queue_size` requests already (the server answers 503)."""


@dataclass
class TokenLogprob:
    """A token, its log-probability under the model, and the `top` most likely tokens at its position, most likely
    first ((token id, log-probability) pairs)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def entries(scores: TokenScores, tokens: Sequence[int]) -> list[TokenLogprob]:
    """`TokenLogprob`s of `tokens` from their scores (`eval.scoring.token_logprobs`)."""
    logprobs, top_ids, top_logprobs = scores.logprobs.tolist(), scores.top_ids.tolist(), scores.top_logprobs.tolist()
    return [TokenLogprob(t, lp, list(zip(ids, lps)))
            for t, lp, ids, lps in zip(tokens, logprobs, top_ids, top_logprobs)]


@dataclass
class Event:
    """What the engine tells a request's sink.

    kind "delta": new text of choice `index`; "finish": the last text of choice `index` and its `finish_reason`
    ("stop": EOS or a stop string, "length": max_tokens or the cache is full); "done": every choice finished,
    `usage` holds the token counts; "error": the request failed (`message`), nothing follows. With the request's
    `logprobs`, a "delta" or "finish" event carries the tokens sampled since the choice's previous event.
    """

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    message: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationRequest:
    """One prompt to continue `n` times. Fill in the fields, then `Engine.submit` it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stop: Sequence[str] = ()
    adapter: str | None = None
    logits_processor_factory: Callable[[], LogitsProcessor] | None = None  # called once per choice
    logprobs: int | None = None  # report each sampled token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (then max_tokens may be 0)
    sink: Callable[[Event], None] | None = None
    # set by the engine
    prompt_scores: list[TokenLogprob | None] | None = None  # with prompt_logprobs (None for the first token)
    id: int = 0
    cancelled: bool = False
    completion_tokens: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)
    _open: int = 0  # choices not finished yet

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt_ids) + self.completion_tokens}


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two token sequences share: what a cache filled for one can keep for the other (the
    engine's prompt prefix reuse, the draft's cache across requests)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
