"""Speculative decoding in the serving engine (`llmlab serve --draft`): a lone request decodes several tokens a step.

Continuous batching already keeps the machine busy when many requests run; one request alone decodes one token per
model forward, which on a CPU is bound by reading the weights. So while exactly one sequence runs (one request,
`n` = 1), nothing waits, and that request needs nothing per token that a round cannot give (no logits processor, no
log-probabilities, no LoRA adapter), the engine's step is a speculative round (`llmlab.speculative`'s pieces, the
same rule as `llmlab generate --draft`):

- the draft catches up with the row's prompt + output on its own batch-1 KV cache (after batched steps it sat out, in
  one forward; when the lone row is another request than last time it keeps only the prefix both share, e.g. a
  chat template's system part) and proposes k tokens (`speculative.propose`);
- the model runs [last token, d_1..d_k] in one forward at that row's own slots of the engine's cache (row 0: the
  only running row), so only that row is written; slots past the accepted prefix hold stale keys that the per-row
  causal mask hides until later steps overwrite them;
- `speculative.accept_drafted` keeps the drafts (greedy: token for token the model's greedy output; sampling: the
  accept/reject rule, drawn from the request's own generator, so a seed reproduces a sample with the draft on,
  though not the same sample as without it);
- the engine passes the kept tokens and the model's own next one through its normal per-token acceptance, one by one,
  so EOS, stop strings, max_tokens and streaming events are exactly as without a draft.

k shrinks near the end of the request's max_tokens and of the caches, and a step that cannot draft at least one token
is an ordinary one. The draft's decode step runs eagerly: the compiled step is shared per device and trusted to skip
its guards, which a second model must not share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmlab.generate import sampling_logits
from llmlab.model import LLaMA
from llmlab.serve.request import shared_prefix
from llmlab.speculative import Draft, DraftFeed, accept_drafted, propose

if TYPE_CHECKING:
    from llmlab.serve.engine import _Row
    from llmlab.serve.request import GenerationRequest


class EngineDraft:
    """The draft model's side of the engine: its cache (up to `max_seq_len` slots, at most the draft's context),
    whose tokens belong to one request at a time, and the rounds. `stats` is the engine's counter dict: `drafted`
    tokens proposed, `kept` of them accepted."""

    def __init__(self, draft: Draft, target: LLaMA, max_seq_len: int, stats: dict[str, int]) -> None:
        draft.check(target)
        model = draft.model.eval()
        self.draft, self.stats = draft, stats
        self.length = min(max_seq_len, model.config.max_position_embeddings)
        model.setup_cache(1, self.length)
        self.feed = DraftFeed(model, self.length, 0, compile=False)
        self.owner: int | None = None  # the id of the request whose tokens the draft's cache holds
        self.held: list[int] = []  # those tokens; the first `feed.filled` are in the cache
        stats.setdefault("drafted", 0)
        stats.setdefault("kept", 0)

    @staticmethod
    def eligible(req: GenerationRequest) -> bool:
        """Whether `req`'s tokens may come from rounds: one choice, nothing per token a round cannot give."""
        return (req.n == 1 and req.logits_processor_factory is None and req.logprobs is None
                and req.adapter is None)

    def round(self, model: LLaMA, row: _Row, max_seq_len: int) -> list[int]:
        """One round for the lone running `row` (its output so far `row.ids`, the last of them to be fed at cache
        slot `row.pos` of cache row 0): the tokens it adds, kept drafts + one of the model's; [] when no token can be
        drafted (the engine then runs an ordinary step)."""
        req, ids, pos = row.req, row.ids, row.pos
        # a round adds up to k + 1 tokens: within max_tokens and the model's cache; the draft writes k - 1 past `pos`
        k = min(self.draft.tokens, req.max_tokens - len(ids) - 1, max_seq_len - pos - 1, self.length - pos)
        if k < 1 or not self.eligible(req):
            return []
        seq = req.prompt_ids + ids
        if req.id != self.owner:  # another request: keep the prefix it shares with the tokens in the draft's cache
            self.feed.rewind(shared_prefix(self.held[:min(self.feed.filled, len(seq) - 1)], seq))
        self.owner, self.held = None, []  # until the round ends: a round that raised leaves nothing to build on
        params, rng = req.sampling, req.generator
        drafted, q = propose(self.feed, seq, k, params, rng)
        device = model.device
        x = torch.tensor([[seq[-1], *drafted]], device=device)  # (1, k + 1)
        slots = torch.arange(pos, pos + k + 1, device=device)[None]  # (1, k + 1): row 0's own slots, no other row's
        logits = model(x, input_pos=slots, kv_len=pos + k + 1)[0].float()  # (k + 1, V)
        out = accept_drafted(sampling_logits(logits, params), drafted, q, params, rng)
        self.feed.rewind(min(self.feed.filled, len(seq) + len(out) - 1))
        self.owner, self.held = req.id, seq + out
        self.stats["drafted"] += k
        self.stats["kept"] += len(out) - 1
        return out

    def close(self) -> None:
        """Free the draft's cache."""
        self.draft.model.clear_cache()
        self.owner, self.held = None, []
