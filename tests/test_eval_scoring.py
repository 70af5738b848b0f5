"""Scoring: log-likelihoods equal HF transformers' on the same weights; answer normalisation, GSM8K extraction and
pass@k on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny import tiny_checkpoint

from llmlab.checkpoint import load_checkpoint
from llmlab.errors import LLMLabError
from llmlab.eval.runner import TextModel
from llmlab.eval.scoring import (
    choice_metrics,
    exact_match,
    extract_gsm8k_answer,
    loglikelihoods,
    normalize_answer,
    normalize_number,
    pass_at_k,
    prefix_token,
    rolling_requests,
)
from llmlab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt", std=0.1)
    return folder, TextModel(load_checkpoint(folder), Tokenizer.from_folder(folder), progress=False)


def hf_loglikelihood(hf, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = hf(ids).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)
    target = torch.tensor(cont)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_multiple_choice_loglikelihoods_equal_hf_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    folder, lm = tiny
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    context = "What does the cow say? The cow says"
    choices = [" moo.", " woof woof.", " quack, says the duck that lives by the pond.", " oink"]
    ours = lm.loglikelihood([(context, c) for c in choices])  # one batch, right-padded rows of different lengths
    for choice, (score, greedy) in zip(choices, ours):
        ref_score, ref_greedy = hf_loglikelihood(hf, *map(list, _pair(lm, context, choice)))
        torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-4)
        assert greedy == ref_greedy
    assert len({round(s, 3) for s, _ in ours}) == len(choices)  # the choices really score differently


def _pair(lm: TextModel, ctx: str, cont: str):
    from llmlab.eval.scoring import encode_pair

    return encode_pair(lm.tokenizer, ctx, cont)


def test_batching_does_not_change_scores(tiny):
    _, lm = tiny
    pairs = [("What does the dog say?", " The dog says woof."), ("The owl", " says hoot."), ("A", " cat")]
    batched = lm.loglikelihood(pairs)
    alone = [lm.loglikelihood([p])[0] for p in pairs]
    for (a, _), (b, _) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4)


def test_rolling_loglikelihood_equals_hf_loss_and_windows_score_every_token_once(tiny):
    transformers = pytest.importorskip("transformers")
    folder, lm = tiny
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "What does the pig say? The pig says oink. What does the bee say? The bee says buzz."
    ids = lm.tokenizer.encode(text, add_bos=False)
    prefix = prefix_token(lm.tokenizer)  # BOS
    full = torch.tensor([[prefix, *ids]])
    with torch.no_grad():
        ref = -hf(full, labels=full).loss.item() * len(ids)
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(ref, rel=1e-5)
    windows = rolling_requests(ids, prefix, max_len=7)  # short windows: every token still predicted exactly once
    assert [t for _, cont in windows for t in cont] == ids
    assert all(ctx == [prefix, *ids][:len(ctx)] for ctx, _ in windows)


def test_long_requests_keep_their_end(tiny):
    _, lm = tiny
    ctx_len = lm.model.config.max_position_embeddings
    long_ctx = list(range(5, 50)) * (ctx_len // 40 + 2)
    (score, _), = loglikelihoods(lm.model, [(long_ctx, [7, 8])])
    (cut, _), = loglikelihoods(lm.model, [(long_ctx[-(ctx_len - 1):], [7, 8])])
    assert score == pytest.approx(cut, abs=1e-4)


def test_empty_requests_are_refused(tiny):
    _, lm = tiny
    with pytest.raises(LLMLabError, match="continuation is empty"):
        loglikelihoods(lm.model, [([1, 2], [])])
    with pytest.raises(LLMLabError, match="context is empty"):
        loglikelihoods(lm.model, [([], [1])])


def test_choice_metrics_acc_and_length_normalised_acc():
    # choice 1 has the highest total, choice 0 the highest per character
    assert choice_metrics([-4.0, -3.0], [10, 2], gold=0) == {"acc": 0.0, "acc_norm": 1.0}
    assert choice_metrics([-4.0, -3.0], [10, 2], gold=1) == {"acc": 1.0, "acc_norm": 0.0}


@pytest.mark.parametrize(("prediction", "reference", "match"), [
    ("The Eiffel Tower", "eiffel tower", 1.0),
    ("  Paris!  ", "paris", 1.0),
    ("an apple", "Apple", 1.0),
    ("December 14, 1972", "14 December 1972", 0.0),
    ("Bobby   Scott.", ["Bob Russell", "Bobby Scott"], 1.0),
    ("theatre", "the atre", 0.0),  # 'the' is removed only as a word
])
def test_exact_match_after_normalisation(prediction, reference, match):
    assert exact_match(prediction, reference) == match


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown fox's tail.") == "quick brown foxs tail"


@pytest.mark.parametrize(("text", "answer"), [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("She pays $1,200.00 in total.\n#### $1,200", "1200"),
    ("#### -3.50", "-3.5"),
    ("So the answer is 18 eggs.", "18"),  # no marker: the last number
    ("First 3, then 4, so 7.", "7"),
    ("I do not know.", None),
    ("The answer: ####12 and then 5", "12"),  # the marked number wins over a later one
    ("#### $18.00", "18"),
    ("It costs 2.5 dollars", "2.5"),
])
def test_gsm8k_answer_extraction(text, answer):
    assert extract_gsm8k_answer(text) == answer


def test_normalize_number():
    assert normalize_number("1,000") == "1000"
    assert normalize_number("5.") == "5"
    assert normalize_number("0.25") == "0.25"


def test_pass_at_k_matches_the_combinatorial_formula():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 2), (200, 13, 100)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(LLMLabError, match="pass@5 needs at least 5 samples"):
        pass_at_k(2, 1, 5)
