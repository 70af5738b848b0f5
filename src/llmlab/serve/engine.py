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

Hook for constrained decoding (tool calls, JSON schemas): a request may carry `logits_processor_factory`, which the
engine calls once per choice for that choice's own `logits_processor(generated_ids: list[int], logits: Tensor) ->
Tensor` (a grammar's parser state belongs to one sequence: `n` choices need `n` parsers). Before each token of a
choice is picked, the engine calls its processor with the token ids that choice generated so far (prompt excluded)
and that row's fp32 logits (V,), and samples from what it returns (set disallowed tokens to -inf; keep at least one
finite). It runs on the engine thread inside `torch.inference_mode()`, once per choice per step, so it should be
quick and must not block. An exception in the factory or the processor fails that request alone (an "error"
event); the others go on. The API layer passes it through from a chat extension (`llmlab.serve.api`).

Log-probabilities (`logprobs`, `echo`): a request with `logprobs = k` gets, with each event, the tokens it covers
with their log-probabilities and the k most likely tokens at each position (`TokenLogprob`, sampled tokens only,
EOS included); with `prompt_logprobs = k` the prompt's tokens are scored too (`prompt_scores`, filled in before the
request's first event; the prompt is then prefilled whole, without the prefix reuse, since every position's logits
are needed), and `max_tokens` may be 0 (score the prompt, generate nothing). Both are the model's own
log-probabilities, an fp32 log-softmax of its logits before temperature, top-p or a grammar, computed by
`llmlab.eval.scoring.token_logprobs`, the function `llmlab evaluate` scores with.

The model may hold quantized weights (a GGUF's blocks, `llmlab.quantized`, what `llmlab serve` runs by default):
the engine then gives each projection a dense copy where the dense GEMM measured faster on a batch
(`quantized.keep_dense_copies`), so a prefill or a step of many rows runs the dense GEMM and one row keeps the
quantized kernel; LoRA adapters apply on top of either.

Adapters can be loaded and unloaded while the engine runs (`load_adapter`, `unload_adapter`): the files are read
and checked on the caller's thread, and the engine pauses between two steps only to put the weights in place. An
unloaded adapter is refused to new requests at once; its weights go when the last request using it (running or
waiting) has finished, so requests in flight are never affected.

With a draft model (`--draft`), a step while one plain request runs alone is a speculative round (`serve.draft`):
several tokens from one model forward, each accepted as a step's token is.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.eval.scoring import token_logprobs
from llmlab.generate import DecodeStep, LogitsProcessor, TextStream, sample
from llmlab.model import LLaMA
from llmlab.quantized import QuantLinear, keep_dense_copies
from llmlab.serve.draft import EngineDraft
from llmlab.serve.request import Event, GenerationRequest, QueueFull, TokenLogprob, entries, shared_prefix
from llmlab.speculative import Draft
from llmlab.tokenizer import Tokenizer

log = logging.getLogger("llmlab.serve")


class _Row:
    """One choice of one request: a row of the running batch (and of the KV cache)."""

    __slots__ = ("req", "index", "pos", "last", "ids", "text", "done", "processor", "scores")

    def __init__(self, req: GenerationRequest, index: int, pos: int, text: TextStream) -> None:
        self.req, self.index, self.pos, self.text = req, index, pos, text
        self.last = 0  # the token fed at slot `pos` next step
        self.ids: list[int] = []
        self.done = False
        self.processor: LogitsProcessor | None = None  # this choice's own, from the request's factory
        self.scores: list[TokenLogprob] = []  # with the request's `logprobs`: the tokens not reported yet

    def take_scores(self) -> list[TokenLogprob] | None:
        if self.req.logprobs is None:
            return None
        scores, self.scores = self.scores, []
        return scores


class Engine:
    """The model's one owner: a thread that admits, prefills and decodes requests (see the module docstring)."""

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, eos_ids: Iterable[int], max_batch: int = 16,
                 max_seq_len: int = 2048, queue_size: int = 64, adapters: Any = None, compile: bool = False,
                 start: bool = True, draft: Draft | None = None) -> None:
        if max_batch < 1 or queue_size < 1:
            raise LLMLabError(f"--max-batch and --queue-size must be at least 1, got {max_batch} and {queue_size}")
        max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.model, self.tokenizer, self.eos = model.eval(), tokenizer, set(eos_ids)
        self.max_batch, self.max_seq_len, self.queue_size = max_batch, max_seq_len, queue_size
        self.adapters = adapters  # a MultiLoRA or None
        self.device = model.device
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0, "steps": 0,
                      "prefix_tokens": 0}
        with torch.inference_mode():
            self.cache = model.setup_cache(max_batch, max_seq_len)
            self.speculation = None if draft is None else EngineDraft(draft, model, max_seq_len, self.stats)
            added = keep_dense_copies(model)  # a quantized model's batches: the dense GEMM where it is faster
        if added:
            log.info("dense copies of the quantized weights for batches: %.0f MB", added / 2**20)
        self._eager = DecodeStep(model, None, False)
        self._compiled = DecodeStep(model, None, True) if compile else None
        self.decode_step = "eager"  # how decode steps run, for the server's start-up line
        if compile:
            self._warm_up()
        self.lock = threading.Lock()  # held for each scheduling round; holding it pauses the engine between steps
        self._cv = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._rows: list[_Row] = []
        self._ids = itertools.count(1)
        self._closing = False
        self._prefix: dict[str | None, tuple[Sequence[int], list[tuple[Tensor, Tensor]]]] = {}  # adapter -> last prompt
        self._retiring: set[str] = set()  # adapters unloaded while requests still use them
        if start:
            self._thread = threading.Thread(target=self._loop, name="llmlab-engine", daemon=True)
            self._thread.start()
        else:  # the constructing thread runs the loop itself (`run`)
            self._thread = threading.current_thread()

    def run(self) -> None:
        """Run the engine on the calling thread, the one that constructed it with `start=False`, until `close`.

        Why a server wants that (`llmlab.serve.load_engine`): torch's OpenMP workers are kept per thread that
        computes, and once two threads have a team of workers on a machine of few cores, libgomp stops letting idle
        workers spin between parallel regions; a decode step, hundreds of short regions, then took twice as long
        (SmolLM2-135M on 2 cores, eager and compiled alike). Loading the model and decoding on one thread keeps one
        team."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("Engine.run: call it on the thread that constructed the engine with start=False")
        self._loop()

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
        if req.max_tokens < (0 if req.prompt_logprobs is not None else 1):
            raise LLMLabError(f"max_tokens must be at least 1, got {req.max_tokens}")
        req.generator = torch.Generator(device=self.device)
        if req.sampling.seed is None:
            req.generator.seed()
        else:
            req.generator.manual_seed(req.sampling.seed)
        req._open = req.n
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            # under the lock `_free_retired` holds: an adapter is never freed between this check and the append
            if req.adapter is not None and req.adapter not in self.adapter_names():
                raise LLMLabError(f"unknown adapter '{req.adapter}'")
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

    def adapter_names(self) -> list[str]:
        """The adapters requests may use now (loaded, and not being unloaded)."""
        return [] if self.adapters is None else [n for n in self.adapters.names if n not in self._retiring]

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Serve the LoRA adapter in `folder` as `name` from the next step on. The files are read and checked here,
        on the caller's thread (LLMLabError when they are no LoRA adapter of this base model); the engine only
        pauses between two steps to put the weights in place."""
        from llmlab.serve.lora_multi import MultiLoRA

        if self.adapters is not None and name in self.adapters.names:
            raise LLMLabError(f"an adapter named '{name}' is loaded already; unload it first")
        try:
            staged = (self.adapters or MultiLoRA(self.model)).stage(name, folder)
        except (OSError, ValueError) as e:  # a path the OS refuses (too long, a NUL byte, no permission)
            raise LLMLabError(f"{folder}: cannot read the adapter: {e}") from e
        with self.lock:  # between two steps
            if self.adapters is None:
                self.adapters = MultiLoRA(self.model)
            if name in self.adapters.names:  # another load of the same name won the race
                raise LLMLabError(f"an adapter named '{name}' is loaded already; unload it first")
            self.adapters.install(staged)
            self._prefix.pop(name, None)

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name`: new requests for it are refused from now on; its weights are freed as soon as
        no running or waiting request uses it (at once when none does). LLMLabError for a name not served."""
        with self.lock:
            if name not in self.adapter_names():
                raise LLMLabError(f"there is no adapter named '{name}' (loaded: {self.adapter_names()})")
            self._retiring.add(name)
            self._prefix.pop(name, None)
            self._free_retired()

    def status(self) -> dict[str, int]:
        """Rows decoding now, requests waiting, and counters since start (requests, tokens, cancelled, ...)."""
        return {"running": len(self._rows), "waiting": len(self._waiting), **self.stats}

    def close(self) -> None:
        """Stop the engine thread (requests still open get an error event) and free the KV cache."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for req in list(self._waiting) + list({id(r.req): r.req for r in self._rows}.values()):
            self._fail(req, "the server is shutting down")
        self._waiting.clear()
        self._rows.clear()
        self.model.clear_cache()
        if self.speculation is not None:
            self.speculation.close()

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
                        if self._retiring:
                            self._free_retired()
                    except Exception as e:  # a failing step must not take the server down: fail its requests
                        log.exception("engine step failed")
                        for req in {id(r.req): r.req for r in self._rows}.values():
                            self._fail(req, f"generation failed: {e}")
                        self._rows.clear()

    def _free_retired(self) -> None:
        """Remove the unloaded adapters no request uses any more (with `lock` held: between steps)."""
        with self._cv:  # `submit` checks adapter names under it
            used = {r.req.adapter for r in self._rows} | {req.adapter for req in self._waiting}
            for name in self._retiring - used:
                self.adapters.remove(name)
                self._retiring.discard(name)

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
            if req.max_tokens == 0:  # the prompt scored (echo), nothing to generate
                for row in new:
                    self._finish(row, "length")
                continue
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
        for req in batch:  # a prompt to score is run whole: every position's logits are needed
            starts.append(0 if req.prompt_logprobs is not None else self._reuse_prefix(req, row))
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
        for i, req in enumerate(batch):
            if req.prompt_logprobs is not None:
                req.prompt_scores = [None, *self._score_prompt(req, hidden[i, :lens[i] - 1])]
        for req, r in zip(batch, cache_rows):
            self._remember_prefix(req, r)
            for j in range(1, req.n):  # the other choices start from a copy of the prompt's cache
                self.cache.copy_row(r, r + j, len(req.prompt_ids))
        return logits

    def _score_prompt(self, req: GenerationRequest, hidden: Tensor, chunk: int = 256) -> list[TokenLogprob]:
        """Each prompt token after the first, scored from the hidden states before it (T-1, hidden); the head runs
        on `chunk` positions at a time, so a long prompt never holds (T, V) logits at once."""
        targets = torch.tensor(req.prompt_ids[1:], device=self.device)
        out: list[TokenLogprob] = []
        for a in range(0, len(targets), chunk):
            scores = token_logprobs(self.model.lm_head(hidden[a:a + chunk]), targets[a:a + chunk], req.prompt_logprobs)
            out += entries(scores, req.prompt_ids[1 + a:1 + a + chunk])
        return out

    def _reuse_prefix(self, req: GenerationRequest, row: int) -> int:
        """Copy the cached keys/values of the longest prefix this prompt shares with the last prompt prefilled for
        the same adapter into `row`; returns how many prompt tokens need no prefill (chat prompts share their
        template's system part, so most of a short request's prefill is skipped)."""
        ids, kv = self._prefix.get(req.adapter, ((), []))
        n = shared_prefix(ids, req.prompt_ids[:-1])  # the last prompt token is always run: its logits are needed
        if n:
            self.cache.write_row(row, kv, n)
            self.stats["prefix_tokens"] += n
        return n

    def _remember_prefix(self, req: GenerationRequest, row: int) -> None:
        self._prefix[req.adapter] = (list(req.prompt_ids), self.cache.read_row(row, len(req.prompt_ids)))

    def _decode(self, tokens: Tensor, pos: Tensor, slot: int) -> Tensor:
        """The next-token logits (B, V) of `tokens` (B, 1) fed at each row's own cache slot `pos` (B, 1), `slot` the
        largest; compiled when the engine is, unless LoRA adapters are in place (their per-row selection is not
        part of the compiled graph, whose guards are not re-checked: those steps run eagerly)."""
        step = self._eager if self._compiled is None or self._lora_installed() else self._compiled
        return step(tokens, pos, None, self.cache.causal[pos][:, None], slot)  # per-row causal mask (B, 1, 1, S)

    def _lora_installed(self) -> bool:
        return self.adapters is not None and bool(self.adapters.modules)

    def _warm_up(self) -> None:
        """Compile the decode step, at start, for every batch size the model's forward branches on (one row, two
        rows and up, and each row count from which some quantized layer switches to its dense copy), so that no
        request pays a compilation and later steps may skip the guards' checks (`generate.DecodeStep`)."""
        if self._lora_installed():
            self.decode_step = "eager (LoRA adapters are served)"
            log.info("LoRA adapters are served: the decode step runs eagerly (not compiled)")
            return
        sizes = {1, 2, self.max_batch} | {m.dense_from for m in self.model.modules()
                                          if isinstance(m, QuantLinear) and m.dense is not None}
        sizes = sorted(b for b in sizes if b <= self.max_batch)
        start, step = time.perf_counter(), self._compiled
        step.trust_guards = False  # each new size must be compiled, not refused
        with torch.inference_mode():
            for b in sizes:
                for slot in (1, 2):  # the cache's slots are overwritten by the rows' own prefills later
                    self._decode(torch.zeros(b, 1, dtype=torch.long, device=self.device),
                                 torch.full((b, 1), slot, device=self.device), slot)
        step.trust_guards = True
        self.decode_step = f"compiled for batches of {sizes} rows in {time.perf_counter() - start:.0f} s"
        log.info("decode step %s", self.decode_step)

    def _step(self) -> None:
        rows = self._rows
        if self.speculation is not None and len(rows) == 1 and not self._waiting:
            run = self.speculation.round(self.model, rows[0], self.max_seq_len)
            if run:
                return self._accept_run(rows[0], run)
        tokens = torch.tensor([[r.last] for r in rows], device=self.device)  # (B, 1)
        pos = torch.tensor([[r.pos] for r in rows], device=self.device)  # (B, 1): each row's own slot
        with self._adapters([r.req.adapter for r in rows]):
            logits = self._decode(tokens, pos, max(r.pos for r in rows))  # (B, V)
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

    def _accept_run(self, row: _Row, tokens: list[int]) -> None:
        """A speculative round's tokens, one by one as steps would give them (EOS, stop strings, max_tokens exact)."""
        self.stats["steps"] += 1
        for tok in tokens:
            row.pos += 1
            self._accept([row], [tok])
            if row.done:
                break
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
        model_logits = logits
        if req.logits_processor_factory is not None:
            for r in rows:
                if r.processor is None:
                    r.processor = req.logits_processor_factory()
            logits = torch.stack([r.processor(list(r.ids), logits[i]) for i, r in enumerate(rows)])
        picked = sample(logits, req.sampling, req.generator).view(-1)
        tokens = picked.tolist()
        if req.logprobs is not None:  # the model's own log-probabilities, not the filtered ones sampled from
            for r, entry in zip(rows, entries(token_logprobs(model_logits, picked, req.logprobs), tokens)):
                r.scores.append(entry)
        return tokens

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
                self._emit(req, Event("delta", row.index, piece, logprobs=row.take_scores()))

    def _finish(self, row: _Row, reason: str, piece: str = "") -> None:
        row.done = True
        req = row.req
        self._emit(req, Event("finish", row.index, piece + row.text.finish(), reason, logprobs=row.take_scores()))
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
                self.cache.copy_row(len(rows) - 1, i, rows[-1].pos)
                rows[i] = rows.pop()
            i += 1
