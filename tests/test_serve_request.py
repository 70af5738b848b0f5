"""What a serving request is and gets back (`llmlab.serve.request`): usage counts and log-probability entries; the
engine's and the API's tests exercise the rest."""

from __future__ import annotations

import math

import torch

from llmlab.eval.scoring import token_logprobs
from llmlab.serve.request import GenerationRequest, TokenLogprob, entries


def test_usage_counts_prompt_and_completion_tokens():
    req = GenerationRequest([5, 6, 7], max_tokens=4)
    req.completion_tokens = 2
    assert req.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_entries_pair_each_token_with_its_logprob_and_alternatives():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    got = entries(token_logprobs(logits, torch.tensor([1, 2]), top=2), [1, 2])
    assert [e.token for e in got] == [1, 2] and all(isinstance(e, TokenLogprob) for e in got)
    assert math.isclose(got[0].logprob, math.log(0.2), rel_tol=1e-5)
    assert [t for t, _ in got[0].top] == [0, 1] and [t for t, _ in got[1].top] == [2, 1]  # most likely first
    assert math.isclose(got[1].top[0][1], math.log(0.6), rel_tol=1e-5)


def test_shared_prefix_counts_the_leading_tokens_two_sequences_share():
    from llmlab.serve.request import shared_prefix

    assert shared_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert shared_prefix([1, 2], [1, 2, 3]) == 2 and shared_prefix([1, 2, 3], [1, 2]) == 2
    assert shared_prefix([], [1]) == 0 and shared_prefix([5], [6]) == 0
