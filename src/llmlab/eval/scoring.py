"""Scores of a model's text: log-likelihoods of continuations (batched), rolling log-likelihood for perplexity, and the
answer metrics (exact match after normalisation, GSM8K answer extraction, unbiased pass@k).

Log-likelihoods are computed without a KV cache: each (context, continuation) pair is one right-padded row, and since
attention is causal the pads after a row's last token never reach its scored positions. Rows are sorted by length so
a batch holds rows of similar length (less padding), the way lm-evaluation-harness batches them.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.model import LLaMA
from llmlab.tokenizer import Tokenizer


# -- tokenisation of requests ------------------------------------------------------------------------
def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, split where the joined text's tokens say.

    BPE tokenizers merge a space with the word after it, so a context ending in spaces gives them to the
    continuation; the continuation's ids are then the ids of `context + continuation` past the context's own.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    if whole[:len(ctx)] != ctx:  # the join merged across the boundary: fall back to separate encodings
        return ctx, tokenizer.encode(continuation, add_bos=False)
    return ctx, whole[len(ctx):]


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token that stands before a text scored on its own (BOS, else EOS), as in lm-evaluation-harness."""
    for tid in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
        if tid is not None:
            return tid
    raise LLMLabError("the tokenizer has no BOS, EOS or pad token to condition a text scored on its own")


# -- log-likelihoods -----------------------------------------------------------------------------------
class TokenScores(NamedTuple):
    """Per position: log p of the target token, whether it is the argmax, and the `top` most likely tokens."""

    logprobs: Tensor  # (n,)
    greedy: Tensor  # (n,) bool
    top_logprobs: Tensor  # (n, top), most likely first
    top_ids: Tensor  # (n, top)


def token_logprobs(logits: Tensor, targets: Tensor, top: int = 0) -> TokenScores:
    """Score `targets` (n,) under the next-token `logits` (n, V): an fp32 log-softmax of the model's own logits (no
    temperature or other sampling filter). `llmlab evaluate`'s log-likelihoods and the server's `logprobs` / `echo`
    both come from here, so a score is the same number whichever way it is asked for."""
    logprobs = logits.float().log_softmax(-1)  # (n, V)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0]
    greedy = logprobs.argmax(-1) == targets
    values, ids = logprobs.topk(min(top, logprobs.size(-1)), dim=-1)  # top 0: (n, 0)
    return TokenScores(chosen, greedy, values, ids)


@torch.inference_mode()
def loglikelihoods(model: LLaMA, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                   max_batch_tokens: int = 4096,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context), continuation is greedy).

    "greedy" means every continuation token is the argmax at its position. Requests longer than the model's
    context keep their last max_position_embeddings + 1 tokens. Batches hold at most `batch_size` rows and about
    `max_batch_tokens` padded tokens (the logits of a batch take rows x length x vocabulary floats).
    `progress(n)` is called with the number of requests finished after each batch.
    """
    max_len = model.config.max_position_embeddings
    rows: list[tuple[list[int], list[int]]] = []  # (input ids, the targets its last positions predict)
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise LLMLabError(f"request {i}: the continuation is empty (0 tokens); nothing to score")
        if not ctx:
            raise LLMLabError(f"request {i}: the context is empty; score a text on its own after a prefix token "
                              "(see prefix_token)")
        seq = (list(ctx) + list(cont))[-(max_len + 1):]
        rows.append((seq[:-1], seq[-min(len(cont), len(seq) - 1):]))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    device = model.device
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    start = 0
    while start < len(order):
        longest = len(rows[order[start]][0])
        n = max(1, min(batch_size, max_batch_tokens // max(longest, 1)))
        chunk = order[start:start + n]
        batch = torch.zeros(len(chunk), longest, dtype=torch.long, device=device)
        for r, i in enumerate(chunk):
            ids = rows[i][0]
            batch[r, :len(ids)] = torch.tensor(ids, device=device)
        logits = model(batch)  # (B, T, V)
        for r, i in enumerate(chunk):
            ids, targets = rows[i]
            scores = token_logprobs(logits[r, len(ids) - len(targets):len(ids)], torch.tensor(targets, device=device))
            out[i] = (scores.logprobs.sum().item(), bool(scores.greedy.all().item()))
        start += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return out  # type: ignore[return-value]  # every slot is filled


def rolling_requests(ids: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Cut a whole text (token ids) into windows that together score every token once.

    The text is preceded by `prefix`; each window scores up to `max_len` tokens and is conditioned on the text
    before it (cut to the model's context by `loglikelihoods`).
    """
    full = [prefix, *ids]
    return [(full[:s], full[s:s + max_len]) for s in range(1, len(full), max_len)]


def rolling_loglikelihood(model: LLaMA, texts_ids: Sequence[Sequence[int]], prefix: int, batch_size: int = 8,
                          max_batch_tokens: int = 4096,
                          progress: Callable[[int], None] | None = None) -> list[float]:
    """Total log-likelihood of each whole text (token ids), every token scored once (for perplexity)."""
    max_len = model.config.max_position_embeddings
    owners, requests = [], []
    for i, ids in enumerate(texts_ids):
        for req in rolling_requests(ids, prefix, max_len):
            owners.append(i)
            requests.append(req)
    totals = [0.0] * len(texts_ids)
    for owner, (score, _) in zip(owners, loglikelihoods(model, requests, batch_size, max_batch_tokens, progress)):
        totals[owner] += score
    return totals


def perplexity_metrics(total_logprob: float, n_tokens: int, n_words: int, n_bytes: int) -> dict[str, float]:
    """Token- and word-level perplexity and bits per byte from a summed log-likelihood (natural log)."""
    nll = -total_logprob
    return {"token_perplexity": math.exp(nll / max(n_tokens, 1)), "word_perplexity": math.exp(nll / max(n_words, 1)),
            "bits_per_byte": nll / max(n_bytes, 1) / math.log(2)}


# -- multiple choice -----------------------------------------------------------------------------------
def choice_metrics(scores: Sequence[float], lengths: Sequence[int], gold: int) -> dict[str, float]:
    """acc: the most likely choice is the gold one; acc_norm: the same with each log-likelihood divided by the
    choice's length in characters (so long answers are not penalised for having more tokens)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    best_norm = max(range(len(scores)), key=lambda i: scores[i] / max(lengths[i], 1))
    return {"acc": float(best == gold), "acc_norm": float(best_norm == gold)}


# -- answers -------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in refs))


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def normalize_number(text: str) -> str:
    """'$1,234.00' -> '1234', '-3.50' -> '-3.5': no currency sign, thousands separators or trailing zeros."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    if value.is_integer():
        return str(int(value))
    return repr(value)


def extract_gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: the number after `####`, else the last number in the text.

    Returns it normalised (`normalize_number`), or None when the text holds no number.
    """
    marked = re.search(r"####\s*(" + _NUMBER + ")", text)
    if marked:
        return normalize_number(marked.group(1))
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def first_line(text: str) -> str:
    """The first non-empty line of a generated answer, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "none": lambda text: text.strip(),
    "first_line": first_line,
    "gsm8k": extract_gsm8k_answer,
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for n samples of which c pass."""
    if k > n:
        raise LLMLabError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    # the product form avoids the huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

