"""Speculative decoding: a small draft model proposes a few tokens, the model checks them all in one forward.

Leviathan et al. 2023 ("Fast inference from transformers via speculative decoding") and Chen et al. 2023
("Accelerating large language model decoding with speculative sampling"). One round, for one sequence:

- the draft (same tokenizer and vocabulary) decodes k tokens d_1..d_k autoregressively on its own KV cache, through
  the same (compiled) one-token decode step plain generation uses (`generate.DecodeStep`), drawing each from its
  distribution q_i;
- the model runs [last token, d_1..d_k] as one T=k+1 forward over its cache, which gives its distribution p_i after
  every prefix;
- greedy: the longest prefix of drafted tokens that are the model's own argmax is kept, then the model's token at the
  first disagreement (or after the last drafted token), so the output is token for token the model's greedy output;
- sampling: d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected one is replaced by a draw from
  norm(max(0, p_i - q_i)); when all k are kept a bonus token is drawn from p_{k+1}. Each emitted token then has exactly
  the model's distribution, whatever the draft proposes.

p and q are the distributions `generate.sample` draws from (`sampling_logits`: repetition penalty, temperature,
top-k, top-p applied alike to both; the penalty sees the drafted tokens before each position, as plain decoding
would have seen them). Rolling back costs nothing: both caches are written slot by slot and every forward reads only
the slots up to its own position (the causal mask of the model's `Cache`; the filled width of the draft's key mask,
whose stale entries are switched off on rewind), so entries past the accepted prefix are never read and are
overwritten by the next round. Only batch-1 decoding is speculative: several prompts are decoded one after another.
The serving engine's rounds for a request running alone (`llmlab.serve.draft`) are made of the same pieces: the
draft's `DraftFeed`, `propose` and the rule `accept_drafted`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.generate import DecodeStep, SamplingParams, cache_length, draw, make_generator, sampling_logits
from llmlab.model import LLaMA
from llmlab.tokenizer import Tokenizer

MAX_DRAFT_TOKENS = 16  # adaptive k never proposes more per round


@dataclass
class DraftStats:
    """What speculative decoding did, summed over calls: `verifies` model forwards that checked drafted tokens,
    `proposed` drafted tokens, `accepted` of them kept, `tokens` emitted in all."""

    verifies: int = 0
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the model kept."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def accepted_per_verify(self) -> float:
        """Drafted tokens kept per verifying forward (each forward also adds one token of the model's own)."""
        return self.accepted / self.verifies if self.verifies else 0.0


class DraftFeed:
    """The draft's side of one sequence: its cache is filled up to `filled` slots, fed one token at a time."""

    def __init__(self, model: LLaMA, max_len: int, filled: int, compile: bool) -> None:
        device = model.device
        self.step = DecodeStep(model, 1, compile)
        self.key_valid = torch.zeros(1, max_len, dtype=torch.bool, device=device)
        self.key_valid[:, :filled] = True
        self.mask = self.key_valid.view(1, 1, 1, max_len)  # a view: updates of key_valid show through
        self.pos = torch.tensor([filled], device=device)
        self.position_ids = torch.tensor([[filled]], device=device)
        self.filled = filled

    def feed(self, token: Tensor) -> Tensor:
        """Put `token` (1, 1) at the next slot; the draft's next-token logits (1, V) fp32."""
        self.pos.fill_(self.filled)
        self.position_ids.fill_(self.filled)
        self.key_valid[0, self.filled] = True
        logits = self.step(token, self.pos, self.position_ids, self.mask, self.filled)
        self.filled += 1
        return logits

    def catch_up(self, seq: Sequence[int]) -> Tensor:
        """Feed the tokens of `seq` from slot `filled` on (at least its last one); the draft's next-token logits after
        the last (1, V) fp32. Generation lags by one or two tokens; the serving engine's draft, after steps it sat
        out, by many: all but the last then go through one forward."""
        device = self.pos.device
        missing = list(seq[self.filled:])
        if len(missing) > 1:
            _forward(self.step.model, torch.tensor([missing[:-1]], device=device), self.filled, last_only=True)
            self.key_valid[0, self.filled:self.filled + len(missing) - 1] = True
            self.filled += len(missing) - 1
        return self.feed(torch.tensor([missing[-1:]], device=device))

    def rewind(self, length: int) -> None:
        """Forget every slot from `length` on (they are overwritten later; the mask hides them until then)."""
        if length < self.filled:
            self.key_valid[0, length:self.filled] = False
            self.filled = length


def _forward(model: LLaMA, tokens: Tensor, start: int, last_only: bool = False) -> Tensor:
    """Run tokens (1, T) at cache slots [start, start + T) (RoPE positions alike, causal over the cache); the fp32
    next-token logits after each of them (T, V), or after the last only (1, V)."""
    slots = torch.arange(start, start + tokens.size(1), device=tokens.device)
    return model(tokens, input_pos=slots, kv_len=start + tokens.size(1), last_only=last_only)[0].float()


def propose(feed: DraftFeed, seq: Sequence[int], k: int, params: SamplingParams, rng: torch.Generator,
            seen: Tensor | None = None) -> tuple[list[int], Tensor | None]:
    """Catch the draft up with `seq` and draft k tokens from its distributions (`sampling_logits` of `params`; the
    repetition penalty sees `seen` and the drafted tokens); with sampling also those distributions q (k, V)."""
    if k == 0:
        return [], None
    logits = feed.catch_up(seq)  # the last token, and after a fully kept round the last drafted one too
    cur = None if seen is None else seen.clone()
    tokens, probs = [], []
    for j in range(k):
        z = sampling_logits(logits, params, cur)
        if params.greedy:
            d = z.argmax(-1, keepdim=True)
        else:
            probs.append(z.softmax(-1))
            d = draw(probs[-1], rng)
        tokens.append(d)
        if cur is not None:
            cur.scatter_(1, d, True)
        if j < k - 1:
            logits = feed.feed(d)
    return torch.cat(tokens).view(-1).tolist(), torch.cat(probs) if probs else None


def accept_drafted(z: Tensor, drafted: list[int], q: Tensor | None, params: SamplingParams,
                   rng: torch.Generator) -> list[int]:
    """The tokens a round adds, from the model's `sampling_logits` z (k + 1, V) after [last token, d_1..d_k]: the kept
    drafts and one token of the model's own (the module docstring's rules: greedy keeps the drafts that are the
    model's argmax; sampling keeps d_i with probability min(1, p/q) and draws the replacement from max(0, p - q), or
    the bonus token from p_{k+1}). q (k, V): the draft's distributions (sampling only)."""
    k, device = len(drafted), z.device
    if params.greedy:
        best = z.argmax(-1).tolist()
        a = 0
        while a < k and drafted[a] == best[a]:
            a += 1
        return drafted[:a] + [best[a]]
    p = z.softmax(-1)
    a = 0
    if k:
        idx, d = torch.arange(k, device=device), torch.tensor(drafted, device=device)
        u = torch.rand(k, generator=rng, device=device)
        keep = (u * q[idx, d] < p[idx, d]).tolist()  # u < p/q, without dividing
        a = keep.index(False) if False in keep else k
    dist = p[a]
    if a < k:
        residual = (p[a] - q[a]).clamp(min=0)
        dist = residual if float(residual.sum()) > 0 else p[a]
    return drafted[:a] + [int(draw(dist[None], rng))]


class Draft:
    """A draft model for speculative decoding of a model with the same tokenizer: `tokens` drafted per round
    (`--draft_tokens`); with `adaptive` the number grows by one after a round whose drafts were all kept and
    shrinks by one (to at least 1) after a round that kept none. `stats` sums what every call did."""

    def __init__(self, model: LLaMA, tokens: int = 4, adaptive: bool = False) -> None:
        _check_tokens(tokens)
        self.model, self.tokens, self.adaptive = model, tokens, adaptive
        self.stats = DraftStats()

    def check(self, target: LLaMA) -> None:
        """Raise a clear error unless this draft can propose tokens for `target`."""
        if target is self.model:
            raise LLMLabError("--draft: the draft is the model object itself; load it a second time (each model "
                              "keeps its own KV cache)")
        if self.model.config.vocab_size != target.config.vocab_size:
            raise LLMLabError(f"--draft: the draft's vocabulary has {self.model.config.vocab_size} tokens but the "
                              f"model's has {target.config.vocab_size}; a draft must use the model's tokenizer")
        if self.model.device != target.device:
            raise LLMLabError(f"--draft: the draft is on {self.model.device} but the model on {target.device}")

    def generate_tokens(self, target: LLaMA, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        params: SamplingParams, eos: set[int], should_stop: Callable[[int, int], bool] | None,
                        compile: bool) -> Iterator[list[int | None]]:
        """`generate.generate_tokens` by speculative decoding: the prompts one after another, each step a list with
        the new token of the prompt being decoded and None for the others."""
        self.check(target)
        context = self.model.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > context:
            raise LLMLabError(f"prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the draft's "
                              f"context of {context} tokens; lower --max-new-tokens or drop --draft")
        rng = make_generator(params, target.device)  # one stream for all the prompts, as in a batch
        for row, prompt in enumerate(prompts):
            stop = None if should_stop is None else (lambda t, row=row: should_stop(row, t))
            for token in self._decode(target, list(prompt), max_new_tokens, params, eos, stop, compile, rng):
                out: list[int | None] = [None] * len(prompts)
                out[row] = token
                yield out

    @torch.inference_mode()
    def _decode(self, target: LLaMA, prompt: list[int], max_new_tokens: int, params: SamplingParams,
                eos: set[int], stop: Callable[[int], bool] | None, compile: bool,
                rng: torch.Generator) -> Iterator[int]:
        """The new tokens of one prompt (the EOS that ends it is not yielded; a `stop` token is)."""
        draft, device, vocab = self.model, target.device, target.config.vocab_size
        T = len(prompt)
        S = cache_length(target, T, max_new_tokens, compile)
        target.setup_cache(1, S)
        draft.setup_cache(1, min(S, draft.config.max_position_embeddings))
        try:
            seen = None  # tokens of the prompt and the output so far, for the repetition penalty
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
                seen[0, prompt] = True
            ids = torch.tensor([prompt], device=device)
            first = sampling_logits(_forward(target, ids, 0, last_only=True), params, seen)
            new = [int(first.argmax(-1)) if params.greedy else int(draw(first.softmax(-1), rng))]
            _forward(draft, ids, 0, last_only=True)
            feed = DraftFeed(draft, draft.max_cache_len, T, compile)
            seq, produced, k = list(prompt), 0, self.tokens
            while True:
                seq.extend(new)
                if seen is not None:
                    seen[0, new] = True
                for t in new:
                    if t in eos:
                        return
                    produced += 1
                    self.stats.tokens += 1
                    yield t
                    if stop is not None and stop(t):
                        return
                if produced >= max_new_tokens:
                    return
                k_now = min(k, max_new_tokens - produced - 1)  # a round adds up to k_now + 1 tokens
                drafted, q = propose(feed, seq, k_now, params, rng, seen)
                new = self._verify(target, seq, drafted, q, params, rng, seen)
                feed.rewind(min(feed.filled, len(seq) + len(new) - 1))
                if self.adaptive and k_now == k:
                    k = min(k + 1, MAX_DRAFT_TOKENS) if len(new) > k else max(1, k - 1) if len(new) == 1 else k
        finally:
            target.clear_cache()
            draft.clear_cache()

    def _verify(self, target: LLaMA, seq: list[int], drafted: list[int], q: Tensor | None, params: SamplingParams,
                rng: torch.Generator, seen: Tensor | None) -> list[int]:
        """One model forward over [last token, drafted...]; the tokens this round adds (kept drafts + one more)."""
        k, device = len(drafted), target.device
        x = torch.tensor([seq[-1:] + drafted], device=device)
        rows = None
        if seen is not None:  # position i has seen the drafted tokens before it
            rows = seen.expand(k + 1, -1).clone()
            for i, t in enumerate(drafted):
                rows[i + 1:, t] = True
        z = sampling_logits(_forward(target, x, len(seq) - 1), params, rows)  # (k + 1, V)
        out = accept_drafted(z, drafted, q, params, rng)
        if k:
            self.stats.verifies += 1
            self.stats.proposed += k
            self.stats.accepted += len(out) - 1
        return out


def _check_tokens(tokens: int) -> None:
    if not 1 <= tokens <= MAX_DRAFT_TOKENS:
        raise LLMLabError(f"--draft_tokens must be from 1 to {MAX_DRAFT_TOKENS}, got {tokens}")


def check_draft_options(draft: str | Path | None, tokens: int) -> None:
    """Raise a clear error for a --draft that is no file or folder, or --draft-tokens out of range; commands call it
    before loading anything (nothing to check without --draft)."""
    if draft is None:
        return
    _check_tokens(tokens)
    if not Path(draft).exists():
        raise LLMLabError(f"--draft {draft}: no such checkpoint folder or GGUF file")


def load_draft(path: str | Path, model: LLaMA, tokenizer: Tokenizer, tokens: int = 4, adaptive: bool = False, *,
               dtype: str = "auto") -> Draft:
    """The draft checkpoint (folder or GGUF file, `loading.load_for_inference`) on the model's device, checked to
    share the model's tokenizer."""
    from llmlab.loading import load_for_inference

    draft, draft_tokenizer, _ = load_for_inference(path, device=str(model.device), dtype=dtype)
    ours, theirs = tokenizer.backend.get_vocab(), draft_tokenizer.backend.get_vocab()
    if ours != theirs or tokenizer.eos_token != draft_tokenizer.eos_token:
        differ = sorted(set(ours) ^ set(theirs))[:3] or sorted(t for t in ours if ours[t] != theirs.get(t))[:3]
        detail = (f"{len(theirs)} vs {len(ours)} tokens" if len(ours) != len(theirs) else
                  f"eos {draft_tokenizer.eos_token!r} vs {tokenizer.eos_token!r}" if ours == theirs else
                  f"e.g. tokens {differ}")
        raise LLMLabError(f"--draft {path}: its tokenizer differs from the model's ({detail}); the draft must use the "
                          "model's tokenizer (e.g. `llmlab distill --student-layers every-other` of the model)")
    out = Draft(draft, tokens, adaptive)
    out.check(model)
    return out
