"""Grounded answers: retrieve passages for a question, fit them into the context budget, ask the model to answer
from them citing [1], [2], ..., then list each cited source with its location and original text.

Used by `llmlab chat CKPT --index DIR` (GroundedChat) and by the server's `--index` (grounded_messages +
sources_payload). The history keeps the plain question, not the passages, so a long conversation does not fill
the context with old retrievals.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from llmlab.errors import LLMLabError
from llmlab.generate import ChatSession
from llmlab.rag.index import Index
from llmlab.rag.store import Hit
from llmlab.tokenizer import Tokenizer

INSTRUCTIONS = ("Answer the user's question using only the numbered passages in the message. Cite the passage "
                "that supports each statement with its number in square brackets, like [1] or [2]. If the passages "
                "do not contain the answer, say that you do not know.")
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def format_passage(number: int, hit: Hit) -> str:
    return f"[{number}] ({hit.location})\n{hit.text}"


def fit_passages(hits: Sequence[Hit], tokenizer: Tokenizer, budget: int) -> list[Hit]:
    """The hits, best first, that fit together in `budget` tokens as formatted passages (one that does not fit is
    skipped, so a shorter one after it may still go in)."""
    chosen, used = [], 0
    for hit in hits:
        cost = len(tokenizer.encode(format_passage(len(chosen) + 1, hit) + "\n\n"))
        if used + cost <= budget:
            chosen.append(hit)
            used += cost
    return chosen


def grounded_message(question: str, passages: Sequence[Hit]) -> str:
    """The user message the model sees: the numbered passages, then the question."""
    if not passages:
        return f"No passages were found for this question.\n\nQuestion: {question}"
    body = "\n\n".join(format_passage(i, hit) for i, hit in enumerate(passages, 1))
    return f"Passages:\n\n{body}\n\nQuestion: {question}\nAnswer citing the passages like [1]."


def cited_numbers(answer: str, n_passages: int) -> list[int]:
    """Passage numbers cited in `answer` as [n] or [n, m], in order of first citation; out-of-range ones dropped."""
    seen: dict[int, None] = {}
    for group in _CITATION.findall(answer):
        for num in group.split(","):
            k = int(num)
            if 1 <= k <= n_passages:
                seen.setdefault(k)
    return list(seen)


def sources_payload(answer: str, passages: Sequence[Hit]) -> list[dict[str, Any]]:
    """Every passage shown to the model, numbered as in the prompt, with `cited` saying whether the answer cites
    it: the `sources` field of llmlab's API responses."""
    cited = set(cited_numbers(answer, len(passages)))
    return [{"index": i, "path": hit.display_path, "page": hit.page, "line_start": hit.line_start,
             "line_end": hit.line_end, "location": hit.location, "text": hit.text, "score": round(hit.score, 6),
             "cited": i in cited} for i, hit in enumerate(passages, 1)]


def format_sources(answer: str, passages: Sequence[Hit]) -> str:
    """A readable list of the cited sources with their original text (or, when nothing is cited, the passages the
    answer was given, said as such)."""
    numbers = cited_numbers(answer, len(passages))
    if not passages:
        return "Sources: none (no passage matched the question)"
    if numbers:
        head, shown = "Sources:", numbers
    else:
        head, shown = "Sources: the answer cites no passage; it was given these:", list(range(1, len(passages) + 1))
    lines = [head]
    for k in shown:
        hit = passages[k - 1]
        lines.append(f"[{k}] {hit.location}")
        lines.extend(f"    | {line}".rstrip() for line in hit.text.splitlines())
    return "\n".join(lines)


def context_budget(session: ChatSession, requested: int) -> int:
    """Tokens left for passages: at most `requested`, and what the model's context leaves after the conversation
    so far, the question's wrapping and the reply."""
    config = session.model.config
    history = len(session.tokenizer.encode_chat(session.messages)) if session.messages else 0
    left = config.max_position_embeddings - session.max_new_tokens - history - 128
    return max(0, min(requested, left))


class GroundedChat:
    """A chat whose every question is answered from the index; `last_passages` are those of the last answer."""

    def __init__(self, session: ChatSession, index: Index, k: int = 4, context_tokens: int = 1024) -> None:
        if k < 1:
            raise LLMLabError(f"--top-k-passages must be at least 1, got {k}")
        if context_tokens < 64:
            raise LLMLabError(f"--context-tokens must be at least 64, got {context_tokens}")
        self.session, self.index, self.k, self.context_tokens = session, index, k, context_tokens
        session.system = f"{session.system}\n\n{INSTRUCTIONS}" if session.system else INSTRUCTIONS
        session.reset()
        self.last_passages: list[Hit] = []
        self.last_answer = ""

    def reset(self) -> None:
        self.session.reset()

    def send(self, question: str) -> Iterator[str]:
        """Stream the answer to `question`; afterwards `sources()` lists what it cited."""
        hits = self.index.search(question, self.k)
        passages = fit_passages(hits, self.session.tokenizer, context_budget(self.session, self.context_tokens))
        reply = []
        for piece in self.session.send(grounded_message(question, passages)):
            reply.append(piece)
            yield piece
        self.session.messages[-2]["content"] = question  # keep the plain question in the history
        self.last_passages, self.last_answer = passages, "".join(reply)

    def sources(self) -> str:
        return format_sources(self.last_answer, self.last_passages)
