"""`llmlab serve --draft`: the serving engine decodes a request that runs alone speculatively (`llmlab.serve.draft`).

Greedy text equals the text without a draft (whatever the draft proposes), also when a second request comes and
goes mid-generation; stop strings, EOS, max_tokens and the cache's end are exact; requests that need something per
token (log-probabilities, a grammar, an adapter) bypass the draft; a seed reproduces a sample; the CLI's errors."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
from _serve import alone, make_adapter, one_thread  # noqa: F401  (one_thread: a fixture, used through pytestmark)
from _tiny import tiny_checkpoint

from llmlab.checkpoint import load_checkpoint, save_checkpoint
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.generate import SamplingParams, generate
from llmlab.serve import load_engine
from llmlab.serve.engine import Engine
from llmlab.serve.request import GenerationRequest
from llmlab.speculative import Draft
from llmlab.tokenizer import Tokenizer, train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What does the cat say?", "The dog", "What does the owl say? The owl says"]


def noisy_copy(ckpt: Path, folder: Path, scale: float) -> Path:
    """The model with noise on every weight: a draft that is right part of the time."""
    model = load_checkpoint(ckpt)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return save_checkpoint(model, folder, tokenizer=Tokenizer.from_folder(ckpt))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_draft")
    target = tiny_checkpoint(root / "target", seed=0, std=0.1)
    other_tok = train_bpe_tokenizer(["completely different text for another vocabulary"] * 20, 300,
                                    eos_token="<|im_end|>")
    return {"target": target, "other": tiny_checkpoint(root / "other", seed=1, std=0.1),
            "noisy": noisy_copy(target, root / "noisy", 0.01), "adapter": make_adapter(target, root / "alpha", 1),
            "foreign_tokenizer": save_checkpoint(load_checkpoint(target), root / "foreign", tokenizer=other_tok)}


@pytest.fixture(scope="module")
def engines(ckpts):
    """An engine per draft: another random model, a noisy copy of the model (some drafts kept), the model itself
    loaded a second time (every draft kept); the first also serves a LoRA adapter."""
    out = {}
    for name in ("other", "noisy", "target"):
        adapters = {"alpha": ckpts["adapter"]} if name == "other" else None
        out[name], _ = load_engine(ckpts["target"], adapters, max_batch=4, max_seq_len=96, dtype="float32",
                                   draft=ckpts[name])
    yield out
    for eng in out.values():
        eng.close()


def counters(eng: Engine) -> tuple[int, int]:
    return eng.stats["drafted"], eng.stats["kept"]


# -- greedy: the text without a draft ----------------------------------------------------------------
@pytest.mark.parametrize("draft", ["other", "noisy", "target"])
def test_greedy_text_equals_the_text_without_a_draft(ckpts, engines, draft):
    eng = engines[draft]
    before = counters(eng)
    for prompt in PROMPTS:  # one after another: each runs alone, and the draft's cache changes hands
        ids = eng.tokenizer.encode(prompt)
        assert eng.generate(GenerationRequest(ids, 30), 60) == [alone(ckpts["target"], ids, 30)]
    drafted, kept = (a - b for a, b in zip(counters(eng), before))
    assert drafted > 0
    if draft == "target":
        assert kept == drafted
    elif draft == "noisy":
        assert 0 < kept < drafted
    else:
        assert kept < drafted // 4


def test_a_request_arriving_mid_generation_batches_then_speculation_resumes(ckpts, engines):
    eng, tok = engines["noisy"], engines["noisy"].tokenizer
    a_ids, b_ids = tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])
    texts: dict[str, list[str]] = {"a": [], "b": []}
    done = {"a": threading.Event(), "b": threading.Event()}
    paused, resume = threading.Event(), threading.Event()
    marks: dict[str, tuple] = {}

    def sink(name):
        def on(ev):
            if ev.kind in ("delta", "finish"):
                texts[name].append(ev.text)
            if name == "a" and ev.kind == "delta" and not paused.is_set():  # hold the engine after A's first token
                paused.set()
                resume.wait(30)
            if name == "b" and ev.kind == "done":
                marks["b_done"] = (counters(eng), eng.stats["steps"])
            if ev.kind in ("done", "error"):
                done[name].set()
        return on

    eng.submit(GenerationRequest(a_ids, 70, sink=sink("a")))
    assert paused.wait(30)
    marks["b_in"] = counters(eng)
    eng.submit(GenerationRequest(b_ids, 12, sink=sink("b")))
    resume.set()
    assert done["a"].wait(60) and done["b"].wait(60)
    assert "".join(texts["a"]) == alone(ckpts["target"], a_ids, 70)[0]
    assert "".join(texts["b"]) == alone(ckpts["target"], b_ids, 12)[0]
    # from B's arrival to its end the steps were batched (nothing drafted); after it A's rounds resumed, the draft
    # first catching up with the tokens A got in the batched steps
    (drafted_b, _), steps_b = marks["b_done"]
    assert drafted_b == marks["b_in"][0]
    assert counters(eng)[0] > drafted_b
    assert eng.stats["steps"] - steps_b < 70 - 12  # fewer forwards than A's tokens after B: some drafts kept


# -- exact ends ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 9])
def test_max_tokens_is_exact(ckpts, engines, n):
    ids = engines["target"].tokenizer.encode(PROMPTS[2])
    want = alone(ckpts["target"], ids, n)
    for name in ("target", "noisy"):
        req = GenerationRequest(ids, n)
        assert engines[name].generate(req, 60) == [want] and req.completion_tokens == n


def test_stop_strings_are_exact(ckpts, engines):
    tok = engines["target"].tokenizer
    ids = tok.encode(PROMPTS[2])
    plain = alone(ckpts["target"], ids, 30)[0]
    for stop in (plain[5:8], plain[len(plain) // 2:][:2]):
        want = alone(ckpts["target"], ids, 30, stop=[stop])
        assert want[1] == "stop"
        for name in ("target", "noisy"):
            req = GenerationRequest(ids, 30, stop=[stop])
            assert engines[name].generate(req, 60) == [want]


def test_eos_inside_a_kept_run_ends_the_output(ckpts):
    model, tok = load_checkpoint(ckpts["target"]).eval(), Tokenizer.from_folder(ckpts["target"])
    ids = tok.encode(PROMPTS[0])
    plain = generate(model, tok, [ids], 20, eos_ids=[])[0].token_ids
    eos = plain[7]  # within a round of kept drafts: the output ends before it
    want = generate(model, tok, [ids], 20, eos_ids=[eos])[0]
    assert len(want.token_ids) == plain.index(eos) and want.finish_reason == "stop"
    eng = Engine(model, tok, [eos], max_batch=2, max_seq_len=96, draft=Draft(load_checkpoint(ckpts["target"]), 4))
    try:
        assert eng.generate(GenerationRequest(ids, 20), 60) == [(want.text, "stop")]
        assert eng.stats["kept"] == eng.stats["drafted"] > 0
    finally:
        eng.close()


def test_the_cache_end_is_exact(ckpts, engines):
    tok = engines["target"].tokenizer
    ids = (tok.encode(" ".join(PROMPTS)) * 10)[:90]  # 96 slots: 6 more tokens fit, and the one their logits give
    want = alone(ckpts["target"], ids, 7)
    for name in ("target", "noisy"):
        assert engines[name].generate(GenerationRequest(ids, 20), 60) == [(want[0], "length")]


# -- what bypasses the draft ---------------------------------------------------------------------------
def test_logprobs_grammar_and_adapter_requests_bypass_the_draft(ckpts, engines):
    eng = engines["other"]
    ids = eng.tokenizer.encode(PROMPTS[0])

    def no_low_ids():
        return lambda generated, logits: logits.masked_fill(torch.arange(logits.numel()) < 100, float("-inf"))

    before = counters(eng)
    assert eng.generate(GenerationRequest(ids, 12, logprobs=2), 60) == [alone(ckpts["target"], ids, 12)]
    assert eng.generate(GenerationRequest(ids, 12, adapter="alpha"), 60) == \
        [alone(ckpts["target"], ids, 12, adapter=ckpts["adapter"])]
    eng.generate(GenerationRequest(ids, 12, logits_processor_factory=no_low_ids), 60)
    assert eng.generate(GenerationRequest(ids, 12, n=2), 60) == [alone(ckpts["target"], ids, 12)] * 2
    assert counters(eng) == before


# -- sampling ------------------------------------------------------------------------------------------
def test_a_seed_reproduces_a_sample_with_the_draft(engines):
    eng = engines["noisy"]
    ids = eng.tokenizer.encode(PROMPTS[1])
    before = counters(eng)[0]

    def sample(seed):
        return eng.generate(GenerationRequest(ids, 24, SamplingParams(temperature=1.0, top_k=40, seed=seed)), 60)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first  # (a 300-token vocabulary at temperature 1: two seeds all but never agree on 24)
    assert counters(eng)[0] > before


# -- the engine and the command line -------------------------------------------------------------------
def test_cli_serve_with_a_draft_starts_and_says_so(ckpts, capsys, monkeypatch):
    target, draft = ckpts["target"], ckpts["noisy"]
    seen = {}

    def fake_run(app, host, port, log_level):  # instead of listening: ask the engine behind the app once
        seen["app"] = app

    monkeypatch.setattr("uvicorn.run", fake_run)
    assert main(["serve", str(target), "--draft", str(draft), "--draft-tokens", "3", "--max-seq-len", "64"]) == 0
    err = capsys.readouterr().err
    assert f"draft {draft}, 3 tokens a round" in err and "app" in seen


@pytest.mark.parametrize("which,extra,message", [
    ("missing", [], "--draft .*nowhere: no such checkpoint folder or GGUF file"),
    ("other", [], "--draft .*foreign: its tokenizer differs from the model's"),
    ("draft", ["--draft-tokens", "17"], "--draft_tokens must be from 1 to 16, got 17"),
])
def test_cli_serve_draft_errors(ckpts, capsys, monkeypatch, which, extra, message):
    target, draft, other = ckpts["target"], ckpts["noisy"], ckpts["foreign_tokenizer"]
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server must not start"))
    path = {"missing": target.parent / "nowhere", "other": other, "draft": draft}[which]
    assert main(["serve", str(target), "--draft", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a bad option stops it before loading the model
    assert len(err) == (2 if which == "other" else 1) and err[-1].startswith("llmlab: error: ")
    assert re.search(message, err[-1]), err


def test_engine_refuses_the_model_as_its_own_draft(ckpts):
    model = load_checkpoint(ckpts["target"]).eval()
    with pytest.raises(LLMLabError, match="model object itself"):
        Engine(model, Tokenizer.from_folder(ckpts["target"]), [], max_batch=1, max_seq_len=32, start=False,
               draft=Draft(model))
