"""Continuous batching: one thread owns the model and decodes every running request together, one token a step.

Between two decode steps the engine admits waiting requests: they are prefilled (together, right-padded, in one forward)
into free rows of the model's static KV cache and join the running batch for the next step, so a new request never
waits for the others to finish. Rows sit at different lengths, so each decode step feeds (B, 1) tokens at per-row
cache slots (`input_pos` of shape (B, 1), see `LLaMA.forward`); attention covers the slots up to the longest row and
a per-row causal mask hides the rest. A finished row's place is taken by the last row (its cache row is copied), so
the running batch always occupies cache rows 0..B-1 and a step's cache is a view, never a gather. With `n` > 1 the
prompt is prefilled once and its cache row copied to the other choices' rows. The keys/values of the last prompt
prefilled (per adapter) are kept: a prompt that starts the same way (a chat template's system part, a conversation's
history) gets that prefix copied in and prefills only the rest.

Each request carries its own sampling parameters and random generator (a seed reproduces its sample whatever else
is in the batch), its stop strings (`llmlab.generate.TextStream`), its LoRA adapter (`MultiLoRA` applies each row's
adapter inside one forward), and a `sink` that receives its events from the engine thread. The waiting queue is
bounded (`QueueFull` when full); `cancel` (a client went away) frees a request's rows before the next step.

Hook for constrained decoding (tool calls, JSON schemas): a request may carry
`logits_processor(generated_ids: list[int], logits: Tensor) -> Tensor`. Before each token of each choice is picked,
the engine calls it with the token ids that choice generated so far (prompt excluded) and that row's fp32 logits
(V,), and samples from what it returns (set disallowed tokens to -inf; keep at least one finite). It runs on the
engine thread inside `torch.inference_mode()`, once per choice per step, so it should be quick and must not block.
One callable serves all `n` choices of a request, so derive any state from `generated_ids` (e.g. replay them
through a grammar's automaton, or cache by `tuple(generated_ids)`). An exception in it fails that request alone
(an "error" event); the others go on. The API layer passes it through from a chat extension (`llmlab.serve.api`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.generate import LogitsProcessor, SamplingParams, TextStream, sample
from llmlab.model import LLaMA
from llmlab.tokenizer import Tokenizer

log = logging.getLogger("llmlab.serve")


class QueueFull(LLMLabError):
    """The waiting queue holds `queue_size` requests already (the server answers 503)."""


@dataclass
class Event:
    """What the engine tells a request's sink.

    kind "delta": new text of choice `index`; "finish": the last text of choice `index` and its `finish_reason`
    ("stop": EOS or a stop string, "length": max_tokens or the cache is full); "done": every choice finished,
    `usage` holds the token counts; "error": the request failed (`message`), nothing follows.
    """

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    message: str | None = None


@dataclass
class GenerationRequest:
    """One prompt to continue `n` times. Fill in the fields, then `Engine.submit` it."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stop: Sequence[str] = ()
    adapter: str | None = None
    logits_processor: LogitsProcessor | None = None
    sink: Callable[[Event], None] | None = None
    # set by the engine
    id: int = 0
    cancelled: bool = False
    completion_tokens: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)
    _open: int = 0  # choices not finished yet

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.completion_tokens,
                "total_tokens": len(self.prompt_ids) + self.completion_tokens}


class _Row:
    """One choice of one request: a row of the running batch (and of the KV cache)."""

    __slots__ = ("req", "index", "pos", "last", "ids", "text", "done")

    def __init__(self, req: GenerationRequest, index: int, pos: int, text: TextStream) -> None:
        self.req, self.index, self.pos, self.text = req, index, pos, text
        self.last = 0  # the token fed at slot `pos` next step
        self.ids: list[int] = []
        self.done = False


class Engine:
    """The model's one owner: a thread that admits, prefills and decodes requests (see the module docstring)."""

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, eos_ids: Iterable[int], max_batch: int = 16,
                 max_seq_len: int = 2048, queue_size: int = 64, adapters: Any = None) -> None:
        if max_batch < 1 or queue_size < 1:
            raise LLMLabError(f"--max-batch and --queue-size must be at least 1, got {max_batch} and {queue_size}")
        max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.model, self.tokenizer, self.eos = model.eval(), tokenizer, set(eos_ids)
        self.max_batch, self.max_seq_len, self.queue_size = max_batch, max_seq_len, queue_size
        self.adapters = adapters  # a MultiLoRA or None
        self.device = model.device
        with torch.inference_mode():
            model.setup_cache(max_batch, max_seq_len)
        self.lock = threading.Lock()  # held for each scheduling round; holding it pauses the engine between steps
        self._cv = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._rows: list[_Row] = []
        self._ids = itertools.count(1)
        self._closing = False
        self._prefix: dict[str | None, tuple[Sequence[int], list[tuple[Tensor, Tensor]]]] = {}  # adapter -> last prompt
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0, "steps": 0,
                      "prefix_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="llmlab-engine", daemon=True)
        self._thread.start()

    # -- the outside ---------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> GenerationRequest:
        """Queue `req`; raises LLMLabError for a request that can never run and `QueueFull` when the queue is full."""
        if not req.prompt_ids:
            raise LLMLabError("the prompt is empty (0 tokens)")
        if len(req.prompt_ids) >= self.max_seq_len:
            raise LLMLabError(f"the prompt has {len(req.prompt_ids)} tokens; this server's context is "
                              f"{self.max_seq_len} tokens (--max-seq-len), prompt and output together")
        if not 1 <= req.n <= self.max_batch:
            raise LLMLabError(f"n must be between 1 and {self.max_batch} (the server's --max-batch), got {req.n}")
        if req.max_tokens < 1:
            raise LLMLabError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if req.adapter is not None and (self.adapters is None or req.adapter not in self.adapters.names):
            raise LLMLabError(f"unknown adapter '{req.adapter}'")
        req.generator = torch.Generator(device=self.device)
        if req.sampling.seed is None:
            req.generator.seed()
        else:
            req.generator.manual_seed(req.sampling.seed)
        req._open = req.n
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting (--queue-size "
                                f"{self.queue_size}); retry later")
            req.id = next(self._ids)
            self.stats["requests"] += 1
            self._waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: GenerationRequest) -> None:
        """Stop generating for `req` (its client went away); its rows are freed before the next step."""
        if req._open and not req.cancelled:
            req.cancelled = True
            with self._cv:
                self._cv.notify()

    def status(self) -> dict[str, int]:
        """Rows decoding now, requests waiting, and counters since start (requests, tokens, cancelled, ...)."""
        return {"running": len(self._rows), "waiting": len(self._waiting), **self.stats}

    def close(self) -> None:
        """Stop the engine thread (requests still open get an error event) and free the KV cache."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=30)
        for req in list(self._waiting) + list({id(r.req): r.req for r in self._rows}.values()):
            self._fail(req, "the server is shutting down")
        self._waiting.clear()
        self._rows.clear()
        self.model.clear_cache()

    def generate(self, req: GenerationRequest, timeout: float | None = None) -> list[tuple[str, str]]:
        """Submit `req` and wait: (text, finish_reason) per choice. For scripts and tests; servers use `sink`."""
        done = threading.Event()
        texts: list[list[str]] = [[] for _ in range(req.n)]
        reasons: list[str] = [""] * req.n
        error: list[str] = []

        def sink(ev: Event) -> None:
            if ev.kind in ("delta", "finish"):
                texts[ev.index].append(ev.text)
            if ev.kind == "finish":
                reasons[ev.index] = ev.finish_reason or ""
            if ev.kind == "error":
                error.append(ev.message or "")
            if ev.kind in ("done", "error"):
                done.set()

        req.sink = sink
        self.submit(req)
        if not done.wait(timeout):
            self.cancel(req)
            raise TimeoutError(f"request {req.id} did not finish in {timeout} s")
        if error:
            raise LLMLabError(error[0])
        return [("".join(t), r) for t, r in zip(texts, reasons)]

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closing and not self._waiting and not self._rows:
                        self._cv.wait()
                    if self._closing:
                        return
                with self.lock:
                    try:
                        self._drop_cancelled()
                        self._admit()
                        if self._rows:
                            self._step()
                    except Exception as e:  # a failing step must not take the server down: fail its requests
                        log.exception("engine step failed")
                        for req in {id(r.req): r.req for r in self._rows}.values():
                            self._fail(req, f"generation failed: {e}")
                        self._rows.clear()

    def _drop_cancelled(self) -> None:
        dropped = {id(r.req): r.req for r in self._rows if r.req.cancelled}
        for row in self._rows:
            row.done = row.done or row.req.cancelled
        self._compact()
        for req in dropped.values():
            req._open = 0
            self.stats["cancelled"] += 1

    def _admit(self) -> None:
        """Move the waiting requests that fit into the batch, prefilled together in one forward."""
        batch, rows = [], len(self._rows)
        with self._cv:
            while self._waiting and rows + self._waiting[0].n <= self.max_batch:
                req = self._waiting.popleft()
                if req.cancelled:
                    self.stats["cancelled"] += 1
                    continue
                batch.append(req)
                rows += req.n
        if not batch:
            return
        try:
            logits = self._prefill(batch, len(self._rows))
        except Exception as e:
            log.exception("prefill failed")
            for req in batch:
                self._fail(req, f"generation failed: {e}")
            return
        for i, req in enumerate(batch):  # rows go in the order of their cache rows; compaction waits for all
            new = [_Row(req, j, len(req.prompt_ids), TextStream(self.tokenizer, req.stop)) for j in range(req.n)]
            self._rows.extend(new)
            self._advance(req, new, logits[i:i + 1].expand(req.n, -1), " in prefill")
        self._compact()

    def _adapters(self, rows: Sequence[str | None]) -> Any:
        return nullcontext() if self.adapters is None else self.adapters.select(rows)

    def _prefill(self, batch: list[GenerationRequest], first: int) -> Tensor:
        """Prefill `batch` into cache rows from `first` on (each request's `n` rows in turn); last logits (k, V).

        The prompts (minus any reused prefix) are right-padded into one (k, T) forward with per-row slots; a pad
        writes into a slot past its row's prompt, which that row's own decode steps overwrite before any query of
        the row can see it (the per-row causal mask)."""
        S, dev = self.max_seq_len, self.device
        cache_rows, starts, row = [], [], first
        for req in batch:
            starts.append(self._reuse_prefix(req, row))
            cache_rows.append(row)
            row += req.n
        lens = [len(req.prompt_ids) - s for req, s in zip(batch, starts)]
        T = max(lens)
        tokens = torch.zeros(len(batch), T, dtype=torch.long, device=dev)
        for i, (req, s) in enumerate(zip(batch, starts)):
            tokens[i, :lens[i]] = torch.tensor(req.prompt_ids[s:], device=dev)
        pos = (torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)).clamp(max=S - 1)  # (k, T)
        with self._adapters([req.adapter for req in batch]):
            hidden = self.model(tokens, input_pos=pos, cache_rows=torch.tensor(cache_rows, device=dev),
                                kv_len=min(S, max(starts) + T), return_hidden=True)  # (k, T, hidden)
        last = hidden[torch.arange(len(batch), device=dev), torch.tensor(lens, device=dev) - 1]  # (k, hidden)
        logits = self.model.lm_head(last).float()  # (k, V)
        for req, r in zip(batch, cache_rows):
            self._remember_prefix(req, r)
            for j in range(1, req.n):  # the other choices start from a copy of the prompt's cache
                self._copy_row(r, r + j, len(req.prompt_ids))
        return logits

    def _reuse_prefix(self, req: GenerationRequest, row: int) -> int:
        """Copy the cached keys/values of the longest prefix this prompt shares with the last prompt prefilled for
        the same adapter into `row`; returns how many prompt tokens need no prefill (chat prompts share their
        template's system part, so most of a short request's prefill is skipped)."""
        ids, kv = self._prefix.get(req.adapter, ((), []))
        n = 0
        for a, b in zip(ids, req.prompt_ids[:-1]):  # the last prompt token is always run: its logits are needed
            if a != b:
                break
            n += 1
        if n:
            for layer, (k, v) in zip(self.model.model.layers, kv):
                cache = layer.self_attn.kv_cache
                cache.k[row, :, :n] = k[:, :n]
                cache.v[row, :, :n] = v[:, :n]
            self.stats["prefix_tokens"] += n
        return n

    def _remember_prefix(self, req: GenerationRequest, row: int) -> None:
        T = len(req.prompt_ids)
        kv = [(layer.self_attn.kv_cache.k[row, :, :T].clone(), layer.self_attn.kv_cache.v[row, :, :T].clone())
              for layer in self.model.model.layers]
        self._prefix[req.adapter] = (list(req.prompt_ids), kv)

    def _step(self) -> None:
        rows = self._rows
        tokens = torch.tensor([[r.last] for r in rows], device=self.device)  # (B, 1)
        pos = torch.tensor([[r.pos] for r in rows], device=self.device)  # (B, 1): each row's own slot
        kv_len = max(r.pos for r in rows) + 1
        with self._adapters([r.req.adapter for r in rows]):
            logits = self.model(tokens, input_pos=pos, kv_len=kv_len)[:, -1].float()  # (B, V)
        self.stats["steps"] += 1
        for r in rows:
            r.pos += 1
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(id(r.req), []).append(i)
        for idx in groups.values():
            req = rows[idx[0]].req
            self._advance(req, [rows[i] for i in idx], logits[idx])
        self._compact()

    def _advance(self, req: GenerationRequest, rows: list[_Row], logits: Tensor, where: str = "") -> None:
        """Sample and accept the next token of one request's `rows`; if sampling raises (e.g. its logits processor),
        that request fails, not the batch."""
        try:
            picked = self._sample(req, rows, logits)
        except Exception as e:
            log.exception("request %d failed%s", req.id, where)
            for row in rows:
                row.done = True
            self._fail(req, f"generation failed: {e}")
            return
        self._accept(rows, picked)

    def _sample(self, req: GenerationRequest, rows: list[_Row], logits: Tensor) -> list[int]:
        if req.logits_processor is not None:
            logits = torch.stack([req.logits_processor(list(r.ids), logits[i]) for i, r in enumerate(rows)])
        return sample(logits, req.sampling, req.generator).view(-1).tolist()

    def _accept(self, rows: list[_Row], tokens: list[int]) -> None:
        for row, tok in zip(rows, tokens):
            req = row.req
            row.ids.append(tok)
            row.last = tok
            req.completion_tokens += 1
            self.stats["tokens"] += 1
            if tok in self.eos:
                self._finish(row, "stop")
                continue
            piece = row.text.add(tok)
            if row.text.stopped:
                self._finish(row, "stop", piece)
            elif len(row.ids) >= req.max_tokens or row.pos >= self.max_seq_len:
                self._finish(row, "length", piece)
            elif piece:
                self._emit(req, Event("delta", row.index, piece))

    def _finish(self, row: _Row, reason: str, piece: str = "") -> None:
        row.done = True
        req = row.req
        self._emit(req, Event("finish", row.index, piece + row.text.finish(), reason))
        req._open -= 1
        if req._open == 0:
            self.stats["finished"] += 1
            self._emit(req, Event("done", usage=req.usage))

    def _fail(self, req: GenerationRequest, message: str) -> None:
        if req._open:
            req._open = 0
            self.stats["failed"] += 1
            self._emit(req, Event("error", message=message))

    def _emit(self, req: GenerationRequest, event: Event) -> None:
        if req.sink is None or req.cancelled:
            return
        try:
            req.sink(event)
        except Exception:  # a broken consumer loses its own events only
            log.exception("request %d: event sink failed", req.id)

    def _compact(self) -> None:
        """Drop finished rows; the last row moves into each freed place, so rows stay 0..B-1 in the cache."""
        rows = self._rows
        i = 0
        while i < len(rows):
            while rows and rows[-1].done:
                rows.pop()
            if i < len(rows) and rows[i].done:
                self._copy_row(len(rows) - 1, i, rows[-1].pos)
                rows[i] = rows.pop()
            i += 1

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.model.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]
